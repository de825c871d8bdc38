"""diffusers' SDXL components built from the tiny original-code fixture (`../shared/fixtures/sdxl`) with
diffusers' own single-file conversion, for the SDXL tests. diffusers picks SDXL's `text_time` addition
embedding only for the real context widths (2048 / 1280), so the tiny model's config says it explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SDXL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sdxl"
BASE = SDXL_DIR / "sdxl-base-tiny.safetensors"


def base_config() -> dict:
    return json.loads((SDXL_DIR / "sdxl-base-tiny.json").read_text())


def sgm_config(cfg: dict | None = None) -> dict:
    return (cfg or base_config())["sgm_config"]


def diffusers_unet(ckpt: dict, original_config: dict):
    """UNet2DConditionModel from an original SDXL state dict (`model.diffusion_model.*`)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return unet.eval()


def fixture_ckpt() -> dict[str, torch.Tensor]:
    return load_file(str(BASE))
