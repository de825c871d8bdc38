"""txt2img, img2img, inpaint, superres, encode and decode as plain functions over a ModelBundle.

Every task is one loop (DESIGN.md): noise → σ-schedule sampler over a denoiser → latent → decoder.
Seeds become noise here: image i of a request uses its own `torch.Generator("cpu").manual_seed(seed_i)`
for everything random about it (posterior sample, initial noise, ancestral noise), so an image never
depends on the batch it was made in. Functions return tensors in [0, 1]; they never write files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .checkpoint import ModelBundle
from .denoiser import (CFGDenoiser, Denoiser, get_sigmas, noise_for_img2img, prepare_noise, quantize_timesteps,
                       strength_sigmas, to_latent)  # fmt: skip
from .errors import ConfigError, InputError
from .samplers import get_sampler, randn


@dataclass
class Settings:
    steps: int = 25
    sampler: str = "dpmpp_2m"
    karras: bool = True
    spacing: str = "leading"
    cfg: float = 7.5
    eta: float = 0.0
    strength: float = 0.75  # img2img / inpaint with an ordinary model
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, not {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength must be in (0, 1], not {self.strength}")
        if self.spacing not in ("leading", "trailing", "linspace"):
            raise ConfigError(f"--spacing must be leading, trailing or linspace, not '{self.spacing}'")
        get_sampler(self.sampler)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def check_size(bundle: ModelBundle, width: int, height: int) -> None:
    f = bundle.config.factor
    for name, v in (("width", width), ("height", height)):
        if v < f or v % f:
            raise InputError(f"--{name} {v} is not a positive multiple of the model's factor {f}")


def latent_shape(bundle: ModelBundle, n: int, width: int, height: int) -> tuple[int, ...]:
    f = bundle.config.factor
    return (n, bundle.config.latent_channels, height // f, width // f)


def _params(bundle: ModelBundle):
    p = next(bundle.unet.parameters())
    return p.device, p.dtype


# ------------------------------------------------------------------------------------------ conditioning


def encode_prompts(bundle: ModelBundle, prompts: list, negatives: list, cfg: float) -> tuple[dict, dict | None]:
    """Conditioning kwargs for the denoiser: cross-attention context (text) or class labels."""
    cond_mod = bundle.cond
    device, dtype = _params(bundle)
    kind = bundle.config.cond.kind
    if kind == "none":
        return {}, None
    if kind == "class":
        labels = torch.tensor([int(p) for p in prompts], device=device)
        cond = {"context": cond_mod.encode(labels).to(dtype)}
        if cfg == 1.0:
            return cond, None
        null = torch.full_like(labels, cond_mod.null_label)
        return cond, {"context": cond_mod.encode(null).to(dtype)}
    with torch.no_grad():
        ctx = cond_mod.encode(list(prompts)).to(device, dtype)
        unc = None if cfg == 1.0 else {"context": cond_mod.encode(list(negatives)).to(device, dtype)}
    return {"context": ctx}, unc


# -------------------------------------------------------------------------------------------- sampling


def _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, wrap=None):
    den = Denoiser(bundle.unet, bundle.schedule, bundle.config.prediction, quantize=quantize_timesteps(settings.sampler))
    model = CFGDenoiser(den)
    if wrap is not None:
        model = wrap(model)
    fn = get_sampler(settings.sampler)
    extra = {"cond": cond, "uncond": uncond, "cond_scale": settings.cfg}
    opts = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    with torch.no_grad():
        return fn(model, x, sigmas, extra_args=extra, callback=callback, generator=gens, **opts)


def sigmas_for(bundle: ModelBundle, settings: Settings) -> torch.Tensor:
    return get_sigmas(bundle.schedule, settings.steps, sampler=settings.sampler, spacing=settings.spacing,
                      karras=settings.karras)  # fmt: skip


def tail(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """img2img's σ tail (SDEdit, Meng et al. 2021), as diffusers' get_timesteps picks it."""
    out = strength_sigmas(sigmas, strength)
    if len(out) < 2:
        raise ConfigError(f"--strength {strength} with {len(sigmas) - 1} steps leaves no step to run: raise either")
    return out


def decode(bundle: ModelBundle, z: torch.Tensor) -> torch.Tensor:
    """Scaled latent → image in [0, 1] (as diffusers: (x/2 + 0.5).clamp(0, 1))."""
    with torch.no_grad():
        img = bundle.first_stage.decode_latent(z / bundle.config.scale_factor)
    return (img.float() / 2 + 0.5).clamp(0, 1)


def encode(bundle: ModelBundle, images: torch.Tensor, gens: list[torch.Generator] | None = None) -> torch.Tensor:
    """Images in [0, 1] → scaled latents. KL: a posterior sample drawn from each image's generator
    (as diffusers' img2img), or the mode without generators."""
    device, dtype = _params(bundle)
    x = (images * 2 - 1).to(device, dtype)
    with torch.no_grad():
        if gens is None:
            z = bundle.first_stage.encode_latent(x)
        else:
            z = torch.cat([bundle.first_stage.encode_latent(x[i : i + 1], generator=g, sample=True) for i, g in enumerate(gens)])
    return z * bundle.config.scale_factor


def txt2img(bundle: ModelBundle, prompts: list, negatives: list, seeds: list[int], width: int, height: int,
            settings: Settings, callback=None) -> torch.Tensor:  # fmt: skip
    settings.check()
    check_size(bundle, width, height)
    if bundle.config.concat is not None:
        raise InputError(f"{bundle.config.name} is a {bundle.config.concat} model: use `latentgen "
                         f"{'inpaint' if bundle.config.concat == 'inpaint' else 'superres'}`")  # fmt: skip
    device, dtype = _params(bundle)
    gens = generators(seeds)
    sigmas = sigmas_for(bundle, settings)
    noise = randn(latent_shape(bundle, len(seeds), width, height), gens, device)
    x = prepare_noise(noise, sigmas, settings.sampler, settings.spacing)
    cond, uncond = encode_prompts(bundle, prompts, negatives, settings.cfg)
    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback)
    return decode(bundle, to_latent(x, sigmas[-1]))


