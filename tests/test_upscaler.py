"""The SD 2 x4 upscaler (stablediffusion's LatentUpscaleDiffusion: the low-res image noised to a level that the
UNet gets as class label, concatenated to the latent; OpenCLIP text guidance; f=4 KL autoencoder; v) against
diffusers' StableDiffusionUpscalePipeline on the same tiny random weights. The weights are written as an
original single-file checkpoint (the x4-upscaler-ema layout, low_scale_model.* buffers included); diffusers'
own single-file conversion makes the reference, which is also saved as a diffusers folder for our loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import randomize_
from safetensors.torch import load_file, save_file

from latentgen import pipelines
from latentgen.config import ModelConfig
from latentgen.loading.bundle import build_modules, load_model, save_model
from latentgen.pipelines import Settings
from latentgen.text.clip import clip_to_openclip
from latentgen.text.config import CondConfig

diffusers = pytest.importorskip("diffusers")
from test_pipelines import _tokenizer, assert_images_match  # noqa: E402

# configs/stable-diffusion/x4-upscaling.yaml, shrunk: the same structure (no attention at level 0, levels 1.. with
# self-attention disabled except the last, as wide as the context there, linear proj, 8 heads, 1000 classes).
UNET = dict(
    use_checkpoint=False,
    num_classes=1000,
    image_size=16,
    in_channels=7,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 4],
    num_res_blocks=1,
    channel_mult=[1, 2, 4],
    disable_self_attentions=[True, True, False],
    disable_middle_self_attn=False,
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=128,
    legacy=False,
    use_linear_in_transformer=True,
)
FIRST_STAGE = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}
TEXT = dict(width=128, layers=3, heads=2)  # OpenCLIP-like; the x4 model uses its penultimate layer
LDM_CONFIG = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
        "params": {
            "parameterization": "v",
            "low_scale_key": "lr",
            "linear_start": 0.0001,
            "linear_end": 0.02,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 16,
            "channels": 4,
            "conditioning_key": "hybrid-adm",
            "scale_factor": 0.08333,
            "low_scale_config": {
                "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                "params": {
                    "noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                    "max_noise_level": 350,
                },
            },
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": FIRST_STAGE},
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"},
            },
        },
    }
}
PROMPTS = ["a red circle above a blue square", "an oil painting of a lighthouse at night"]
NEG = "blurry"
SEEDS = [1234, 1235]


def _schedule_buffers(prefix: str) -> dict:
    """The buffers LatentDiffusion / AbstractLowScaleModel register (LDM's "linear" β = linspace(√start, √end)²)."""
    betas = np.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": np.append(1.0, ac[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
    }
    return {prefix + k: torch.tensor(v, dtype=torch.float32) for k, v in bufs.items()}


def _original_checkpoint(path) -> dict:
    """Random weights in the x4-upscaler-ema.ckpt layout, every parameter redrawn."""
    from latentgen.autoencoder import AutoencoderConfig
    from latentgen.unet import UNetConfig

    cond_cfg = CondConfig(
        kind="open_clip",
        hidden_size=TEXT["width"],
        intermediate_size=4 * TEXT["width"],
        num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"],
        hidden_act="gelu",
        layer="penultimate",
        pad_token_id=0,
    )
    cfg = ModelConfig(UNetConfig.from_ldm_params(UNET), AutoencoderConfig.from_ldm_params(FIRST_STAGE), cond_cfg)
    unet, vae, cond = build_modules(cfg)
    for i, m in enumerate((unet, vae, cond)):
        randomize_(m, seed=40 + i)
    g = torch.Generator().manual_seed(3)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    text = clip_to_openclip(cond.state_dict())
    text["model.text_projection"] = torch.randn(TEXT["width"], TEXT["width"], generator=g) / TEXT["width"] ** 0.5
    text["model.logit_scale"] = torch.tensor(4.6052)
    sd.update({"cond_stage_model." + k: v for k, v in text.items()})
    sd.update(_schedule_buffers(""))
    sd.update(_schedule_buffers("low_scale_model."))
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


