"""The batch protocol: items from the PROMPT argument or stdin (plain lines or JSON lines with per-item
overrides), seeds (image i of seed S uses S+i), and the loop that makes, saves and reports each image."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional

from .. import validation
from ..errors import ConfigError, LatentgenError
from .app import note
from .sdxl import SDXL_ITEM_KEYS

if TYPE_CHECKING:
    from .session import Session

ITEM_KEYS = {
    "prompt",
    "negative",
    "seed",
    "out",
    "steps",
    "cfg",
    "sampler",
    "scheduler",
    "width",
    "height",
    "num",
    "strength",
    "class",
    "loras",
}
ITEM_KEYS |= set(SDXL_ITEM_KEYS)  # SDXL size / aesthetic conditioning


def check_options(**values) -> None:
    """Command-line options through the validation layer (the same checks as JSON lines and recipes)."""
    validation.check(values, "cli")
    if values.get("seed") is not None:
        validation.check_seeds(values["seed"], values.get("num") or 1)


def read_items(prompt: Optional[str], quiet: bool) -> list[dict]:
    """PROMPT, or `-`: one prompt per line on stdin (CR LF endings too), or JSON lines with per-item overrides,
    each through the validation layer: a bad item fails alone."""
    if prompt != "-":
        return [{"prompt": prompt or ""}]
    items = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                bad = set(obj) - ITEM_KEYS
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)}; allowed: {sorted(ITEM_KEYS)}")
                obj = validation.check(obj, f"stdin line {n}")
                if obj.get("seed") is not None:
                    validation.check_seeds(obj["seed"], obj.get("num", 1), f"stdin line {n}")
                items.append({**obj, "_line": n})
            except ConfigError as e:
                items.append({"_error": str(e), "_line": n})
            except ValueError as e:
                items.append({"_error": f"stdin line {n}: bad JSON line ({e})", "_line": n})
        else:
            items.append({"prompt": line, "_line": n})
    if not items:
        raise ConfigError("no prompts on stdin")
    return items


def base_seed(seed: Optional[int], quiet: bool) -> int:
    """The given seed, or a random one (also for -1, as in A1111), printed on stderr."""
    import secrets

    if seed is None or seed == validation.RANDOM_SEED:
        seed = secrets.randbelow(2**31)
        note(f"seed {seed}", quiet)
    return seed


def run_generation(sess: Session, items: list[dict], seed: int, num: int, make, task_meta: dict) -> None:
    """Drive the batch: per item, draw seeds, run `make(item, seeds, settings...)`, save, report."""
    import time

    counter = 0
    for k, item in enumerate(items):
        n = int(item.get("num", num))
        first = counter
        counter += n
        if not sess.mine(k):
            continue
        label = item.get("prompt", "")
        if "_error" in item:
            sess.emit({"index": first, "item": k, "error": item["_error"]})
            continue
        if item.get("seed") == validation.RANDOM_SEED:
            item = {**item, "seed": base_seed(None, sess.quiet)}
        seeds = [int(item["seed"]) + i for i in range(n)] if "seed" in item else [seed + first + i for i in range(n)]
        t0 = time.perf_counter()
        try:
            images, meta = make(item, seeds)
        except LatentgenError as e:
            sess.emit({"index": first, "item": k, "prompt": label, "error": str(e)})
            continue
        dt = (time.perf_counter() - t0) / max(n, 1)
        for i, (img, s) in enumerate(zip(images, seeds)):
            rec = {
                "index": first + i,
                "item": k,
                **meta,
                "seed": s,
                **({"subseed": meta["subseed"] + i} if meta.get("subseed") is not None else {}),  # A1111: V + i
                "model": sess.bundle.config.name,
                "model_hash": sess.model_hash,
                "dtype": str(sess.dtype).replace("torch.", ""),
                "device": sess.device,
                **({"weights": sess.weights} if sess.weights else {}),
                **task_meta,
            }
            try:
                path = sess.path_for(item.get("out") or sess.out, index=first + i, seed=s, prompt=label, i=i)
                if n > 1 and "out" in item and "{" not in item["out"]:
                    raise ConfigError(f"item {k} makes {n} images but its out '{item['out']}' has no pattern field")
                sess.save(img, path, rec)
                sess.emit({**rec, "path": path, "seconds": round(dt, 3)})
            except LatentgenError as e:
                sess.emit({**rec, "error": str(e)})
                if getattr(e, "fatal", False):  # a full disk: the next images would fail the same way, so stop
                    return
