"""Named σ schedules: which noise levels a sampling run visits, under ComfyUI's scheduler names.

Each function returns n descending levels followed by a final 0 (n + 1 values, float32) from the model's
discrete schedule (`denoiser.DiscreteSchedule`: its T levels σ_t, σ_min = σ_0, σ_max = σ_T-1, and the
log-linear interpolation σ(t)) or from a range [σ_min, σ_max]. "normal" — the model's own timesteps with
diffusers' spacing — lives in denoiser.get_sigmas, which dispatches here for every other name.

  karras            Karras et al. 2022 (arXiv 2206.00364) eq. 5, ρ = 7 (diffusers use_karras_sigmas)
  exponential       uniform in log σ (k-diffusion get_sigmas_exponential; diffusers use_exponential_sigmas)
  sgm_uniform       n timesteps uniform in t from T-1 towards 0, endpoint excluded (ComfyUI normal_scheduler, sgm)
  simple            every (T/n)-th model level from the top (ComfyUI simple_scheduler)
  ddim_uniform      every (T//n)-th model level from t = 1 upwards (ComfyUI ddim_scheduler)
  beta              model levels at the Beta(0.6, 0.6) quantiles of t (Lee et al. 2024, arXiv 2407.12173;
                    ComfyUI beta_scheduler). diffusers' use_beta_sigmas differs: it spaces σ itself.
  linear_quadratic  σ/σ_max linear, then quadratic in the step index (Mochi, genmoai; ComfyUI)
  kl_optimal        tan of a linear ramp in arctan σ (A1111 PR 15608, AYS paper §3.2, arXiv 2404.14507)
  ays               Align Your Steps (Sabour et al. 2024, arXiv 2404.14507): NVIDIA's published 10-step SD 1.5 /
                    SDXL tables, log-linearly interpolated to other step counts, the last level set to 0
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError

SCHEDULERS = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
    "ays",
)

# Align Your Steps: the published 10-step levels (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html).
AYS_LEVELS = {
    "sd1": [
        14.6146412293,
        6.4745760956,
        3.8636745985,
        2.6946151520,
        1.8841921177,
        1.3943805092,
        0.9642583904,
        0.6523686016,
        0.3977456272,
        0.1515232662,
        0.0291671582,
    ],
    "sdxl": [
        14.6146412293,
        6.3184485287,
        3.7681790315,
        2.1811480769,
        1.3405244945,
        0.8620721141,
        0.5550693289,
        0.3798540708,
        0.2332364134,
        0.1114188177,
        0.0291671582,
    ],
}

# The scheduler a sampler uses when none is named: A1111's per-sampler defaults (sd_samplers_kdiffusion: DPM++ and
# DPM2 samplers on Karras, DPM++ 2M SDE Heun / 3M SDE on exponential; dpmpp_2m_sde keeps its Karras default here),
# everything else on the model's own timesteps — DDIM, PLMS and DDPM are defined on them.
DEFAULT_SCHEDULERS = {
    "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "karras",
    "dpmpp_2m_sde_heun": "exponential",
    "dpmpp_3m_sde": "exponential",
    "dpmpp_sde": "karras",
    "dpmpp_2s_a": "karras",
    "dpm2": "karras",
    "dpm2_a": "karras",
    "lcm": "sgm_uniform",  # ComfyUI's advice for LCM models: near LCMScheduler's own timesteps
}

# name → A1111's "Schedule type" label (A1111 1.9+; read back case-insensitively, "Automatic"/"Uniform" → normal).
SCHEDULER_LABELS = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "linear_quadratic": "Linear Quadratic",
    "kl_optimal": "KL Optimal",
    "ays": "Align Your Steps",
}


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown --scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return name


def default_scheduler(sampler: str) -> str:
    """The schedule `sampler` runs on when no --scheduler is given."""
    return DEFAULT_SCHEDULERS.get(sampler, "normal")


def _append_zero(levels) -> torch.Tensor:
    levels = torch.as_tensor(levels, dtype=torch.float64)
    return torch.cat([levels, levels.new_zeros(1)]).float()


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5), float64 maths."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n levels uniform in log σ from σ_max to σ_min."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ_i = tan((1 - i/(n-1))·atan σ_max + i/(n-1)·atan σ_min)."""
    ramp = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    return _append_zero(np.tan(ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)))


