"""Training: the first-stage autoencoder and the latent diffusion model (Rombach et al., arXiv 2112.10752).

- `train_autoencoder`: the LDM first stage (paper Sec. 3.1, App. G): L1 reconstruction + perceptual loss +
  patch-based adversarial loss (PatchGAN `NLayerDiscriminator`, Isola et al. arXiv 1611.07004, as in
  taming-transformers; hinge loss; adaptive weight = ||∇L_rec|| / ||∇L_GAN|| at the decoder's last layer,
  Esser et al. arXiv 2012.09841 Eq. 7) + a small KL penalty (KL-reg) or the VQ codebook/commitment loss
  (VQ-reg). Perceptual loss: LPIPS (Zhang et al. arXiv 1801.03924) when VGG16 weights are given, else the
  Laplacian-pyramid L1 loss of Bojanowski et al. (arXiv 1707.05776, Eq. 3), which needs no pretrained net.
- `train_ldm`: ε- or v-prediction (`denoiser.training_loss`, paper Eq. 2 / Eq. 3) on the frozen
  autoencoder's latents scaled to unit variance (scale factor = 1 / std of the latents, paper Sec. 4.3.2),
  with no / class / text (BERT, trained jointly) conditioning, concat conditioning for super-resolution
  and inpainting, and condition dropout for classifier-free guidance (Ho & Salimans arXiv 2207.12598).

Both share one loop: EMA weights (CompVis LitEma), periodic checkpoints (checkpoint.save_model layout, EMA
weights) plus a training-state file (safetensors + JSON metadata, never pickle), exact resume, a checkpoint
on SIGINT / SIGTERM, and data parallelism under torchrun.

Determinism: everything random about a step is a function of (seed, step): the global batch is a slice of
a per-epoch permutation, and the global batch is cut into micro-batches of `micro_batch` samples, each with
its own generator seeded by (seed, step, micro-batch index). Under torchrun rank r takes micro-batches
r, r + W, ... (disjoint slices of the same global batch) and gradients are averaged across ranks, so W
processes compute what one process computes with the same global batch and micro-batch size (one process
accumulates the micro-batches' gradients). Resuming needs nothing but the step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, InputError

STATE_FILE = "state.safetensors"
STATE_FORMAT = "latentgen-train-state/1"
AE_FILE = "autoencoder.safetensors"
LDM_FILE = "model.safetensors"
COND_CHOICES = ("none", "class", "text", "sr", "inpaint")
# options that may change between a run and its --resume (they do not change what is computed)
_NOT_IDENTITY = {
    "out",
    "resume",
    "overwrite",
    "steps",
    "save_every",
    "sample_every",
    "log_every",
    "device",
    "micro_batch",
    "bf16",
    "init",
    "save_dtype",
    "sample_steps",
    "cache_latents",
    "workers",
    "time_budget",
}


# ================================================================================================ options


@dataclass(kw_only=True)
class RunOptions:
    """What both trainers share. `batch_size` is the global batch (all ranks together)."""

    data: str
    out: str | None = None
    size: int = 64
    steps: int = 1000
    batch_size: int = 8
    micro_batch: int | None = None  # default: batch_size / world size
    lr: float = 1e-4
    warmup: int = 0
    lr_decay: str = "constant"  # constant | cosine (to lr/10 at --steps)
    seed: int = 0
    ema_decay: float = 0.999
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    bf16: bool = False
    resume: str | None = None
    overwrite: bool = False
    init: str | None = None
    device: str | None = None
    save_dtype: str = "float32"  # storage of the inference file: float32 | float16 | bfloat16
    time_budget: float = 0.0  # seconds; > 0: --steps shrinks to what fits (measured after the first steps)

    def identity(self) -> dict:
        """The options a --resume must repeat."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}


@dataclass(kw_only=True)
class AEOptions(RunOptions):
    reg: str = "kl"  # kl | vq
    f: int = 4
    ch: int = 64
    ch_mult: tuple[int, ...] | None = None  # default (1, 2, 4, 4, ...)[: log2 f + 1]
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    embed_dim: int = 4
    n_embed: int = 256
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_vgg: str | None = None
    disc_start: int = 1000
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_ch: int = 64
    norm_groups: int = 32
    l2_weight: float = 0.0  # an MSE term beside L1 (pulls towards PSNR)
    adam_betas: tuple[float, float] = (0.5, 0.9)  # taming's; (0.9, 0.99) converges faster without the GAN


@dataclass(kw_only=True)
class LDMOptions(RunOptions):
    ae: str | None = None
    cond: str = "none"
    prediction: str = "eps"
    cond_drop: float = 0.1
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (2, 4)
    num_head_channels: int = 32
    transformer_depth: int = 1
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_length: int = 77
    class_dim: int = 64
    scale_batches: int = 4
    sample_steps: int = 20
    cache_latents: bool = False
    workers: int = 0  # DataLoader processes that render / load the items encoded for --cache-latents


@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list[dict] = field(default_factory=list)  # per step run by this call: {"step": n, term: value}
    interrupted: bool = False
    model_path: Path | None = None


# ================================================================================= distributed + device


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


# ========================================================================================= data pipeline


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
    from .data import open_dataset

    if not opts.data:
        raise ConfigError("--data is required: an image folder or 'shapes[:N[:SEED]]'")
    return open_dataset(opts.data, opts.size, require_captions=require_captions)


# ============================================================================================ EMA, state


