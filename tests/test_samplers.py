"""Schedules, denoiser, guidance and samplers against diffusers' schedulers and the original LDM buffers.

Whole runs use a tiny random conv net whose output depends on x, t and the context, classifier-free
guidance 7.5 with a different uncond context, and compare the final latent with a plain diffusers loop
(set_timesteps, scale_model_input, guidance on the network output, step) from the same noise.
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from latentgen.denoiser import (
    CFGDenoiser,
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    make_betas,
    noise_for_img2img,
    prepare_noise,
    quantize_timesteps,
    strength_sigmas,
    to_latent,
    training_loss,
)
from latentgen.errors import ConfigError
from latentgen.samplers import SAMPLERS, get_sampler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
DIFFUSERS = {
    "ddim": (DDIMScheduler, dict(set_alpha_to_one=False, clip_sample=False)),
    "plms": (PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=False)),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "ddpm": (DDPMScheduler, dict(clip_sample=False)),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "dpmpp_2m_sde_heun": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun"),
    ),
    "uni_pc": (UniPCMultistepScheduler, dict(solver_type="bh2", solver_order=2)),
}
# diffusers has use_karras_sigmas (and use_exponential_sigmas) for these
KARRAS_OK = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_2m_sde_heun")
KARRAS_OK += ("uni_pc",)
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.from_betas(make_betas("scaled_linear"))


def make_scheduler(sampler, spacing="leading", karras=False, prediction="eps", scheduler=None, **extra):
    cls, kwargs = DIFFUSERS[sampler]
    kwargs = dict(kwargs, timestep_spacing=spacing, prediction_type=PREDICTION[prediction], **extra)
    scheduler = scheduler or ("karras" if karras else "normal")
    if scheduler != "normal":
        kwargs[f"use_{scheduler}_sigmas"] = True
    return cls(**SD_CONFIG, **kwargs)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1)).item()


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ours,theirs,start,end",
    [
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("linear", "linear", 0.0001, 0.02),
        ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
    ],
)
def test_make_betas_matches_diffusers(ours, theirs, start, end):
    betas = make_betas(ours, 1000, start, end)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=theirs).betas
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert (betas.float() - ref).abs().max() < 1e-6


def test_schedule_matches_original_ldm_buffers(fixtures_dir, fixture_config, schedule):
    """Betas/ā of the ORIGINAL LatentDiffusion register_schedule, and its DDIM timesteps."""
    cfg = fixture_config("sd1-tiny")
    buffers = load_file(str(fixtures_dir / cfg["checkpoint"]))
    betas = make_betas("scaled_linear", cfg["timesteps"], cfg["linear_start"], cfg["linear_end"])
    assert (betas - buffers["betas"].double()).abs().max() < 1e-9
    assert (schedule.alphas_cumprod - buffers["alphas_cumprod"].double()).abs().max() < 1e-7
    ref = load_file(str(fixtures_dir / "sd1-tiny.orig-ref.safetensors"))["out.sample.ddim.timesteps"]
    sigmas = get_sigmas(schedule, len(ref), sampler="ddim")
    assert torch.equal(schedule.sigma_to_t(sigmas[:-1], quantize=True).long(), ref.long())


def _diffusers_sigmas(scheduler, sampler):
    """The noise levels a diffusers scheduler visits, one per step, plus where it ends."""
    if sampler in ("ddim", "plms", "ddpm"):
        ts = scheduler.timesteps
        if sampler == "plms":  # [t0, t1, t1, t2, ...]: the repeated t1 is the warm-up's second call
            ts = torch.cat([ts[:1], ts[2:]])
        ac = scheduler.alphas_cumprod.double()
        last = ac[:1] if sampler != "ddpm" else torch.ones(1, dtype=torch.float64)
        a = torch.cat([ac[ts], last])
        return ((1 - a) / a).sqrt().float()
    sigmas = scheduler.sigmas
    if sampler in ("heun", "dpm2", "dpm2_a", "dpmpp_sde"):  # [s0, s1, s1, s2, s2, ..., 0(, 0)]
        sigmas = torch.unique_consecutive(sigmas)
    return sigmas


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("named", ["normal", "karras", "exponential"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_get_sigmas_matches_diffusers(schedule, sampler, spacing, named, steps):
    if named != "normal" and sampler not in KARRAS_OK:
        pytest.skip(f"diffusers has no {named} sigmas for {sampler}")
    scheduler = make_scheduler(sampler, spacing, scheduler=named)
    scheduler.set_timesteps(steps)
    ref = _diffusers_sigmas(scheduler, sampler)
    ours = get_sigmas(schedule, steps, sampler=sampler, spacing=spacing, scheduler=named)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert rel_err(ours, ref) < 1e-6
    if sampler in ("euler", "heun", "dpmpp_2m") and named == "normal":  # the timesteps the network sees
        t_ref = scheduler.timesteps if sampler != "heun" else scheduler.timesteps[::2]
        assert (schedule.sigma_to_t(ours[:-1]) - t_ref.float()).abs().max() < 2e-3


def test_sigma_to_t_matches_diffusers(schedule):
    scheduler = EulerDiscreteScheduler(**SD_CONFIG)
    log_sigmas = schedule.log_sigmas.numpy()
    uniform = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 15
    sigmas = torch.cat([uniform, torch.tensor([1e-3, 20.0], dtype=torch.float64)])  # incl. out of range
    ref = torch.from_numpy(scheduler._sigma_to_t(sigmas.numpy(), log_sigmas))
    assert (schedule.sigma_to_t(sigmas) - ref).abs().max() < 1e-4
    t = torch.tensor([0.0, 3.5, 500.25, 999.0])
    assert (schedule.sigma_to_t(schedule.t_to_sigma(t)) - t).abs().max() < 1e-4
    assert schedule.sigma_min == pytest.approx(float(schedule.sigmas[0]))
    assert schedule.sigma_max == pytest.approx(float(schedule.sigmas[-1]))


def test_bad_options_raise_config_error(schedule):
    with pytest.raises(ConfigError, match="unknown sampler 'dpm_fast'"):
        get_sampler("dpm_fast")
    with pytest.raises(ConfigError, match="spacing"):
        get_sigmas(schedule, 10, sampler="euler", spacing="quadratic")
    with pytest.raises(ConfigError, match="beta_schedule"):
        make_betas("sigmoid")
    with pytest.raises(ConfigError, match="prediction"):
        Denoiser(lambda *a, **k: None, schedule, "x0")
    assert get_sampler("dpmpp_2m") is SAMPLERS["dpmpp_2m"]


# ------------------------------------------------------------------------------------------------
# a tiny random network: output depends on x, t and context non-trivially
# ------------------------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self, in_channels=4, out_channels=4, context_dim=8, width=16, seed=0):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.time_proj = torch.nn.Linear(16, width)
        self.context_proj = torch.nn.Linear(context_dim, width)
        self.norm = torch.nn.GroupNorm(4, width)
        self.conv_out = torch.nn.Conv2d(width, out_channels, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # every parameter random, norm affine included
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (1.0 if p.ndim > 1 else 0.3))

    def forward(self, x, t, context=None, y=None):
        freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float32) / 8).to(x.device)
        args = torch.as_tensor(t, device=x.device).float().reshape(-1, 1) * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(x.dtype)
        h = self.conv_in(x) + self.time_proj(emb)[:, :, None, None]
        if context is not None:
            h = h + self.context_proj(torch.tanh(context)).mean(1)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(self.norm(h)))


def diffusers_run(
    scheduler, net, noise, cond, uncond, scale, steps, *, z0=None, strength=None, concat=None, v_to_eps=False, **step_kw
):
    """The StableDiffusion[Img2Img]Pipeline denoising loop, reduced to its scheduler calls."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if strength is None:
        latents = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(noise.shape[0]))
    context = torch.cat([uncond, cond])
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    generator = step_kw.pop("generator", None)
    if accepts_generator:
        step_kw["generator"] = generator
    for t in timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        if concat is not None:
            model_in = torch.cat([model_in, torch.cat([concat] * 2)], dim=1)
        out_uncond, out_cond = net(model_in, t.expand(model_in.shape[0]), context=context).chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        if v_to_eps:
            a = scheduler.alphas_cumprod[t]
            guided = a.sqrt() * guided + (1 - a).sqrt() * latents
        latents = scheduler.step(guided, t, latents, **step_kw).prev_sample
    return latents


