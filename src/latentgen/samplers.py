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
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .errors import ConfigError


def _draw(shape, generator) -> torch.Tensor:
    if hasattr(generator, "randn"):  # a counter-based generator of its own (noise.PhiloxGenerator)
        return generator.randn(shape)
    if generator is not None and generator.device.type != "cpu":  # --rng cuda: drawn where the generator lives
        return torch.randn(tuple(shape), generator=generator, device=generator.device)
    return torch.randn(tuple(shape), generator=generator)


def randn(shape, generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit noise from `generator` (one, or one per batch item, as diffusers' randn_tensor with a generator
    list), then moved to `device`. CPU generators (the default) make results independent of the device and the
    batch; see noise.py for the CUDA and NV sources."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ConfigError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
        noise = torch.cat([_draw((1, *shape[1:]), g).to(device) for g in generator])
    else:
        noise = _draw(shape, generator)
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


def _dpmpp_2m_denoised(denoised, old_denoised, h_last: float | None, h: float) -> torch.Tensor:
    """2M estimate D + (D - D_prev)/(2r), r = h_last/h (DPM-Solver++(2M), Lu et al. 2022, Alg. 2, midpoint)."""
    if old_denoised is None:
        return denoised
    return denoised + (denoised - old_denoised) / (2 * h_last / h)


def _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, eta: float, solver: str = "midpoint"):
    """DPM-Solver++(2M) with η·h of SDE noise per step (η = 0: the ODE solver), or its 3M SDE form.

    With h = log σ - log σ' and h_η = (1 + η)h: x ← (σ'/σ)e^{-ηh} x - expm1(-h_η)·D + σ'·sqrt(-expm1(-2ηh))·n
    plus a correction from earlier estimates (k-diffusion sample_dpmpp_2m[_sde] / sample_dpmpp_3m_sde):
    "midpoint" uses D' = D + (D - D₁)/(2r), r = h₁/h, in place of D; "heun" adds φ₂·(D - D₁)/r with
    φ₂ = expm1(-h_η)/h_η + 1; "3m" adds φ₂·d₁ - φ₃·d₂ (φ₃ = φ₂/h_η - ½) from the two last estimates and
    falls back to heun's term on the second step. The first step (no history) and a final step to σ = 0
    (x ← D) are first order.
    """
    levels = sigmas.tolist()
    history: list[tuple[torch.Tensor, float]] = []  # (D, h) of earlier steps, newest first
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = _denoise(model, x, sigma, extra_args, callback, i)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = (1 + eta) * h
        decay = sigma_next / sigma * math.exp(-eta * h)
        if solver == "midpoint":
            d = _dpmpp_2m_denoised(denoised, *(history[0] if history else (None, None)), h)
            x = x * decay - d * math.expm1(-h_eta)
        else:
            x = x * decay - denoised * math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if solver == "3m" and len(history) >= 2:
                (d_1, h_1), (d_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                x = x + (d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))) * phi_2
                x = x - (d1_0 - d1_1) / (r0 + r1) * (phi_2 / h_eta - 0.5)
            elif history:
                d_1, h_1 = history[0]
                x = x + (denoised - d_1) / (h_1 / h) * phi_2
        if eta > 0:
            x = x + _randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
        history = [(denoised, h)] + history[:1]
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


