"""What a path holds, read into a RawCheckpoint: an original single-file safetensors, a diffusers folder
(mapped into the original names) or a `builtin:` name shipped with the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import BUILTIN_PREFIX
from ..errors import CheckpointError
from .diffusers import read_diffusers_folder
from .layout import FIRST_STAGE_PREFIX, FORMAT_TAG, UNET_PREFIX
from .safetensors import read_safetensors


@dataclass
class RawCheckpoint:
    path: str
    format: str  # original | diffusers | latentgen
    tensors: dict
    metadata: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    p = Path(path)
    if str(path).startswith(BUILTIN_PREFIX):
        p = builtin_dir() / (str(path)[len(BUILTIN_PREFIX) :] + ".safetensors")
        if not p.is_file():
            raise CheckpointError(f"{path}: the embedded model is not installed in this package ({p} missing)")
    if p.is_dir():
        sd, hints = read_diffusers_folder(p)
        return RawCheckpoint(str(p), "diffusers", sd, {}, hints)
    tensors, meta = read_safetensors(p)
    fmt = "latentgen" if meta.get("format") == FORMAT_TAG and "latentgen" in meta else "original"
    if not any(k.startswith(UNET_PREFIX) for k in tensors):
        if any(k.startswith(("encoder.", "decoder.", FIRST_STAGE_PREFIX)) for k in tensors):
            fmt = "first_stage"
        else:
            raise CheckpointError(
                f"{p}: no model.diffusion_model.* keys — not an original SD/LDM checkpoint, a latentgen file or "
                "an autoencoder (a diffusers UNet alone is not enough: pass the whole diffusers folder)"
            )
    return RawCheckpoint(str(p), fmt, tensors, meta)


def builtin_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "assets"  # src/latentgen/assets
