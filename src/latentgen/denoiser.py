"""Noise schedules, the eps / v denoiser, classifier-free guidance and the training loss.

Everything here speaks k-diffusion's "x-space" (Karras et al. 2022, arXiv 2206.00364): a latent z_t of the
discrete variance-preserving process z_t = sqrt(ā_t) z0 + sqrt(1 - ā_t) ε (Ho et al. 2020, eq. 4) is
rescaled to x = z_t / sqrt(ā_t) = z0 + σ ε with noise level σ_t = sqrt((1 - ā_t) / ā_t). A network that
predicts ε or v becomes a denoiser D(x; σ) ≈ E[z0 | x], and every sampler in samplers.py only sees D.

The timesteps that `get_sigmas` picks reproduce diffusers' schedulers exactly (same spacing, same
final step), so a sampler here lands on the latent diffusers would decode.

References: LDM (Rombach et al., arXiv 2112.10752); DDPM (Ho et al., arXiv 2006.11239); DDIM (Song et al.,
arXiv 2010.02502); improved DDPM cosine schedule (Nichol & Dhariwal, arXiv 2102.09672); v-prediction
(Salimans & Ho, arXiv 2202.00512); classifier-free guidance (Ho & Salimans, arXiv 2207.12598);
"Common diffusion noise schedules and sample steps are flawed" (Lin et al., arXiv 2305.08891, Table 2:
leading / trailing / linspace spacing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .schedulers import check_scheduler, named_sigmas

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("eps", "v")

# Sampler families by the diffusers scheduler whose timesteps they reproduce ("normal" schedule).
EULER_FAMILY = (  # Euler[Ancestral]/Heun/LMS/KDPM2[Ancestral]/DPMSolverSDE/LCM-like: float t, x-space noise
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpm2",
    "dpm2_a",
    "dpmpp_sde",
    "dpmpp_2s_a",
    "euler_cfg_pp",
    "res_multistep",
    "lcm",
)
DPM_FAMILY = (  # DPMSolverMultistep/UniPCMultistep: n+1 grid, last point dropped, integer t
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde",
    "dpmpp_2m_cfg_pp",
    "uni_pc",
)
DDIM_FAMILY = ("ddim", "plms")  # DDIM/PNDMScheduler: last step to ā_0 unless set_alpha_to_one
SAMPLER_NAMES = EULER_FAMILY + DPM_FAMILY + DDIM_FAMILY + ("ddpm",)


# --------------------------------------------------------------------------------------------------
# betas → ā → σ
# --------------------------------------------------------------------------------------------------
def make_betas(
    beta_schedule: str, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> torch.Tensor:
    """β_1..β_T in float64.

    "scaled_linear": linspace(sqrt(start), sqrt(end))², what LDM calls "linear" and SD uses;
    "linear": linspace(start, end) (DDPM, Ho et al. 2020 §4); "cosine": ā(t) = cos²((t/T + s)/(1 + s)·π/2),
    s = 0.008, β clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17) — diffusers' "squaredcos_cap_v2".
    """
    if beta_schedule == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if beta_schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown beta_schedule '{beta_schedule}'; choose one of {', '.join(BETA_SCHEDULES)}")


class DiscreteSchedule:
    """The T noise levels σ_t = sqrt((1 - ā_t) / ā_t) of a discrete-time model (k-diffusion DiscreteSchedule)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DiscreteSchedule:
        """ā_t = Π_{s≤t} (1 - β_s) (Ho et al. 2020, §2)."""
        return cls(torch.cumprod(1 - betas.to(torch.float64), dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Continuous timestep of σ by linear interpolation in log σ (k-diffusion, diffusers `_sigma_to_t`).

        σ outside [σ_min, σ_max] clamps to t = 0 or T - 1. Computed in float64 on the CPU; returned in
        float32 on σ's device. `quantize` rounds to the nearest integer timestep.
        """
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log()
        low = torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        w = (self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[low + 1])
        t = low + w.clamp(0, 1)
        if quantize:
            t = t.round()
        return t.to(sigma.device, torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a continuous timestep: linear interpolation in log σ, the inverse of `sigma_to_t`."""
        t = torch.as_tensor(t, dtype=torch.float64)
        low = t.floor().long().clamp(0, self.num_timesteps - 2)
        w = (t - low).clamp(0, 1)
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def sigmas_linear(self, t: np.ndarray) -> np.ndarray:
        """σ at timesteps t by linear interpolation in σ — `np.interp` as diffusers' Euler/Heun/DPM do."""
        return np.interp(t, np.arange(self.num_timesteps), self.sigmas.numpy())


# --------------------------------------------------------------------------------------------------
# choosing the noise levels of a sampling run
# --------------------------------------------------------------------------------------------------
def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLER_NAMES:
        raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLER_NAMES)}")


