"""Shared helpers for tests that need tiny random models in the original checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw EVERY parameter, so that a wrong mapping or a skipped layer cannot hide.

    GroupNorm/LayerNorm weight 1 + 0.2 N, bias 0.1 N; embeddings 0.5 N; other >= 2-D weights
    N / sqrt(fan_in) (zero-initialised layers included); other 1-D parameters 0.1 N.
    """
    g = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                value = 1 + 0.2 * noise if name == "weight" else 0.1 * noise
            elif isinstance(mod, nn.Embedding):
                value = 0.5 * noise
            elif p.ndim >= 2:
                value = noise / p[0].numel() ** 0.5
            else:
                value = 0.1 * noise
            p.copy_(value)
    return module


def original_state_dict(unet: nn.Module | None = None, first_stage: nn.Module | None = None) -> dict:
    """State dict in the original single-file layout (`model.diffusion_model.*`, `first_stage_model.*`)."""
    sd = {}
    for prefix, mod in ((UNET_PREFIX, unet), (FIRST_STAGE_PREFIX, first_stage)):
        if mod is not None:
            sd.update({prefix + k: v.detach().clone().contiguous() for k, v in mod.state_dict().items()})
    return sd


def save_original_checkpoint(
    path: Path,
    unet: nn.Module | None = None,
    first_stage: nn.Module | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the modules as an original single-file safetensors checkpoint."""
    save_file(original_state_dict(unet, first_stage), str(path), metadata=metadata)
    return path


def strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def max_scaled_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(1, |ref|), elementwise."""
    return ((a.float() - ref.float()).abs() / ref.float().abs().clamp(min=1.0)).max().item()