def _diffusers_pipeline(ckpt: dict):
    """StableDiffusionUpscalePipeline from the original checkpoint by diffusers' own conversion."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    ucfg = create_unet_diffusers_config_from_ldm(LDM_CONFIG, ckpt)
    assert ucfg["only_cross_attention"] == [True, True, False] and ucfg["num_class_embeds"] == 1000
    unet = UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    vcfg = create_vae_diffusers_config_from_ldm(LDM_CONFIG, ckpt)
    vae = AutoencoderKL(**vcfg).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    width = TEXT["width"]
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=TEXT["layers"] - 1,
            num_attention_heads=TEXT["heads"],
            max_position_embeddings=77,
            hidden_act="gelu",
        )
    ).eval()
    sd = convert_open_clip_checkpoint(text, ckpt)
    own = text.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 dropped the nesting
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    last = f"encoder.layers.{TEXT['layers'] - 1}."  # diffusers keeps layers-1 blocks: the penultimate output
    assert all(last in k or "text_projection" in k for k in sd if k not in own)
    assert set(own) - set(sd) <= {k for k in own if "position_ids" in k}
    text.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.0001,
        beta_end=0.02,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    )
    low = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=_tokenizer(0),
        unet=unet,
        low_res_scheduler=low,
        scheduler=sched,
        max_noise_level=350,
    )


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    d = tmp_path_factory.mktemp("x4")
    ckpt = _original_checkpoint(d / "x4-upscaler-tiny.safetensors")
    return d / "x4-upscaler-tiny.safetensors", _diffusers_pipeline(ckpt)


def _low_res(n=2, size=16):
    g = torch.Generator().manual_seed(7)
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------ detection


def _unet_out(bundle):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 7, 8, 8, generator=g), torch.randn(2, 77, TEXT["width"], generator=g)
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([10.0, 700.0]), context=ctx, y=torch.tensor([0, 350]))


def test_original_file_is_recognised(x4):
    b = load_model(str(x4[0]))
    c = b.config
    assert (c.concat, c.family, c.conditioning_key, c.prediction) == ("lowres", "sd2", "hybrid-adm", "v")
    assert (c.max_noise_level, c.scale_factor, c.recommended) == (350, 0.08333, {"cfg": 9.0, "noise_level": 20})
    low_scale = (c.low_scale_beta_schedule, c.low_scale_timesteps, c.low_scale_linear_start, c.low_scale_linear_end)
    assert low_scale == ("scaled_linear", 1000, 1e-4, 0.02)
    u = c.unet
    assert (u.in_channels, u.num_classes, u.num_heads, u.use_linear_in_transformer) == (7, 1000, 8, True)
    assert u.disable_self_attentions == (False, True, False) and not u.disable_middle_self_attn  # level 0: no attn
    assert (c.cond.kind, c.cond.layer, c.factor) == ("open_clip", "penultimate", 4)
    buf = load_file(str(x4[0]))  # the schedules are the file's buffers
    assert torch.equal(b.low_scale.alphas_cumprod, buf["low_scale_model.alphas_cumprod"].double())
    assert torch.equal(b.schedule.alphas_cumprod, buf["alphas_cumprod"].double())
    # the original config describes the same model
    declared = load_model(str(x4[0]), config=LDM_CONFIG)
    dc = declared.config
    assert dc.unet.disable_self_attentions == (True, True, False) and dc.conditioning_key == "hybrid-adm"
    assert (dc.max_noise_level, dc.scale_factor, dc.prediction, dc.low_scale_linear_end) == (350, 0.08333, "v", 0.02)
    assert torch.equal(_unet_out(declared), _unet_out(b))


def test_noise_augmentation_needs_class_labels(x4, tmp_path):
    from latentgen.errors import CheckpointError

    sd = load_file(str(x4[0]))
    del sd["model.diffusion_model.label_emb.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="low_scale_model.*num_classes None"):
        load_model(str(tmp_path / "bad.safetensors"))


# ------------------------------------------------------------------------------------- vs diffusers


def _scheduler(sampler):
    kw = dict(
        beta_schedule="scaled_linear",
        beta_start=0.0001,
        beta_end=0.02,
        steps_offset=1,
        prediction_type="v_prediction",
        timestep_spacing="leading",
    )
    if sampler == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **kw)
    return diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **kw)


@pytest.mark.parametrize("sampler,karras,noise_level,cfg", [("ddim", False, 20, 9.0), ("dpmpp_2m", True, 150, 4.0)])
def test_superres_matches_diffusers_upscale_pipeline(x4, monkeypatch, sampler, karras, noise_level, cfg):
    pipe = x4[1]
    pipe.scheduler = _scheduler(sampler)
    bundle = load_model(str(x4[0]))
    low = _low_res()
    kw = dict(
        prompt=PROMPTS,
        image=low,
        num_inference_steps=8,
        guidance_scale=cfg,
        noise_level=noise_level,
        negative_prompt=[NEG] * 2,
    )
    with torch.no_grad():
        ref_z = pipe(**kw, generator=_gens(SEEDS), output_type="latent").images
        ref = pipe(**kw, generator=_gens(SEEDS), output_type="np").images
    st = Settings(steps=8, sampler=sampler, karras=karras, spacing="leading", cfg=cfg)
    ours = pipelines.superres(bundle, low, SEEDS, st, prompts=PROMPTS, negatives=[NEG] * 2, noise_level=noise_level)
    assert ours.shape == (2, 3, 64, 64)
    seen = {}
    monkeypatch.setattr(pipelines, "decode", lambda b, z: seen.setdefault("z", z))
    pipelines.superres(bundle, low, SEEDS, st, prompts=PROMPTS, negatives=[NEG] * 2, noise_level=noise_level)
    z_err = (seen["z"] - ref_z).abs().max().item()
    img_err = np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max()
    print(f"{sampler}: max |Δ latent| {z_err:.2e} (max |latent| {ref_z.abs().max():.2f}), max |Δ image| {img_err:.2e}")
    assert z_err <= 1e-4 * max(1.0, ref_z.abs().max().item())
    assert img_err <= 1e-4
    assert_images_match(ours, ref)


def test_diffusers_folder_and_latentgen_file_load_the_same_model(x4, tmp_path):
    orig = load_model(str(x4[0]))
    x4[1].save_pretrained(tmp_path / "folder")
    folder = load_model(str(tmp_path / "folder"))
    fc = folder.config
    assert folder.format == "diffusers" and (fc.concat, fc.family, fc.prediction_source) == ("lowres", "sd2", "config")
    assert (fc.max_noise_level, fc.scale_factor, fc.prediction, fc.cond.pad_token_id) == (350, 0.08333, "v", 0)
    assert (fc.unet.num_heads, fc.unet.disable_self_attentions) == (8, (True, True, False))
    for a, b in ((folder.unet, orig.unet), (folder.first_stage, orig.first_stage)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    save_model(tmp_path / "own.safetensors", orig.config, orig.unet, orig.first_stage, orig.cond)
    own = load_model(str(tmp_path / "own.safetensors"))
    assert own.config.to_dict() == {**orig.config.to_dict(), "prediction_source": "metadata"}
    st = Settings(steps=3, sampler="euler", karras=False, cfg=5.0)
    args = (_low_res(1), [9], st)
    kw = dict(prompts=PROMPTS[:1], negatives=[NEG], noise_level=30)
    ref = pipelines.superres(orig, *args, **kw)
    assert (pipelines.superres(folder, *args, **kw) - ref).abs().max() <= 1e-5
    assert (pipelines.superres(own, *args, **kw) - ref).abs().max() <= 1e-5


def test_noise_level_is_checked(x4, tmp_path):
    from tiny_models import random_model

    from latentgen.errors import ConfigError, InputError

    bundle = load_model(str(x4[0]))
    st = Settings(steps=1, sampler="euler")
    for bad in (-1, 351):
        with pytest.raises(InputError, match=rf"--noise-level {bad} is outside 0\.\.350"):
            pipelines.superres(bundle, _low_res(1), [0], st, noise_level=bad)
    assert pipelines.noise_level_for(bundle, None) == 20 and pipelines.noise_level_for(bundle, 350) == 350
    sr = load_model(str(random_model("sr", tmp_path / "sr.safetensors")))
    with pytest.raises(ConfigError, match="--noise-level 20: model tiny-sr does not noise"):
        pipelines.superres(sr, _low_res(1, 8), [0], st, noise_level=20)


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    from typer.testing import CliRunner

    from latentgen.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path, size):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_superres_x4(x4, tmp_path, monkeypatch):
    from PIL import Image

    from latentgen.images import read_png_text, to_pil
    from latentgen.loading.weights import prepack

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    low = _png("low.png", 16)
    r = _cli(
        "superres",
        low,
        "--model",
        x4[0],
        "-p",
        "a boat",
        "--negative",
        NEG,
        "--steps",
        2,
        "--seed",
        5,
        "--dtype",
        "fp32",
        "--out",
        "up.png",
        "--json",
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    rec = json.loads(r.stdout)
    assert (rec["noise_level"], rec["cfg"], rec["prompt"], rec["negative"]) == (20, 9.0, "a boat", NEG)
    up = np.asarray(Image.open("up.png").convert("RGB"))
    assert up.shape == (64, 64, 3)
    b = load_model(str(x4[0]))
    for m in (b.unet, b.first_stage):  # as the CLI does for fp32 on CPU
        prepack(m)
    x = torch.from_numpy(np.asarray(Image.open(low).convert("RGB")) / 255.0).float().permute(2, 0, 1)[None]
    ref = pipelines.superres(b, x, [5], Settings(steps=2, cfg=9.0), prompts=["a boat"], negatives=[NEG], noise_level=20)
    assert np.array_equal(up, np.asarray(to_pil(ref[0])))
    assert json.loads(read_png_text("up.png")["latentgen"])["noise_level"] == 20
    r = _cli("superres", "--recipe", "up.png", "--out", "again.png")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert np.array_equal(np.asarray(Image.open("again.png").convert("RGB")), up)
    r = _cli("info", x4[0])
    assert r.exit_code == 0 and "low-res noise levels 0..350" in r.stdout, r.stdout


@pytest.mark.parametrize("case", ["level too high", "level on LDM-SR", "prompt on LDM-SR"])
def test_cli_superres_bad_noise_level_is_one_line_exit_2(x4, tmp_path, monkeypatch, case):
    from tiny_models import random_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    sr = random_model("sr", tmp_path / "sr.safetensors")
    args, needle = {
        "level too high": ([_png("low.png", 16), "--model", x4[0], "--noise-level", 400], "400 is outside 0..350"),
        "level on LDM-SR": ([_png("low.png", 8), "--model", sr, "--noise-level", 20], "drop --noise-level"),
        "prompt on LDM-SR": ([_png("low.png", 8), "--model", sr, "-p", "x"], "takes no text"),
    }[case]
    r = _cli("superres", *args, "--steps", 1, "--out", "o.png")
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: error:") and needle in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "o.png").exists()