def _spaced_timesteps(n: int, total: int, spacing: str, steps_offset: int, float_linspace: bool) -> np.ndarray:
    """The n descending timesteps of diffusers' DDIM/PNDM/DDPM/Euler/Heun `set_timesteps` (Lin et al. Table 2)."""
    if spacing == "linspace":
        if float_linspace:  # Euler / Heun keep the fractional float32 timesteps
            return np.linspace(0, total - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (total // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.float64) - 1
    raise ConfigError(f"unknown timestep spacing '{spacing}'; choose one of {', '.join(SPACINGS)}")


def _dpm_timesteps(n: int, total: int, spacing: str, steps_offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's grid: n+1 points with the last (t≈0) dropped."""
    if spacing == "linspace":
        return np.linspace(0, total - 1, n + 1).round()[::-1][:-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n + 1) * (total // (n + 1))).round()[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(total, 0, -total / n).round().astype(np.float64) - 1
    raise ConfigError(f"unknown timestep spacing '{spacing}'; choose one of {', '.join(SPACINGS)}")


def get_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    sampler: str,
    spacing: str = "leading",
    scheduler: str = "normal",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    ays_table: str = "sd1",
) -> torch.Tensor:
    """The noise levels (float32, descending) that `sampler` visits under `scheduler` (schedulers.py).

    "normal": the model's own timesteps as the diffusers scheduler of the sampler's family picks them
    (SD's setting is "leading" with steps_offset 1), σ at fractional timesteps interpolated linearly as
    diffusers does; the last level is 0, except DDIM/PLMS which step to ā_0, i.e. σ(t=0), unless
    `set_alpha_to_one`. Other names come from schedulers.named_sigmas and end at 0. karras / exponential /
    kl_optimal span the spaced "normal" levels for the Euler family (diffusers' Euler-type schedulers with
    use_karras_sigmas / use_exponential_sigmas), the model's whole [σ_min, σ_max] otherwise (as
    DPMSolverMultistep and ComfyUI). Heun and DPM2 visit intermediate levels internally; pass them this list.

    Known divergence: diffusers' DDIM/PNDM step from t to t - T//steps, which is the next listed
    timestep only for "leading" spacing and for "trailing" when steps divides T; we always step to the
    next listed timestep (the model is then called at the noise level the sample actually has).
    """
    _check_sampler(sampler)
    check_scheduler(scheduler)
    if steps < 1 or steps > schedule.num_timesteps:
        raise ConfigError(f"steps must be between 1 and {schedule.num_timesteps}, got {steps}; change --steps")
    total = schedule.num_timesteps
    if sampler in DPM_FAMILY:
        timesteps = _dpm_timesteps(steps, total, spacing, steps_offset)
    else:
        timesteps = _spaced_timesteps(steps, total, spacing, steps_offset, float_linspace=sampler in EULER_FAMILY)
    sigmas = schedule.sigmas_linear(timesteps)
    if scheduler != "normal":
        if sampler in EULER_FAMILY:
            span = (float(sigmas[-1]), float(sigmas[0]))
        else:
            span = (schedule.sigma_min, schedule.sigma_max)
        return named_sigmas(scheduler, schedule, steps, span, ays_table)
    last = schedule.sigma_min if sampler in DDIM_FAMILY and not set_alpha_to_one else 0.0
    return torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))


def quantize_timesteps(sampler: str) -> bool:
    """Whether diffusers feeds the network integer timesteps for this sampler (all but the Euler family).

    Only matters for Karras levels, whose timesteps DPMSolverMultistep rounds; pass it to `Denoiser`.
    """
    _check_sampler(sampler)
    return sampler not in EULER_FAMILY


def strength_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of `sigmas` an img2img run of this strength covers, as diffusers' img2img picks it.

    ⌊steps·strength⌋ steps are run (at least 0, at most all); the result starts at the σ to noise to.
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}; change --strength")
    steps = sigmas.shape[0] - 1
    start = max(steps - min(int(steps * strength), steps), 0)
    return sigmas[start:]