def img2img(bundle: ModelBundle, images: torch.Tensor, prompts: list, negatives: list, seeds: list[int],
            settings: Settings, callback=None) -> torch.Tensor:  # fmt: skip
    """SDEdit: encode, noise to the strength's σ, run the tail of the schedule."""
    settings.check()
    check_size(bundle, images.shape[-1], images.shape[-2])
    gens = generators(seeds)
    z0 = encode(bundle, images, gens)
    sigmas = tail(sigmas_for(bundle, settings), settings.strength)
    noise = randn(tuple(z0.shape), gens, z0.device)
    x = noise_for_img2img(z0.float(), noise, sigmas[0])
    cond, uncond = encode_prompts(bundle, prompts, negatives, settings.cfg)
    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback)
    return decode(bundle, to_latent(x, sigmas[-1]))


def inpaint(bundle: ModelBundle, images: torch.Tensor, masks: torch.Tensor, prompts: list, negatives: list,
            seeds: list[int], settings: Settings, callback=None) -> torch.Tensor:  # fmt: skip
    """Repaint where mask = 1. A 9-channel inpainting UNet gets [mask↓, E(masked image)] as concat
    conditioning (as diffusers' StableDiffusionInpaintPipeline); any other model keeps the known region by
    replacing it, at every step, with the original latent re-noised to the current σ."""
    settings.check()
    check_size(bundle, images.shape[-1], images.shape[-2])
    if masks.shape[-2:] != images.shape[-2:]:
        raise InputError(f"mask is {masks.shape[-1]}x{masks.shape[-2]} but the image is "
                         f"{images.shape[-1]}x{images.shape[-2]}: pass a mask of the same size or --resize-mask")  # fmt: skip
    masks = (masks >= 0.5).to(images.dtype)
    device, dtype = _params(bundle)
    gens = generators(seeds)
    cond, uncond = encode_prompts(bundle, prompts, negatives, settings.cfg)
    sigmas = sigmas_for(bundle, settings)
    n = images.shape[0]
    shape = latent_shape(bundle, n, images.shape[-1], images.shape[-2])
    if bundle.config.concat == "inpaint":
        if settings.strength < 1.0:
            z0 = encode(bundle, images, gens)
            sigmas = tail(sigmas, settings.strength)
            x = noise_for_img2img(z0.float(), randn(shape, gens, device), sigmas[0])
        else:
            x = prepare_noise(randn(shape, gens, device), sigmas, settings.sampler, settings.spacing)
        masked = images * (masks < 0.5) + 0.5 * (masks >= 0.5)  # repainted pixels → 0 in [-1, 1], as diffusers
        mz = encode(bundle, masked, gens)
        m = F.interpolate(masks, size=shape[-2:]).to(device, dtype)
        concat = torch.cat([m, mz.to(dtype)], dim=1)
        cond = {**cond, "concat": concat}
        if uncond is not None:
            uncond = {**uncond, "concat": concat}
        x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback)
        return decode(bundle, to_latent(x, sigmas[-1]))
    if bundle.config.concat is not None:
        raise InputError(f"{bundle.config.name} is a super-resolution model: use `latentgen superres`")
    z0 = encode(bundle, images, gens).float()
    sigmas = tail(sigmas, settings.strength)
    noise = randn(shape, gens, device)
    x = noise_for_img2img(z0, noise, sigmas[0])
    keep = 1.0 - F.interpolate(masks, size=shape[-2:], mode="bilinear", align_corners=False).to(device).clamp(0, 1)
    keep = (keep > 0.999).float()  # known region: pixels entirely outside the (dilated) mask

    def wrap(model):
        def blended(x, sigma, **kw):
            s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma
            x = keep * (z0 + noise * s) + (1 - keep) * x
            return keep * z0 + (1 - keep) * model(x, sigma, **kw)

        return blended

    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, wrap=wrap)
    z = to_latent(x, sigmas[-1])
    z = keep * z0 + (1 - keep) * z
    return decode(bundle, z)


def superres(bundle: ModelBundle, images: torch.Tensor, seeds: list[int], settings: Settings, callback=None,
             prompts: list | None = None, negatives: list | None = None) -> torch.Tensor:  # fmt: skip
    """LDM-SR (Rombach et al. §4.4): the low-res image in [-1, 1], at latent resolution, is concatenated to
    the latent the UNet denoises; the output is f times larger."""
    settings.check()
    if bundle.config.concat != "lowres":
        raise InputError(f"{bundle.config.name} is not a super-resolution model (its UNet takes no low-res image)")
    device, dtype = _params(bundle)
    gens = generators(seeds)
    n, _, h, w = images.shape
    lowres = (images * 2 - 1).to(device, dtype)
    sigmas = sigmas_for(bundle, settings)
    x = prepare_noise(randn((n, bundle.config.latent_channels, h, w), gens, device), sigmas, settings.sampler,
                      settings.spacing)  # fmt: skip
    p = prompts or [""] * n
    cond, uncond = encode_prompts(bundle, p, negatives or [""] * n, settings.cfg)
    cond = {**cond, "concat": lowres}
    if uncond is not None:
        uncond = {**uncond, "concat": lowres}
    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback)
    return decode(bundle, to_latent(x, sigmas[-1]))
