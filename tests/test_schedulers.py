"""Named σ schedules against diffusers where it has them (test_samplers.test_get_sigmas_matches_diffusers covers
karras / exponential for every sampler family) and against ComfyUI's formulas (comfy/samplers.py,
comfy_extras/nodes_align_your_steps.py), written out here step by step; the default schedule per sampler;
A1111 sampler / schedule names both ways."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from latentgen.denoiser import SAMPLER_NAMES, DiscreteSchedule, get_sigmas, make_betas
from latentgen.errors import ConfigError
from latentgen.infotext import a1111_sampler_label, parse_parameters, png_text, sampler_from_a1111
from latentgen.pipelines import Settings
from latentgen.samplers import SAMPLERS
from latentgen.schedulers import AYS_LEVELS, SCHEDULERS, default_scheduler


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.from_betas(make_betas("scaled_linear"))


def comfy_sigma(schedule, t: float) -> float:
    """ComfyUI ModelSamplingDiscrete.sigma: log-linear interpolation between the integer timesteps."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    ls = schedule.log_sigmas
    return math.exp((1 - w) * float(ls[lo]) + w * float(ls[hi]))


def reference(name, schedule, n):
    """The levels ComfyUI computes for `name`, written independently of latentgen.schedulers."""
    s = schedule.sigmas.tolist()
    total = len(s)
    smin, smax = s[0], s[-1]
    if name == "simple":
        return [s[-(1 + int(x * total / n))] for x in range(n)] + [0.0]
    if name == "ddim_uniform":
        out, x = [0.0], 1
        while x < total:
            out.append(s[x])
            x += max(total // n, 1)
        return out[::-1]
    if name == "sgm_uniform":
        return [comfy_sigma(schedule, 999 - k * 999 / n) for k in range(n)] + [0.0]
    if name == "beta":
        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (total - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(s[int(t)])
            last = t
        return out + [0.0]
    if name == "kl_optimal":
        return [math.tan((1 - k / (n - 1)) * math.atan(smax) + k / (n - 1) * math.atan(smin)) for k in range(n)] + [0]
    if name == "linear_quadratic":  # Mochi's schedule, threshold 0.025, n//2 linear steps
        ls_ = n // 2
        lin = [i * 0.025 / ls_ for i in range(ls_)]
        diff = ls_ - 0.025 * n
        qs = n - ls_
        a, b = diff / (ls_ * qs**2), 0.025 / ls_ - 2 * diff / qs**2
        quad = [a * i**2 + b * i + a * ls_**2 for i in range(ls_, n)]
        return [(1 - v) * smax for v in lin + quad + [1.0]]
    if name == "ays":
        table = AYS_LEVELS["sd1"]
        if n + 1 == len(table):
            out = list(table)
        else:
            ys = np.log(table[::-1])
            out = list(np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(table)), ys))[::-1])
        return out[:-1] + [0.0]
    raise AssertionError(name)


@pytest.mark.parametrize("n", [4, 10, 25])
@pytest.mark.parametrize(
    "name", ["simple", "ddim_uniform", "sgm_uniform", "beta", "kl_optimal", "linear_quadratic", "ays"]
)
def test_named_schedules_match_comfyui_formulas(schedule, name, n):
    ours = get_sigmas(schedule, n, sampler="dpmpp_2m", scheduler=name)
    ref = torch.tensor(reference(name, schedule, n), dtype=torch.float64)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours.double() - ref).abs().max() < 1e-6 * ref.abs().max()
    assert ours[-1] == 0 and bool((ours[:-1] > 0).all()) and bool((ours[:-2] > ours[1:-1]).all())


def test_ays_ten_steps_is_the_published_table(schedule):
    ours = get_sigmas(schedule, 10, sampler="euler", scheduler="ays")
    assert ours[:-1].tolist() == pytest.approx(AYS_LEVELS["sd1"][:-1], rel=1e-6)
    sdxl = get_sigmas(schedule, 10, sampler="euler", scheduler="ays", ays_table="sdxl")
    assert sdxl[1].item() == pytest.approx(6.3184485287, rel=1e-6)


def test_default_schedule_follows_the_sampler(schedule):
    """Issue 12, defect 1: naming DDIM/PLMS/DDPM gives their own uniform timesteps; dpmpp_2m keeps Karras."""
    for sampler, expected in (("ddim", "normal"), ("plms", "normal"), ("ddpm", "normal"), ("dpmpp_2m", "karras")):
        st = Settings(sampler=sampler)
        assert st.schedule_name == expected == default_scheduler(sampler)
    st = Settings(sampler="ddim", steps=10)
    ddim_levels = get_sigmas(schedule, 10, sampler="ddim", scheduler=st.schedule_name)
    assert torch.equal(ddim_levels, get_sigmas(schedule, 10, sampler="ddim"))  # the model's own timesteps
    assert Settings(sampler="ddim", karras=True).schedule_name == "karras"  # --karras still an alias
    assert Settings(sampler="dpmpp_2m", karras=False).schedule_name == "normal"
    assert Settings(sampler="ddim", karras=False, scheduler="beta").schedule_name == "beta"  # a name wins
    with pytest.raises(ConfigError, match="--scheduler"):
        Settings(scheduler="zigzag").check()


