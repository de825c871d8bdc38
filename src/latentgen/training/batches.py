"""The batch stream: every random choice of a step is a function of (seed, step); the global batch is cut
into micro-batches, and under torchrun rank r takes micro-batches r, r + W, ..."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .distributed import Dist
from .options import RunOptions


def step_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]) >> 1


class BatchStream:
    """Global batch of step s = positions s·B … s·B + B - 1 of an endless sequence of per-epoch permutations."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(step_seed(self.seed, 0x5EED, epoch))
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(pos // n)[pos % n]))
        return out

    def items(self, indices: list[int]) -> dict:
        items = [self.dataset[i] for i in indices]
        return {
            "image": torch.stack([it["image"] for it in items]),
            "caption": [it["caption"] for it in items],
            "index": indices,
        }


@dataclass
class MicroPlan:
    """How a global batch is split: `count` micro-batches of `size`; this rank runs `mine`."""

    size: int
    count: int
    mine: list[int]


def plan_micro_batches(opts: RunOptions, dist: Dist) -> MicroPlan:
    size = opts.micro_batch or opts.batch_size // dist.world
    if size < 1 or opts.batch_size % size or (opts.batch_size // size) % dist.world:
        raise ConfigError(
            f"--batch-size {opts.batch_size} must split into micro-batches of {size} (--micro-batch) shared evenly "
            f"by {dist.world} process(es); pick a batch size divisible by micro-batch × processes"
        )
    count = opts.batch_size // size
    return MicroPlan(size, count, list(range(dist.rank, count, dist.world)))


def open_data(opts: RunOptions, require_captions: bool = False):
    from ..data import open_dataset

    if not opts.data:
        raise ConfigError("--data is required: an image folder or 'shapes[:N[:SEED]]'")
    return open_dataset(opts.data, opts.size, require_captions=require_captions)
