"""Data parallelism under torchrun: the process group, the device of each rank, autocast."""

from __future__ import annotations

import contextlib
import inspect
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

    def wrap(self, module: nn.Module) -> nn.Module:
        """`DistributedDataParallel` over the module's trainable parameters when there are several processes:
        bucketed all-reduces of the mean gradient, overlapped with the backward pass. The module itself in one
        process, or when nothing in it is trained. Call the result for the forward passes whose backward
        trains the module; its `.module` (or the module itself) for anything else."""
        if self.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        # buffers are not synchronised on each forward (every rank holds the same ones); newer torch names that
        # forward_sync_buffers and warns about broadcast_buffers
        params = inspect.signature(DistributedDataParallel).parameters
        sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=ids, **sync)

    @staticmethod
    def accumulating(*wrapped: nn.Module, last: bool) -> contextlib.ExitStack:
        """Around the forward and backward of one micro-batch: every micro-batch but the last of a step runs
        under `no_sync`, so gradients accumulate locally and the last backward all-reduces their sum once."""
        from torch.nn.parallel import DistributedDataParallel

        stack = contextlib.ExitStack()
        if not last:
            for m in wrapped:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        return stack

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
