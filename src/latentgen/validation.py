"""One validation layer for every value that reaches the pipelines: command-line options, JSON-line items and
PNG recipes pass the same checks (type, range, finiteness), so the three cannot disagree.

`check(values, where)` returns the values converted to their Python types, or raises ConfigError naming the field
as its source spells it: `--steps` on the command line, `stdin line 3: "steps"` for a JSON line, `x.png: recipe:
"steps"` for a recipe. Fields it does not know pass through unchanged (a recipe carries model paths, hashes
and the like). The limits are documented in README.md ("Errors and exit codes").

Leaf module: it imports nothing of latentgen at import time but the errors (the names of samplers, schedulers
and RNGs are looked up when first checked), so every layer may use it.
"""

from __future__ import annotations

import math

from .errors import ConfigError

MAX_SIDE = 8192  # pixels, width or height of an output (and of an input image, see MAX_IMAGE_PIXELS)
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE  # input images above this many pixels are refused before decoding
MAX_STEPS = 1000  # the discrete schedules have 1000 timesteps
MAX_NUM = 64  # images per prompt (one batch); a job's memory is checked as well (latentgen.memory)
MAX_CFG = 100.0
SEED_MAX = 2**63 - 1  # seeds are 64-bit signed integers everywhere (torch, numpy, JSON readers)
RANDOM_SEED = -1  # as in A1111: a random seed, drawn and reported
SPACINGS = ("leading", "trailing", "linspace")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def label(field: str, where: str) -> str:
    """How the source spells a field: `--mask-blur` (command line) or `<where>: "mask_blur"`."""
    if where == "cli":
        return "--" + field.replace("_", "-")
    return f'{where}: "{field}"'


def _integer(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be an integer, not {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ConfigError(f"{name} must be an integer, not {v!r}")
        v = int(v)
    return v


def _number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be a number, not {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, not {v}")
    return v


def int_in(lo: int, hi: int, hint: str = ""):
    def conv(v, name: str) -> int:
        v = _integer(v, name)
        if not lo <= v <= hi:
            raise ConfigError(f"{name} {v} is out of range: use {lo}..{hi}{hint}")
        return v

    return conv


def float_in(lo: float, hi: float, *, open_low: bool = False):
    def conv(v, name: str) -> float:
        v = _number(v, name)
        if not (lo < v if open_low else lo <= v) or v > hi:
            raise ConfigError(f"{name} {v:g} is out of range: use {'(' if open_low else '['}{lo:g}, {hi:g}]")
        return v

    return conv


def one_of(choices):
    """A string among `choices` (a tuple, or a function returning one: looked up when first needed)."""

    def conv(v, name: str) -> str:
        options = choices() if callable(choices) else choices
        if not isinstance(v, str) or v not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, not {v!r}")
        return v

    return conv


def text(v, name: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{name} must be a string, not {v!r}")
    return v


def optional_text(v, name: str):
    return None if v is None else text(v, name)


def flag(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, not {v!r}")
    return v


def sampler(v, name: str) -> str:
    """A sampler by latentgen's, A1111's or ComfyUI's name ("dpmpp_2m", "DPM++ 2M Karras"), kept as given."""
    from .infotext import sampler_from_a1111

    v = text(v, name)
    try:
        sampler_from_a1111(v)
    except ConfigError as e:
        raise ConfigError(f"{name} must name a sampler: {e}") from None
    return v


def scheduler_names() -> tuple[str, ...]:
    from .schedulers import SCHEDULERS

    return tuple(SCHEDULERS)


def rng_names() -> tuple[str, ...]:
    from .noise import RNGS

    return tuple(RNGS)


def seed(v, name: str) -> int:
    v = _integer(v, name)
    if v != RANDOM_SEED and not 0 <= v <= SEED_MAX:
        raise ConfigError(f"{name} {v} is out of range: use 0..{SEED_MAX} (2**63-1), or -1 for a random seed")
    return v


FIELDS = {
    "prompt": text,
    "negative": optional_text,
    "out": text,
    "steps": int_in(1, MAX_STEPS),
    "num": int_in(1, MAX_NUM, " images per prompt (more prompts or items for more)"),
    "width": int_in(1, MAX_SIDE, " pixels"),
    "height": int_in(1, MAX_SIDE, " pixels"),
    "seed": seed,
    "cfg": float_in(0.0, MAX_CFG),
    "eta": float_in(0.0, 1.0),
    "strength": float_in(0.0, 1.0, open_low=True),
    "noise_level": int_in(0, 1000),
    "mask_blur": int_in(0, 256, " pixels"),
    "sampler": sampler,
    "scheduler": one_of(scheduler_names),
    "rng": one_of(rng_names),
    "subseed": seed,
    "subseed_strength": float_in(0.0, 1.0),
    "spacing": one_of(SPACINGS),
    "karras": flag,
    "ema": flag,
    "class": int_in(0, 2**31 - 1),
    "dtype": one_of(DTYPES),
}


def check(values: dict, where: str = "cli") -> dict:
    """`values` with every known field checked and converted; None means "not given" and passes. Raises
    ConfigError naming the first bad field (see `label`)."""
    out = dict(values)
    for k, v in values.items():
        conv = FIELDS.get(k)
        if conv is not None and v is not None:
            out[k] = conv(v, label(k, where))
    return out


def check_seeds(first: int, n: int, where: str = "cli") -> None:
    """Image i of a request uses seed S+i: the last one must still be a valid seed."""
    if first != RANDOM_SEED and first + n - 1 > SEED_MAX:
        raise ConfigError(f"{label('seed', where)} {first} + {n} images passes {SEED_MAX}: use a smaller seed")
