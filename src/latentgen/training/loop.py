"""The training loop shared by both trainers: learning-rate schedule, time budget, logging, sample grids,
checkpoints every N steps and on SIGINT / SIGTERM."""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .distributed import Dist
from .options import RunOptions, TrainResult


def lr_at(opts: RunOptions, step: int) -> float:
    """Linear warm-up over --warmup steps, then constant or a cosine decay to lr/10 at --steps."""
    lr = opts.lr * min(1.0, (step + 1) / opts.warmup) if opts.warmup else opts.lr
    if opts.lr_decay == "cosine":
        lr *= 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step / max(opts.steps, 1), 1.0)))
    return lr


def deadline(opts: RunOptions, t_begin: float) -> float | None:
    return t_begin + opts.time_budget if opts.time_budget > 0 else None


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def cast_copy(module: nn.Module, dtype_name: str) -> nn.Module:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype_name not in dtypes:
        raise ConfigError(f"--save-dtype must be one of {', '.join(dtypes)}, not {dtype_name!r}")
    if dtypes[dtype_name] == torch.float32:
        return module
    return copy.deepcopy(module).to(dtypes[dtype_name])


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.signum = 0  # the signal that asked (the exit code is 128 + it: 130 SIGINT, 143 SIGTERM)
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Loop:
    """Runs steps start..opts.steps-1: `step_fn(step) -> {term: value}`, checkpoints, samples, progress."""

    opts: RunOptions
    dist: Dist
    step_fn: object
    save_fn: object
    sample_fn: object
    log: object = stderr_log
    callback: object = None
    deadline: float | None = None  # time.perf_counter() by which --time-budget wants the run finished

    PROBE = (5, 35)  # --time-budget: the rate is measured between these steps of the run

    def fit_budget(self, done: int, since: float) -> None:
        """Shrink opts.steps to what fits before the deadline at the rate of the probe steps (all ranks agree).
        The cosine decay follows the new --steps from here on; the probe's steps used the old one."""
        now = time.perf_counter()
        rate = (self.PROBE[1] - self.PROBE[0]) / max(now - since, 1e-9)
        fit = self.dist.min(done + max(int(0.95 * rate * (self.deadline - now)), 0))
        if fit < self.opts.steps:
            self.opts.steps = max(fit, done)
            if self.dist.main:
                self.log(
                    f"time budget: {self.opts.steps} steps fit ({rate:.2f} it/s measured); "
                    f"reproduce with --steps {self.opts.steps}"
                )

    def run(self, start: int, result: TrainResult) -> TrainResult:
        opts, t0 = self.opts, time.perf_counter()
        probe_t = t0
        with StopRequest() as stop:
            for step in range(start, opts.steps):
                if step >= opts.steps:  # --time-budget shortened the run
                    break
                terms = self.dist.mean(self.step_fn(step))
                done = step + 1
                if self.deadline is not None and done - start in self.PROBE:
                    if done - start == self.PROBE[0]:
                        probe_t = time.perf_counter()
                    else:
                        self.fit_budget(done, probe_t)
                result.losses.append({"step": done, **terms})
                result.step = done
                if self.callback is not None:
                    self.callback(done, terms)
                halt = self.dist.any(stop.requested)
                if done % opts.save_every == 0 or done == opts.steps or halt:
                    self.save_fn(done)
                if opts.sample_every and done % opts.sample_every == 0 and self.dist.main:
                    self.sample_fn(done)
                if self.dist.main and (done % opts.log_every == 0 or done == opts.steps or halt):
                    rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                    parts = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
                    self.log(
                        f"step {done}/{opts.steps}  {parts}  {rate:.2f} it/s  ETA "
                        f"{_fmt_time((opts.steps - done) / max(rate, 1e-9))}"
                    )
                if halt:
                    result.interrupted = True
                    result.signal = stop.signum or signal.SIGINT
                    if self.dist.main:
                        self.log(f"interrupted: checkpoint of step {done} written to {result.out}")
                    break
        return result


def run_trainer(
    opts: RunOptions,
    dist: Dist,
    trainer,
    start: int,
    out: Path,
    model_file: str,
    meta: dict,
    log,
    callback,
    t_begin: float,
) -> TrainResult:
    """Run `trainer` (its step, save and sample methods) from `start` in a `Loop`; the result names OUT/model_file."""
    loop = Loop(
        opts,
        dist,
        trainer.step,
        lambda s: trainer.save(out, s, meta),
        lambda s: trainer.sample(out, s),
        log,
        callback,
        deadline(opts, t_begin),
    )
    return loop.run(start, TrainResult(out, start, model_path=out / model_file))


def save_grid(rows: list[torch.Tensor], path: Path, text: dict | None = None) -> None:
    """Rows of images [n, 3, h, w] in [0, 1] (resized to the first row's size) → one PNG."""
    from ..images import save_png, to_pil

    h, w = rows[0].shape[-2:]
    rows = [
        F.interpolate(r.float(), size=(h, w), mode="nearest") if r.shape[-2:] != (h, w) else r.float() for r in rows
    ]
    grid = torch.cat([torch.cat(list(r.cpu()), dim=-1) for r in rows], dim=-2)
    save_png(to_pil(grid), path, text={k: str(v) for k, v in (text or {}).items()}, overwrite=True)