# --------------------------------------------------------------------------------------------------
# initial noise and the way back to the latent
# --------------------------------------------------------------------------------------------------
def prepare_noise(noise: torch.Tensor, sigmas: torch.Tensor, sampler: str, spacing: str) -> torch.Tensor:
    """x_T for txt2img from unit noise, as diffusers scales its initial latents.

    diffusers starts from z_T = noise (init_noise_sigma 1), i.e. x_T = noise·sqrt(1 + σ_0²), except the
    Euler family with "linspace"/"trailing" spacing, whose init_noise_sigma is σ_0 itself: x_T = noise·σ_0.
    """
    _check_sampler(sampler)
    sigma = sigmas[0].to(noise.device, noise.dtype)
    if sampler in EULER_FAMILY and spacing in ("linspace", "trailing"):
        return noise * sigma
    return noise * (sigma**2 + 1).sqrt()


def noise_for_img2img(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x at level σ from a clean latent (SDEdit, Meng et al. arXiv 2108.01073): z0 + σ·noise."""
    return z0 + torch.as_tensor(sigma, dtype=z0.dtype, device=z0.device) * noise


def q_sample(schedule: DiscreteSchedule, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(ā_t)·x0 + sqrt(1 - ā_t)·ε at the integer timestep t (Ho et al. 2020, eq. 4)."""
    a = float(schedule.alphas_cumprod[int(t)])
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def to_latent(x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
    """z = x / sqrt(1 + σ²): the latent diffusers decodes (differs from x only when σ_last > 0, DDIM/PLMS)."""
    sigma = torch.as_tensor(sigma_last, dtype=x.dtype, device=x.device)
    return x / (sigma**2 + 1).sqrt()


# --------------------------------------------------------------------------------------------------
# eps / v network → denoiser, and guidance
# --------------------------------------------------------------------------------------------------
def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def network_dtype(net, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype `net` computes in: the one loading.weights.upcast_on_use gave it, else its first weight's."""
    if getattr(net, "compute_dtype", None) is not None:  # weights kept in a lower precision (upcast_on_use)
        return net.compute_dtype
    params = getattr(net, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.dtype if first is not None and first.is_floating_point() else fallback


def _cast_float(v, dtype):
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


class Denoiser:
    """D(x; σ) ≈ E[z0 | x] from an ε- or v-predicting network `unet(x_in, t, context=None, y=None)`.

    Preconditioning as k-diffusion external.py / EDM (Karras et al. 2022, Table 1, VP column):
    x_in = x·c_in with c_in = 1/sqrt(σ² + 1) (i.e. the VP latent z_t), t = schedule.sigma_to_t(σ), and
      eps: D = x - σ·ε                                   (x = z0 + σ ε)
      v:   D = x/(σ² + 1) - v·σ/sqrt(σ² + 1)             (v = sqrt(ā) ε - sqrt(1-ā) z0, Salimans & Ho 2022 §4)
    A `concat` tensor (inpainting mask + masked latent, low-res image) joins x_in on the channel dim
    after scaling, as CompVis DiffusionWrapper "hybrid"/"concat" does. The network runs in its own
    dtype (e.g. bf16); x, σ and D stay in x's dtype.
    """

    def __init__(self, unet, schedule: DiscreteSchedule, prediction: str = "eps", quantize: bool = False):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction '{prediction}'; choose one of {', '.join(PREDICTIONS)}")
        self.unet, self.schedule, self.prediction, self.quantize = unet, schedule, prediction, quantize

    def __call__(self, x, sigma, *, context=None, y=None, concat=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s = _append_dims(sigma, x.ndim)
        c_in = 1 / (s**2 + 1).sqrt()
        dtype = network_dtype(self.unet, x.dtype)
        x_in = (x * c_in).to(dtype)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(dtype)], dim=1)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        out = self.unet(x_in, t, context=_cast_float(context, dtype), y=_cast_float(y, dtype)).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        return x * c_in**2 - out * s * c_in


def _cat_conditions(uncond: dict, cond: dict) -> dict:
    """Batch two Denoiser kwarg dicts (uncond first, as diffusers and CompVis do)."""
    keys = set(uncond) | set(cond)
    merged = {}
    for key in keys:
        a, b = uncond.get(key), cond.get(key)
        if a is None and b is None:
            continue
        if a is None or b is None:
            raise ConfigError(f"guidance: '{key}' is given for one of cond/uncond only; give it for both or neither")
        merged[key] = torch.cat([a, b])
    return merged


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) on a `Denoiser`.

    D_guided = D_u + s·(D_c - D_u). D is affine in the network output with coefficients that depend only
    on (x, σ), so guiding D is exactly guiding ε or v. With no uncond or s == 1 the network runs once on
    cond; otherwise cond and uncond run as one batch of 2B, or as two calls when their contexts differ in length
    (a prompt and a negative of different chunk counts: A1111 runs them apart rather than padding the shorter).
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def _both(self, x, sigma, cond: dict, uncond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_u, D_c) from one network pass over the batch of 2B, or two passes when the contexts differ in length."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c, u = cond.get("context"), uncond.get("context")
        if c is not None and u is not None and c.shape[1:] != u.shape[1:]:
            return self.denoiser(x, sigma, **uncond), self.denoiser(x, sigma, **cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_cat_conditions(uncond, cond))
        d_uncond, d_cond = both.chunk(2)
        return d_uncond, d_cond

    def __call__(self, x, sigma, *, cond: dict, uncond: dict | None = None, cond_scale: float = 1.0):
        if uncond is None or cond_scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        d_uncond, d_cond = self._both(x, sigma, cond, uncond)
        return d_uncond + (d_cond - d_uncond) * cond_scale

    def with_uncond(self, x, sigma, *, cond: dict, uncond: dict | None = None, cond_scale: float = 1.0):
        """(guided D, unconditional D), for the CFG++ samplers (Chung et al. 2024), which step along D_u.

        Without an uncond the conditional D serves as both (CFG++ then reduces to the plain sampler).
        """
        if uncond is None:
            d = self.denoiser(x, sigma, **cond)
            return d, d
        d_uncond, d_cond = self._both(x, sigma, cond, uncond)
        return d_uncond + (d_cond - d_uncond) * cond_scale, d_uncond


# --------------------------------------------------------------------------------------------------
# training objective
# --------------------------------------------------------------------------------------------------
def training_loss(
    denoiser_net, schedule: DiscreteSchedule, prediction: str, z0: torch.Tensor, cond_kwargs: dict, generator
) -> torch.Tensor:
    """LDM objective (Rombach et al. eq. 2; Ho et al. 2020 eq. 14): E_{t,ε} ||target - net(z_t, t)||².

    t ~ U{0..T-1}, z_t = sqrt(ā_t) z0 + sqrt(1 - ā_t) ε, target ε ("eps") or v = sqrt(ā_t) ε -
    sqrt(1 - ā_t) z0 ("v"). t and ε are drawn on the CPU from `generator`. cond_kwargs holds the
    network's context / y and an optional `concat` tensor joined on the channel dim.
    """
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction '{prediction}'; choose one of {', '.join(PREDICTIONS)}")
    b = z0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    a = _append_dims(schedule.alphas_cumprod[t].to(z0.device, z0.dtype), z0.ndim)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    kwargs = dict(cond_kwargs)
    concat = kwargs.pop("concat", None)
    if concat is not None:
        z_t = torch.cat([z_t, concat], dim=1)
    out = denoiser_net(z_t, t.to(z0.device), **kwargs)
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z0
    return F.mse_loss(out.float(), target.float())
