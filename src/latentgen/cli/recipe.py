"""`--recipe IMG.png`: the latentgen recipe stored in a PNG, read back and applied where the command line
leaves an option unset."""

from __future__ import annotations

import json
from typing import Optional

from ..errors import InputError


def _recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    from ..images import read_png_text

    text = read_png_text(path)
    if "latentgen" not in text and "parameters" in text:  # an A1111 (or ComfyUI-exported) image
        from ..infotext import parse_parameters
        from ..validation import check

        return check(parse_parameters(text["parameters"]), f"{path}: parameters")
    if "latentgen" not in text:
        raise InputError(f"{path}: has no latentgen recipe (it was not made by latentgen)")
    try:
        rec = json.loads(text["latentgen"])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: damaged latentgen recipe ({e})") from e
    if not isinstance(rec, dict):
        raise InputError(f"{path}: damaged latentgen recipe (not a JSON object)")
    from ..validation import check

    return check(rec, f"{path}: recipe")


def _recipe_run(rec: dict, seed, model, dtype: str, prediction, ema: bool) -> tuple:
    """Seed, model, dtype, prediction and EMA of a recipe, where the command line leaves them unset."""
    return (
        rec.get("seed") if seed is None else seed,
        model or rec.get("model_path") or rec.get("model"),
        rec.get("dtype", dtype) if dtype == "auto" else dtype,
        prediction or rec.get("prediction"),
        ema or bool(rec.get("ema")),
    )
