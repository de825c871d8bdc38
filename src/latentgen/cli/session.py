"""The Session of one generation command: device and dtype, the model loaded once, default settings, output
paths checked before any work, records on stdout, the exit code, and the torchrun split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, ConfigError, InputError
from ..infotext import png_text
from .app import note
from .batch import read_items
from .device import pick_device, pick_dtype
from .progress import Progress

# karras / scheduler None: the sampler's own default schedule (schedulers.default_scheduler; karras for dpmpp_2m)
DEFAULTS = {"steps": 25, "sampler": "dpmpp_2m", "karras": None, "spacing": "leading", "cfg": 7.5, "eta": 0.0}


class Session:
    """One generation command: the model (loaded once), defaults, the output protocol and the exit code."""

    def __init__(
        self,
        task: str,
        model,
        prediction,
        config,
        dtype,
        device,
        quiet,
        as_json,
        overwrite,
        out,
        ema=False,
        low_memory=None,
        weights=None,
    ):
        import torch

        from ..config import resolve_model
        from ..loading.bundle import bundle_from_raw
        from ..loading.files import read_checkpoint
        from ..loading.layout import UNET_PREFIX
        from ..loading.weights import prepack

        self.task, self.quiet, self.as_json, self.overwrite = task, quiet, as_json, overwrite
        self.rank, self.world = int_env("RANK", 0), int_env("WORLD_SIZE", 1)
        self.device = pick_device(device)
        if self.world > 1 and self.device == "cuda":
            self.device = f"cuda:{int_env('LOCAL_RANK', 0)}"
        self.weights = check_weights(weights, low_memory)
        self.out = out or "out/{index:05d}-{seed}.png"
        check_out_pattern(self.out, overwrite)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
        try:
            path, entry = resolve_model(model)
            raw = read_checkpoint(path)  # memory-mapped: the UNet's size decides `--dtype auto`
            unet_params = sum(v.numel() for k, v in raw.tensors.items() if k.startswith(UNET_PREFIX))
            self.dtype = pick_dtype(dtype, self.device, unet_params)
            self.bundle = bundle_from_raw(
                raw,
                entry=entry,
                prediction=prediction,
                config=config,
                ema=ema,
                device=self.device,
                dtype=self.dtype,
                low_memory=low_memory,
                weights=self.weights,
            )
        except CheckpointError as e:
            if model is not None:
                raise
            raise CheckpointError(
                f"default model unavailable ({e}): pass --model NAME|PATH "
                "(python scripts/make_tiny_model.py tiny.safetensors makes a test model)"
            ) from e
        for n in self.bundle.notes:
            note(n, quiet)
        if self.device == "cpu" and self.dtype == torch.float32:  # generation only: never for training
            for m in (self.bundle.unet, self.bundle.first_stage):
                prepack(m)
        bp = Path(self.bundle.path)
        self.model_path = str(bp.resolve()) if bp.exists() else self.bundle.path
        self.failed = 0
        self.records: list[dict] = []
        self.index = 0
        self._hash = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            from ..images import file_hash

            self._hash = file_hash(self.bundle.path)
        return self._hash

    def settings(self, steps, sampler, karras, spacing, cfg, eta, strength=0.75, recipe=None, scheduler=None):
        from ..infotext import sampler_from_a1111
        from ..pipelines import Settings

        rec = {**DEFAULTS, **self.bundle.config.recommended, **(recipe or {})}
        given = {"steps": steps, "sampler": sampler, "karras": karras, "spacing": spacing, "cfg": cfg, "eta": eta}
        given["scheduler"] = scheduler
        vals = {k: (v if v is not None else rec.get(k, DEFAULTS.get(k))) for k, v in given.items()}
        name, named_schedule = sampler_from_a1111(str(vals["sampler"]))  # "DPM++ 2M Karras" → dpmpp_2m, karras
        st = Settings(
            steps=int(vals["steps"]),
            sampler=name,
            karras=None if vals["karras"] is None else bool(vals["karras"]),
            spacing=str(vals["spacing"]),
            cfg=float(vals["cfg"]),
            eta=float(vals["eta"] or 0.0),
            strength=float(strength),
            scheduler=vals["scheduler"] if vals["scheduler"] is not None else named_schedule,
        )
        st.check()
        return st

    def size(self, width, height, recipe=None):
        rec = {**self.bundle.config.recommended, **(recipe or {})}
        f = self.bundle.config.factor
        default = rec.get("width") or rec.get("height") or 8 * f * 8
        return int(width or rec.get("width") or default), int(height or rec.get("height") or default)

    def progress(self, total: int, label: str):
        return Progress(total, label, self.quiet)

    def path_for(self, pattern: str, *, index: int, seed: int, prompt: str, i: int) -> str:
        from ..images import slugify

        try:
            return pattern.format(index=index, seed=seed, prompt=slugify(prompt), i=i, model=self.bundle.config.name)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"--out pattern '{pattern}' is invalid ({e}); fields: index, seed, prompt, i, model"
            ) from e

    def read_items(self, prompt: Optional[str]) -> list[dict]:
        """The batch; under torchrun rank 0 reads stdin and sends the items to every rank."""
        if self.world == 1 or prompt != "-":
            return read_items(prompt, self.quiet)
        import torch.distributed as dist

        box = [read_items(prompt, self.quiet) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_outputs(self, items: list[dict], num: int) -> None:
        """Usage errors found before any work: a fixed --out name for several images, or one that exists."""
        total = sum(int(it.get("num", num)) for it in items if "out" not in it and "_error" not in it)
        if total == 0 or has_fields(self.out):
            return
        if total > 1:
            raise ConfigError(
                f"--out {self.out} names one file but {total} images are made: add a field, "
                "e.g. --out 'out/{index:05d}-{seed}.png'"
            )
        if not self.overwrite and Path(self.out).exists():
            raise InputError(f"{self.out} exists: pass --overwrite to replace it")

    def emit(self, record: dict) -> None:
        if self.world > 1:
            self.records.append(record)
            return
        self._print(record)

    def _print(self, record: dict) -> None:
        if "error" in record:
            self.failed += 1
            print(f"latentgen: error: {record.get('item', '?')}: {record['error']}", file=sys.stderr)
        if self.as_json:
            print(json.dumps(record), flush=True)
        elif "error" not in record:
            print(record["path"], flush=True)

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, self.records)
            self.records = []
            if self.rank == 0:
                for rec in sorted((r for part in gathered for r in part), key=lambda r: r.get("index", 0)):
                    self._print(rec)
            else:
                self.failed = sum(1 for part in gathered for r in part if "error" in r)
            dist.destroy_process_group()
        raise SystemExit(1 if self.failed else 0)

    def mine(self, item_index: int) -> bool:
        return item_index % self.world == self.rank

    def save(self, image, path: str, meta: dict) -> None:
        from ..images import save_png, to_pil

        save_png(to_pil(image), path, text=png_text(meta), overwrite=self.overwrite)


def check_weights(weights, low_memory):
    """`--weights`: int8 or omitted; int8 weights are dequantised as their layers run, which --full-weights
    (everything upcast at load) contradicts."""
    from ..loading.weights import check_weight_storage

    if check_weight_storage(weights) is None:
        return None
    if low_memory is False:
        raise ConfigError(
            f"--weights {weights} keeps the weights in 8 bits and dequantises them as they run: drop --full-weights"
        )
    return weights


def has_fields(pattern: str) -> bool:
    return pattern.format(index=0, seed=0, prompt="p", i=0, model="m") != pattern if "{" in pattern else False


def check_out_pattern(pattern: str, overwrite: bool) -> None:
    """The output directory (the pattern's fixed part) must be creatable and writable before the model loads."""
    import os
    import tempfile

    try:
        probe = Path(pattern.format(index=0, seed=0, prompt="p", i=0, model="m"))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--out pattern '{pattern}' is invalid ({e}); fields: index, seed, prompt, i, model") from e
    if probe.is_dir():
        raise InputError(
            f"--out {pattern} is a directory: give a file name or a pattern, e.g. {probe}/{{index:05d}}.png"
        )
    parent = probe.parent if str(probe.parent) else Path(".")
    if "{" in str(Path(pattern).parent):  # the directory itself varies per image: check where it starts
        parent = next(iter(Path(pattern).parents))
        while "{" in str(parent):
            parent = parent.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latentgen-probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(
            f"--out {pattern}: cannot write to directory {parent} ({e.strerror}); choose another --out"
        ) from e


def int_env(name: str, default: int) -> int:
    import os

    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