def ours_run(
    schedule,
    sampler,
    net,
    noise,
    cond,
    uncond,
    scale,
    steps,
    *,
    spacing="leading",
    karras=False,
    scheduler=None,
    sigmas=None,
    prediction="eps",
    z0=None,
    strength=None,
    concat=None,
    **options,
):
    scheduler = scheduler or ("karras" if karras else "normal")
    if sigmas is None:
        sigmas = get_sigmas(schedule, steps, sampler=sampler, spacing=spacing, scheduler=scheduler)
    model = CFGDenoiser(Denoiser(net, schedule, prediction, quantize=quantize_timesteps(sampler)))
    if strength is None:
        x = prepare_noise(noise, sigmas, sampler, spacing)
    else:
        sigmas = strength_sigmas(sigmas, strength)
        x = noise_for_img2img(z0, noise, sigmas[0])
    extra = {
        "cond": {"context": cond, "concat": concat},
        "uncond": {"context": uncond, "concat": concat},
        "cond_scale": scale,
    }
    x = get_sampler(sampler)(model, x, sigmas, extra_args=extra, **options)
    return to_latent(x, sigmas[-1])


def _inputs(in_channels=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    net = TinyNet(in_channels=in_channels, seed=seed)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    return net, noise, cond, uncond, z0


RUNS = [  # sampler, spacing, karras, steps, prediction
    ("ddim", "leading", False, 10, "eps"),
    ("ddim", "leading", False, 10, "v"),
    ("ddim", "trailing", False, 25, "eps"),
    ("plms", "leading", False, 10, "eps"),
    ("plms", "leading", False, 25, "v"),
    ("plms", "trailing", False, 10, "eps"),
    ("euler", "leading", False, 10, "eps"),
    ("euler", "leading", False, 10, "v"),
    ("euler", "linspace", False, 25, "eps"),
    ("euler", "leading", True, 10, "eps"),
    ("euler", "trailing", True, 25, "v"),
    ("heun", "leading", False, 10, "eps"),
    ("heun", "linspace", False, 10, "v"),
    ("heun", "leading", True, 10, "eps"),
    ("dpmpp_2m", "leading", False, 10, "eps"),
    ("dpmpp_2m", "leading", False, 25, "v"),
    ("dpmpp_2m", "trailing", False, 10, "eps"),
    ("dpmpp_2m", "leading", True, 10, "eps"),
    ("dpmpp_2m", "leading", True, 25, "v"),
    ("lms", "leading", False, 10, "eps"),
    ("lms", "linspace", False, 10, "v"),
    ("lms", "leading", True, 10, "eps"),
    ("dpm2", "leading", False, 10, "eps"),
    ("dpm2", "trailing", False, 10, "v"),
    ("uni_pc", "leading", False, 10, "eps"),
    ("uni_pc", "leading", False, 25, "v"),
    ("uni_pc", "trailing", False, 10, "eps"),
    ("uni_pc", "leading", True, 10, "eps"),
]


@pytest.mark.parametrize("sampler,spacing,karras,steps,prediction", RUNS)
def test_txt2img_run_matches_diffusers(schedule, sampler, spacing, karras, steps, prediction):
    net, noise, cond, uncond, _ = _inputs()
    if sampler == "plms" and prediction == "v":
        # PLMS extrapolates ε̂ (the ODE derivative; the original PLMSSampler has no v support). diffusers'
        # PNDM with v_prediction extrapolates raw v outputs instead; compare with PNDM on ε̂ = √ā v + √(1-ā) z.
        scheduler = make_scheduler(sampler, spacing, karras, "eps")
        ref = diffusers_run(scheduler, net, noise, cond, uncond, 7.5, steps, v_to_eps=True)
    else:
        ref = diffusers_run(make_scheduler(sampler, spacing, karras, prediction), net, noise, cond, uncond, 7.5, steps)
    ours = ours_run(
        schedule, sampler, net, noise, cond, uncond, 7.5, steps, spacing=spacing, karras=karras, prediction=prediction
    )
    assert rel_err(ours, ref) < 1e-4


STOCHASTIC_RUNS = [  # sampler, spacing, karras, options for ours, options for diffusers' step
    ("euler_a", "leading", False, {}, {}),
    ("euler_a", "trailing", False, {}, {}),
    ("ddim", "leading", False, {"eta": 1.0}, {"eta": 1.0}),
    ("ddim", "leading", False, {"eta": 0.5}, {"eta": 0.5}),
    ("ddpm", "leading", False, {}, {}),
    ("ddpm", "linspace", False, {}, {}),
    ("dpmpp_2m_sde", "leading", False, {}, {}),
    ("dpmpp_2m_sde", "leading", True, {}, {}),
    ("dpm2_a", "leading", False, {}, {}),
    ("dpm2_a", "linspace", False, {}, {}),
    ("dpmpp_2m_sde_heun", "leading", False, {}, {}),
    ("dpmpp_2m_sde_heun", "leading", True, {}, {}),
]


@pytest.mark.parametrize("sampler,spacing,karras,options,step_kw", STOCHASTIC_RUNS)
def test_stochastic_run_matches_diffusers_with_same_generator(schedule, sampler, spacing, karras, options, step_kw):
    """Same CPU generator, same draws in the same order: stochastic samplers match diffusers exactly too."""
    net, noise, cond, uncond, _ = _inputs()
    scheduler = make_scheduler(sampler, spacing, karras, "eps")
    ref = diffusers_run(
        scheduler, net, noise, cond, uncond, 7.5, 10, generator=torch.Generator().manual_seed(5), **step_kw
    )
    ours = ours_run(
        schedule,
        sampler,
        net,
        noise,
        cond,
        uncond,
        7.5,
        10,
        spacing=spacing,
        karras=karras,
        generator=torch.Generator().manual_seed(5),
        **options,
    )
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize(
    "sampler,karras,prediction",
    [
        ("ddim", False, "eps"),
        ("euler", False, "v"),
        ("euler", True, "eps"),
        ("heun", False, "eps"),
        ("dpmpp_2m", False, "v"),
        ("dpmpp_2m", True, "eps"),
        ("euler_a", False, "eps"),
    ],
)
def test_img2img_tail_matches_diffusers(schedule, sampler, karras, prediction):
    net, noise, cond, uncond, z0 = _inputs()
    scheduler = make_scheduler(sampler, "leading", karras, prediction)
    gen_kw = {"generator": torch.Generator().manual_seed(3)} if sampler == "euler_a" else {}
    ref = diffusers_run(scheduler, net, noise, cond, uncond, 7.5, 10, z0=z0, strength=0.6, **gen_kw)
    gen_kw = {"generator": torch.Generator().manual_seed(3)} if sampler == "euler_a" else {}
    ours = ours_run(
        schedule,
        sampler,
        net,
        noise,
        cond,
        uncond,
        7.5,
        10,
        karras=karras,
        prediction=prediction,
        z0=z0,
        strength=0.6,
        **gen_kw,
    )
    assert rel_err(ours, ref) < 1e-4


def test_concat_conditioning_matches_diffusers_inpaint_loop(schedule):
    """Concat channels join the SCALED latent, as StableDiffusionInpaintPipeline does."""
    net, noise, cond, uncond, _ = _inputs(in_channels=9)
    concat = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(9))
    for sampler in ("euler", "dpmpp_2m"):
        ref = diffusers_run(make_scheduler(sampler), net, noise, cond, uncond, 7.5, 10, concat=concat)
        ours = ours_run(schedule, sampler, net, noise, cond, uncond, 7.5, 10, concat=concat)
        assert rel_err(ours, ref) < 1e-4


