"""`--recipe IMG.png`: the latentgen recipe stored in a PNG, read back and applied where the command line
leaves an option unset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import InputError


def _recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    from ..images import read_png_text

    text = read_png_text(path)
    if "latentgen" not in text and "parameters" in text:  # written by A1111 (or a tool that speaks its keys)
        from ..infotext import parse_parameters
        from ..validation import check

        rec, skipped = parse_parameters(text["parameters"])
        return {**check(rec, f"{path}: parameters"), "a1111": True, "unhonoured": skipped}
    if "latentgen" not in text:
        raise InputError(f"{path}: has no latentgen recipe or A1111 parameters (it was not made by latentgen)")
    try:
        rec = json.loads(text["latentgen"])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: damaged latentgen recipe ({e})") from e
    if not isinstance(rec, dict):
        raise InputError(f"{path}: damaged latentgen recipe (not a JSON object)")
    from ..validation import check

    return check(rec, f"{path}: recipe")


def _recipe_run(rec: dict, seed, model, dtype: str, prediction, ema: bool) -> tuple:
    """Seed, model, dtype, prediction and EMA of a recipe, where the command line leaves them unset. The recorded
    model file must still be the one that made the image (its A1111 hash, a sha256 prefix)."""
    path = rec.get("model_path")
    if model is None and path and rec.get("model_hash") and Path(path).exists():
        from ..images import file_hash

        if file_hash(path) != rec["model_hash"]:
            raise InputError(
                f"--recipe: the model {path} has changed since the image was made (hash {rec['model_hash']}); "
                "pass --model to use another"
            )
    return (
        rec.get("seed") if seed is None else seed,
        model or rec.get("model_path") or rec.get("model"),
        rec.get("dtype", dtype) if dtype == "auto" else dtype,
        prediction or rec.get("prediction"),
        ema or bool(rec.get("ema")),
    )
