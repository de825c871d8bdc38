"""End to end against diffusers' pipelines on the same weights (tiny SD1-like and SD2-like (v) models made
by the original code), the same seeds (CPU generators, one per image), scheduler and settings:
8-bit images differ by at most 1 level on 99.9% of pixel values."""

import numpy as np
import pytest
import torch

from latentgen import pipelines
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings

diffusers = pytest.importorskip("diffusers")
from test_diffusers_folder import make_diffusers_folder  # noqa: E402

PROMPTS = ["a red circle above a blue square", "an oil painting of a lighthouse at night"]
NEG = "blurry"


def _pair(fixtures_dir, fixture_config, tmp_path_factory, name, _, pad, prediction):
    """(our bundle from the original file, the diffusers components converted from the same file)."""
    cfg = fixture_config(name)
    bundle = load_model(
        str(fixtures_dir / f"{name}.safetensors"), config=cfg, overrides={"cond": {"num_attention_heads": 4}}
    )
    if name == "sd1-tiny":
        folder = tmp_path_factory.mktemp(name) / "d"
        unet, vae, text = make_diffusers_folder(
            fixtures_dir / f"{name}.safetensors", cfg["ldm_config"], folder, text_heads=4, pad_token=pad
        )
    else:
        unet, vae, text = _sd2_components(fixtures_dir, cfg)
    return bundle, unet, vae, text, prediction


def _sd2_components(fixtures_dir, cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = load_file(str(fixtures_dir / "sd2-tiny.safetensors"))
    ucfg = create_unet_diffusers_config_from_ldm(cfg["ldm_config"], ckpt)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg))
    vcfg = create_vae_diffusers_config_from_ldm(cfg["ldm_config"], ckpt)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg))
    te = cfg["text_encoder"]
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=te["width"],
            intermediate_size=4 * te["width"],
            num_hidden_layers=te["layers"] - 1,
            num_attention_heads=te["heads"],
            max_position_embeddings=77,
            hidden_act="gelu",
        )
    )
    sd = convert_open_clip_checkpoint(text, ckpt)
    own = text.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 dropped the nesting
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    # diffusers keeps layers-1 blocks (SD2 uses the penultimate layer): the last block's keys are extra
    last = f"encoder.layers.{te['layers'] - 1}."
    extra = [k for k in sd if k not in own]
    assert all(last in k or "position_ids" in k for k in extra), extra
    sd = {k: v for k, v in sd.items() if k in own}
    assert set(sd) == set(own) - {k for k in own if "position_ids" in k}
    text.load_state_dict(sd, strict=False)
    return unet, vae, text


def _tokenizer(pad):
    """transformers' CLIPTokenizer on the shipped BPE vocabulary, for the diffusers pipelines."""
    from transformers import CLIPTokenizer

    from latentgen.text.tokenizers import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = 77
    if pad == 0:
        tok.pad_token = "!"
    return tok


SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
}


def _scheduler(sampler, karras, prediction):
    cls, extra = SCHEDULERS[sampler]
    kw = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction,
        **extra,
    )
    if sampler == "ddim":
        kw.update(clip_sample=False, set_alpha_to_one=False)
    if karras:
        kw["use_karras_sigmas"] = True
    return getattr(diffusers, cls)(**kw)


def _u8(x):
    return (np.asarray(x) * 255).round().astype(np.int16)


def assert_images_match(ours: torch.Tensor, theirs: np.ndarray):
    a = _u8(ours.permute(0, 2, 3, 1).numpy())
    b = _u8(theirs)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert (diff <= 1).mean() >= 0.999, f"max diff {diff.max()}, share within 1 level {(diff <= 1).mean():.4f}"