# ------------------------------------------------------------------------------------------------
# guidance, callbacks, dtypes
# ------------------------------------------------------------------------------------------------
class CountingNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, context=None, y=None):
        self.batches.append(x.shape[0])
        return super().forward(x, t, context=context)


def test_cfg_one_pass_without_guidance_and_batched_equals_separate(schedule):
    net = CountingNet()
    _, noise, cond, uncond, _ = _inputs()
    x, sigma = noise * 3, torch.tensor([2.5, 0.7])
    den = Denoiser(net, schedule, "eps")
    cfg = CFGDenoiser(den)
    out1 = cfg(x, sigma, cond={"context": cond}, uncond={"context": uncond}, cond_scale=1.0)
    out2 = cfg(x, sigma, cond={"context": cond}, uncond=None, cond_scale=7.5)
    assert net.batches == [2, 2]  # one pass of batch B each, no unconditional pass
    assert torch.equal(out1, den(x, sigma, context=cond)) and torch.equal(out2, out1)
    net.batches.clear()
    guided = cfg(x, sigma, cond={"context": cond}, uncond={"context": uncond}, cond_scale=7.5)
    assert net.batches == [4]  # cond and uncond in one batch
    d_c, d_u = den(x, sigma, context=cond), den(x, sigma, context=uncond)
    assert (guided - (d_u + 7.5 * (d_c - d_u))).abs().max() < 1e-5 * d_c.abs().max()
    # guiding x0 equals guiding eps (the affine map from eps to x0 is shared by both branches)
    eps = lambda d: (x - d) / sigma[:, None, None, None]  # noqa: E731
    assert (eps(guided) - (eps(d_u) + 7.5 * (eps(d_c) - eps(d_u)))).abs().max() < 1e-4