def sgm_uniform(schedule, n: int) -> torch.Tensor:
    """σ(t) at t = linspace(T-1, 0, n+1)[:-1] (the SGM / "trailing"-like uniform grid with fractional t)."""
    t = np.linspace(schedule.num_timesteps - 1, 0, n + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(torch.from_numpy(t)))


def simple(schedule, n: int) -> torch.Tensor:
    """σ_t at t = T-1-⌊i·T/n⌋, i = 0..n-1."""
    total = schedule.num_timesteps
    idx = [total - 1 - int(i * total / n) for i in range(n)]
    return _append_zero(schedule.sigmas[idx])


def ddim_uniform(schedule, n: int) -> torch.Tensor:
    """σ_t at t = 1, 1 + c, 1 + 2c, … (c = max(T//n, 1)), descending, then 0 (ComfyUI's ddim_scheduler; more
    than n levels when c does not divide T - 1 evenly, as there)."""
    total = schedule.num_timesteps
    idx = list(range(1, total, max(total // n, 1)))[::-1]
    return _append_zero(schedule.sigmas[idx])


def beta(schedule, n: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """σ_t at t = round(F⁻¹(1 - i/n)·(T-1)), F the Beta(α, β) CDF, repeated timesteps dropped."""
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:
        raise ConfigError("--scheduler beta needs scipy: pip install scipy, or pick another --scheduler") from e
    total = schedule.num_timesteps - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta_) * total)
    idx = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    return _append_zero(schedule.sigmas[idx])


def linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025, linear_steps: int | None = None):
    """1 - s_i in units of σ_max: s linear up to `threshold_noise` over the first n/2 steps, then quadratic to 1."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    linear_steps = n // 2 if linear_steps is None else linear_steps
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * n
    quadratic_steps = n - linear_steps
    a = diff / (linear_steps * quadratic_steps**2)
    b = threshold_noise / linear_steps - 2 * diff / quadratic_steps**2
    c = a * linear_steps**2
    quad = [a * i**2 + b * i + c for i in range(linear_steps, n)]
    levels = np.array([1.0 - s for s in lin + quad + [1.0]]) * sigma_max
    return torch.from_numpy(levels).float()


def ays(n: int, table: str = "sd1") -> torch.Tensor:
    """The AYS table for n steps: as published for n = 10, else log-linearly interpolated; the last level → 0."""
    if table not in AYS_LEVELS:
        raise ConfigError(f"no Align-Your-Steps table for '{table}'; choose one of {', '.join(AYS_LEVELS)}")
    levels = np.array(AYS_LEVELS[table])
    if n + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, np.log(levels[::-1])))[::-1]
    levels = levels.copy()
    levels[-1] = 0.0
    return torch.from_numpy(levels).float()


def named_sigmas(name: str, schedule, n: int, sigma_range: tuple[float, float], ays_table: str = "sd1"):
    """The n + 1 levels of scheduler `name` (anything but "normal"); `sigma_range` = (σ_min, σ_max) is the span
    the range-based schedules (karras, exponential, kl_optimal) and linear_quadratic use."""
    lo, hi = sigma_range
    if name == "karras":
        return karras(n, lo, hi)
    if name == "exponential":
        return exponential(n, lo, hi)
    if name == "kl_optimal":
        return kl_optimal(n, lo, hi)
    if name == "linear_quadratic":
        return linear_quadratic(n, hi)
    if name == "sgm_uniform":
        return sgm_uniform(schedule, n)
    if name == "simple":
        return simple(schedule, n)
    if name == "ddim_uniform":
        return ddim_uniform(schedule, n)
    if name == "beta":
        return beta(schedule, n)
    if name == "ays":
        return ays(n, ays_table)
    raise ConfigError(f"unknown --scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
