"""Samplers: stateless functions over a denoiser, in the style of k-diffusion's sampling.py.

    sample_<name>(model, x, sigmas, *, extra_args=None, callback=None, generator=None, **options) -> x

`model(x, sigma, **extra_args)` returns the clean estimate D(x; σ) in x-space (x = z0 + σ ε, see
denoiser.py); `sigmas` is the descending list of noise levels to visit (denoiser.get_sigmas), of which
img2img passes just the tail — nothing here assumes sigmas[0] is σ_max. `callback` gets
{"i", "sigma", "x", "denoised"} once per step. Stochastic samplers draw their noise with torch.randn on
the CPU from `generator` (one torch.Generator, or a list with one per batch item) and move it to x's
device, so results do not depend on the device.

With the levels from get_sigmas each sampler reproduces a diffusers scheduler step for step:
ddim ↔ DDIMScheduler, plms ↔ PNDMScheduler(skip_prk_steps=True), euler ↔ EulerDiscreteScheduler,
euler_a ↔ EulerAncestralDiscreteScheduler, heun ↔ HeunDiscreteScheduler, dpmpp_2m / dpmpp_2m_sde ↔
DPMSolverMultistepScheduler("dpmsolver++" / "sde-dpmsolver++", order 2, midpoint), ddpm ↔ DDPMScheduler.
In x-space DDIM(η) and the DDPM posterior step are the Euler-ancestral step (shown in `_ancestral_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import ConfigError


def randn(shape, generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit noise drawn on the CPU (one generator, or one per batch item, as diffusers' randn_tensor with a
    generator list), then moved to `device`: results do not depend on the device or the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ConfigError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        noise = torch.randn(tuple(shape), generator=generator)
    return noise.to(device, dtype)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def _denoise(model, x, sigma: float, extra_args, callback, i: int) -> torch.Tensor:
    """One network evaluation at level σ for the whole batch, reported to the callback."""
    denoised = model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
    return denoised


def _ancestral_step(x, denoised, sigma: float, sigma_next: float, eta: float, generator) -> torch.Tensor:
    """x at σ_next = D + σ_down·ε̂ + σ_up·n, σ_up = η·σ_next·sqrt(σ² - σ_next²)/σ, σ_down² = σ_next² - σ_up².

    k-diffusion's get_ancestral_step. Dividing DDIM's update (Song et al. 2020, eq. 12 and 16) by
    sqrt(ā_prev) gives exactly this, so DDIM(η) and the DDPM posterior (η = 1, Ho et al. eq. 7) are it.
    """
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x = x + (x - denoised) / sigma * (sigma_down - sigma)
    if sigma_up > 0:
        x = x + _randn_like(x, generator) * sigma_up
    return x


def _run_ancestral(model, x, sigmas, extra_args, callback, generator, eta: float) -> torch.Tensor:
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        denoised = _denoise(model, x, levels[i], extra_args, callback, i)
        x = _ancestral_step(x, denoised, levels[i], levels[i + 1], eta, generator)
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ))/σ (Karras et al. 2022, Alg. 1 / eq. 3)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        denoised = _denoise(model, x, levels[i], extra_args, callback, i)
        x = x + (x - denoised) / levels[i] * (levels[i + 1] - levels[i])
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 0.0):
    """DDIM (Song et al. 2020, eq. 12); η = 0 is deterministic (Euler in x-space), η = 1 is DDPM-like (eq. 16)."""
    return _run_ancestral(model, x, sigmas, extra_args, callback, generator, eta)


@torch.no_grad()
def sample_euler_a(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """Euler ancestral (k-diffusion sample_euler_ancestral): an Euler step to σ_down, then fresh noise σ_up."""
    return _run_ancestral(model, x, sigmas, extra_args, callback, generator, eta)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x̂0) with β̃ variance (Ho et al. 2020, eq. 6-7)."""
    return _run_ancestral(model, x, sigmas, extra_args, callback, generator, 1.0)


@torch.no_grad()
def sample_heun(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to σ = 0 is an Euler step."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        d = (x - _denoise(model, x, sigma, extra_args, callback, i)) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        denoised_next = model(x_euler, x.new_full((x.shape[0],), sigma_next), **(extra_args or {}))
        d_next = (x_euler - denoised_next) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def _plms_eps(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams–Bashforth combination of the current ε̂ and up to 3 earlier ones (Liu et al. 2022, eq. 12)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, arXiv 2202.09778) as CompVis PLMSSampler / diffusers PNDM(skip_prk_steps).

    Each step moves x by (σ_next - σ)·ε' (the DDIM transfer, eq. 9, in x-space). The first step is a
    pseudo improved Euler: ε' = (ε̂(x, σ) + ε̂(x_euler, σ_next))/2, and only ε̂(x, σ) enters the history;
    later steps use 2nd/3rd/4th-order Adams–Bashforth on the history. A single-step run is plain Euler
    (as diffusers). Note: diffusers' img2img with PNDM mislabels the timesteps after its warm-up; we do not.
    """
    levels = sigmas.tolist()
    steps = len(levels) - 1
    history: list[torch.Tensor] = []
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        eps = (x - _denoise(model, x, sigma, extra_args, callback, i)) / sigma
        if not history and steps > 1:
            x_euler = x + eps * (sigma_next - sigma)
            denoised_next = model(x_euler, x.new_full((x.shape[0],), sigma_next), **(extra_args or {}))
            eps_prime = (eps + (x_euler - denoised_next) / sigma_next) / 2
        elif not history:
            eps_prime = eps
        else:
            eps_prime = _plms_eps(eps, history)
        history = (history + [eps])[-3:]
        x = x + eps_prime * (sigma_next - sigma)
    return x


def _dpmpp_2m_denoised(denoised, old_denoised, h: float, h_last: float | None) -> torch.Tensor:
    """2M estimate D + (D - D_prev)/(2r), r = h_last/h (DPM-Solver++(2M), Lu et al. 2022, Alg. 2, midpoint)."""
    if old_denoised is None:
        return denoised
    return denoised + (denoised - old_denoised) / (2 * h_last / h)


def _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, eta: float) -> torch.Tensor:
    """DPM-Solver++(2M), midpoint, with η·h of SDE noise per step (η = 0: the ODE solver).

    x ← (σ'/σ)e^{-ηh} x - expm1(-(1+η)h)·D' + σ'·sqrt(-expm1(-2ηh))·n with h = log σ - log σ' and D' the
    2M estimate. The first step (no history) and a final step to σ = 0 (x ← D) are first order.
    """
    levels = sigmas.tolist()
    old_denoised, h_last = None, None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = _denoise(model, x, sigma, extra_args, callback, i)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = _dpmpp_2m_denoised(denoised, old_denoised, h, h_last)
            x = x * (sigma_next / sigma * math.exp(-eta * h)) - d * math.expm1(-(1 + eta) * h)
            if eta > 0:
                x = x + _randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in λ = -log σ.

    First-order first and last steps as diffusers' DPMSolverMultistepScheduler with final_sigmas_type
    "zero" (its lower_order_final then always triggers) and k-diffusion's sample_dpmpp_2m.
    """
    return _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, 0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4; k-diffusion sample_dpmpp_2m_sde, midpoint).

    η = 1 is diffusers' "sde-dpmsolver++"; one noise draw per step that does not end at σ = 0.
    """
    return _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, eta)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddpm": sample_ddpm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered under `name`."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