def _sd_pipeline(kind, bundle_pack, sampler, karras):
    bundle, unet, vae, text, prediction = bundle_pack
    cls = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    pad = 0 if bundle.config.cond.pad_token_id == 0 else 49407
    return cls(
        vae=vae,
        text_encoder=text,
        tokenizer=_tokenizer(pad),
        unet=unet,
        scheduler=_scheduler(sampler, karras, prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "sampler,karras", [("ddim", False), ("euler", False), ("heun", False), ("dpmpp_2m", False), ("dpmpp_2m", True)]
)
def test_txt2img_matches_diffusers(request, family, sampler, karras):
    pack = request.getfixturevalue(family)
    bundle = pack[0]
    seeds = [1234, 1235]
    pipe = _sd_pipeline("txt2img", pack, sampler, karras)
    ref = pipe(
        PROMPTS,
        negative_prompt=[NEG] * 2,
        height=16,
        width=16,
        num_inference_steps=8,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    st = Settings(steps=8, sampler=sampler, karras=karras, spacing="leading", cfg=7.5)
    ours = pipelines.txt2img(bundle, PROMPTS, [NEG] * 2, seeds, 16, 16, st)
    assert_images_match(ours, ref)


def _test_image(n=1, size=16):
    g = torch.Generator().manual_seed(7)
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(request, family, sampler):
    pack = request.getfixturevalue(family)
    img = _test_image()
    seeds = [99]
    pipe = _sd_pipeline("img2img", pack, sampler, False)
    ref = pipe(
        PROMPTS[:1],
        image=img * 2 - 1,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        negative_prompt=[NEG],
        generator=[torch.Generator("cpu").manual_seed(99)],
        output_type="np",
    ).images
    st = Settings(steps=10, sampler=sampler, karras=False, spacing="leading", cfg=5.0, strength=0.6)
    ours = pipelines.img2img(pack[0], img, PROMPTS[:1], [NEG], seeds, st)
    assert_images_match(ours, ref)


def test_seed_gives_same_image_at_any_batch_size(sd1):
    st = Settings(steps=4, sampler="euler_a", karras=True, cfg=3.0)
    both = pipelines.txt2img(sd1[0], PROMPTS, ["", ""], [5, 6], 16, 16, st)
    second = pipelines.txt2img(sd1[0], PROMPTS[1:], [""], [6], 16, 16, st)
    # the same noise; only float summation order differs between batch sizes
    assert torch.allclose(both[1:], second, atol=2e-3)


def test_bad_settings(sd1):
    from latentgen.errors import ConfigError, InputError

    with pytest.raises(InputError, match=r"--width 15 is not a positive multiple of 2 \(the first stage.s factor"):
        pipelines.txt2img(sd1[0], ["x"], [""], [0], 15, 16, Settings(steps=2))
    with pytest.raises(ConfigError, match="--steps"):
        pipelines.txt2img(sd1[0], ["x"], [""], [0], 16, 16, Settings(steps=0))
    with pytest.raises(ConfigError, match="--sampler must name a sampler: unknown sampler 'nope'"):
        pipelines.txt2img(sd1[0], ["x"], [""], [0], 16, 16, Settings(sampler="nope"))
    with pytest.raises(ConfigError, match="--strength"):
        pipelines.img2img(sd1[0], _test_image(), ["x"], [""], [0], Settings(strength=1.5))


@pytest.fixture(scope="module")
def sd1_inpaint(fixtures_dir, fixture_config, tmp_path_factory):
    """sd1-tiny with a 9-channel (inpainting) first convolution: [latent, mask, masked-image latent]."""
    import copy as _copy

    from safetensors.torch import load_file, save_file

    sd = load_file(str(fixtures_dir / "sd1-tiny.safetensors"))
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    g = torch.Generator().manual_seed(3)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(w.shape[0], 9, 3, 3, generator=g) / 9
    d = tmp_path_factory.mktemp("inpaint")
    path = d / "sd1-inpaint-tiny.safetensors"
    save_file(sd, str(path))
    cfg = _copy.deepcopy(fixture_config("sd1-tiny"))
    cfg["ldm_config"]["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    cfg["ldm_config"]["model"]["params"]["conditioning_key"] = "hybrid"
    bundle = load_model(str(path), config=cfg, overrides={"cond": {"num_attention_heads": 4}})
    unet, vae, text = make_diffusers_folder(path, cfg["ldm_config"], d / "d", text_heads=4, pad_token="<|endoftext|>")
    return bundle, unet, vae, text, "epsilon"


def _mask(size=16):
    m = torch.zeros(1, 1, size, size)
    m[..., 4:12, 6:14] = 1
    return m


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 1.0), ("dpmpp_2m", 0.8)])
def test_inpaint_9_channel_matches_diffusers(sd1_inpaint, sampler, strength):
    bundle = sd1_inpaint[0]
    assert bundle.config.concat == "inpaint" and bundle.config.conditioning_key == "hybrid"
    img, mask = _test_image(), _mask()
    pipe = _sd_pipeline("inpaint", sd1_inpaint, sampler, False)
    ref = pipe(
        PROMPTS[:1],
        image=img,
        mask_image=mask,
        height=16,
        width=16,
        strength=strength,
        num_inference_steps=10,
        guidance_scale=6.0,
        negative_prompt=[NEG],
        generator=[torch.Generator("cpu").manual_seed(42)],
        output_type="np",
    ).images
    st = Settings(steps=10, sampler=sampler, karras=False, spacing="leading", cfg=6.0, strength=strength)
    ours = pipelines.inpaint(bundle, img, mask, PROMPTS[:1], [NEG], [42], st)
    assert_images_match(ours, ref)