def test_cfg_rejects_half_given_condition(schedule):
    cfg = CFGDenoiser(Denoiser(TinyNet(), schedule))
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ConfigError, match="'y'"):
        cfg(x, torch.tensor(1.0), cond={"y": torch.zeros(1, 3)}, uncond={}, cond_scale=2.0)


def test_denoiser_scalar_sigma_and_bfloat16_network(schedule):
    net, noise, cond, _, _ = _inputs()
    den = Denoiser(net, schedule, "v")
    x = noise * 4
    full = den(x, torch.tensor([3.0, 3.0]), context=cond)
    assert torch.equal(den(x, torch.tensor(3.0), context=cond), full)
    half = Denoiser(TinyNet(seed=1).to(torch.bfloat16), schedule, "v")(x, torch.tensor(3.0), context=cond)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_callback_sees_every_step_and_img2img_does_not_assume_sigma_max(schedule):
    net, noise, cond, uncond, z0 = _inputs()
    sigmas = strength_sigmas(get_sigmas(schedule, 10, sampler="heun"), 0.3)
    assert sigmas.shape[0] == 4 and float(sigmas[0]) < schedule.sigma_max / 10
    seen = []
    model = CFGDenoiser(Denoiser(net, schedule))
    get_sampler("heun")(
        model,
        noise_for_img2img(z0, noise, sigmas[0]),
        sigmas,
        extra_args={"cond": {"context": cond}},
        callback=seen.append,
    )
    assert [s["i"] for s in seen] == [0, 1, 2]
    assert [s["sigma"] for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert set(seen[0]) == {"i", "sigma", "x", "denoised"}


def test_per_image_generators_match_single_image_runs(schedule):
    """A list of generators (seed S+i per image) gives each image what a batch of one would get."""
    net, noise, cond, _, _ = _inputs()
    sigmas = get_sigmas(schedule, 6, sampler="euler_a")
    model = Denoiser(net, schedule)
    x = prepare_noise(noise, sigmas, "euler_a", "leading")
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    batch = get_sampler("euler_a")(model, x, sigmas, extra_args={"context": cond}, generator=gens)
    for i in range(2):
        single = get_sampler("euler_a")(
            model,
            x[i : i + 1],
            sigmas,
            extra_args={"context": cond[i : i + 1]},
            generator=torch.Generator().manual_seed(100 + i),
        )
        assert (single - batch[i : i + 1]).abs().max() < 1e-4


def test_seed_noise_equals_diffusers_randn_tensor():
    shape = (1, 4, 8, 8)
    for seed in (0, 1234):
        ours = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        ref = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"))
        assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# distributional checks with an exact denoiser for Gaussian data x0 ~ N(mu, s²)
# ------------------------------------------------------------------------------------------------
MU, S = 0.5, 1.0


def gaussian_denoiser(x, sigma):
    """E[x0 | x = x0 + σ n] for x0 ~ N(MU, S²): MU + S²/(S² + σ²)·(x - MU)."""
    s2 = sigma.reshape(-1, 1) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


class GaussianWithUncond:
    """The exact denoiser, offering `with_uncond` as CFGDenoiser does (unguided: both estimates equal)."""

    def __call__(self, x, sigma):
        return gaussian_denoiser(x, sigma)

    def with_uncond(self, x, sigma):
        d = gaussian_denoiser(x, sigma)
        return d, d


STOCHASTIC = ("euler_a", "ddpm", "dpmpp_2m_sde", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde_heun")
STOCHASTIC += ("dpmpp_3m_sde",)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "lcm"])  # LCM needs a consistency model
def test_samplers_land_on_the_data_distribution(schedule, sampler):
    steps = 60 if sampler == "dpmpp_sde" else 250
    sigmas = get_sigmas(schedule, steps, sampler=sampler, scheduler="karras" if sampler.startswith("dpm") else "normal")
    g = torch.Generator().manual_seed(0)
    n = torch.randn(2000, 16, generator=g)
    x = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * n  # exact marginal at σ_0
    out = get_sampler(sampler)(GaussianWithUncond(), x, sigmas, generator=g)
    std = math.sqrt(S**2 + float(sigmas[-1]) ** 2)  # DDIM / PLMS stop at σ(t=0) > 0
    se_mean = std / math.sqrt(out.numel())
    assert abs(out.mean().item() - MU) < 4 * se_mean
    assert abs(out.std().item() / std - 1) < 0.02
    corr = torch.corrcoef(torch.stack([n.flatten(), out.flatten()]))[0, 1].item()
    assert (corr < 0.5) if sampler in STOCHASTIC else (corr > 0.999)  # fresh noise vs a deterministic map


