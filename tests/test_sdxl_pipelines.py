"""SDXL end to end: sampling runs against the original Stability code (fixture), and txt2img / img2img with a
refiner / inpaint / the base + refiner ensemble against diffusers' SDXL pipelines on the same weights and seeds
(8-bit images within 1 level on 99.9% of the values), from the single file and from a diffusers folder."""

from __future__ import annotations

import pytest
import torch
from helpers_models import max_scaled_err
from safetensors.torch import load_file
from sdxl_reference import (
    BASE,
    SDXL_DIR,
    base_config,
    inpaint_single_file,
    save_folder,
)

from latentgen import pipelines
from latentgen.denoiser import CFGDenoiser, Denoiser
from latentgen.loading.bundle import load_model
from latentgen.loading.sdxl import variant
from latentgen.pipelines import Settings
from latentgen.samplers import get_sampler

diffusers = pytest.importorskip("diffusers")
from test_pipelines import _scheduler, assert_images_match  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}"),
    pytest.mark.filterwarnings("ignore::latentgen.text.tokenizers.TruncationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
PROMPTS = ["a red cube on top of a blue sphere", "an oil painting of a lighthouse at night"]
SEEDS = [1234, 1235]
H, W = 64, 128  # non-square, to catch h/w swaps


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------------------------
# 1. the original code's complete runs (EulerEDMSampler and DPMPP2MSampler, sgm's own σ grid and init)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sampling_matches_original_code(base, sampler):
    ref = load_file(str(SDXL_DIR / "sdxl-base-tiny.orig-ref.safetensors"))
    o = base_config()["orig_ref"]
    sdxl = {"original_size": (H, W), "crop": (0, 0), "target_size": (H, W)}
    cond, uncond = base.cond.guidance_pair(o["sample_prompts"], [None] * 2, True, **sdxl)
    assert max_scaled_err(cond["y"], ref["out.sample.cond.vector"]) <= 1e-5
    assert max_scaled_err(uncond["context"], ref["out.sample.uncond.crossattn"]) <= 1e-5
    sigmas = ref[f"out.sample.{sampler}.sigmas"]
    model = CFGDenoiser(Denoiser(base.unet, base.schedule, "eps", quantize=True))  # sgm feeds integer t
    extra = {"cond": cond, "uncond": uncond, "cond_scale": o["guidance_scale"]}
    with torch.no_grad():
        x = get_sampler(sampler)(model, ref[f"out.sample.{sampler}.init"], sigmas, extra_args=extra)
        images = pipelines.decode_latents(base.first_stage, x / base.config.scale_factor)
    want = ref[f"out.sample.{sampler}.latents"]  # |latent| up to 80 (random weights): relative to the largest
    assert ((x - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert max_scaled_err(images, ref[f"out.sample.{sampler}.images"]) <= 1e-4
    assert max_scaled_err(images, ref[f"out.sample.{sampler}.images"]) <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# 2. diffusers' pipelines


def _pipe(cls, components, sampler, karras, **kw):
    return getattr(diffusers, cls)(
        **components, scheduler=_scheduler(sampler, karras, "epsilon"), add_watermarker=False, **kw
    ).to("cpu")


CASES = [("ddim", False), ("euler", False), ("euler", True), ("dpmpp_2m", False), ("dpmpp_2m", True)]


@pytest.mark.parametrize("sampler,karras", CASES)
def test_txt2img_matches_diffusers(base, components, sampler, karras):
    pipe = _pipe("StableDiffusionXLPipeline", components, sampler, karras)
    ref = pipe(
        PROMPTS, height=H, width=W, num_inference_steps=5, guidance_scale=5.0, generator=_gens(SEEDS), output_type="np"
    )
    st = Settings(steps=5, sampler=sampler, karras=karras, cfg=5.0)
    ours = pipelines.txt2img(base, PROMPTS, [""] * 2, SEEDS, W, H, st)
    assert_images_match(ours, ref.images)


def test_txt2img_size_conditioning_and_negative_match_diffusers(base, components):
    """--original-size / --crop / --target-size (W,H and X,Y here; (h, w), (top, left) to the model) and an
    encoded negative prompt, at an odd latent size (72x40 px: 9x5 latent pixels)."""
    pipe = _pipe("StableDiffusionXLPipeline", components, "euler", False)
    neg = ["blurry", ""]  # diffusers encodes "" when given; pass None for the rows without a negative
    ref = pipe(
        PROMPTS,
        negative_prompt=["blurry", "blurry"],
        height=40,
        width=72,
        num_inference_steps=4,
        guidance_scale=5.0,
        original_size=(300, 500),
        crops_coords_top_left=(16, 32),
        target_size=(48, 80),
        generator=_gens(SEEDS),
        output_type="np",
    )
    st = Settings(
        steps=4, sampler="euler", karras=False, cfg=5.0, original_size=(500, 300), crop=(32, 16), target_size=(80, 48)
    )
    ours = pipelines.txt2img(base, PROMPTS, ["blurry"] * 2, SEEDS, 72, 40, st)
    assert ours.shape == (2, 3, 40, 72)
    assert_images_match(ours, ref.images)
    mixed = pipelines.txt2img(base, PROMPTS, neg, SEEDS, 72, 40, st)
    assert torch.equal(mixed[0], ours[0]) and not torch.equal(mixed[1], ours[1])


def test_diffusers_folder_equals_single_file(base, components, tmp_path):
    folder = save_folder(components, tmp_path / "sdxl", _scheduler("euler", False, "epsilon"))
    loaded = load_model(str(folder))
    assert loaded.config.family == "sdxl" and not loaded.config.cond.refiner
    assert (loaded.config.prediction, loaded.config.prediction_source) == ("eps", "config")  # the scheduler's
    st = Settings(steps=3, sampler="dpmpp_2m", karras=False, cfg=5.0)
    a = pipelines.txt2img(base, PROMPTS[:1], [""], SEEDS[:1], W, H, st)
    b = pipelines.txt2img(loaded, PROMPTS[:1], [""], SEEDS[:1], W, H, st)
    assert torch.equal(a, b)


def _image(n=1):
    g = torch.Generator().manual_seed(7)
    return torch.nn.functional.interpolate(torch.rand(n, 3, H // 8, W // 8, generator=g), size=(H, W), mode="bilinear")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_refiner_img2img_matches_diffusers(refiner, sampler):
    bundle, parts = refiner
    assert bundle.config.cond.refiner and variant(bundle.config) == "sdxl-refiner"
    pipe = _pipe(
        "StableDiffusionXLImg2ImgPipeline",
        parts,
        sampler,
        False,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    img = _image()
    ref = pipe(
        PROMPTS[:1],
        image=img,
        strength=0.5,
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=_gens([9]),
        output_type="np",
    )
    st = Settings(steps=8, sampler=sampler, karras=False, cfg=5.0, strength=0.5)
    ours = pipelines.img2img(bundle, img, PROMPTS[:1], [""], [9], st)
    assert_images_match(ours, ref.images)


@pytest.mark.parametrize("sampler,karras", [("euler", False), ("dpmpp_2m", True)])
def test_base_and_refiner_ensemble_matches_diffusers(base, components, refiner, sampler, karras):
    """Ensemble of experts: the base over the first 80% of the schedule (denoising_end), the refiner over the
    rest (denoising_start) on the same latent."""
    bundle, parts = refiner
    base_pipe = _pipe("StableDiffusionXLPipeline", components, sampler, karras)
    ref_pipe = _pipe(
        "StableDiffusionXLImg2ImgPipeline",
        parts,
        sampler,
        karras,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    gens = _gens(SEEDS)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, generator=gens)
    latents = base_pipe(PROMPTS, height=H, width=W, denoising_end=0.8, output_type="latent", **kw).images
    ref = ref_pipe(PROMPTS, image=latents, denoising_start=0.8, output_type="np", **kw).images
    st = Settings(steps=10, sampler=sampler, karras=karras, cfg=5.0)
    ours = pipelines.txt2img(base, PROMPTS, [""] * 2, SEEDS, W, H, st, refiner=bundle, refiner_start=0.8)
    assert_images_match(ours, ref)


@pytest.fixture(scope="module")
def inpainting(components, tmp_path_factory):
    """The fixture with a random 9-channel first convolution ([latent, mask, masked-image latent]), as an SDXL
    inpainting file; the same weights as a diffusers UNet."""
    path = tmp_path_factory.mktemp("inpaint") / "sdxl-inpaint-tiny.safetensors"
    conv_in = inpaint_single_file(path)
    unet = diffusers.UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    state = components["unet"].state_dict()
    state["conv_in.weight"] = conv_in
    unet.load_state_dict(state, strict=True)
    return load_model(str(path)), {**components, "unet": unet.eval()}


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("dpmpp_2m", 0.6), ("ddim", 1.0)])
def test_inpaint_matches_diffusers(inpainting, sampler, strength):
    bundle, parts = inpainting
    assert variant(bundle.config) == "sdxl-inpaint"
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 32:96] = 1
    img = _image()
    pipe = _pipe("StableDiffusionXLInpaintPipeline", parts, sampler, False)
    ref = pipe(
        PROMPTS[:1],
        image=img,
        mask_image=mask,
        height=H,
        width=W,
        strength=strength,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=_gens([21]),
        output_type="np",
    )
    st = Settings(steps=6, sampler=sampler, karras=False, cfg=5.0, strength=strength)
    ours = pipelines.inpaint(bundle, img, mask, PROMPTS[:1], [""], [21], st)
    assert_images_match(ours, ref.images)


def test_hires_fix_matches_diffusers(base, components, upscaler="latent", mode="bilinear"):
    """Hires fix on SDXL = diffusers' StableDiffusionXLPipeline (output_type="latent") + the same interpolation
    of the latent + StableDiffusionXLImg2ImgPipeline at the upscaled size, fresh generators from the seeds. The
    second pass conditions on original = target = the upscaled size (A1111's hires pass; diffusers' img2img
    default from the latent's size)."""
    from latentgen.hires import Hires, txt2img_hires

    base_pipe = _pipe("StableDiffusionXLPipeline", components, "euler", False)
    img_pipe = _pipe("StableDiffusionXLImg2ImgPipeline", components, "euler", False)
    z = base_pipe(
        PROMPTS,
        height=H,
        width=W,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=_gens(SEEDS),
        output_type="latent",
    ).images
    up = torch.nn.functional.interpolate(z, size=(H * 3 // 16, W * 3 // 16), mode=mode, align_corners=False)
    ref = img_pipe(
        PROMPTS,
        image=up,
        strength=0.5,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=_gens(SEEDS),
        output_type="np",
    ).images
    st = Settings(steps=4, sampler="euler", karras=False, cfg=5.0)
    hires = Hires(scale=1.5, steps=6, strength=0.5, upscaler=upscaler)
    ours = txt2img_hires(base, PROMPTS, [""] * 2, SEEDS, W, H, st, hires)
    assert ours.shape == (2, 3, H * 3 // 2, W * 3 // 2)
    assert_images_match(ours, ref)


# ---------------------------------------------------------------------------------------------------------
# 3. the VAE in half precision


def test_fp16_and_bf16_vae_have_no_nan(base):
    """A VAE whose activations overflow fp16 (as the real SDXL VAE's do; here forced by scaling conv_in):
    decoding and encoding in fp16 give NaN/inf unless upcast, as diffusers' force_upcast."""
    import copy

    bundle = copy.deepcopy(base)
    del bundle.first_stage.compute_dtype  # loaded for fp32 on the CPU; here it runs in the dtype it is cast to
    with torch.no_grad():
        bundle.first_stage.decoder.conv_in.weight.mul_(3e3)
        bundle.first_stage.encoder.conv_in.weight.mul_(1e5)
    z = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(0))  # small: CPU fp16 convs are slow
    img = _image()[..., :24, :32]
    ref, ref_z = pipelines.decode(bundle, z), pipelines.encode(bundle, img)
    for dtype in (torch.float16, torch.bfloat16):
        bundle.first_stage.to(dtype)
        out, zz = pipelines.decode(bundle, z), pipelines.encode(bundle, img)
        assert torch.isfinite(out).all() and torch.isfinite(zz).all(), dtype
        assert next(bundle.first_stage.parameters()).dtype == dtype  # cast back after
        assert (out - ref).abs().max() <= 0.05 and (zz - ref_z).abs().max() <= 0.05
        if dtype == torch.float16:  # the test can fail: without the upcast fp16 overflows
            bundle.config.vae_force_upcast = False
            assert not torch.isfinite(pipelines.decode(bundle, z)).all()
            assert not torch.isfinite(pipelines.encode(bundle, img)).all()
            bundle.config.vae_force_upcast = True
        bundle.first_stage.to(torch.float32)
