"""VAE override against swapping diffusers' `vae` in StableDiffusionPipeline (random VAE, diffusers folder and
original-layout file), the automatic <checkpoint>.vae.safetensors, A1111's VAE keys, bad files."""

import copy
import shutil

import numpy as np
import pytest
import torch
from helpers_models import randomize_
from safetensors.torch import save_file

from latentgen import pipelines
from latentgen.adapters.vae import override_vae
from latentgen.errors import CheckpointError
from latentgen.pipelines import Settings

diffusers = pytest.importorskip("diffusers")
from test_pipelines import _sd_pipeline, assert_images_match  # noqa: E402


def test_vae_override_matches_swapping_diffusers_vae(sd1, tmp_path):
    bundle, unet, vae, text, pred = sd1
    new = randomize_(copy.deepcopy(vae), seed=12)
    new.save_pretrained(str(tmp_path / "model" / "vae"), safe_serialization=True)
    pipe = _sd_pipeline("txt2img", (bundle, unet, new, text, pred), "euler", False)
    ref = pipe(
        ["a boat"],
        height=16,
        width=16,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=[torch.Generator("cpu").manual_seed(2)],
        output_type="np",
    ).images
    st = Settings(steps=3, sampler="euler", karras=False, cfg=4.0)
    old = bundle.first_stage
    try:
        override_vae(bundle, tmp_path / "model")  # a model folder with vae/
        ours = pipelines.txt2img(bundle, ["a boat"], [""], [2], 16, 16, st)
        assert_images_match(ours, ref)
        sd = {"first_stage_model." + k: v for k, v in bundle.first_stage.state_dict().items()}
        save_file(sd, str(tmp_path / "orig.vae.safetensors"))
        save_file({k[len("first_stage_model.") :]: v for k, v in sd.items()}, str(tmp_path / "bare.safetensors"))
        for f in ("orig.vae.safetensors", "bare.safetensors"):
            bundle.first_stage = old
            override_vae(bundle, tmp_path / f)
            assert torch.equal(pipelines.txt2img(bundle, ["a boat"], [""], [2], 16, 16, st), ours)
        bundle.first_stage = old
        wrong = {k: v for k, v in sd.items() if "decoder.conv_out" not in k}
        save_file(wrong, str(tmp_path / "wrong.safetensors"))
        with pytest.raises(CheckpointError, match=r"wrong.safetensors: VAE for .* 2 missing: decoder.conv_out"):
            override_vae(bundle, tmp_path / "wrong.safetensors")
    finally:
        bundle.first_stage = old


def test_vae_beside_checkpoint_is_used_and_recorded(tmp_path, monkeypatch, fixtures_dir, fixture_config):
    from test_cli import cli, pixels
    from tiny_models import sd1_from_fixture

    from latentgen.images import read_png_text
    from latentgen.loading.bundle import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = sd1_from_fixture(fixtures_dir, fixture_config, tmp_path / "m.safetensors")
    fs = randomize_(load_model(str(model)).first_stage, seed=3)
    save_file({k: v.contiguous() for k, v in fs.state_dict().items()}, str(tmp_path / "other.safetensors"))
    base = ("--model", model, "--steps", 2, "--dtype", "fp32", "--seed", 4)
    r = cli("txt2img", "a boat", *base, "--vae", tmp_path / "other.safetensors", "--out", "given.png")
    assert r.exit_code == 0, r.stderr
    shutil.copy(tmp_path / "other.safetensors", tmp_path / "m.vae.safetensors")
    r = cli("txt2img", "a boat", *base, "--out", "auto.png")
    assert r.exit_code == 0 and "using the VAE beside the checkpoint" in r.stderr, r.stderr
    assert np.array_equal(pixels("auto.png"), pixels("given.png"))
    params = read_png_text("auto.png")["parameters"]
    assert "VAE: m.vae" in params and "VAE hash: " in params
    r = cli("txt2img", "a boat", *base, "--vae", "nothere.safetensors", "--out", "x.png")
    assert r.exit_code == 2 and "--vae nothere.safetensors: no such file" in r.stderr
