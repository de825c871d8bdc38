"""Hires fix (A1111's "Hires. fix"): txt2img at the base size, upscale, then img2img at the target size.

The first pass makes the composition at the size the model was trained for; its latent is enlarged, either in
latent space (`latent*`: interpolation of the scaled latent, as A1111's "Latent" upscalers) or in pixel space
(`lanczos`: decode, Lanczos-resize, encode); the second pass is SDEdit at `strength` with fresh noise from each
image's seed, optionally with its own sampler, step count and prompt. Large images decode in tiles
(pipelines.decode), so any family works at any scale memory allows; the memory guard checks the second pass's
size before the first pass runs. SDXL's second pass conditions on its own (upscaled) size, as A1111's hires pass
does (original = target = the upscaled size, unless --original-size / --target-size are given).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import pipelines
from .errors import ConfigError, InputError
from .infotext import HIRES_UPSCALERS
from .loading.bundle import ModelBundle
from .text.schedule import schedule_steps

UPSCALERS = tuple(HIRES_UPSCALERS)  # latent, latent-bicubic, latent-antialiased, lanczos
MAX_SCALE = 8.0


@dataclass
class Hires:
    scale: float
    steps: int | None = None  # None: the first pass's step count
    strength: float = 0.7
    upscaler: str = "latent"
    sampler: str | None = None  # None: the first pass's sampler (and schedule)
    prompt: str | None = None  # None: the first pass's prompt
    negative: str | None = None

    def check(self) -> None:
        if not 1.0 <= self.scale <= MAX_SCALE:
            raise ConfigError(f"--hires {self.scale}: the upscale factor must be between 1 and {MAX_SCALE:g}")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--hires-strength {self.strength}: must be in (0, 1]")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--hires-steps {self.steps}: must be at least 1")
        if self.upscaler not in UPSCALERS:
            raise ConfigError(f"--hires-upscaler '{self.upscaler}': choose one of {', '.join(UPSCALERS)}")

    def second_pass(self, settings: pipelines.Settings) -> pipelines.Settings:
        """The second pass's settings: the first's with the hires steps, sampler and strength."""
        st = replace(settings, steps=self.steps or settings.steps, strength=self.strength)
        if self.sampler is not None and self.sampler != settings.sampler:
            st = replace(st, sampler=self.sampler, scheduler=None, karras=None)  # the new sampler's default schedule
        st.check()
        return st


def target_size(bundle: ModelBundle, width: int, height: int, scale: float) -> tuple[int, int]:
    """width·scale × height·scale, rounded down to what the model accepts (pipelines.size_multiple)."""
    m = pipelines.size_multiple(bundle)
    return max(m, int(width * scale) // m * m), max(m, int(height * scale) // m * m)


def upscale_latent(bundle: ModelBundle, z, width: int, height: int, upscaler: str, seeds: list[int], rng="cpu"):
    """The scaled latent z enlarged to the latent of a width × height image, and the generators the second pass
    draws from (fresh ones from the seeds; after the encoder's posterior sample for `lanczos`)."""
    gens = pipelines.generators(seeds, rng)
    f = bundle.config.factor
    size = (height // f, width // f)
    if upscaler != "lanczos":
        mode = "bicubic" if upscaler == "latent-bicubic" else "bilinear"
        antialias = upscaler == "latent-antialiased"
        up = F.interpolate(z.float(), size=size, mode=mode, align_corners=False, antialias=antialias)
        return up.to(z.dtype), gens
    images = pipelines.decode(bundle, z)
    resized = [
        Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).resize(
            (width, height), Image.LANCZOS
        )
        for img in images
    ]
    batch = torch.stack([torch.from_numpy(np.asarray(r, dtype=np.float32) / 255).permute(2, 0, 1) for r in resized])
    return pipelines.encode(bundle, batch, gens), gens


def txt2img_hires(
    bundle: ModelBundle,
    prompts: list,
    negatives: list,
    seeds: list[int],
    width: int,
    height: int,
    settings: pipelines.Settings,
    hires: Hires,
    callback=None,
) -> torch.Tensor:
    """Images of the target size (target_size) in [0, 1]: first pass at width × height, then the hires pass."""
    hires.check()
    second = hires.second_pass(settings)
    w2, h2 = target_size(bundle, width, height, hires.scale)
    try:  # the second pass is the larger job: refuse it before the first pass runs
        pipelines.guard_memory(bundle, len(seeds), w2, h2, second)
    except InputError as e:
        raise InputError(f"--hires {hires.scale:g} ({w2}x{h2}): {e}, or a lower --hires") from None
    z = pipelines.txt2img_latent(bundle, prompts, negatives, seeds, width, height, settings, callback)
    up, gens = upscale_latent(bundle, z, w2, h2, hires.upscaler, seeds, settings.rng)
    p2 = [hires.prompt] * len(seeds) if hires.prompt is not None else prompts
    n2 = [hires.negative] * len(seeds) if hires.negative is not None else negatives
    first = schedule_steps(settings.steps, settings.sampler)  # prompt editing counts on from the first pass
    return pipelines.decode(bundle, pipelines.img2img_latent(bundle, up, p2, n2, gens, second, callback, first))
