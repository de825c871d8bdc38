"""VAE override: another first stage's weights in place of the checkpoint's (A1111's "SD VAE" setting).

Accepted: a standalone VAE safetensors in the original layout (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, with or without ``first_stage_model.``; ``loss.*`` and ``model_ema.*`` keys ignored), the same
in diffusers' names, or a diffusers ``vae/`` folder (or a model folder that has one). The architecture must be the
checkpoint's own (same config): a VAE for another family is refused with the keys that differ.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from latentgen.errors import CheckpointError

SUFFIX = ".vae.safetensors"  # A1111: <checkpoint stem>.vae.safetensors beside the checkpoint is used automatically


def beside(checkpoint: str | Path) -> Path | None:
    """The VAE file A1111 would pick up automatically for a checkpoint file, if there is one."""
    p = Path(checkpoint)
    cand = p.with_name(p.name.removesuffix(p.suffix) + SUFFIX) if p.is_file() else None
    return cand if cand is not None and cand.is_file() else None


def read_vae(path: str | Path) -> dict[str, torch.Tensor]:
    """First-stage weights in the original names, without prefix."""
    from latentgen.loading.diffusers import _diffusers_vae_to_original, _first_existing, _read_json
    from latentgen.loading.safetensors import read_safetensors

    p = Path(path)
    if p.is_dir():
        folder = p / "vae" if (p / "vae").is_dir() else p
        f = _first_existing(folder, ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"])
        if f is None:
            raise CheckpointError(f"--vae {p}: no diffusion_pytorch_model.safetensors in {folder}")
        cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        tensors = read_safetensors(f)[0]
        return _diffusers_vae_to_original(tensors, _levels(tensors, cfg))
    tensors = read_safetensors(p)[0]
    if any(k.startswith("first_stage_model.") for k in tensors):
        tensors = {k[len("first_stage_model.") :]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        return _diffusers_vae_to_original(tensors, _levels(tensors, {}))
    return tensors


def _levels(tensors: dict, cfg: dict) -> int:
    return len(cfg.get("block_out_channels", [])) or 1 + max(
        int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.down_blocks\.(\d+)", k))
    )


def override_vae(bundle, path: str | Path) -> None:
    """Replace ``bundle.first_stage`` by the VAE at ``path`` (same config; device, dtype and conv packing kept)."""
    from latentgen.autoencoder import build_autoencoder
    from latentgen.denoiser import network_dtype
    from latentgen.loading.bundle import empty_weights
    from latentgen.loading.layout import load_strict
    from latentgen.loading.weights import PackedConv2d, PackedLinear, prepack

    old = bundle.first_stage
    sd = read_vae(path)
    with empty_weights():
        module = build_autoencoder(bundle.config.first_stage)
    load_strict(module, sd, what=f"VAE for {bundle.config.name}", source=str(path))
    device, dtype = next(old.parameters()).device, network_dtype(old)
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if any(isinstance(m, (PackedConv2d, PackedLinear)) for m in old.modules()):
        prepack(module)
    bundle.first_stage = module