def test_ddim_eta_one_is_stochastic_and_on_distribution(schedule):
    sigmas = get_sigmas(schedule, 250, sampler="ddim")
    g = torch.Generator().manual_seed(1)
    n = torch.randn(2000, 16, generator=g)
    out = get_sampler("ddim")(
        gaussian_denoiser, MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * n, sigmas, generator=g, eta=1.0
    )
    std = math.sqrt(S**2 + float(sigmas[-1]) ** 2)
    assert abs(out.mean().item() - MU) < 4 * std / math.sqrt(out.numel())
    assert abs(out.std().item() / std - 1) < 0.02
    assert torch.corrcoef(torch.stack([n.flatten(), out.flatten()]))[0, 1].item() < 0.5


# ------------------------------------------------------------------------------------------------
# training objective
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_targets_match_diffusers(schedule, prediction):
    """A network that reads the true z0 and returns diffusers' target (noise / get_velocity) has zero loss."""
    ddpm = DDPMScheduler(**SD_CONFIG)
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def oracle(z_t, t, context=None):
        a = ddpm.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noise = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
        return noise if prediction == "eps" else ddpm.get_velocity(z0, noise, t)

    loss = training_loss(oracle, schedule, prediction, z0, {"context": None}, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    wrong = training_loss(
        lambda z, t, context=None: torch.zeros_like(z), schedule, prediction, z0, {}, torch.Generator().manual_seed(0)
    )
    assert wrong.item() > 0.1


# ------------------------------------------------------------------------------------------------
# the samplers diffusers has no generator-driven twin of
# ------------------------------------------------------------------------------------------------
def test_uni_pc_order_3_matches_diffusers(schedule):
    net, noise, cond, uncond, _ = _inputs()
    ref = diffusers_run(make_scheduler("uni_pc", solver_order=3), net, noise, cond, uncond, 7.5, 10)
    ours = ours_run(schedule, "uni_pc", net, noise, cond, uncond, 7.5, 10, order=3)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("spacing,karras", [("leading", False), ("leading", True), ("trailing", False)])
def test_dpmpp_sde_matches_diffusers_brownian_tree(schedule, spacing, karras):
    """One Brownian tree per image, seeded with the image's seed, as DPMSolverSDEScheduler(noise_sampler_seed).

    The tree's increments over intervals an ulp apart differ by ~sqrt(ulp), so this runs on diffusers' own
    float32 levels (get_sigmas equals them to 1e-6, test_get_sigmas_matches_diffusers).
    """
    net, noise, cond, uncond, _ = _inputs()
    scheduler = make_scheduler("dpmpp_sde", spacing, karras, noise_sampler_seed=[11, 12])
    ref = diffusers_run(scheduler, net, noise, cond, uncond, 7.5, 6)
    levels = torch.unique_consecutive(scheduler.sigmas)
    named = "karras" if karras else "normal"
    assert rel_err(levels, get_sigmas(schedule, 6, sampler="dpmpp_sde", spacing=spacing, scheduler=named)) < 1e-6
    kw = dict(spacing=spacing, sigmas=levels)
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    ours = ours_run(schedule, "dpmpp_sde", net, noise, cond, uncond, 7.5, 6, generator=gens, **kw)
    assert rel_err(ours, ref) < 1e-5
    other = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(13)]
    changed = ours_run(schedule, "dpmpp_sde", net, noise, cond, uncond, 7.5, 6, generator=other, **kw)
    assert torch.equal(changed[0], ours[0]) and rel_err(changed[1], ours[1]) > 1e-2  # image 1's own tree