class EMA:
    """Exponential moving average of a module's weights (CompVis ldm/modules/ema.py LitEma): the decay warms
    up as min(decay, (1 + n) / (10 + n)) over the n updates so far; buffers are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.num_updates = float(decay), 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        own = dict(self.module.named_parameters())
        params = list(module.named_parameters())
        torch._foreach_lerp_([own[n] for n, _ in params], [p.detach() for _, p in params], 1 - d)
        own_buffers = dict(self.module.named_buffers())
        for name, b in module.named_buffers():
            own_buffers[name].copy_(b)


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{name}.{idx}.{key}"] = v
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    prefix = f"opt.{name}."
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, what = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[what] = v.clone()
    for key, v in meta["scalars"].items():
        idx, what = key.split(".", 1)
        state.setdefault(int(idx), {})[what] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(path: Path, *, step: int, modules: dict, optimizers: dict, emas: dict, meta: dict) -> None:
    """The training state: weights, EMA weights, optimizer moments, torch RNG (safetensors) + JSON metadata."""
    from .checkpoint import write_safetensors

    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    info = {"format": STATE_FORMAT, "step": str(step)}
    for name, m in modules.items():
        tensors.update({f"model.{name}.{k}": v for k, v in m.state_dict().items()})
    for name, ema in emas.items():
        tensors.update({f"ema.{name}.{k}": v for k, v in ema.module.state_dict().items()})
        info[f"ema.{name}.num_updates"] = str(ema.num_updates)
    for name, opt in optimizers.items():
        t, m = _optimizer_tensors(name, opt)
        tensors.update(t)
        info[f"opt.{name}"] = json.dumps(m)
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    write_safetensors(path, tensors, info)


@dataclass
class TrainState:
    path: Path
    step: int
    tensors: dict
    meta: dict

    def json(self, key: str):
        return json.loads(self.meta[key])

    def load_module(self, name: str, module: nn.Module) -> None:
        from .checkpoint import load_strict, split_prefix

        load_strict(
            module,
            {k: v.clone() for k, v in split_prefix(self.tensors, f"model.{name}.").items()},
            what=name,
            source=str(self.path),
        )

    def restore(self, *, optimizers: dict, emas: dict) -> None:
        from .checkpoint import load_strict, split_prefix

        for name, ema in emas.items():
            sd = {k: v.clone() for k, v in split_prefix(self.tensors, f"ema.{name}.").items()}
            load_strict(ema.module, sd, what=f"EMA {name}", source=str(self.path))
            ema.num_updates = int(self.meta[f"ema.{name}.num_updates"])
        for name, opt in optimizers.items():
            _restore_optimizer(name, opt, self.tensors, self.json(f"opt.{name}"))
        torch.set_rng_state(self.tensors["rng.torch"])


def read_state(folder: str | Path) -> TrainState:
    from .checkpoint import read_safetensors

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume {folder}: no {STATE_FILE} there (not a latentgen training folder)")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a latentgen training state (format {meta.get('format')!r})")
    return TrainState(path, int(meta["step"]), tensors, meta)


def check_resume(state: TrainState, kind: str, opts: RunOptions) -> None:
    """--resume must repeat the run's options (those that change what is computed)."""
    if state.meta.get("kind") != kind:
        raise ConfigError(f"--resume {state.path.parent}: that folder holds a {state.meta.get('kind')} run, not {kind}")
    old, new = state.json("run"), json.loads(json.dumps(opts.identity()))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume {state.path.parent}: {flag} was {old.get(key)!r} in that run but is {new.get(key)!r} "
                f"now; repeat the run's options or start a new run in another --out"
            )


def prepare_out(opts: RunOptions) -> tuple[Path, TrainState | None]:
    """The output folder, and the state to resume from. Refuses to mix runs: nothing is written here."""
    if opts.resume is None and opts.out is None:
        raise ConfigError("--out DIR is required (or --resume DIR to continue a run)")
    out = Path(opts.out or opts.resume)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")
    state = read_state(opts.resume) if opts.resume is not None else None
    same = state is not None and out.resolve() == Path(opts.resume).resolve()
    if out.is_dir() and any(out.iterdir()) and not same and not opts.overwrite:
        raise InputError(
            f"--out {out} already holds files of another run; pass --resume {out} to continue it or --overwrite "
            "to start over"
        )
    return out, state


def lr_at(opts: RunOptions, step: int) -> float:
    """Linear warm-up over --warmup steps, then constant or a cosine decay to lr/10 at --steps."""
    lr = opts.lr * min(1.0, (step + 1) / opts.warmup) if opts.warmup else opts.lr
    if opts.lr_decay == "cosine":
        lr *= 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step / max(opts.steps, 1), 1.0)))
    return lr


def deadline(opts: RunOptions, t_begin: float) -> float | None:
    return t_begin + opts.time_budget if opts.time_budget > 0 else None


def check_run_options(opts: RunOptions) -> None:
    if getattr(opts, "workers", 0) < 0:
        raise ConfigError(f"--workers must be >= 0, not {opts.workers}")
    if opts.time_budget < 0:
        raise ConfigError(f"--time-budget must be >= 0 seconds, not {opts.time_budget}")
    if opts.lr_decay not in ("constant", "cosine"):
        raise ConfigError(f"--lr-decay must be constant or cosine, not {opts.lr_decay!r}")
    betas = getattr(opts, "adam_betas", (0.5, 0.9))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"--adam-betas takes two numbers in [0, 1) like 0.5,0.9, not {betas}")


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


