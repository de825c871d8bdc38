"""Data parallelism under torchrun: the process group, the device of each rank, autocast."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Mean of the gradients over ranks (what DistributedDataParallel does), one flat all-reduce."""
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def _reduce(self, value: int, op) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([int(value)])
        torch.distributed.all_reduce(t, op=op)
        return int(t.item())

    def min(self, value: int) -> int:
        return self._reduce(value, torch.distributed.ReduceOp.MIN)

    def any(self, flag: bool) -> bool:
        return bool(self._reduce(flag, torch.distributed.ReduceOp.MAX))


def setup_distributed(device: str | None) -> Dist:
    """One process, or one of WORLD_SIZE processes started by torchrun (env RANK / WORLD_SIZE / LOCAL_RANK):
    gloo on CPU, NCCL on CUDA (device cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":  # TF32 matmuls / convolutions (fp32 parameters; autocast covers --bf16)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def autocast(dist: Dist, enabled: bool):
    """bf16 autocast where the device supports it (CPU, or a CUDA device with bf16)."""
    ok = enabled and (dist.device.type == "cpu" or (dist.device.type == "cuda" and torch.cuda.is_bf16_supported()))
    return torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=ok)