# --------------------------------------------------------------------------------------------------
# more k-diffusion / ComfyUI samplers
# --------------------------------------------------------------------------------------------------
def _lms_coefficient(levels: list[float], i: int, j: int, order: int) -> float:
    """∫_{σ_i}^{σ_i+1} ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j on σ_i, σ_i-1, …, σ_i-order+1.

    k-diffusion's linear_multistep_coeff (and diffusers LMSDiscreteScheduler) integrate it with
    scipy.integrate.quad; the polynomial is integrated exactly here.
    """
    nodes = [levels[i - k] for k in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antideriv = poly.integ()
    return float(antideriv(levels[i + 1]) - antideriv(levels[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, *, extra_args=None, callback=None, generator=None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth in σ) on the ODE derivative, up to `order` past derivatives.

    k-diffusion sample_lms / diffusers LMSDiscreteScheduler (Karras et al. 2022 cite it as the
    "LMS" baseline); the final step to σ = 0 is an LMS step too, as in both.
    """
    levels = sigmas.tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(levels) - 1):
        denoised = _denoise(model, x, levels[i], extra_args, callback, i)
        ds = (ds + [(x - denoised) / levels[i]])[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(levels, i, j, cur) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _call(model, x, sigma: float, extra_args) -> torch.Tensor:
    return model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))


@torch.no_grad()
def sample_dpm2(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """DPM-Solver-2 in σ (k-diffusion sample_dpm_2; diffusers KDPM2DiscreteScheduler).

    The derivative at the geometric midpoint σ_mid = sqrt(σ·σ_next) moves x the whole step (Lu et al.
    2022, arXiv 2206.00927, Alg. 1 with r = 1/2, in Karras et al.'s σ form); the last step to 0 is Euler.
    """
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        d = (x - _denoise(model, x, sigma, extra_args, callback, i)) / sigma
        x = _dpm2_step(model, x, d, sigma, sigma_next, extra_args)
    return x


def _dpm2_step(model, x, d, sigma: float, sigma_to: float, extra_args) -> torch.Tensor:
    """x moved from σ to σ_to by the derivative at the geometric midpoint sqrt(σ·σ_to); Euler when σ_to is 0."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = (x_mid - _call(model, x_mid, sigma_mid, extra_args)) / sigma_mid
    return x + d_mid * (sigma_to - sigma)


def _ancestral_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of k-diffusion's get_ancestral_step."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_dpm2_a(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """Ancestral DPM-Solver-2 (k-diffusion sample_dpm_2_ancestral; diffusers KDPM2AncestralDiscreteScheduler):
    a DPM-Solver-2 step to σ_down through sqrt(σ·σ_down), then fresh noise σ_up; the last step is Euler."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma = levels[i]
        sigma_down, sigma_up = _ancestral_levels(sigma, levels[i + 1], eta)
        d = (x - _denoise(model, x, sigma, extra_args, callback, i)) / sigma
        x = _dpm2_step(model, x, d, sigma, sigma_down, extra_args)
        if sigma_down != 0:
            x = x + _randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_a(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, arXiv 2211.01095, Alg. 1, r = 1/2; k-diffusion
    sample_dpmpp_2s_ancestral): a singlestep 2nd-order data-prediction step to σ_down through the λ-midpoint
    sqrt(σ·σ_down), then fresh noise σ_up. η = 0 is the deterministic DPM-Solver++(2S)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        sigma_down, sigma_up = _ancestral_levels(sigma, sigma_next, eta)
        denoised = _denoise(model, x, sigma, extra_args, callback, i)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)  # λ_s = (λ + λ_down)/2 with λ = -log σ
            x_mid = (sigma_mid / sigma) * x + (1 - sigma_mid / sigma) * denoised
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * _call(model, x_mid, sigma_mid, extra_args)
        if sigma_next > 0 and sigma_up > 0:
            x = x + _randn_like(x, generator) * sigma_up
    return x


def _seeds_of(generator, batch: int) -> list[int] | int:
    """The seeds behind the per-image generators (the entropy of their Brownian trees)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ConfigError(f"got {len(generator)} generators for a batch of {batch}; pass one per image")
        return [int(g.initial_seed()) for g in generator]
    if generator is None:
        return int(torch.randint(0, 2**62, ()).item())
    return int(generator.initial_seed())


class BrownianNoise:
    """Unit noise for the interval (σ, σ_next) from a Brownian tree over [σ_min, σ_max] (torchsde), one tree per
    image seeded with its seed: k-diffusion's BrownianTreeNoiseSampler, as diffusers' DPMSolverSDEScheduler and
    A1111 use it. The noise of an interval does not depend on the step count that reaches it."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds):
        try:
            import torchsde
        except ImportError as e:  # an optional dependency: only the Brownian-tree samplers need it
            raise ConfigError("--sampler dpmpp_sde needs torchsde: pip install torchsde, or pick another") from e
        self.batched = isinstance(seeds, list)
        shape = x.shape[1:] if self.batched else x.shape
        w0 = torch.zeros(shape, dtype=torch.float32)
        self.trees = [
            torchsde.BrownianInterval(
                t0=sigma_min,
                t1=sigma_max,
                size=w0.shape,
                dtype=w0.dtype,
                device=w0.device,
                entropy=s,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for s in (seeds if self.batched else [seeds])
        ]
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        lo, hi = min(sigma, sigma_next), max(sigma, sigma_next)
        sign = 1.0 if sigma < sigma_next else -1.0
        with warnings.catch_warnings():  # points a float32 ulp outside [σ_min, σ_max], as k-diffusion's queries
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return (w / math.sqrt(hi - lo)).to(self.device, self.dtype)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """DPM-Solver++ (stochastic, r = 1/2; k-diffusion sample_dpmpp_sde = diffusers DPMSolverSDEScheduler).

    Each step: an ancestral data-prediction step to the λ-midpoint σ_s = sqrt(σ·σ_next), a second network
    call there, and an ancestral step over the whole interval with that estimate; noise from a Brownian
    tree seeded per image (`BrownianNoise`). The last step to 0 is x ← D.
    """
    levels = sigmas.tolist()
    positive = [s for s in levels if s > 0]
    if len(levels) < 2 or not positive:
        return x
    noise = BrownianNoise(x, min(positive), max(levels), _seeds_of(generator, x.shape[0]))
    for i in range(len(levels) - 1):
        denoised = _denoise(model, x, levels[i], extra_args, callback, i)
        if levels[i + 1] == 0:
            x = denoised
            continue
        # σ → λ = -log σ → σ in float32, as k-diffusion and diffusers compute the points they ask the tree about:
        # the tree's increments over nearby intervals differ by ~sqrt(Δσ), so the points must agree to the bit.
        sigma, sigma_mid, sigma_next = _lambda_points(levels[i], levels[i + 1])
        down, up = _ancestral_levels(sigma, sigma_mid, eta)
        x_mid = (down / sigma) * x + (1 - down / sigma) * denoised
        if up > 0:
            x_mid = x_mid + noise(sigma, sigma_mid) * up
        denoised_mid = _call(model, x_mid, sigma_mid, extra_args)
        down, up = _ancestral_levels(sigma, sigma_next, eta)
        x = (down / sigma) * x + (1 - down / sigma) * denoised_mid
        if up > 0:
            x = x + noise(sigma, sigma_next) * up
    return x


def _lambda_points(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """σ, the λ-midpoint sqrt(σ·σ_next) and σ_next through float32 λ = -log σ (k-diffusion's sigma_fn(t_fn(σ)))."""
    t = torch.tensor([sigma, sigma_next], dtype=torch.float32).log().neg()
    mid = t[0] + (t[1] - t[0]) * 0.5
    return float(t[0].neg().exp()), float(mid.neg().exp()), float(t[1].neg().exp())


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type 2nd-order term (k-diffusion solver_type "heun"; diffusers
    DPMSolverMultistepScheduler("sde-dpmsolver++", solver_type="heun")); noise from `generator` as diffusers."""
    return _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, eta, "heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde; Lu et al. 2022 §4 with a 3rd-order multistep
    correction). Noise from `generator` (A1111 and ComfyUI use a Brownian tree here)."""
    return _run_dpmpp_2m(model, x, sigmas, extra_args, callback, generator, eta, "3m")


def _uni_coefficients(rks: list[float], hh: float, order: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """UniPC's R (Vandermonde in the r_k), b and B(h) for the bh2 variant (Zhao et al. 2023, arXiv 2302.04867,
    Alg. 1-2, B(h) = e^h - 1), as diffusers UniPCMultistepScheduler builds them for data prediction."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh)
    factorial = 1
    r_rows, b = [], []
    r = torch.tensor(rks, dtype=torch.float64)
    for k in range(1, order + 1):
        r_rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(r_rows), torch.tensor(b, dtype=torch.float64), b_h


def _uni_update(x, m0, sigma, sigma_next, history, order, model_t=None):
    """One UniP predictor step (model_t None) or UniC corrector step of UniPC-bh2 in x-space (α = 1, σ̃).

    history: [(D_k, λ_k)] of earlier estimates, newest first (m0's own λ is λ(σ)).
    """
    lam, lam_next = -math.log(sigma), (-math.log(sigma_next) if sigma_next > 0 else math.inf)
    h = lam_next - lam
    hh = -h
    h_phi_1 = math.expm1(hh)
    rks, d1s = [], []
    for d_k, lam_k in history[: order - 1]:
        rk = (lam_k - lam) / h
        rks.append(rk)
        d1s.append((d_k - m0) / rk)
    rks.append(1.0)
    r_mat, b, b_h = _uni_coefficients(rks, hh, order)
    x_t = x * (sigma_next / sigma) - m0 * h_phi_1
    if model_t is None:  # predictor: order-1 terms; order 2 uses ρ = ½ (diffusers' simplification)
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b[:-1]).tolist()
            x_t = x_t - sum(rho * d for rho, d in zip(rhos, d1s)) * b_h
        return x_t
    rhos = [0.5] if order == 1 else torch.linalg.solve(r_mat, b).tolist()
    corr = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - (corr + rhos[-1] * (model_t - m0)) * b_h


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, *, extra_args=None, callback=None, generator=None, order: int = 2):
    """UniPC (Zhao et al. 2023, arXiv 2302.04867), bh2, data prediction, as diffusers UniPCMultistepScheduler.

    Each step: the network at the current x; the UniC corrector refines x with it (not after the first
    step); the UniP predictor (order ≤ `order`, warming up, lower order at the end) moves to σ_next.
    No corrector follows the last step, so every network call is used once.
    """
    levels = sigmas.tolist()
    steps = len(levels) - 1
    history: list[tuple[torch.Tensor, float]] = []  # (D, λ) newest first
    last = None  # (x before the previous predictor step, its σ, the order it used)
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = _denoise(model, x, sigma, extra_args, callback, i)
        if last is not None:
            x_prev, sigma_prev, prev_order = last
            x = _uni_update(x_prev, history[0][0], sigma_prev, sigma, history[1:], prev_order, model_t=denoised)
        history = [(denoised, -math.log(sigma))] + history[: order - 1]
        this_order = min(order, steps - i, len(history))
        last = (x, sigma, this_order)
        x = _uni_update(x, denoised, sigma, sigma_next, history[1:], this_order)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv 2310.04378, Alg. 3): x ← D(x; σ),
    then re-noised to the next level with fresh noise, x ← D + σ_next·n (diffusers LCMScheduler's step in
    x-space, ComfyUI sample_lcm)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        x = _denoise(model, x, levels[i], extra_args, callback, i)
        if levels[i + 1] > 0:
            x = x + _randn_like(x, generator) * levels[i + 1]
    return x


def _with_uncond(model, x, sigma: float, extra_args) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided D, unconditional D) from a model that offers `with_uncond` (denoiser.CFGDenoiser does)."""
    fn = getattr(model, "with_uncond", None)
    if fn is None:
        raise ConfigError(
            "the CFG++ samplers need the unconditional estimate, which inpainting with an ordinary model does not "
            "expose: pick another --sampler"
        )
    return fn(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """Euler with CFG++ (Chung et al. 2024, arXiv 2406.08070, Alg. 1; ComfyUI sample_euler_cfg_pp): the step
    re-noises the guided estimate with the unconditional direction, x ← D_cfg + σ_next·(x - D_u)/σ.
    The guidance scale is CFG++'s λ (useful values about 0.3-1, not 7.5)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        guided, uncond = _with_uncond(model, x, levels[i], extra_args)
        if callback is not None:
            callback({"i": i, "sigma": levels[i], "x": x, "denoised": guided})
        x = guided + (x - uncond) / levels[i] * levels[i + 1]
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """DPM-Solver++(2M) with CFG++ (ComfyUI sample_dpmpp_2m_cfg_pp): x ← D_cfg + e^{-h}(x - D_u) minus the 2M
    correction expm1(-h)/(2r)·(D_cfg - D_u,prev); first step without it, the last (σ_next = 0) is x ← D_cfg."""
    levels = sigmas.tolist()
    old_uncond = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        guided, uncond = _with_uncond(model, x, sigma, extra_args)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "denoised": guided})
        if sigma_next == 0:
            x = guided
        else:
            h = math.log(sigma) - math.log(sigma_next)
            x = guided + (x - uncond) * math.exp(-h)
            if old_uncond is not None:
                r = (math.log(levels[i - 1]) - math.log(sigma)) / h
                x = x - (guided - old_uncond) * (math.expm1(-h) / (2 * r))
        old_uncond = uncond
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, *, extra_args=None, callback=None, generator=None) -> torch.Tensor:
    """RES 2nd-order multistep exponential integrator (Zhang et al. 2023, arXiv 2308.02157, Alg. 2 with
    c₂ from the previous step; ComfyUI sample_res_multistep, η = 0): x ← e^{-h} x + h(b₁ D + b₂ D_prev),
    b₂ = φ₂(-h)/c₂, b₁ = φ₁(-h) - b₂. The first step and the last (to σ = 0) are Euler steps."""
    levels = sigmas.tolist()
    old_denoised = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = _denoise(model, x, sigma, extra_args, callback, i)
        if sigma_next == 0 or old_denoised is None:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_next)
            c2 = (math.log(sigma) - math.log(levels[i - 1])) / h  # (λ_prev - λ)/h < 0: D_prev lies behind
            phi_1 = math.expm1(-h) / -h
            phi_2 = (phi_1 - 1) / -h
            b2 = phi_2 / c2
            x = x * math.exp(-h) + (denoised * (phi_1 - b2) + old_denoised * b2) * h
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddpm": sample_ddpm,
    "lms": sample_lms,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_a,
    "dpmpp_2s_a": sample_dpmpp_2s_a,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "uni_pc": sample_uni_pc,
    "lcm": sample_lcm,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "res_multistep": sample_res_multistep,
}

# name → (A1111 display name, ComfyUI sampler name); None where that tool has none.
SAMPLER_NAMES: dict[str, tuple[str | None, str | None]] = {
    "ddim": ("DDIM", "ddim"),
    "plms": ("PLMS", None),
    "euler": ("Euler", "euler"),
    "euler_a": ("Euler a", "euler_ancestral"),
    "heun": ("Heun", "heun"),
    "dpmpp_2m": ("DPM++ 2M", "dpmpp_2m"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "dpmpp_2m_sde"),
    "ddpm": ("DDPM", "ddpm"),
    "lms": ("LMS", "lms"),
    "dpm2": ("DPM2", "dpm_2"),
    "dpm2_a": ("DPM2 a", "dpm_2_ancestral"),
    "dpmpp_2s_a": ("DPM++ 2S a", "dpmpp_2s_ancestral"),
    "dpmpp_sde": ("DPM++ SDE", "dpmpp_sde"),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun"),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "dpmpp_3m_sde"),
    "uni_pc": ("UniPC", "uni_pc_bh2"),
    "lcm": ("LCM", "lcm"),
    "euler_cfg_pp": ("Euler CFG++", "euler_cfg_pp"),
    "dpmpp_2m_cfg_pp": ("DPM++ 2M CFG++", "dpmpp_2m_cfg_pp"),
    "res_multistep": ("Res Multistep", "res_multistep"),
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered under `name`."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
