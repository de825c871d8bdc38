"""Training options (dataclasses) for both trainers, their checks, and the file names of a run folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

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
    signal: int = 0  # the signal that interrupted the run (2 SIGINT, 15 SIGTERM)
    model_path: Path | None = None


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