# ============================================================================================ the loop


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

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
                    if self.dist.main:
                        self.log(f"interrupted: checkpoint of step {done} written to {result.out}")
                    break
        return result


def save_grid(rows: list[torch.Tensor], path: Path, text: dict | None = None) -> None:
    """Rows of images [n, 3, h, w] in [0, 1] (resized to the first row's size) → one PNG."""
    from .images import save_png, to_pil

    h, w = rows[0].shape[-2:]
    rows = [
        F.interpolate(r.float(), size=(h, w), mode="nearest") if r.shape[-2:] != (h, w) else r.float() for r in rows
    ]
    grid = torch.cat([torch.cat(list(r.cpu()), dim=-1) for r in rows], dim=-2)
    save_png(to_pil(grid), path, text={k: str(v) for k, v in (text or {}).items()}, overwrite=True)


# ==================================================================================== autoencoder losses


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. arXiv 1611.07004), as taming-transformers
    `taming/modules/discriminator/model.py` (BatchNorm, LeakyReLU 0.2, 4x4 convs; `main` Sequential)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*seq)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_discriminator(m: nn.Module) -> None:
    """taming `weights_init`: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye arXiv 1705.02894): ½(E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: nn.Parameter) -> torch.Tensor:
    """λ = ||∇_L L_rec|| / (||∇_L L_GAN|| + 1e-4), clamped to [0, 1e4] (Esser et al. 2012.09841, Eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


class LaplacianPyramidLoss(nn.Module):
    """Lap1 (Bojanowski et al. arXiv 1707.05776, Eq. 3): Σ_j 2^{2j}·|L^j(x) - L^j(x̂)|₁ over a Laplacian
    pyramid with a 5x5 binomial kernel, here as the per-level mean (the same weighting up to a constant).
    A perceptual substitute that needs no pretrained network. Returns one value per image, [B, 1, 1, 1]."""

    name = "laplacian-pyramid-l1"

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        d = x - y
        for _ in range(self.levels):
            if min(d.shape[-2:]) < 4:
                break
            low = _blur(d)
            total = total + (d - low).abs().mean(dim=(1, 2, 3))
            d = low[..., ::2, ::2]
        total = total + d.abs().mean(dim=(1, 2, 3))
        return total[:, None, None, None]


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices)


