"""SDXL checkpoints: recognised from keys and shapes alone (no --config), and diffusers' SDXL text encoders
mapped into the original single-file names.

An SDXL single file (Stability's `sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`, their
fine-tunes and the 9-channel inpainting UNet) holds `model.diffusion_model.*` (a UNet with an MLP `label_emb`
on the "vector"), `first_stage_model.*` (the SDXL VAE, scale factor 0.13025) and `conditioner.embedders.*`
(base: CLIP ViT-L at .0, OpenCLIP bigG at .1; refiner: bigG at .0), and maybe sgm's `denoiser.sigmas` buffer,
which is ignored. No schedule buffers: the schedule is sgm's `LegacyDDPMDiscretization` (scaled linear
0.00085..0.012, 1000 steps), as the DDPM defaults.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from latentgen.config import ModelConfig
from latentgen.errors import CheckpointError
from latentgen.text.clip import clip_to_openclip

SDXL_COND_PREFIX = "conditioner."
SDXL_IGNORED_KEYS = {"denoiser.sigmas"}  # sgm DiscreteDenoiser's σ table: recomputed from the schedule
SDXL_SCALE_FACTOR = 0.13025
SDXL_RECOMMENDED = {"width": 1024, "height": 1024, "cfg": 5.0}  # diffusers' StableDiffusionXLPipeline defaults
VARIANTS = ("sdxl-base", "sdxl-refiner", "sdxl-inpaint")


def is_sdxl(tensors) -> bool:
    return any(k.startswith(SDXL_COND_PREFIX + "embedders.") for k in tensors)


def variant(cfg: ModelConfig) -> str | None:
    """sdxl-base / sdxl-refiner / sdxl-inpaint, None for other families."""
    if cfg.family != "sdxl":
        return None
    if cfg.cond.refiner:
        return "sdxl-refiner"
    return "sdxl-inpaint" if cfg.concat == "inpaint" else "sdxl-base"


def read_and_guessed(cfg: ModelConfig) -> str:
    """One line for `latentgen info`: what of an SDXL model the weights showed and what is convention."""
    c = cfg.cond
    texts = ("CLIP-L + " if c.clip_l else "") + "bigG"
    read = f"{texts} text encoders, vector {cfg.unet.adm_in_channels}, UNet in {cfg.unet.in_channels} channels"
    return f"{variant(cfg)}: read {read}; assumed 64 channels per head, eps prediction, scaled-linear schedule"


def sdxl_config(unet_sd: dict, fs_sd: dict, cond_sd: dict, path: str, hints: dict | None = None) -> ModelConfig:
    """The ModelConfig of an SDXL checkpoint from its weights (prefixes removed). Heads: 64 channels each (all
    SDXL UNets and both text towers); the rest shows in the shapes."""
    from latentgen.autoencoder import AutoencoderConfig
    from latentgen.text.sdxl import SDXLCondConfig
    from latentgen.unet import UNetConfig

    try:
        cond = SDXLCondConfig.from_state_dict(cond_sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    unet = UNetConfig.from_state_dict(unet_sd, family_hint="sdxl")
    for key, value in ((hints or {}).get("te_heads") or {}).items():  # a diffusers folder's text configs
        if getattr(cond, key) is not None:
            cond = replace(cond, **{key: replace(getattr(cond, key), num_attention_heads=value)})
    fs = AutoencoderConfig.from_state_dict(fs_sd)
    if unet.num_classes != "sequential" or unet.adm_in_channels != cond.adm_in_channels:
        raise CheckpointError(
            f"{path}: the UNet's label_emb takes {unet.adm_in_channels} channels but the "
            f"{'refiner' if cond.refiner else 'base'} conditioner gives {cond.adm_in_channels} "
            f"(pooled {cond.projection_dim} + size embeddings); the file mixes parts of different models"
        )
    if unet.context_dim != cond.context_dim:
        raise CheckpointError(
            f"{path}: the UNet attends to a {unet.context_dim}-wide context, the text encoders give "
            f"{cond.context_dim}; the file mixes parts of different models"
        )
    lat = fs.embed_dim
    extra = unet.in_channels - lat
    if extra not in (0, lat + 1):
        raise CheckpointError(
            f"{path}: SDXL UNet takes {unet.in_channels} channels; the first stage gives {lat} (inpainting: "
            f"{2 * lat + 1})"
        )
    concat = "inpaint" if extra else None
    hints = hints or {}
    prediction = (hints.get("scheduler") or {}).get("prediction_type")  # a diffusers folder says; files do not
    scale = (hints.get("vae") or {}).get("scaling_factor", SDXL_SCALE_FACTOR)
    return ModelConfig(
        unet=unet,
        first_stage=fs,
        cond=cond,
        family="sdxl",
        conditioning_key="hybrid" if concat else "crossattn",
        concat=concat,
        prediction="v" if prediction == "v_prediction" else "eps",
        prediction_source="config" if prediction else "default",
        scale_factor=float(scale),
        vae_force_upcast=True,
        recommended=dict(SDXL_RECOMMENDED),
    )


def diffusers_text_to_original(text_encoder: dict | None, text_encoder_2: dict) -> dict[str, torch.Tensor]:
    """diffusers' `text_encoder/` (CLIPTextModel) and `text_encoder_2/` (CLIPTextModelWithProjection) weights →
    `conditioner.embedders.*` of the original file (CLIP-L at .0 and bigG at .1; bigG alone at .0 without a
    first encoder, as the refiner). transformers >= 5 stores CLIPTextModel without the `text_model.` nesting."""
    out = {}
    if text_encoder is not None:
        for k, v in text_encoder.items():
            k = k if k.startswith("text_model.") else "text_model." + k
            out[f"{SDXL_COND_PREFIX}embedders.0.transformer.{k}"] = v
    g = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_encoder_2.items()}
    proj = g.pop("text_model.text_projection.weight", None)
    if proj is None:
        raise CheckpointError("diffusers text_encoder_2: text_projection.weight is missing (SDXL pools with it)")
    g = {"transformer." + k: v for k, v in g.items() if not k.endswith("position_ids")}
    idx = 0 if text_encoder is None else 1
    bigg = {**clip_to_openclip(g), "model.text_projection": proj.t().contiguous()}
    out.update({f"{SDXL_COND_PREFIX}embedders.{idx}.{k}": v for k, v in bigg.items()})
    return out