def test_lcm_matches_diffusers_lcm_scheduler(schedule):
    """LCMScheduler's own timesteps (original_inference_steps 50); its boundary condition c_skip = 0.25/(0.25 +
    (10 t)²) is below 4e-8 at these timesteps, so D = x̂0 to float precision."""
    net, noise, cond, uncond, _ = _inputs()
    lcm = LCMScheduler(**dict(SD_CONFIG, steps_offset=0), set_alpha_to_one=True)
    ref = diffusers_run(lcm, net, noise, cond, uncond, 1.5, 4, generator=torch.Generator().manual_seed(4))
    lcm.set_timesteps(4)
    sigmas = torch.cat([schedule.sigmas[lcm.timesteps].float(), torch.zeros(1)])
    model = CFGDenoiser(Denoiser(net, schedule, "eps", quantize=True))
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "cond_scale": 1.5}
    x = prepare_noise(noise, sigmas, "lcm", "leading")
    ours = get_sampler("lcm")(model, x, sigmas, extra_args=extra, generator=torch.Generator().manual_seed(4))
    assert lcm.timesteps.tolist() == [999, 759, 499, 259]
    assert rel_err(ours, ref) < 1e-5


def _eps_net(net, schedule, t, z, context):
    return net(z, torch.full((z.shape[0],), float(t)), context=context)


