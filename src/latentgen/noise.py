"""Noise sources that match other tools, and A1111's variation seeds.

  cpu   torch.Generator("cpu").manual_seed(seed): latentgen's default, diffusers' and ComfyUI's with a CPU
        generator; the same numbers on every device.
  cuda  torch.Generator("cuda").manual_seed(seed), drawn on the GPU: A1111's default ("GPU"); needs CUDA.
  nv    A1111's "NV" RNG (modules/rng_philox.py): Philox 4x32-10 (Salmon et al., "Parallel random numbers:
        as easy as 1, 2, 3", SC 2011; Random123) counter-based draws with a Box-Muller transform, laid out as
        torch's CUDA randn lays them out, so it gives A1111's GPU noise on any device.

Each image has its own generator (seed S + i); the samplers draw their step noise from it too (samplers.randn
calls `.randn(shape)` on generators that offer it). A1111's eta noise seed delta (ENSD) re-seeds the step noise
with S + i + delta once the initial noise is drawn.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError

RNGS = ("cpu", "cuda", "nv")

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
# A1111's float32 constants: 2^-32 and 2^-32·2π, rounded to float32 (the arithmetic then runs in float64).
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32-R on n blocks at once: counter [4, n] and key [2, n] uint32 → [4, n] uint32.

    One round: (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2 (64-bit products), c ← (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1,
    lo0); the key gains the Weyl increments W between rounds (Salmon et al. 2011, §5; Random123 philox.h).
    """
    c = [np.asarray(counter[i], dtype=np.uint64) for i in range(4)]
    k = [np.asarray(key[i], dtype=np.uint64) for i in range(2)]
    for r in range(rounds):
        if r:
            k = [(k[0] + PHILOX_W[0]) & _MASK32, (k[1] + PHILOX_W[1]) & _MASK32]
        p0, p1 = c[0] * np.uint64(PHILOX_M[0]), c[2] * np.uint64(PHILOX_M[1])
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & _MASK32]
    return np.stack(c).astype(np.uint32)


class PhiloxGenerator:
    """A1111's NV RNG for one seed. Call i of `randn(shape)` gives element j the Philox block with counter
    (i, 0, j, 0) and key (seed mod 2^32, seed div 2^32), and maps its first two words to one normal:
    sqrt(-2 ln u)·sin(v), u = (w0 + ½)·2^-32, v = (w1 + ½)·2π·2^-32."""

    def __init__(self, seed: int):
        self.seed = int(seed) % 2**64
        self.offset = 0
        self.device = torch.device("cpu")

    def initial_seed(self) -> int:
        return self.seed

    def randn(self, shape) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        key = np.empty((2, n), dtype=np.uint32)
        key[0], key[1] = self.seed & 0xFFFFFFFF, self.seed >> 32
        self.offset += 1
        w = philox4x32(counter, key)
        u = w[0].astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = w[1].astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        normal = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)
        return torch.from_numpy(normal.reshape(shape))


def make_generator(seed: int, rng: str = "cpu"):
    """The generator an image with this seed draws from, for noise source `rng`."""
    if rng == "cpu":
        return torch.Generator("cpu").manual_seed(int(seed))
    if rng == "nv":
        return PhiloxGenerator(seed)
    if rng == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--rng cuda draws on the GPU, and no CUDA device is available: use --rng nv (the same "
                "numbers on any device) or --rng cpu"
            )
        return torch.Generator("cuda").manual_seed(int(seed))
    raise ConfigError(f"unknown --rng '{rng}'; choose one of {', '.join(RNGS)}")


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of one image's noise `low` with its variation noise `high` (shape [C, H, W]):
    spherical interpolation with the norms and angles taken along dim 1, as A1111 does; nearly parallel
    inputs fall back to A1111's linear `low·t + high·(1 - t)`."""
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high