def test_family_table_lists_every_sampler():
    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)
    assert all(default_scheduler(s) in SCHEDULERS for s in SAMPLERS)


@pytest.mark.parametrize(
    "label,schedule_type,expected",
    [
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Automatic", ("dpmpp_2m", None)),
        ("Euler a", None, ("euler_a", None)),
        ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
        ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
        ("DPM2 a Karras", None, ("dpm2_a", "karras")),
        ("euler_ancestral", None, ("euler_a", None)),  # ComfyUI's name
        ("uni_pc_bh2", "sgm_uniform", ("uni_pc", "sgm_uniform")),
        ("DDIM", "Uniform", ("ddim", "normal")),
        ("LMS", "Align Your Steps", ("lms", "ays")),
    ],
)
def test_a1111_names_read(label, schedule_type, expected):
    assert sampler_from_a1111(label, schedule_type) == expected


def test_a1111_names_round_trip_through_the_infotext():
    meta = {"prompt": "p", "steps": 4, "cfg": 7.0, "seed": 1, "width": 8, "height": 8, "task": "txt2img"}
    for sampler in SAMPLERS:
        for sched in ("karras", "exponential", "normal", "kl_optimal"):
            text = png_text({**meta, "sampler": sampler, "scheduler": sched})["parameters"].splitlines()[-1]
            fields = dict(f.split(": ", 1) for f in text.split(", "))
            assert sampler_from_a1111(fields["Sampler"], fields.get("Schedule type")) == (sampler, sched)
    assert a1111_sampler_label("dpmpp_2m") == "DPM++ 2M" and a1111_sampler_label("euler_a") == "Euler a"
    old = png_text({**meta, "sampler": "euler", "karras": True})["parameters"]  # a recipe from before --scheduler
    assert "Sampler: Euler Karras, CFG scale" in old
    with pytest.raises(ConfigError, match="unknown sampler 'Magic'"):
        sampler_from_a1111("Magic")
    with pytest.raises(ConfigError, match="schedule type"):
        sampler_from_a1111("Euler", "Zigzag")


A1111_TEXT = """a castle on a hill, sunset
with fog
Negative prompt: blurry, lowres
Steps: 30, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 6.5, Seed: 1234, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 99, Variation seed strength: 0.3, \
Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (bicubic), \
Hires prompt: "a castle, detailed", ENSD: 31337, Version: v1.10.1"""


def test_a1111_parameters_read():
    rec, skipped = parse_parameters(A1111_TEXT)
    assert skipped == []
    assert rec["prompt"] == "a castle on a hill, sunset\nwith fog" and rec["negative"] == "blurry, lowres"
    assert (rec["sampler"], rec["scheduler"], rec["steps"], rec["cfg"], rec["seed"]) == (
        "dpmpp_2m_sde",
        "exponential",
        30,
        6.5,
        1234,
    )
    assert (rec["width"], rec["height"], rec["subseed"], rec["subseed_strength"], rec["ensd"]) == (
        512,
        768,
        99,
        0.3,
        31337,
    )
    assert rec["rng"] == "nv"  # no RNG field: A1111's GPU noise, which NV reproduces on any device
    assert rec["hires"] == {
        "scale": 1.5,
        "steps": 12,
        "strength": 0.55,
        "upscaler": "latent-bicubic",
        "sampler": None,
        "prompt": "a castle, detailed",
    }
    assert parse_parameters("just a prompt") == ({"prompt": "just a prompt", "negative": "", "rng": "nv"}, [])
    rec, skipped = parse_parameters(
        "p\nSteps: 2, Sampler: Euler, Seed: 1, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+"
    )
    assert "hires" not in rec and skipped == ["Hires upscale: 2"]  # an upscaler we do not have: not honoured


def test_parameters_round_trip():
    meta = {
        "task": "txt2img",
        "prompt": "a dot, red",
        "negative": "blue",
        "steps": 7,
        "sampler": "dpm2_a",
        "scheduler": "beta",
        "cfg": 5.0,
        "seed": 42,
        "width": 64,
        "height": 96,
        "subseed": 5,
        "subseed_strength": 0.5,
        "ensd": 7,
        "rng": "cpu",
        "hires": {
            "scale": 2.0,
            "steps": 3,
            "strength": 0.6,
            "upscaler": "lanczos",
            "sampler": "euler",
            "prompt": "a, b",
        },
    }
    rec, skipped = parse_parameters(png_text(meta)["parameters"])
    assert skipped == []
    assert rec["rng"] == "nv"  # latentgen writes no RNG for its cpu default; A1111 would read it as GPU
    assert {k: rec[k] for k in meta if k not in ("task", "rng")} == {
        k: v for k, v in meta.items() if k not in ("task", "rng")
    }