def test_euler_cfg_pp_is_the_papers_ddim_form(schedule):
    """CFG++ (Chung et al. 2024, Alg. 1): z_prev = √ā_prev·x̂0^λ + √(1-ā_prev)·ε̂_∅ on DDIM's timesteps, written
    here on the network's ε directly; ours is euler_cfg_pp in x-space on the same levels."""
    net, noise, cond, uncond, _ = _inputs()
    lam, steps = 0.6, 8
    ac = schedule.alphas_cumprod
    ts = list(range(999, 0, -1000 // steps))[:steps]
    z = noise.clone()
    for k, t in enumerate(ts):
        a, a_prev = ac[t].float(), (ac[ts[k + 1]].float() if k + 1 < steps else torch.tensor(1.0))
        e_u, e_c = _eps_net(net, schedule, t, z, uncond), _eps_net(net, schedule, t, z, cond)
        e = e_u + lam * (e_c - e_u)
        x0 = (z - (1 - a).sqrt() * e) / a.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e_u
    sigmas = torch.cat([schedule.sigmas[ts].float(), torch.zeros(1)])
    model = CFGDenoiser(Denoiser(net, schedule, "eps", quantize=True))
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "cond_scale": lam}
    x = noise * (sigmas[0] ** 2 + 1).sqrt()
    ours = get_sampler("euler_cfg_pp")(model, x, sigmas, extra_args=extra)
    assert rel_err(ours, z) < 1e-4


def test_cfg_pp_samplers_reduce_to_their_base_without_guidance(schedule):
    """With the unconditional estimate equal to the guided one, CFG++ is the plain sampler (ComfyUI's formulas)."""
    net, noise, cond, _, _ = _inputs()
    for pp, base in (("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m")):
        sigmas = get_sigmas(schedule, 8, sampler=base, scheduler="karras")
        model = CFGDenoiser(Denoiser(net, schedule))
        extra = {"cond": {"context": cond}, "uncond": {"context": cond}, "cond_scale": 3.0}
        x = noise * 15
        a = get_sampler(pp)(model, x, sigmas, extra_args=extra)
        b = get_sampler(base)(model, x, sigmas, extra_args=extra)
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ConfigError, match="CFG\\+\\+"):
        get_sampler("euler_cfg_pp")(gaussian_denoiser, torch.zeros(2, 3), sigmas)


def test_dpmpp_2m_cfg_pp_step_formula(schedule):
    """x' = D_cfg + (σ'/σ)(x - D_u) + (1 - σ'/σ)(D_cfg - D_u,prev)/(2r): the 2M data term on the guided estimate,
    the noise direction from the unguided one (ComfyUI sample_dpmpp_2m_cfg_pp), written out per step."""
    net, noise, cond, uncond, _ = _inputs()
    sigmas = get_sigmas(schedule, 6, sampler="dpmpp_2m", scheduler="karras")
    model = CFGDenoiser(Denoiser(net, schedule, quantize=True))
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "cond_scale": 0.8}
    x0 = noise * 15
    ours = get_sampler("dpmpp_2m_cfg_pp")(model, x0, sigmas, extra_args=extra)
    x, prev_u, s = x0, None, sigmas.tolist()
    for i in range(len(s) - 1):
        g, u = model.with_uncond(x, torch.tensor(s[i]), **extra)
        if s[i + 1] == 0:
            x = g
            break
        ratio = s[i + 1] / s[i]
        nxt = g + ratio * (x - u)
        if prev_u is not None:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            nxt = nxt + (1 - ratio) * (g - prev_u) / (2 * r)
        x, prev_u = nxt, u
    assert rel_err(ours, x) < 1e-5


