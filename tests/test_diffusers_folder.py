"""A diffusers folder made from an original checkpoint by diffusers' own conversion loads into the same
modules and computes the same outputs as the original file."""

import json

import pytest
import torch
from safetensors.torch import load_file

from latentgen.loading.bundle import load_model

pytest.importorskip("diffusers")


def make_diffusers_folder(src, ldm_config, folder, *, text_heads, pad_token, scheduler_extra=None):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = load_file(str(src))
    unet_cfg = create_unet_diffusers_config_from_ldm(ldm_config, ckpt)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_cfg))
    vae_cfg = create_vae_diffusers_config_from_ldm(ldm_config, ckpt)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_cfg))
    text_sd = convert_ldm_clip_checkpoint(ckpt)
    text_sd.pop("text_model.embeddings.position_ids", None)
    if not any(
        k.startswith("text_model.")
        for k in CLIPTextModel(
            CLIPTextConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1)
        ).state_dict()
    ):  # transformers 5 dropped the nesting
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    hidden = ckpt["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    layers = 1 + max(
        int(k.split(".")[5]) for k in ckpt if k.startswith("cond_stage_model.transformer.text_model.encoder.layers.")
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    text.load_state_dict(text_sd, strict=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        **(scheduler_extra or {}),
    ).save_pretrained(folder / "scheduler")
    return unet, vae, text


def test_diffusers_folder_equals_original_file(fixtures_dir, fixture_config, tmp_path):
    cfg = fixture_config("sd1-tiny")
    src = fixtures_dir / "sd1-tiny.safetensors"
    folder = tmp_path / "sd1-diffusers"
    make_diffusers_folder(src, cfg["ldm_config"], folder, text_heads=4, pad_token="<|endoftext|>")
    orig = load_model(str(src), config=cfg, overrides={"cond": {"num_attention_heads": 4}})
    dif = load_model(str(folder))
    assert dif.format == "diffusers" and dif.config.family == "sd1"
    assert dif.config.prediction == "eps" and dif.config.prediction_source == "config"
    assert dif.config.scale_factor == pytest.approx(0.18215)
    ref = load_file(str(fixtures_dir / "sd1-tiny.orig-ref.safetensors"))
    with torch.no_grad():
        x, t, c = ref["in.unet.x"], ref["in.unet.t"], ref["in.unet.context"]
        assert torch.allclose(dif.unet(x, t, context=c), orig.unet(x, t, context=c), atol=1e-5)
        img = ref["in.vae.image"]
        assert torch.allclose(dif.first_stage.encode(img).mean, orig.first_stage.encode(img).mean, atol=1e-5)
        z = ref["in.vae.z"]
        assert torch.allclose(dif.first_stage.decode_latent(z), orig.first_stage.decode_latent(z), atol=1e-5)
        ids = ref["in.text.ids"]
        assert torch.allclose(dif.cond(ids), orig.cond(ids), atol=1e-5)
    # the same weights, key for key, in original names
    for a, b in ((dif.unet, orig.unet), (dif.first_stage, orig.first_stage)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_v_prediction_folder(fixtures_dir, fixture_config, tmp_path):
    cfg = fixture_config("sd1-tiny")
    folder = tmp_path / "v"
    make_diffusers_folder(
        fixtures_dir / "sd1-tiny.safetensors",
        cfg["ldm_config"],
        folder,
        text_heads=4,
        pad_token="!",
        scheduler_extra={"prediction_type": "v_prediction"},
    )
    b = load_model(str(folder))
    assert b.config.prediction == "v" and b.config.cond.pad_token_id == 0


def test_folder_with_pickles_is_refused(tmp_path):
    from latentgen.errors import CheckpointError

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02.")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path))
