"""`latentgen encode` and `latentgen decode`: images to scaled latents in safetensors and back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError, InputError
from .app import command
from .device import pick_device
from .options import DeviceOpt, ModelOpt, OverwriteOpt, QuietOpt
from .session import check_out_pattern


@command()
def encode(
    image: str = typer.Argument(..., help="Image to encode."),
    out: str = typer.Option(..., "--out", "-o", help="Latent file to write (.safetensors)."),
    model: Optional[str] = ModelOpt,
    sample: bool = typer.Option(False, "--sample", help="KL: draw from the posterior instead of its mode."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample."),
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Encode an image into the model's (scaled) latent space; writes a safetensors file."""
    import torch

    from ..images import load_image, to_tensor
    from ..loading.bundle import load_first_stage
    from ..loading.safetensors import write_safetensors

    _check_single_out(out, overwrite)
    x = to_tensor(load_image(image))
    fs = load_first_stage(model, device=pick_device(device))
    from ..pipelines import encode_latents

    f = fs.factor
    if x.shape[-1] % f or x.shape[-2] % f:
        raise InputError(
            f"{image} is {x.shape[-1]}x{x.shape[-2]}: both sides must be multiples of the model's "
            f"factor {f} (crop or resize it)"
        )
    gens = [torch.Generator("cpu").manual_seed(seed)] if sample else None
    with torch.no_grad():
        z = encode_latents(fs.module, x * 2 - 1, gens) * fs.scale_factor
    write_safetensors(out, {"latent": z.float().cpu()}, fs.latent_metadata(tuple(z.shape)), overwrite=overwrite)
    print(out)


def _check_single_out(out: str, overwrite: bool) -> None:
    check_out_pattern(out, overwrite)
    if not overwrite and Path(out).exists():
        raise InputError(f"{out} exists: pass --overwrite to replace it")


@command()
def decode(
    latent: str = typer.Argument(..., help="Latent file written by `latentgen encode` (or any {latent: tensor})."),
    out: str = typer.Option(..., "--out", "-o", help="PNG to write."),
    model: Optional[str] = ModelOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Decode a latent file back into an image with a compatible first stage."""
    import torch

    from ..images import save_png, to_pil
    from ..loading.bundle import load_first_stage
    from ..loading.safetensors import read_safetensors

    tensors, meta = read_safetensors(latent)
    if "latent" not in tensors:
        raise InputError(f"{latent}: no tensor named 'latent' (write it with `latentgen encode`)")
    z = tensors["latent"]
    n = z.shape[0] if z.ndim == 4 else 1
    paths = [out.format(i=i) for i in range(n)] if "{i" in out else [out]
    if len(paths) != n:
        raise ConfigError(f"{latent} holds {n} latents: give --out a {{i}} field, e.g. --out 'img-{{i}}.png'")
    for p in paths:
        _check_single_out(p, overwrite)
    fs = load_first_stage(model, device=pick_device(device))
    fs.check_latent(z, meta, latent)
    from ..pipelines import decode_latents

    with torch.no_grad():
        img = (decode_latents(fs.module, z / fs.scale_factor).float() / 2 + 0.5).clamp(0, 1)
    for p, im in zip(paths, img):
        save_png(
            to_pil(im),
            p,
            text={"latentgen": json.dumps({"task": "decode", "latent": latent, "model": fs.name})},
            overwrite=overwrite,
        )
        print(p)