def test_dpmpp_2s_matches_diffusers_singlestep_midpoints(schedule):
    """η = 0: DPM-Solver++(2S) over every other level of a log-uniform grid is DPMSolverSinglestepScheduler's
    order-2 step (its intermediate grid point is then the λ-midpoint). Compared over the first 2·3 of 8 steps,
    before diffusers' lower-order final steps."""
    from diffusers import DPMSolverSinglestepScheduler

    net, noise, cond, uncond, _ = _inputs()
    config = {k: v for k, v in SD_CONFIG.items() if k != "steps_offset"}
    sched = DPMSolverSinglestepScheduler(
        **config, algorithm_type="dpmsolver++", solver_order=2, use_exponential_sigmas=True
    )
    sched.set_timesteps(8)
    latents = noise * sched.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in sched.timesteps[:6]:
        out_u, out_c = net(sched.scale_model_input(torch.cat([latents] * 2), t), t.expand(4), context=context).chunk(2)
        latents = sched.step(out_u + 7.5 * (out_c - out_u), t, latents).prev_sample
    sigmas = sched.sigmas[0:7:2]  # σ0, σ2, σ4, σ6

    ref_t = sched.timesteps.float()

    def on_their_timesteps(x, t, context=None, y=None):  # diffusers truncates these float timesteps to int64
        return net(x, ref_t[(t[:, None] - ref_t).abs().argmin(1)], context=context)

    model = CFGDenoiser(Denoiser(on_their_timesteps, schedule))
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "cond_scale": 7.5}
    x = prepare_noise(noise, sigmas, "dpmpp_2s_a", "leading")
    ours = get_sampler("dpmpp_2s_a")(model, x, sigmas, extra_args=extra, eta=0.0)
    assert rel_err(to_latent(ours, sigmas[-1]), latents) < 1e-5


# ------------------------------------------------------------------------------------------------
# convergence order on the exact probability-flow ODE of Gaussian data
# ------------------------------------------------------------------------------------------------
ORDERS = [  # sampler, options, least observed order (measured: 1.0, 2.0, 2.0, 3.2, 2.0, 2.0, 2.0, 2.1, 6.0, 2.1, 2.0)
    ("euler", {}, 0.9),
    ("heun", {}, 1.8),
    ("dpm2", {}, 1.8),
    ("lms", {}, 2.8),
    ("dpmpp_2m", {}, 1.8),
    ("dpmpp_2s_a", {"eta": 0.0}, 1.8),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 1.8),
    ("dpmpp_3m_sde", {"eta": 0.0}, 1.8),  # its two lower-order warm-up steps cap the observed order near 2
    ("uni_pc", {}, 2.5),
    ("uni_pc", {"order": 3}, 1.8),
    ("res_multistep", {}, 1.8),
]


@pytest.mark.parametrize("sampler,options,order", ORDERS)
def test_deterministic_samplers_converge_at_their_order(sampler, options, order):
    """x(σ) = μ + (x(σ₀) - μ)·sqrt(s² + σ²)/sqrt(s² + σ₀²) solves dx/dσ = (x - D)/σ exactly for x0 ~ N(μ, s²).
    Doubling the steps of a log-uniform grid from 10 to 0.1 must cut the error by at least 2^order (a wrong
    coefficient in a higher-order term leaves a first-order method: ratio 2)."""
    g = torch.Generator().manual_seed(0)
    x0 = MU + math.sqrt(S**2 + 100) * torch.randn(64, 4, generator=g, dtype=torch.float64)
    exact = MU + (x0 - MU) * math.sqrt(S**2 + 0.01) / math.sqrt(S**2 + 100)
    errors = []
    for n in (32, 64):
        sigmas = torch.exp(torch.linspace(math.log(10), math.log(0.1), n + 1, dtype=torch.float64))
        out = get_sampler(sampler)(GaussianWithUncond(), x0, sigmas, **options)
        errors.append((out - exact).abs().max().item())
    assert math.log2(errors[0] / errors[1]) > order, errors
