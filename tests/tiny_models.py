"""Tiny latentgen-format checkpoints (config in the safetensors metadata) for CLI and pipeline tests.

`sd1_from_fixture` re-saves the sd1-tiny fixture made by the original code; `random_model(kind)` builds a
model of each family the core loads (class-conditional, unconditional, LDM-SR, 9-channel inpainting,
SD1-like) from the typed configs with EVERY weight randomised (helpers_models.randomize_).
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_models import randomize_

from latentgen.autoencoder import AutoencoderConfig
from latentgen.config import ModelConfig
from latentgen.loading.bundle import build_modules, load_model, save_model
from latentgen.text.config import CondConfig
from latentgen.unet import UNetConfig

LATENT = 4
KINDS = ("sd1", "class", "uncond", "sr", "inpaint")


def tiny_first_stage(kind: str = "kl") -> AutoencoderConfig:
    """f=2 KL (or VQ) autoencoder, 4 latent channels."""
    extra = {"n_embed": 16, "double_z": False} if kind == "vq" else {}
    return AutoencoderConfig(
        kind=kind, embed_dim=LATENT, z_channels=LATENT, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, **extra
    )


def tiny_unet(in_channels: int = LATENT, context_dim: int | None = None) -> UNetConfig:
    return UNetConfig(
        in_channels=in_channels,
        out_channels=LATENT,
        model_channels=32,
        attention_resolutions=(2,),
        num_res_blocks=1,
        channel_mult=(1, 2),
        num_heads=2,
        use_spatial_transformer=context_dim is not None,
        context_dim=context_dim,
    )


def tiny_clip() -> CondConfig:
    return CondConfig(kind="clip", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(kind: str) -> ModelConfig:
    """The ModelConfig of one tiny family: sd1 | class | uncond | sr | inpaint."""
    fs = tiny_first_stage()
    if kind == "sd1":
        return ModelConfig(tiny_unet(context_dim=32), fs, tiny_clip(), family="sd1", name="tiny-sd1")
    if kind == "class":
        cond = CondConfig(kind="class", n_classes=5, embed_dim=32, null_label=4)
        return ModelConfig(tiny_unet(context_dim=32), fs, cond, name="tiny-class")
    if kind == "uncond":
        return ModelConfig(tiny_unet(), fs, CondConfig(kind="none"), conditioning_key="none", name="tiny-uncond")
    if kind == "sr":
        return ModelConfig(
            tiny_unet(in_channels=LATENT + 3),
            fs,
            CondConfig(kind="none"),
            conditioning_key="concat",
            concat="lowres",
            name="tiny-sr",
        )
    if kind == "inpaint":
        return ModelConfig(
            tiny_unet(in_channels=2 * LATENT + 1, context_dim=32),
            fs,
            tiny_clip(),
            family="sd1",
            conditioning_key="hybrid",
            concat="inpaint",
            name="tiny-inpaint",
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; use one of {KINDS}")


def random_model(kind: str, path: str | Path, seed: int = 0, recommended: dict | None = None) -> Path:
    """Write a tiny random checkpoint of `kind` in latentgen format; returns its path."""
    cfg = tiny_config(kind)
    cfg.recommended = dict(recommended or {"steps": 2, "width": 16, "height": 16})
    torch.manual_seed(seed)
    unet, fs, cond = build_modules(cfg)
    for i, m in enumerate((unet, fs, cond)):
        randomize_(m, seed + i)
    save_model(path, cfg, unet, fs, cond)
    return Path(path)


def sd1_from_fixture(fixtures_dir: Path, fixture_config, path: str | Path, recommended: dict | None = None) -> Path:
    """The sd1-tiny fixture (made by the original code) re-saved in latentgen format."""
    b = load_model(
        str(fixtures_dir / "sd1-tiny.safetensors"),
        config=fixture_config("sd1-tiny"),
        overrides={"cond": {"num_attention_heads": 4}},
    )
    b.config.recommended = dict(recommended or {"steps": 2, "width": 16, "height": 16})
    b.config.name = "sd1-tiny"
    save_model(path, b.config, b.unet, b.first_stage, b.cond)
    return Path(path)


def bert_from_fixture(fixtures_dir: Path, fixture_config, path: str | Path) -> Path:
    """The CompVis BERT-conditioned text-to-image fixture (KL f=8) re-saved in latentgen format."""
    b = load_model(str(fixtures_dir / "ldm-kl-bert-tiny.safetensors"), config=fixture_config("ldm-kl-bert-tiny"))
    b.config.recommended = {"steps": 2, "width": 16, "height": 16}
    b.config.name = "ldm-kl-bert-tiny"
    save_model(path, b.config, b.unet, b.first_stage, b.cond)
    return Path(path)
