"""The batch protocol: items from the PROMPT argument or stdin (plain lines or JSON lines with per-item
overrides), seeds (image i of seed S uses S+i), and the loop that makes, saves and reports each image."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional

from ..errors import ConfigError, LatentgenError
from .app import note

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
}


def read_items(prompt: Optional[str], quiet: bool) -> list[dict]:
    """PROMPT, or `-`: one prompt per line on stdin, or JSON lines with per-item overrides."""
    if prompt != "-":
        return [{"prompt": prompt or ""}]
    items = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
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
                items.append({**obj, "_line": n})
            except ValueError as e:
                items.append({"_error": f"stdin line {n}: bad JSON line ({e})", "_line": n})
        else:
            items.append({"prompt": line, "_line": n})
    if not items:
        raise ConfigError("no prompts on stdin")
    return items


def base_seed(seed: Optional[int], quiet: bool) -> int:
    import secrets

    if seed is None:
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