class VGG16Features(nn.Module):
    """torchvision `vgg16().features` up to relu5_3 (Simonyan & Zisserman arXiv 1409.1556), with its key names
    (`features.N.weight`) so a torchvision state dict loads directly."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """LPIPS `NetLinLayer`: `model = [Dropout, 1x1 conv without bias]` (key `linK.model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. arXiv 1801.03924, Eq. 1): Σ_l mean_hw ||w_l ⊙ (ŷ_l - ŷ'_l)||² over unit-normalised
    VGG16 activations, after LPIPS' ScalingLayer. Without learned heads w_l = 1 (lpips=False).
    Returns [B, 1, 1, 1]."""

    name = "lpips-vgg16"

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", NetLinLayer(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.heads = "uniform"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net((x - self.shift) / self.scale), self.net((y - self.shift) / self.scale)
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model[1]((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total


def load_lpips(path: str) -> LPIPS:
    """LPIPS from a safetensors file with torchvision VGG16 `features.N.*` (classifier.* ignored) and, when
    present, LPIPS' heads `lin{0..4}.model.1.weight`; otherwise uniform channel weights."""
    from .checkpoint import load_strict, read_safetensors

    tensors, _ = read_safetensors(path)
    lp = LPIPS()
    feats = {k: v for k, v in tensors.items() if k.startswith("features.")}
    if not feats:
        raise CheckpointError(f"--lpips-vgg {path}: no features.N.weight keys (torchvision VGG16 layout expected)")
    load_strict(lp.net, feats, what="VGG16 features", source=path)
    heads = {k: v for k, v in tensors.items() if k.startswith("lin")}
    if heads:
        load_strict(
            nn.ModuleDict({f"lin{i}": getattr(lp, f"lin{i}") for i in range(5)}),
            heads,
            what="LPIPS linear heads",
            source=path,
        )
        lp.heads = "lpips"
    else:
        with torch.no_grad():
            for i in range(5):
                getattr(lp, f"lin{i}").model[1].weight.fill_(1.0)
    return lp.eval().requires_grad_(False)


def perceptual_loss(opts: AEOptions) -> nn.Module:
    return load_lpips(opts.lpips_vgg) if opts.lpips_vgg else LaplacianPyramidLoss()


def perceptual_name(p: nn.Module) -> str:
    return f"{p.name} ({p.heads} heads)" if isinstance(p, LPIPS) else p.name


# ===================================================================================== train-ae


def ae_config(opts: AEOptions):
    from .autoencoder import AutoencoderConfig

    levels = int(round(math.log2(opts.f))) + 1
    if opts.f < 1 or 2 ** (levels - 1) != opts.f:
        raise ConfigError(f"--f {opts.f} must be a power of two (1, 2, 4, 8, ...)")
    mult = tuple(opts.ch_mult) if opts.ch_mult else (1, 2, 4, 4, 4, 4)[:levels]
    if len(mult) != levels:
        raise ConfigError(f"--ch-mult {','.join(map(str, mult))} has {len(mult)} levels; --f {opts.f} needs {levels}")
    if opts.norm_groups < 1 or any(opts.ch * m % opts.norm_groups for m in mult):
        raise ConfigError(
            f"--ch {opts.ch} × --ch-mult must give multiples of --norm-groups {opts.norm_groups} (GroupNorm)"
        )
    if opts.reg not in ("kl", "vq"):
        raise ConfigError(f"--reg must be kl or vq, not {opts.reg!r}")
    return AutoencoderConfig(
        kind=opts.reg,
        embed_dim=opts.embed_dim,
        z_channels=opts.embed_dim,
        ch=opts.ch,
        ch_mult=mult,
        num_res_blocks=opts.num_res_blocks,
        attn_resolutions=tuple(opts.attn_resolutions),
        resolution=opts.size,
        double_z=opts.reg == "kl",
        n_embed=opts.n_embed if opts.reg == "vq" else None,
        norm_groups=opts.norm_groups,
    )


@dataclass
class AETrainer:
    opts: AEOptions
    dist: Dist
    stream: BatchStream
    plan: MicroPlan
    ae: nn.Module
    disc: nn.Module
    perceptual: nn.Module
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA

    def generator_loss(self, x: torch.Tensor, g: torch.Generator, step: int):
        """taming LPIPSWithDiscriminator / VQLPIPSWithDiscriminator, optimizer_idx 0."""
        opts = self.opts
        if opts.reg == "kl":
            rec, posterior = self.ae(x, sample_posterior=True, generator=g)
        else:
            rec, qloss, _ = self.ae(x)
        rec_loss = (x - rec).abs()
        if opts.l2_weight:
            rec_loss = rec_loss + opts.l2_weight * (x - rec).pow(2)
        p_loss = self.perceptual(x.float(), rec.float()) if opts.perceptual_weight > 0 else rec.new_zeros(())
        rec_loss = rec_loss + opts.perceptual_weight * p_loss
        terms = {"rec": (x - rec).abs().mean().item(), "p": p_loss.mean().item()}
        if opts.reg == "kl":
            nll = rec_loss.sum() / rec_loss.shape[0]
            kl = posterior.kl().sum() / x.shape[0]
            loss = nll + opts.kl_weight * kl
            terms["kl"] = kl.item()
        else:
            nll = rec_loss.mean()
            loss = nll + opts.codebook_weight * qloss.mean()
            terms["q"] = qloss.mean().item()
        if step >= opts.disc_start:
            g_loss = -self.disc(rec).mean()
            d_weight = adaptive_weight(nll, g_loss, self.ae.decoder.conv_out.weight) * opts.disc_weight
            loss = loss + d_weight * g_loss
            terms.update(g=g_loss.item(), d_weight=d_weight.item())
        return loss, rec.detach(), terms

    def step(self, step: int) -> dict:
        opts, dist, plan = self.opts, self.dist, self.plan
        indices = self.stream.indices(step)
        set_lr(self.opt_ae, lr_at(opts, step))
        set_lr(self.opt_d, lr_at(opts, step))
        self.opt_ae.zero_grad(set_to_none=True)
        self.disc.requires_grad_(False)
        recs, totals = {}, {}
        for j in plan.mine:
            x = self.stream.items(indices[j * plan.size : (j + 1) * plan.size])["image"].to(dist.device)
            g = torch.Generator().manual_seed(step_seed(opts.seed, step, j))
            with autocast(dist, opts.bf16):
                loss, rec, terms = self.generator_loss(x, g, step)
            (loss / len(plan.mine)).backward()
            recs[j] = (x, rec)
            for k, v in {"loss": loss.item(), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v / len(plan.mine)
        ae_params = [p for p in self.ae.parameters() if p.requires_grad]
        dist.average_grads(ae_params)
        self.opt_ae.step()
        self.ema.update(self.ae)
        if step >= opts.disc_start:
            self.disc.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for j in plan.mine:
                x, rec = recs[j]
                with autocast(dist, opts.bf16):
                    d_loss = hinge_d_loss(self.disc(x), self.disc(rec))
                (d_loss / len(plan.mine)).backward()
                totals["d"] = totals.get("d", 0.0) + d_loss.item() / len(plan.mine)
            dist.average_grads(list(self.disc.parameters()))
            self.opt_d.step()
        return totals

    @torch.no_grad()
    def scale_factor(self) -> float:
        """1 / std of the EMA model's latents on the first global batch (LDM Sec. 4.3.2)."""
        x = self.stream.items(self.stream.indices(0))["image"].to(self.dist.device)
        z = self.ema.module.encode_latent(x)
        return float(1.0 / z.float().std().clamp(min=1e-8))

    def save(self, out: Path, step: int, meta: dict) -> Path:
        from .checkpoint import FIRST_STAGE_PREFIX, write_safetensors

        scale = self.scale_factor()  # collective-free: every rank computes it, rank 0 writes
        if not self.dist.main:
            return out / AE_FILE
        save_state(
            out / STATE_FILE,
            step=step,
            modules={"ae": self.ae, "disc": self.disc},
            optimizers={"ae": self.opt_ae, "disc": self.opt_d},
            emas={"ae": self.ema},
            meta=meta,
        )
        module = cast_copy(self.ema.module, self.opts.save_dtype)
        tensors = {FIRST_STAGE_PREFIX + k: v for k, v in module.state_dict().items()}
        info = {
            "autoencoder": json.dumps({"config": self.ema.module.config.to_dict(), "scale_factor": scale}),
            "perceptual_loss": perceptual_name(self.perceptual),
            "step": str(step),
            "training": json.dumps(self.opts.identity()),
        }
        write_safetensors(out / AE_FILE, tensors, info)
        return out / AE_FILE

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        x = self.stream.items(list(range(min(8, len(self.stream.dataset)))))["image"].to(self.dist.device)
        rec = self.ema.module.decode_latent(self.ema.module.encode_latent(x))
        save_grid(
            [(x + 1) / 2, ((rec.float() + 1) / 2).clamp(0, 1)],
            out / "samples" / f"step-{step:07d}.png",
            {"latentgen": json.dumps({"task": "train-ae", "step": step, "rows": ["input", "reconstruction"]})},
        )


def train_autoencoder(opts: AEOptions, *, log=stderr_log, callback=None) -> TrainResult:
    """Train a KL or VQ first stage (see the module docstring). Writes DIR/autoencoder.safetensors
    (EMA weights, `checkpoint.load_first_stage` format) and DIR/state.safetensors."""
    from .autoencoder import AutoencoderConfig, build_autoencoder
    from .checkpoint import load_first_stage

    t_begin = time.perf_counter()
    check_run_options(opts)
    dist = setup_distributed(opts.device)
    out, state = prepare_out(opts)
    dataset = open_data(opts)
    plan = plan_micro_batches(opts, dist)
    perceptual = perceptual_loss(opts).to(dist.device)
    torch.manual_seed(opts.seed)
    if state is not None:
        check_resume(state, "autoencoder", opts)
        cfg = AutoencoderConfig.from_dict(state.json("model_config"))
        ae = build_autoencoder(cfg)
    elif opts.init:
        fs = load_first_stage(opts.init)
        ae, cfg = fs.module.float().requires_grad_(True), fs.cfg
    else:
        cfg = ae_config(opts)
        ae = build_autoencoder(cfg)
    disc = NLayerDiscriminator(cfg.out_ch, opts.disc_ch, opts.disc_layers)
    if state is not None:
        state.load_module("ae", ae)
        state.load_module("disc", disc)
    ae.to(dist.device).train().requires_grad_(True)
    disc.to(dist.device).train()
    opt_ae = torch.optim.Adam(ae.parameters(), lr=opts.lr, betas=tuple(opts.adam_betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts.lr, betas=tuple(opts.adam_betas))
    ema = EMA(ae, opts.ema_decay)
    start = 0
    if state is not None:
        state.restore(optimizers={"ae": opt_ae, "disc": opt_d}, emas={"ae": ema})
        start = state.step
    trainer = AETrainer(
        opts, dist, BatchStream(dataset, opts.batch_size, opts.seed), plan, ae, disc, perceptual, opt_ae, opt_d, ema
    )
    meta = {
        "kind": "autoencoder",
        "run": opts.identity(),
        "model_config": cfg.to_dict(),
        "perceptual_loss": perceptual_name(perceptual),
    }
    if dist.main:
        log(
            f"train-ae: {cfg.kind.upper()} f={cfg.factor}, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M "
            f"params, perceptual loss: {perceptual_name(perceptual)}, {dist.world} process(es), from step {start}"
        )
    result = TrainResult(out, start, model_path=out / AE_FILE)
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
    return loop.run(start, result)


# ===================================================================================== train-ldm


def cond_name(cfg) -> str:
    """The --cond value that describes a ModelConfig."""
    if cfg.concat == "lowres":
        return "sr"
    if cfg.concat == "inpaint":
        return "inpaint"
    return {"bert": "text", "class": "class", "none": "none"}.get(cfg.cond.kind, "text")


def class_names(dataset) -> list[str]:
    """Class of an item: for the shapes set, colour and shape of the first object ("red circle"); for a
    folder, its caption (each distinct caption is a class)."""
    from .data import COLOURS, SHAPES, ShapesDataset

    if isinstance(dataset, ShapesDataset):
        return [f"{c} {s}" for c in COLOURS for s in SHAPES]
    names = sorted(set(dataset.captions))
    if len(names) < 2 or "" in names:
        raise InputError(
            f"--cond class needs every image of '{dataset.root}' captioned with its class name (at least two classes)"
        )
    return names


def class_label(dataset, names: list[str], caption: str) -> int:
    from .data import ShapesDataset, parse_caption

    if isinstance(dataset, ShapesDataset):
        obj = parse_caption(caption).objects[0]
        return names.index(f"{obj.colour} {obj.shape}")
    return names.index(caption)


def ldm_config(opts: LDMOptions, first_stage_cfg, scale: float, n_classes: int | None, captions: bool):
    """A new model's config: text conditioning for --cond text, and for --cond inpaint when captions exist."""
    from .conditioning import CondConfig
    from .config import ModelConfig
    from .unet import UNetConfig

    if any(opts.model_channels * m % 32 for m in opts.channel_mult):
        raise ConfigError(
            f"--model-channels {opts.model_channels} × --channel-mult must give multiples of 32 "
            "(GroupNorm with 32 groups); e.g. --model-channels 32 or 64"
        )
    lat = first_stage_cfg.embed_dim
    text = opts.cond == "text" or (opts.cond == "inpaint" and captions)
    if opts.cond == "class":
        cond = CondConfig(kind="class", n_classes=n_classes + 1, embed_dim=opts.class_dim, null_label=n_classes)
    elif text:
        cond = CondConfig(
            kind="bert",
            n_embed=opts.text_dim,
            n_layer=opts.text_layers,
            heads=opts.text_heads,
            dim_head=opts.text_dim // opts.text_heads,
            max_seq_len=opts.text_length,
        )
    else:
        cond = CondConfig(kind="none")
    extra = {"sr": 3, "inpaint": lat + 1}.get(opts.cond, 0)
    concat = {"sr": "lowres", "inpaint": "inpaint"}.get(opts.cond)
    ctx = cond.context_dim
    unet = UNetConfig(
        in_channels=lat + extra,
        out_channels=lat,
        model_channels=opts.model_channels,
        attention_resolutions=tuple(opts.attention_resolutions),
        num_res_blocks=opts.num_res_blocks,
        channel_mult=tuple(opts.channel_mult),
        num_head_channels=opts.num_head_channels,
        use_spatial_transformer=ctx is not None,
        transformer_depth=opts.transformer_depth,
        context_dim=ctx,
        image_size=opts.size // first_stage_cfg.factor,
    )
    key = ("hybrid" if ctx else "concat") if concat else ("crossattn" if ctx else "none")
    return ModelConfig(
        unet=unet,
        first_stage=first_stage_cfg,
        cond=cond,
        family="latentgen",
        prediction=opts.prediction,
        prediction_source="metadata",
        conditioning_key=key,
        concat=concat,
        scale_factor=scale,
        name=Path(opts.out or opts.resume).name,
    )


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The super-resolution input: an image in [-1, 1] downsampled by the autoencoder's factor f (bicubic,
    antialiased), so it lies at latent resolution (LDM Sec. 4.4; concat conditioning)."""
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def _load_ae(path: str, device):
    from .checkpoint import load_first_stage

    try:
        return load_first_stage(path, device=device)
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"--ae {path}: not an autoencoder latentgen can load ({e})") from e


@dataclass
class LDMTrainer:
    opts: LDMOptions
    dist: Dist
    stream: BatchStream
    plan: MicroPlan
    cfg: object  # ModelConfig
    unet: nn.Module
    cond: nn.Module
    first_stage: nn.Module
    schedule: object
    opt: torch.optim.Optimizer
    emas: dict
    classes: list[str] | None = None
    cache: dict | None = None  # --cache-latents: {"enc": every item's encoder output, "captions": [...]}

    @torch.no_grad()
    def fill_cache(self) -> None:
        """--cache-latents: every item's encoder output (KL moments / VQ latent) and caption, computed once up
        front (each rank encodes its share, then all gather; --workers processes render / load the images), so
        steps only draw the posterior noise and never touch the images again, except for sr / inpaint."""
        from .autoencoder import DiagonalGaussian

        ds, dist = self.stream.dataset, self.dist
        per = -(-len(ds) // dist.world)
        mine = torch.utils.data.Subset(ds, range(dist.rank * per, min(len(ds), (dist.rank + 1) * per)))
        loader = torch.utils.data.DataLoader(mine, batch_size=max(self.plan.size, 16), num_workers=self.opts.workers)
        encs, captions = [], []
        for batch in loader:
            e = self.first_stage.encode(batch["image"].to(dist.device))
            encs.append(e.moments if isinstance(e, DiagonalGaussian) else e)
            captions += batch["caption"]
        enc = torch.cat(encs)
        if dist.world > 1:
            pad = enc.new_zeros((per - enc.shape[0], *enc.shape[1:]))
            parts = [enc.new_empty((per, *enc.shape[1:])) for _ in range(dist.world)]
            torch.distributed.all_gather(parts, torch.cat([enc, pad]))
            enc = torch.cat(parts)[: len(ds)]
            everyone: list = [None] * dist.world
            torch.distributed.all_gather_object(everyone, captions)
            captions = [c for part in everyone for c in part]
        self.cache = {"enc": enc, "captions": captions}
        if self.cfg.cond.kind == "bert":  # token ids too: the tokenizer costs ~0.15 ms per caption and step
            unique = sorted(set(captions) | {""})
            ids = torch.cat([self.cond.tokenize(unique[i : i + 4096]) for i in range(0, len(unique), 4096)])
            row = {c: i for i, c in enumerate(unique)}
            self.cache["ids"] = ids[torch.tensor([row[c] for c in captions])]
            self.cache["empty"] = ids[row[""]]

    @torch.no_grad()
    def latents(self, x: torch.Tensor, g: torch.Generator | None, index: list[int] | None = None) -> torch.Tensor:
        """Scaled latent: a posterior sample (LDM get_first_stage_encoding) × scale factor; from the cache of
        encoder outputs where the items' indices are given and --cache-latents is on."""
        if self.cache is None or index is None:
            z = self.first_stage.encode_latent(x, generator=g, sample=g is not None)
            return z.float() * self.cfg.scale_factor
        from .autoencoder import DiagonalGaussian

        enc = self.cache["enc"][torch.as_tensor(index, device=self.cache["enc"].device)]
        if self.cfg.first_stage.kind == "kl":
            posterior = DiagonalGaussian(enc)
            enc = posterior.sample(g) if g is not None else posterior.mode()
        return enc.float() * self.cfg.scale_factor

    def lowres(self, x: torch.Tensor) -> torch.Tensor:
        return downsample(x, self.cfg.factor)

    def conditioning(self, batch: dict, x: torch.Tensor, g: torch.Generator) -> dict:
        """Denoiser kwargs of a micro-batch; text / class dropped with probability --cond-drop."""
        opts, kind, n = self.opts, self.cfg.cond.kind, len(batch["caption"])
        drop = torch.rand(n, generator=g) < opts.cond_drop
        kw: dict = {}
        if kind == "bert" and self.cache is not None:  # fill_cache tokenized every caption
            ids = self.cache["ids"][torch.tensor(batch["index"])]
            ids = torch.where(drop[:, None], self.cache["empty"], ids)
            kw["context"] = self.cond(ids.to(self.dist.device))
        elif kind == "bert":
            prompts = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            kw["context"] = self.cond(self.cond.tokenize(prompts).to(self.dist.device))
        elif kind == "class":
            labels = [
                self.cfg.cond.null_label if d else class_label(self.stream.dataset, self.classes, c)
                for c, d in zip(batch["caption"], drop.tolist())
            ]
            kw["context"] = self.cond(torch.tensor(labels, device=self.dist.device))
        if self.cfg.concat == "lowres":
            kw["concat"] = self.lowres(x)
        elif self.cfg.concat == "inpaint":
            from .data import random_mask

            mask = torch.stack([random_mask(x.shape[-2], x.shape[-1], g) for _ in range(n)]).to(x.device)
            masked = self.latents(x * (1 - mask), g)
            kw["concat"] = torch.cat([F.interpolate(mask, size=masked.shape[-2:]), masked], dim=1)
        return kw

    def step(self, step: int) -> dict:
        from .denoiser import training_loss

        opts, dist, plan = self.opts, self.dist, self.plan
        indices = self.stream.indices(step)
        set_lr(self.opt, lr_at(opts, step))
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in plan.mine:
            mine = indices[j * plan.size : (j + 1) * plan.size]
            if self.cache is not None and self.cfg.concat is None:  # no image needed
                batch, x = {"caption": [self.cache["captions"][i] for i in mine], "index": mine}, None
            else:
                batch = self.stream.items(mine)
                x = batch["image"].to(dist.device)
            g = torch.Generator().manual_seed(step_seed(opts.seed, step, j))
            with autocast(dist, opts.bf16):
                kw = self.conditioning(batch, x, g)
                z0 = self.latents(x, g, batch["index"])
                loss = training_loss(self.unet, self.schedule, self.cfg.prediction, z0, kw, g)
            (loss / len(plan.mine)).backward()
            total += loss.item() / len(plan.mine)
        params = [p for m in (self.unet, self.cond) for p in m.parameters() if p.requires_grad]
        dist.average_grads(params)
        self.opt.step()
        for name, m in (("unet", self.unet), ("cond", self.cond)):
            if name in self.emas:
                self.emas[name].update(m)
        return {"loss": total}

    def ema_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.emas["unet"].module, self.emas["cond"].module if "cond" in self.emas else self.cond

    def save(self, out: Path, step: int, meta: dict) -> Path:
        from .checkpoint import save_model

        if not self.dist.main:
            return out / LDM_FILE
        emas = {k: v for k, v in self.emas.items()}
        save_state(
            out / STATE_FILE,
            step=step,
            modules={"unet": self.unet, "cond": self.cond, "first_stage": self.first_stage},
            optimizers={"ldm": self.opt},
            emas=emas,
            meta=meta,
        )
        unet, cond = self.ema_modules()
        d = self.opts.save_dtype
        extra = {"step": str(step), "training": json.dumps(self.opts.identity())}
        if self.classes:
            extra["class_names"] = json.dumps(self.classes)
        save_model(
            out / LDM_FILE,
            self.cfg,
            cast_copy(unet, d),
            cast_copy(self.first_stage, d),
            cast_copy(cond, d),
            metadata=extra,
        )
        return out / LDM_FILE

    def bundle(self):
        from .checkpoint import ModelBundle

        unet, cond = self.ema_modules()
        return ModelBundle(self.cfg, unet, self.first_stage, cond, self.schedule, "<training>", "latentgen")

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        from . import pipelines

        n = min(4, len(self.stream.dataset))
        batch = self.stream.items(list(range(n)))
        x01 = (batch["image"] + 1) / 2
        bundle, kind, concat = self.bundle(), self.cfg.cond.kind, self.cfg.concat
        guided = 3.0 if self.opts.cond_drop > 0 and kind in ("bert", "class") else 1.0
        settings = pipelines.Settings(steps=self.opts.sample_steps, sampler="dpmpp_2m", cfg=guided)
        seeds = list(range(n))
        prompts = batch["caption"] if kind == "bert" else [""] * n
        if kind == "class":
            prompts = [str(class_label(self.stream.dataset, self.classes, c)) for c in batch["caption"]]
        size = x01.shape[-1]
        if concat == "lowres":
            low = (self.lowres(batch["image"]) + 1) / 2
            rows = [low, pipelines.superres(bundle, low, seeds, settings), x01]
        elif concat == "inpaint":
            from .data import random_mask

            g = torch.Generator().manual_seed(step_seed(self.opts.seed, 0xA5))
            masks = torch.stack([random_mask(size, size, g) for _ in range(n)])
            settings.strength = 1.0
            res = pipelines.inpaint(bundle, x01, masks, prompts, [""] * n, seeds, settings)
            rows = [x01 * (1 - masks), res, x01]
        else:
            rows = [pipelines.txt2img(bundle, prompts, [""] * n, seeds, size, size, settings), x01]
        save_grid(
            rows,
            out / "samples" / f"step-{step:07d}.png",
            {"latentgen": json.dumps({"task": "train-ldm", "step": step, "prompts": prompts})},
        )


@torch.no_grad()
def measure_scale(first_stage: nn.Module, stream: BatchStream, batches: int, device) -> float:
    """LDM Sec. 4.3.2 / App. D.1: rescale latents to unit variance, scale = 1 / std(z) over the first batches
    (posterior means; every rank computes the same value)."""
    zs = []
    for step in range(max(batches, 1)):
        x = stream.items(stream.indices(step))["image"].to(device)
        zs.append(first_stage.encode_latent(x).float())
    return float(1.0 / torch.cat(zs).std().clamp(min=1e-8))


def _build_ldm(opts: LDMOptions, state: TrainState | None, stream: BatchStream, classes, dist: Dist, log):
    """(ModelConfig, unet, cond, first_stage) for a fresh run, a fine-tune (--init) or a resume."""
    from .checkpoint import build_modules, load_model
    from .config import ModelConfig

    if state is not None:
        cfg = ModelConfig.from_dict(state.json("model_config"))
        unet, first_stage, cond = build_modules(cfg)
        for name, m in (("unet", unet), ("cond", cond), ("first_stage", first_stage)):
            state.load_module(name, m)
        return cfg, unet, cond, first_stage
    if opts.init:
        if opts.ae:
            raise ConfigError("--ae and --init both given: a fine-tune uses the autoencoder inside --init; drop --ae")
        bundle = load_model(opts.init)
        cfg = bundle.config
        if cond_name(cfg) != opts.cond:
            raise ConfigError(f"--init {opts.init} is a '{cond_name(cfg)}' model; pass --cond {cond_name(cfg)}")
        cfg.prediction, cfg.prediction_source = opts.prediction, "metadata"
        return cfg, bundle.unet.float(), bundle.cond.float(), bundle.first_stage.float()
    if not opts.ae:
        raise ConfigError("--ae AE.safetensors is required (the autoencoder from train-ae), or --init CKPT")
    fs = _load_ae(opts.ae, dist.device)
    scale = measure_scale(fs.module, stream, opts.scale_batches, dist.device)
    if dist.main:
        log(f"train-ldm: latent scale factor 1/std = {scale:.5g} (measured on {opts.scale_batches} batches)")
    cfg = ldm_config(opts, fs.cfg, scale, len(classes) if classes else None, _has_captions(stream.dataset))
    unet, _, cond = build_modules(cfg)
    return cfg, unet, cond, fs.module.float()


def _has_captions(dataset) -> bool:
    from .data import ShapesDataset

    return isinstance(dataset, ShapesDataset) or all(c.strip() for c in getattr(dataset, "captions", [""]))


def train_ldm(opts: LDMOptions, *, log=stderr_log, callback=None) -> TrainResult:
    """Train (or fine-tune) a latent diffusion model on a frozen autoencoder. Writes DIR/model.safetensors
    (EMA weights, `checkpoint.load_model` format) and DIR/state.safetensors."""
    from .checkpoint import make_schedule

    if opts.cond not in COND_CHOICES:
        raise ConfigError(f"--cond must be one of {', '.join(COND_CHOICES)}, not {opts.cond!r}")
    if opts.prediction not in ("eps", "v"):
        raise ConfigError(f"--prediction must be eps or v, not {opts.prediction!r}")
    if not 0.0 <= opts.cond_drop < 1.0:
        raise ConfigError(f"--cond-drop must be in [0, 1), not {opts.cond_drop}")
    t_begin = time.perf_counter()
    check_run_options(opts)
    dist = setup_distributed(opts.device)
    out, state = prepare_out(opts)
    if state is not None:
        check_resume(state, "ldm", opts)
    dataset = open_data(opts, require_captions=opts.cond == "text")
    plan = plan_micro_batches(opts, dist)
    stream = BatchStream(dataset, opts.batch_size, opts.seed)
    classes = class_names(dataset) if opts.cond == "class" else None
    torch.manual_seed(opts.seed)
    cfg, unet, cond, first_stage = _build_ldm(opts, state, stream, classes, dist, log)
    if cfg.factor * (opts.size // cfg.factor) != opts.size:
        raise ConfigError(f"--size {opts.size} is not a multiple of the autoencoder's factor {cfg.factor}")
    first_stage.to(dist.device).eval().requires_grad_(False)
    unet.to(dist.device).train().requires_grad_(True)
    trainable_cond = cfg.cond.kind in ("bert", "class")
    cond.to(dist.device).train().requires_grad_(trainable_cond)
    params = list(unet.parameters()) + (list(cond.parameters()) if trainable_cond else [])
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    emas = {"unet": EMA(unet, opts.ema_decay)}
    if trainable_cond:
        emas["cond"] = EMA(cond, opts.ema_decay)
    start = 0
    if state is not None:
        state.restore(optimizers={"ldm": opt}, emas=emas)
        start = state.step
    schedule = make_schedule(cfg)
    trainer = LDMTrainer(opts, dist, stream, plan, cfg, unet, cond, first_stage, schedule, opt, emas, classes)
    if opts.cache_latents:
        t = time.perf_counter()
        trainer.fill_cache()
        if dist.main:
            log(f"train-ldm: {len(dataset)} items encoded for --cache-latents in {time.perf_counter() - t:.1f} s")
    meta = {"kind": "ldm", "run": opts.identity(), "model_config": cfg.to_dict()}
    if dist.main:
        n = sum(p.numel() for p in unet.parameters()) / 1e6
        log(
            f"train-ldm: cond {cond_name(cfg)} ({cfg.conditioning_key}), {opts.prediction}-prediction, UNet {n:.2f}M "
            f"params, scale {cfg.scale_factor:.5g}, {dist.world} process(es), from step {start}"
        )
    result = TrainResult(out, start, model_path=out / LDM_FILE)
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
    return loop.run(start, result)
