"""Checkpoints: safetensors only, format and architecture detection, strict loading, saving.

Three on-disk formats load by path:
- original single-file (CompVis / Stability): `model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.*`, schedule buffers (`betas`, `alphas_cumprod`, …), optionally `model_ema.*`;
- diffusers folders (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): mapped one way into
  the original names, then treated like an original file;
- latentgen's own files: the original layout plus the full ModelConfig as JSON in the metadata.
Everything not in a config is detected from key names and tensor shapes; what cannot be told from the
file (SD 2.x 512-eps vs 768-v) is reported as a guess.
"""
