"""The original single-file layout (CompVis / Stability): key prefixes, the keys to ignore, strict loading of
one part of a checkpoint into its module, and where the shipped models live."""

from __future__ import annotations

import re

from torch import nn

from ..errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."


FIRST_STAGE_PREFIX = "first_stage_model."


COND_PREFIX = "cond_stage_model."


FORMAT_TAG = "latentgen/1"


SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}


# Keys that original checkpoints carry and inference does not use: schedule buffers (read, not loaded),
# training-only loss weights, EMA copies (used only with ema=True), the autoencoder's training losses,
# the SD x4 upscaler's low-res noising schedule.
IGNORED_KEYS = SCHEDULE_BUFFERS | {"lvlb_weights", "logvar", "scale_factor", "model_ema.decay", "model_ema.num_updates"}


LOW_SCALE_PREFIX = "low_scale_model."


IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", LOW_SCALE_PREFIX, "loss.")


def split_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, sd: dict, *, what: str, source: str, ignore: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict=True) with one readable error naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if not any(re.fullmatch(p, k) for p in ignore)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [
        f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if keys:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{more}")
    if problems:
        raise CheckpointError(f"{source}: {what} weights do not match the architecture — {'; '.join(problems)}")
    module.load_state_dict(sd, strict=True, assign=True)
