"""SDXL's options of the generation commands: size and aesthetic conditioning, and the refiner (ensemble of
experts) of txt2img. Parsed and checked here, recorded in the PNG recipe, handed to pipelines as Settings."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from ..errors import ConfigError

OriginalSizeOpt = typer.Option(
    None, "--original-size", help="SDXL: the size W,H the model is told the image had (default: the output size)."
)
CropOpt = typer.Option(None, "--crop", help="SDXL: crop coordinates X,Y (left, top) to condition on (default 0,0).")
TargetSizeOpt = typer.Option(None, "--target-size", help="SDXL base: target size W,H (default: the output size).")
AestheticOpt = typer.Option(None, "--aesthetic-score", help="SDXL refiner: aesthetic score of the prompt (6.0).")
NegAestheticOpt = typer.Option(
    None, "--negative-aesthetic-score", help="SDXL refiner: aesthetic score of the negative prompt (2.5)."
)
RefinerOpt = typer.Option(
    None,
    "--refiner",
    help="SDXL refiner (path or models.toml name): the base runs the first --refiner-start of the σ schedule, "
    "the refiner the rest, on the same latent. Both stay loaded for the whole batch.",
)
RefinerStartOpt = typer.Option(None, "--refiner-start", help="Fraction of the schedule the base runs (0.8).")
DEFAULT_REFINER_START = 0.8


def parse_pair(text, option: str, what: str = "W,H") -> tuple[int, int] | None:
    """'W,H' → (W, H), non-negative integers; a recipe's list passes through."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return int(text[0]), int(text[1])
    try:
        a, b = (int(v) for v in str(text).split(","))
        if a < 0 or b < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{option} must be {what}, two non-negative integers such as 1024,1024; not '{text}'"
        ) from None
    return a, b


def sdxl_settings(
    st,
    cfg,
    *,
    original_size: Optional[str],
    crop: Optional[str],
    target_size: Optional[str],
    aesthetic_score: Optional[float],
    negative_aesthetic_score: Optional[float],
    recipe: dict | None = None,
):
    """Settings with the SDXL conditioning of the options (else the recipe's, else the defaults). The options
    are refused, naming themselves, for models of other families."""
    given = {
        "--original-size": original_size,
        "--crop": crop,
        "--target-size": target_size,
        "--aesthetic-score": aesthetic_score,
        "--negative-aesthetic-score": negative_aesthetic_score,
    }
    if cfg.family != "sdxl":
        used = [k for k, v in given.items() if v is not None]
        if used:
            raise ConfigError(f"{', '.join(used)}: SDXL options, but model {cfg.name} is {cfg.family}; drop them")
        return st
    rec = (recipe or {}).get("sdxl") or {}
    pick = lambda v, key: v if v is not None else rec.get(key)  # noqa: E731
    kw = {
        "original_size": parse_pair(pick(original_size, "original_size"), "--original-size"),
        "crop": parse_pair(pick(crop, "crop"), "--crop", "X,Y") or (0, 0),
        "target_size": parse_pair(pick(target_size, "target_size"), "--target-size"),
    }
    for key, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        value = pick(value, key)
        if value is not None:
            kw[key] = float(value)
    return dataclasses.replace(st, **kw)


SDXL_ITEM_KEYS = ("original_size", "crop", "target_size", "aesthetic_score", "negative_aesthetic_score")


def item_sdxl(item: dict, opts: dict) -> dict:
    """The SDXL options of one batch item: its JSON keys (`"original_size": [W, H]` or `"W,H"`, …) override the
    command line's."""
    return {**opts, **{k: item[k] for k in SDXL_ITEM_KEYS if item.get(k) is not None}}


def sdxl_meta(st, cfg) -> dict:
    """What the PNG recipe records of the SDXL conditioning ({} for other families)."""
    if cfg.family != "sdxl":
        return {}
    return {
        "sdxl": {
            "original_size": st.original_size,
            "crop": st.crop,
            "target_size": st.target_size,
            "aesthetic_score": st.aesthetic_score,
            "negative_aesthetic_score": st.negative_aesthetic_score,
        }
    }


def load_refiner(sess, refiner: Optional[str], refiner_start: Optional[float], low_memory, recipe: dict | None = None):
    """(refiner bundle or None, start). The refiner must be an SDXL refiner for an SDXL base, and fit in memory
    beside it."""
    rec = recipe or {}
    refiner = refiner or rec.get("refiner")
    if refiner is None:
        if refiner_start is not None:
            raise ConfigError("--refiner-start needs --refiner PATH|NAME")
        return None, None
    start = float(refiner_start if refiner_start is not None else rec.get("refiner_start", DEFAULT_REFINER_START))
    if not 0.0 < start < 1.0:
        raise ConfigError(f"--refiner-start must be in (0, 1), not {start}")
    if sess.bundle.config.family != "sdxl" or sess.bundle.config.cond.refiner:
        raise ConfigError(f"--refiner: model {sess.bundle.config.name} is not an SDXL base; use an SDXL base --model")
    import torch

    from ..config import resolve_model
    from ..loading.bundle import bundle_from_raw, resolve_config
    from ..loading.files import read_checkpoint
    from ..loading.sdxl import variant
    from ..loading.weights import prepack
    from ..pipelines import is_out_of_memory

    path, entry = resolve_model(refiner)
    raw = read_checkpoint(path)  # memory-mapped: nothing is loaded before the checks
    cfg = resolve_config(raw, entry=entry)[0]
    if variant(cfg) != "sdxl-refiner":
        raise ConfigError(f"--refiner {refiner} is {variant(cfg) or cfg.family}, not an SDXL refiner")
    check_refiner_fits(raw, refiner, sess.device, sess.dtype)
    try:
        bundle = bundle_from_raw(
            raw, entry=entry, device=sess.device, dtype=sess.dtype, low_memory=low_memory, weights=sess.weights
        )
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_out_of_memory(e):
            raise
        raise ConfigError(no_room_for_refiner(refiner, "loading it ran out of memory")) from None
    if sess.device == "cpu" and sess.dtype == torch.float32:  # as the Session does for the base
        for m in (bundle.unet, bundle.first_stage):
            prepack(m)
    return bundle, start


def no_room_for_refiner(refiner: str, why: str) -> str:
    return (
        f"--refiner {refiner}: not enough memory for the base and the refiner together ({why}); run the base "
        "alone, then `latentgen img2img --model REFINER` on its images"
    )


def check_refiner_fits(raw, refiner: str, device, dtype) -> None:
    """Refuse, before loading it, a refiner whose weights alone cannot fit in the memory left beside the loaded
    base: counted at the least they can take (as stored or in `dtype`, whichever is smaller), so a refiner that
    fits is never refused; the sampling's own memory is guarded per job (pipelines.guard_memory)."""
    from .. import memory

    need = sum(t.numel() * min(t.element_size(), dtype.itemsize) for t in raw.tensors.values() if t.is_floating_point())
    avail = memory.available_memory(device)
    if avail is not None and need > memory.HEADROOM * avail:
        why = f"its weights take at least {memory.gib(need)}, {memory.gib(avail)} is available"
        raise ConfigError(no_room_for_refiner(refiner, why))
