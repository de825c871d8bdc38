"""Hires fix: txt2img at the base size, upscale, img2img at the target size (A1111's "Hires. fix")."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import sd1_from_fixture

from latentgen import pipelines
from latentgen.errors import ConfigError
from latentgen.hires import Hires, target_size, txt2img_hires
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings


@pytest.fixture(scope="module")
def sd1(fixtures_dir, fixture_config, tmp_path_factory):
    path = sd1_from_fixture(fixtures_dir, fixture_config, tmp_path_factory.mktemp("hires") / "sd1.safetensors")
    return load_model(str(path))


def _first_pass_lanczos(bundle, prompts, seeds, st, w, h):
    """The first pass decoded to 8 bits and Lanczos-resized with PIL, as [0, 1] floats."""
    imgs = pipelines.txt2img(bundle, prompts, [""] * len(seeds), seeds, 16, 16, st)
    out = []
    for img in imgs:
        u8 = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        big = np.asarray(Image.fromarray(u8).resize((w, h), Image.LANCZOS), dtype=np.float32) / 255
        out.append(torch.from_numpy(big).permute(2, 0, 1))
    return torch.stack(out)


def test_lanczos_hires_is_img2img_of_the_resized_first_pass(sd1):
    """The pixel-space hires fix equals latentgen's img2img (itself = diffusers' StableDiffusionImg2ImgPipeline,
    test_pipelines) of the first pass, Lanczos-resized, with the same seeds: fresh noise from each seed."""
    st = Settings(steps=4, sampler="euler", cfg=5.0)
    hires = Hires(scale=2.0, steps=6, strength=0.5, upscaler="lanczos")
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = txt2img_hires(sd1, prompts, [""] * 2, seeds, 16, 16, st, hires)
    assert ours.shape == (2, 3, 32, 32)
    big = _first_pass_lanczos(sd1, prompts, seeds, st, 32, 32)
    second = Settings(steps=6, sampler="euler", cfg=5.0, strength=0.5)
    ref = pipelines.img2img(sd1, big, prompts, [""] * 2, seeds, second)
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic", "latent-antialiased"])
def test_latent_hires_refines_the_interpolated_latent(sd1, upscaler):
    """Latent upscalers: the second pass starts from the interpolated first-pass latent. A 1-step tail of a
    many-step schedule barely changes it, so the result sits near decode(interpolated latent) and far from the
    first pass's plain upscale; every image is its own seed's. (Antialiasing only matters when shrinking, so
    latent-antialiased equals latent for these upscales, as in A1111.)"""
    st = Settings(steps=4, sampler="dpmpp_2m")
    z = pipelines.txt2img_latent(sd1, ["a dot"], [""], [7], 16, 16, st)
    mode = {"latent": "bilinear", "latent-bicubic": "bicubic", "latent-antialiased": "bilinear"}[upscaler]
    up = torch.nn.functional.interpolate(z, size=(16, 16), mode=mode, antialias=upscaler == "latent-antialiased")
    plain = pipelines.decode(sd1, up)
    light = txt2img_hires(sd1, ["a dot"], [""], [7], 16, 16, st, Hires(2.0, steps=50, strength=0.02, upscaler=upscaler))
    assert light.shape == plain.shape == (1, 3, 32, 32)
    strong = txt2img_hires(sd1, ["a dot"], [""], [7], 16, 16, st, Hires(2.0, strength=0.7, upscaler=upscaler))
    assert (light - plain).abs().max() * 4 < (strong - plain).abs().max()
    batch = txt2img_hires(sd1, ["a dot"] * 2, [""] * 2, [6, 7], 16, 16, st, Hires(2.0, upscaler=upscaler))
    assert (batch[1:] - strong).abs().max() < 1e-5


def test_upscalers_differ_and_hires_sampler_and_prompt_apply(sd1):
    st = Settings(steps=4, sampler="euler")
    run = lambda **kw: txt2img_hires(sd1, ["a dot"], [""], [2], 16, 16, st, Hires(2.0, **kw))  # noqa: E731
    base = run()
    for kw in ({"upscaler": "latent-bicubic"}, {"sampler": "dpmpp_2m"}, {"prompt": "a square"}, {"steps": 8}):
        assert (run(**kw) - base).abs().max() > 1e-3, kw


def test_target_size_and_bad_options(sd1):
    assert target_size(sd1, 16, 16, 1.5) == (24, 24)
    assert target_size(sd1, 24, 16, 2.0) == (48, 32)
    for h, needle in (
        (Hires(0.5), "--hires 0.5"),
        (Hires(2.0, strength=0.0), "--hires-strength"),
        (Hires(2.0, steps=0), "--hires-steps"),
        (Hires(2.0, upscaler="esrgan"), "--hires-upscaler"),
    ):
        with pytest.raises(ConfigError, match=needle):
            h.check()


def test_hires_pass_too_large_is_refused_before_the_first_pass(sd1, monkeypatch):
    """The memory guard checks the second pass's size: a first pass that fits, an 8x hires pass that does not,
    refused with one line naming --hires before any latent is drawn."""
    from latentgen import memory
    from latentgen.errors import InputError

    st = Settings(steps=2, sampler="euler")
    est = lambda side: memory.estimate(sd1.config, 1, side, side, 4, tile=pipelines.AUTO_TILE).total  # noqa: E731
    monkeypatch.setattr(memory, "available_memory", lambda device=None: int((est(64) + est(512)) / 2 / memory.HEADROOM))

    def no_noise(*a, **k):
        raise AssertionError("latents allocated before the memory check")

    monkeypatch.setattr(pipelines, "randn", no_noise)
    with pytest.raises(InputError, match=r"^--hires 8 \(512x512\): 1 image of 512x512 need about .* lower --hires$"):
        txt2img_hires(sd1, ["a"], [""], [1], 64, 64, st, Hires(8.0))
    with pytest.raises(AssertionError, match="latents allocated"):  # 2x fits: goes on to draw the noise
        txt2img_hires(sd1, ["a"], [""], [1], 64, 64, st, Hires(2.0))
