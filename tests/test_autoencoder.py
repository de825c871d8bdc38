"""First-stage autoencoders against the original code (fixtures) and against diffusers."""

from __future__ import annotations

import re

import pytest
import torch
from helpers_models import FIRST_STAGE_PREFIX, max_scaled_err, randomize_, save_original_checkpoint, strip_prefix
from safetensors.torch import load_file

from latentgen.autoencoder import AutoencoderConfig, AutoencoderKL, VQModel, build_autoencoder
from latentgen.errors import CheckpointError, ConfigError

FIXTURES = ["sd1-tiny", "sd2-tiny", "ldm-kl-bert-tiny"]


def first_stage_params(fixture_config, name: str) -> dict:
    return fixture_config(name)["ldm_config"]["model"]["params"]["first_stage_config"]["params"]


# ---------------------------------------------------------------------------------------------
# 1. the original code's outputs


@pytest.mark.parametrize("name", FIXTURES)
def test_kl_autoencoder_matches_original_code(fixtures_dir, fixture_config, name):
    sd = strip_prefix(load_file(fixtures_dir / f"{name}.safetensors"), FIRST_STAGE_PREFIX)
    ref = load_file(fixtures_dir / f"{name}.orig-ref.safetensors")
    model = build_autoencoder(AutoencoderConfig.from_ldm_params(first_stage_params(fixture_config, name))).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        posterior = model.encode(ref["in.vae.image"])
        decoded = model.decode(ref["in.vae.z"])
    for key, value in [
        ("moments", posterior.moments),
        ("mean", posterior.mean),
        ("logvar", posterior.logvar),
        ("std", posterior.std),
        ("decoded", decoded),
    ]:
        assert max_scaled_err(value, ref[f"out.vae.{key}"]) <= 1e-5, key


@pytest.mark.parametrize("name", FIXTURES)
def test_config_inferred_from_weights(fixtures_dir, fixture_config, name):
    sd = strip_prefix(load_file(fixtures_dir / f"{name}.safetensors"), FIRST_STAGE_PREFIX)
    declared = AutoencoderConfig.from_ldm_params(first_stage_params(fixture_config, name))
    assert AutoencoderConfig.from_state_dict(sd, resolution=declared.resolution) == declared
    assert declared.factor == fixture_config(name)["vae_downsample_factor"]


# ---------------------------------------------------------------------------------------------
# 2. diffusers


def make(cfg: AutoencoderConfig, seed: int):
    return randomize_(build_autoencoder(cfg), seed).eval()


KL = AutoencoderConfig(
    kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, double_z=True
)
VQ_F2_ATTN = AutoencoderConfig(
    kind="vq",
    embed_dim=3,
    z_channels=3,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    double_z=False,
    n_embed=16,
)
VQ_F4 = AutoencoderConfig(
    kind="vq",
    embed_dim=3,
    z_channels=3,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=2,
    resolution=64,
    double_z=False,
    n_embed=32,
)  # the LDM-SR first stage, tiny


def diffusers_config(cfg: AutoencoderConfig) -> dict:
    attn = [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        latent_channels=cfg.z_channels,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks,
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
    )


@pytest.mark.parametrize("groups", [32, 8])
def test_kl_matches_diffusers(tmp_path, groups):
    """diffusers' own single-file conversion (convert_ldm_vae_checkpoint) and AutoencoderKL; GroupNorm groups
    other than the original 32 (latentgen's norm_groups = diffusers' norm_num_groups)."""
    from dataclasses import replace

    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    model = make(replace(KL, norm_groups=groups), 7)
    ckpt = load_file(save_original_checkpoint(tmp_path / "vae.safetensors", first_stage=model))
    original_config = {
        "model": {"params": {"first_stage_config": {"params": KL.to_ldm_params()}, "scale_factor": 0.18215}}
    }
    config = {**create_vae_diffusers_config_from_ldm(original_config, ckpt, image_size=32), "norm_num_groups": groups}
    ref = DiffusersKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours, theirs = model.encode(x), ref.encode(x).latent_dist
        for a, b in [(ours.mean, theirs.mean), (ours.logvar, theirs.logvar), (ours.std, theirs.std)]:
            assert (a - b).abs().max().item() <= 1e-4
        z = ours.sample(torch.Generator().manual_seed(3))
        assert (z - theirs.sample(torch.Generator().manual_seed(3))).abs().max().item() <= 1e-4
        assert (model.decode(z) - ref.decode(z).sample).abs().max().item() <= 1e-4
        assert torch.equal(model.encode_latent(x), ours.mean)
        assert torch.equal(model.encode_latent(x, torch.Generator().manual_seed(3), sample=True), z)
        assert torch.equal(model.decode_latent(z), model.decode(z))


