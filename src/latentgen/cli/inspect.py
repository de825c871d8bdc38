"""`latentgen info` and `latentgen models`: what a checkpoint is, and what the registry holds."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .app import command, note
from .options import ConfigOpt, PredictionOpt


@command()
def info(
    model: str = typer.Argument(..., help="Checkpoint file, diffusers folder or models.toml name."),
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show what a checkpoint is: family, parameter counts, prediction, latent channels, f, conditioning."""
    from ..loading.bundle import describe_file

    d = describe_file(model, prediction=prediction, config=config)
    if as_json:
        print(json.dumps(d))
        return
    p = d["params"]
    guess = " (guess)" if d["prediction_source"] == "guess" else ""
    lines = [
        f"model         {d['name']}  ({d['format']} format)",
        f"path          {d['path']}",
        f"family        {d['family']}" + (f" ({d['variant_source']})" if d.get("variant") else ""),
        f"prediction    {d['prediction']}{guess}",
        f"first stage   {d['first_stage'].upper()}, f={d['factor']}, {d['latent_channels']} latent channels, "
        f"scale {d['scale_factor']:g}",
        f"conditioning  {d['conditioning']} ({d['conditioning_key']}"
        + (f", concat {d['concat']}" if d["concat"] else "")
        + (f", context {d['context_dim']}" if d["context_dim"] else "")
        + (f", low-res noise levels 0..{d['max_noise_level']}" if d.get("max_noise_level") is not None else "")
        + ")",
        f"parameters    UNet {p['unet'] / 1e6:.2f}M, first stage {p['first_stage'] / 1e6:.2f}M, "
        f"conditioning {p['cond'] / 1e6:.2f}M",
    ]
    if d.get("unknown"):
        lines.append(f"unknown       {', '.join(d['unknown'])} (not in the weights; see the note)")
    print("\n".join(lines))
    for n in d["notes"]:
        note(n)


@command()
def models(as_json: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
    """List the models.toml registry and whether each entry resolves to a file on disk."""
    from pathlib import Path

    from ..config import BUILTIN_PREFIX, load_registry
    from ..loading.files import builtin_dir

    reg = load_registry()
    for name, entry in sorted(reg["models"].items()):
        path = str(entry.get("path", ""))
        target = (
            builtin_dir() / (path[len(BUILTIN_PREFIX) :] + ".safetensors")
            if path.startswith(BUILTIN_PREFIX)
            else Path(path)
        )
        rec = {
            "name": name,
            "path": path,
            "present": target.exists(),
            "default": name == reg["default"],
            "description": entry.get("description", ""),
        }
        if as_json:
            print(json.dumps(rec))
        else:
            mark = "*" if rec["default"] else " "
            state = "present" if rec["present"] else "missing"
            print(f"{mark} {name:<20} {state:<8} {path}  {rec['description']}")
