"""Typed model specs and the models.toml registry.

A `ModelConfig` is everything needed to rebuild a latent diffusion model: the UNet, the first stage,
the conditioning encoder, the noise schedule and how the three are wired (LDM's `conditioning_key`).
Each part's own dataclass lives beside its module (unet.UNetConfig, autoencoder.AutoencoderConfig,
text.config.CondConfig); this file composes them and resolves model names through models.toml;
loading.original_config reads the original CompVis/Stability YAML layout."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

PREDICTIONS = ("eps", "v")


@dataclass
class ModelConfig:
    unet: Any  # unet.UNetConfig
    first_stage: Any  # autoencoder.AutoencoderConfig
    cond: Any  # text.config.CondConfig
    family: str = "ldm"  # sd1 | sd2 | sdxl | ldm | latentgen
    prediction: str = "eps"
    prediction_source: str = "default"  # metadata | config | option | registry | guess | default
    conditioning_key: str = "crossattn"  # crossattn | concat | hybrid | none
    concat: str | None = None  # what the concat channels carry: "inpaint" | "lowres" | None
    scale_factor: float = 0.18215
    beta_schedule: str = "scaled_linear"
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    # Noise augmentation of the low-res image (stablediffusion's ImageConcatWithNoiseAugmentation, the SD 2 x4
    # upscaler): q-sampled at a chosen level of its own schedule, the level given to the UNet as class label y.
    # None: the low-res image is concatenated as is (LDM-SR).
    max_noise_level: int | None = None
    low_scale_beta_schedule: str = "scaled_linear"
    low_scale_timesteps: int = 1000
    low_scale_linear_start: float = 0.0001
    low_scale_linear_end: float = 0.02
    vae_force_upcast: bool = False  # decode in fp32 when the model runs in fp16 (the SDXL VAE overflows)
    name: str | None = None
    recommended: dict = field(default_factory=dict)  # steps, cfg, sampler, width, height, noise_level

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for part in ("unet", "first_stage", "cond"):
            out[part] = getattr(self, part).to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        from .autoencoder import AutoencoderConfig
        from .text.config import CondConfig
        from .unet import UNetConfig

        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["unet"] = UNetConfig.from_dict(d["unet"])
        kw["first_stage"] = AutoencoderConfig.from_dict(d["first_stage"])
        if d["cond"].get("kind") == "sdxl":
            from .text.sdxl import SDXLCondConfig

            kw["cond"] = SDXLCondConfig.from_dict(d["cond"])
        else:
            kw["cond"] = CondConfig.from_dict(d["cond"])
        return cls(**kw)

    @property
    def latent_channels(self) -> int:
        return self.first_stage.embed_dim

    @property
    def factor(self) -> int:
        return self.first_stage.factor


BUILTIN_PREFIX = "builtin:"


def registry_paths() -> list[Path]:
    """Where models.toml files are read from, later ones overriding earlier ones."""
    paths = [Path(__file__).resolve().parents[2] / "models.toml"]  # a source checkout's top level
    paths.append(Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "latentgen" / "models.toml")
    paths.append(Path.cwd() / "models.toml")
    if os.environ.get("LATENTGEN_MODELS"):
        paths.append(Path(os.environ["LATENTGEN_MODELS"]))
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


BUILTIN_DEFAULTS = {"default": "builtin:default-txt2img", "default_superres": "builtin:default-superres"}


def load_registry() -> dict:
    """Merge every models.toml found: {"default": name, "default_superres": name, "models": {name: entry}}.
    Without a registry default, the models shipped inside the package are the defaults."""
    reg: dict = {"default": None, "default_superres": None, "models": {}, "lora_dirs": [], "embedding_dirs": []}
    for path in registry_paths():
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not a valid models.toml ({e})") from e
        for key in ("default", "default_superres"):
            if key in data:
                reg[key] = data[key]
        for key in ("lora_dirs", "embedding_dirs"):  # folders searched for <lora:NAME> tags and --embedding NAME
            for d in data.get(key, []):
                p = Path(os.path.expanduser(str(d)))
                reg[key].append(str(p if p.is_absolute() else path.parent / p))
        for name, entry in data.get("models", {}).items():
            entry = dict(entry)
            if "path" in entry and not str(entry["path"]).startswith(BUILTIN_PREFIX):
                p = Path(os.path.expanduser(str(entry["path"])))
                entry["path"] = str(p if p.is_absolute() else path.parent / p)
            entry["registry"] = str(path)
            reg["models"][name] = entry
    return reg


def resolve_model(name_or_path: str | None, *, task: str = "default") -> tuple[str, dict]:
    """A registry name or a path → (path, registry entry or {}). None means the default for the task
    ("default" or "default_superres"): the registry's, else the model shipped inside the package."""
    reg = load_registry()
    if name_or_path is None:
        name_or_path = reg[task] or BUILTIN_DEFAULTS[task]
    if name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path, {"name": name_or_path[len(BUILTIN_PREFIX) :]}
    if name_or_path in reg["models"]:
        entry = dict(reg["models"][name_or_path], name=name_or_path)
        if "path" not in entry:
            raise ConfigError(f"models.toml entry '{name_or_path}' has no path")
        return str(entry["path"]), entry
    p = Path(os.path.expanduser(name_or_path))
    if p.exists() or os.sep in name_or_path or p.suffix:
        return str(p), {}
    names = ", ".join(sorted(reg["models"])) or "none"
    raise ConfigError(f"unknown model '{name_or_path}': not a file and not in models.toml (known: {names})")