def vq_to_diffusers(ckpt: dict, cfg: AutoencoderConfig, config: dict) -> dict:
    """diffusers' convert_ldm_vae_checkpoint for resnets, mid block and convs; it handles neither the
    codebook nor attention inside levels, so those keys are mapped here (the test's own reference)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    level_attn = {k: v for k, v in ckpt.items() if re.search(r"\.(down|up)\.\d+\.attn\.", k)}
    rest = {k: v for k, v in ckpt.items() if k not in level_attn}
    out = convert_ldm_vae_checkpoint(rest, config)
    out["quantize.embedding.weight"] = ckpt[FIRST_STAGE_PREFIX + "quantize.embedding.weight"]
    levels = len(cfg.ch_mult)
    names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    for key, value in level_attn.items():
        part, kind, level, j, name, param = re.fullmatch(
            r"first_stage_model\.(encoder|decoder)\.(down|up)\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)", key
        ).groups()
        block = int(level) if kind == "down" else levels - 1 - int(level)
        value = value[:, :, 0, 0] if value.ndim == 4 else value
        out[f"{part}.{kind}_blocks.{block}.attentions.{j}.{names[name]}.{param}"] = value
    return out


@pytest.mark.parametrize("cfg", [VQ_F2_ATTN, VQ_F4], ids=["f2-attn", "f4-superres"])
def test_vq_matches_diffusers(tmp_path, cfg):
    from diffusers import VQModel as DiffusersVQ

    model = make(cfg, 9)
    ckpt = load_file(save_original_checkpoint(tmp_path / "vq.safetensors", first_stage=model))
    config = diffusers_config(cfg)
    ref = DiffusersVQ(**config, num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim).eval()
    ref.load_state_dict(vq_to_diffusers(ckpt, cfg, config), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        assert (h - ref.encode(x).latents).abs().max().item() <= 1e-4
        quant, loss, indices = model.quantize(h)
        ref_quant, ref_loss, (_, _, ref_indices) = ref.quantize(h)
        assert indices.unique().numel() > 1
        assert torch.equal(indices.flatten(), ref_indices.flatten())
        assert (quant - ref_quant).abs().max().item() <= 1e-5
        assert abs(loss.item() - ref_loss.item()) <= 1e-5
        assert (model.decode(h) - ref.decode(h).sample).abs().max().item() <= 1e-4
        no_q = model.decode(h, force_not_quantize=True)
        assert (no_q - ref.decode(h, force_not_quantize=True).sample).abs().max().item() <= 1e-4
        assert torch.equal(model.encode_latent(x), h)
        assert torch.equal(model.decode_latent(h), model.decode(h))
    assert model.latent_channels == cfg.embed_dim and model.factor == cfg.factor
    assert AutoencoderConfig.from_state_dict(strip_prefix(ckpt, FIRST_STAGE_PREFIX), resolution=cfg.resolution) == cfg


def test_vq_straight_through_gradient():
    model = make(VQ_F2_ATTN, 2)
    h = torch.randn(1, 3, 4, 4, requires_grad=True)
    quant, loss, _ = model.quantize(h)
    quant.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))  # identity gradient through the quantiser
    assert loss.requires_grad


# ---------------------------------------------------------------------------------------------
# dtypes, errors, configs


@pytest.mark.parametrize("cfg", [KL, VQ_F2_ATTN], ids=["kl", "vq"])
def test_bfloat16_runs(cfg):
    model = make(cfg, 4)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = model.decode_latent(model.encode_latent(x))
        model = model.to(torch.bfloat16)
        out = model.decode_latent(model.encode_latent(x.bfloat16()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    if cfg.kind == "kl":  # (VQ may legitimately pick other codes in bf16)
        assert (out.float() - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("cfg", [KL, VQ_F2_ATTN], ids=["kl", "vq-attn"])
def test_prepacked_cpu_decoder_runs_channels_last_and_computes_the_same(cfg):
    """Once prepacked the decoder runs its activations in channels_last on the CPU: the numbers of the plain NCHW
    run, and a plain NCHW image."""
    from latentgen.loading.weights import prepack

    model = make(cfg, 5)
    z = torch.randn(2, model.decoder.conv_in.in_channels, 6, 5)
    seen = []
    model.decoder.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].stride()))
    with torch.no_grad():
        plain = model.decoder(z)
        prepack(model)
        assert model.decoder.cpu_channels_last
        out = model.decoder(z)
    assert seen == [z.stride(), z.contiguous(memory_format=torch.channels_last).stride()]
    assert out.is_contiguous() and out.shape == plain.shape
    assert max_scaled_err(out, plain) <= 2e-5


@pytest.mark.parametrize("cls, cfg", [(AutoencoderKL, KL), (VQModel, VQ_F4)])
def test_strict_load_rejects_bad_state_dicts(cls, cfg):
    good = cls(cfg).state_dict()
    missing = {k: v for k, v in good.items() if k != "decoder.mid.attn_1.q.weight"}
    unexpected = {**good, "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}
    bad_shape = {**good, "post_quant_conv.weight": torch.zeros(3, 8, 1, 1)}
    for sd in (missing, unexpected, bad_shape):
        with pytest.raises(RuntimeError):
            cls(cfg).load_state_dict(sd, strict=True)


def test_config_round_trips_and_errors():
    for cfg in (KL, VQ_F2_ATTN, VQ_F4):
        assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
        assert AutoencoderConfig.from_ldm_params(cfg.to_ldm_params()) == cfg
    assert KL.factor == 4 and VQ_F2_ATTN.factor == 2
    with pytest.raises(ConfigError, match="n_embed"):
        AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3, ch=32, ch_mult=(1,), num_res_blocks=1)
    with pytest.raises(ConfigError, match="bogus"):
        AutoencoderConfig.from_dict({**KL.to_dict(), "bogus": 1})
    with pytest.raises(CheckpointError, match=re.escape("encoder.conv_in.weight")):
        AutoencoderConfig.from_state_dict({"decoder.conv_in.weight": torch.zeros(1)})