def test_inpaint_ordinary_model_keeps_known_region(sd1, monkeypatch):
    """A 4-channel model: outside the mask the final latent is the original image's latent exactly, inside it
    is repainted."""
    img, mask = _test_image(), _mask()
    seen = {}
    monkeypatch.setattr(pipelines, "decode", lambda b, z: seen.setdefault("z", z))
    st = Settings(steps=6, sampler="euler", karras=False, cfg=3.0, strength=1.0)
    pipelines.inpaint(sd1[0], img, mask, ["x"], [""], [1], st)
    z0 = pipelines.encode(sd1[0], img, pipelines.generators([1]))
    small = torch.nn.functional.interpolate(mask, size=z0.shape[-2:], mode="bilinear")
    known, masked = (small == 0).expand_as(z0), (small == 1).expand_as(z0)
    assert known.any() and masked.any()
    assert torch.allclose(seen["z"][known], z0[known], atol=1e-5)
    assert (seen["z"][masked] - z0[masked]).abs().mean() > 0.1


def test_inpaint_mask_size_mismatch(sd1):
    from latentgen.errors import InputError

    with pytest.raises(InputError, match="mask is 8x8 but the image is 16x16"):
        pipelines.inpaint(sd1[0], _test_image(), torch.zeros(1, 1, 8, 8), ["x"], [""], [0], Settings(steps=2))


def test_superres_matches_ldm_superresolution_pipeline(tmp_path):
    """LDM-SR (VQ f=4 first stage, low-res image concatenated to the latent) against diffusers'
    LDMSuperResolutionPipeline with DDIM, same weights and seed."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline
    from diffusers import VQModel as DiffusersVQ
    from helpers_models import save_original_checkpoint, strip_prefix
    from safetensors.torch import load_file
    from test_autoencoder import VQ_F4, diffusers_config, make, vq_to_diffusers
    from test_unet import LDM_SR, build, diffusers_unet2d

    from latentgen.config import ModelConfig
    from latentgen.loading.bundle import save_model
    from latentgen.loading.layout import UNET_PREFIX
    from latentgen.text.config import CondConfig, build_conditioner

    unet, vq = build(LDM_SR, seed=31), make(VQ_F4, seed=32)
    cfg = ModelConfig(
        unet=unet.config,
        first_stage=VQ_F4,
        cond=CondConfig(kind="none"),
        conditioning_key="concat",
        concat="lowres",
        scale_factor=1.0,
        linear_start=0.0015,
        linear_end=0.0155,
        name="tiny-ldm-sr",
    )
    save_model(tmp_path / "sr.safetensors", cfg, unet, vq, build_conditioner(cfg.cond))
    bundle = load_model(str(tmp_path / "sr.safetensors"))

    ckpt = load_file(save_original_checkpoint(tmp_path / "orig.safetensors", unet=unet, first_stage=vq))
    ref_unet = diffusers_unet2d(LDM_SR, strip_prefix(ckpt, UNET_PREFIX))
    config = diffusers_config(VQ_F4)
    ref_vq = DiffusersVQ(**config, num_vq_embeddings=VQ_F4.n_embed, vq_embed_dim=VQ_F4.embed_dim).eval()
    ref_vq.load_state_dict(vq_to_diffusers(ckpt, VQ_F4, config), strict=True)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.0015,
        beta_end=0.0155,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe = LDMSuperResolutionPipeline(vqvae=ref_vq, unet=ref_unet, scheduler=sched)
    low = _test_image(size=16)
    ref = pipe(
        image=low * 2 - 1,
        num_inference_steps=10,
        eta=0.0,
        generator=torch.Generator("cpu").manual_seed(8),
        output_type="np",
    ).images
    ours = pipelines.superres(bundle, low, [8], Settings(steps=10, sampler="ddim", karras=False, cfg=1.0))
    assert ours.shape[-1] == 64
    assert_images_match(ours, ref)
