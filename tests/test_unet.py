"""UNetModel against the original code (fixtures) and against diffusers' UNets."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers_models import UNET_PREFIX, max_scaled_err, randomize_, save_original_checkpoint, strip_prefix
from safetensors.torch import load_file

from latentgen.errors import CheckpointError, ConfigError, InputError
from latentgen.unet import AttentionBlock, UNetConfig, UNetModel

FIXTURES = ["sd1-tiny", "sd2-tiny", "ldm-kl-bert-tiny"]
NOT_IN_WEIGHTS = {"num_heads", "num_head_channels", "legacy", "image_size"}


def unet_params(fixture_config, name: str) -> dict:
    return fixture_config(name)["ldm_config"]["model"]["params"]["unet_config"]["params"]


def build(params: dict, seed: int) -> UNetModel:
    return randomize_(UNetModel(UNetConfig.from_ldm_params(params)), seed).eval()


# ---------------------------------------------------------------------------------------------
# 1. the original code's outputs


def fixture_unet(fixtures_dir, fixture_config, name: str) -> tuple[UNetModel, dict]:
    """The fixture's UNet with its weights, and the original code's inputs / outputs."""
    sd = strip_prefix(load_file(fixtures_dir / f"{name}.safetensors"), UNET_PREFIX)
    model = UNetModel(UNetConfig.from_ldm_params(unet_params(fixture_config, name))).eval()
    model.load_state_dict(sd, strict=True)
    return model, load_file(fixtures_dir / f"{name}.orig-ref.safetensors")


@pytest.mark.parametrize("name", FIXTURES)
def test_unet_matches_original_code(fixtures_dir, fixture_config, name):
    model, ref = fixture_unet(fixtures_dir, fixture_config, name)
    with torch.no_grad():
        out = model(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"])
    assert max_scaled_err(out, ref["out.unet.out"]) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_channels_last_unet_matches(fixtures_dir, fixture_config, name):
    """On CUDA the loaded UNet runs in channels_last (ModelBundle.to): the same forward, any device."""
    model, ref = fixture_unet(fixtures_dir, fixture_config, name)
    with torch.no_grad():
        plain = model(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"])
        model.to(memory_format=torch.channels_last)
        assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = model(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"])
    assert max_scaled_err(out, plain) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_config_inferred_from_weights(fixtures_dir, fixture_config, name):
    sd = strip_prefix(load_file(fixtures_dir / f"{name}.safetensors"), UNET_PREFIX)
    inferred = UNetConfig.from_state_dict(sd).to_dict()
    declared = UNetConfig.from_ldm_params(unet_params(fixture_config, name)).to_dict()
    for key in NOT_IN_WEIGHTS:
        inferred.pop(key), declared.pop(key)
    assert inferred == declared


# ---------------------------------------------------------------------------------------------
# 2. diffusers' UNet2DConditionModel through diffusers' own single-file conversion

SD1 = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=1,
    channel_mult=[1, 2, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=2,
    context_dim=24,
    use_checkpoint=False,
    legacy=False,
)
SD2 = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=2,
    channel_mult=[1, 2],
    num_head_channels=16,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=40,
    use_checkpoint=False,
    use_fp16=False,
    legacy=False,
)
SD1_INPAINT = {**SD1, "in_channels": 9}


def diffusers_cond_unet(params: dict, ckpt: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original_config, ckpt, image_size=16)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return ref.eval()


@pytest.mark.parametrize("params", [SD1, SD2, SD1_INPAINT], ids=["sd1", "sd2", "sd1-inpaint-9ch"])
def test_cross_attention_unet_matches_diffusers(tmp_path, params):
    model = build(params, seed=11)
    ckpt = load_file(save_original_checkpoint(tmp_path / "model.safetensors", unet=model))
    ref = diffusers_cond_unet(params, ckpt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, params["in_channels"], 8, 8, generator=g)
    context = torch.randn(2, 5, params["context_dim"], generator=g)
    t = torch.tensor([37.5, 901.25])  # fractional, as Karras sigmas give
    with torch.no_grad():
        ours = model(x, t, context=context)
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert (ours - theirs).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# 2b. diffusers' UNet2DModel for CompVis LDMs with the legacy AttentionBlock. diffusers' single-file
# module has no converter for these, so the key mapping below (written from the two architectures)
# is the independent reference.

LDM_UNCOND = dict(
    in_channels=3,
    out_channels=3,
    model_channels=32,
    attention_resolutions=[2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
LDM_CLASS = dict(
    in_channels=3,
    out_channels=3,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=2,
    channel_mult=[1, 2],
    num_head_channels=16,
    num_classes=10,
)
LDM_SR = dict(
    in_channels=6,
    out_channels=3,
    model_channels=32,
    attention_resolutions=[2, 4],
    num_res_blocks=1,
    channel_mult=[1, 2, 2],
    num_head_channels=32,
)  # latent (3) + low-res image (3) channels

_RES_NAMES = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]


def _take(sd: dict, prefix: str) -> dict:
    """Pop the entries under `prefix.` and return them keyed by the rest of the name."""
    keys = [k for k in sd if k.startswith(prefix + ".")]
    return {k[len(prefix) + 1 :]: sd.pop(k) for k in keys}


def _resblock(sd: dict, src: str, dst: str, out: dict) -> None:
    for name, value in _take(sd, src).items():
        for old, new in _RES_NAMES:
            name = name.replace(old, new)
        out[f"{dst}.{name}"] = value


def _attention(sd: dict, src: str, dst: str, out: dict, head_channels: int) -> None:
    """Packed legacy qkv (per head [q_h, k_h, v_h]) -> to_q / to_k / to_v linear layers."""
    parts = _take(sd, src)
    channels = parts["norm.weight"].shape[0]
    heads = channels // head_channels
    out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = parts["norm.weight"], parts["norm.bias"]
    w = parts["qkv.weight"][:, :, 0].reshape(heads, 3, head_channels, channels)
    b = parts["qkv.bias"].reshape(heads, 3, head_channels)
    for i, name in enumerate(["to_q", "to_k", "to_v"]):
        out[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels)
        out[f"{dst}.{name}.bias"] = b[:, i].reshape(channels)
    out[f"{dst}.to_out.0.weight"] = parts["proj_out.weight"][:, :, 0]
    out[f"{dst}.to_out.0.bias"] = parts["proj_out.bias"]


def ldm_to_unet2d(unet_sd: dict, params: dict) -> dict:
    """Original openaimodel.UNetModel (AttentionBlock) keys -> diffusers UNet2DModel keys."""
    sd, out = dict(unet_sd), {}
    n, levels, hc = params["num_res_blocks"], len(params["channel_mult"]), params["num_head_channels"]
    attn_levels = {int(math.log2(r)) for r in params["attention_resolutions"]}
    for src, dst in [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]:
        out.update({f"{dst}.{k}": v for k, v in _take(sd, src).items()})
    if "label_emb.weight" in sd:
        out["class_embedding.weight"] = sd.pop("label_emb.weight")
    i = 1
    for level in range(levels):
        for j in range(n):
            _resblock(sd, f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", out)
            if level in attn_levels:
                _attention(sd, f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", out, hc)
            i += 1
        if level < levels - 1:
            if f"input_blocks.{i}.0.op.weight" in sd:
                out.update(
                    {
                        f"down_blocks.{level}.downsamplers.0.conv.{k[3:]}": v
                        for k, v in _take(sd, f"input_blocks.{i}.0").items()
                    }
                )
            else:
                _resblock(sd, f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", out)
            i += 1
    _resblock(sd, "middle_block.0", "mid_block.resnets.0", out)
    _attention(sd, "middle_block.1", "mid_block.attentions.0", out, hc)
    _resblock(sd, "middle_block.2", "mid_block.resnets.1", out)
    i = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            _resblock(sd, f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", out)
            k = 1
            if level in attn_levels:
                _attention(sd, f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}", out, hc)
                k = 2
            if level > 0 and j == n:
                if f"output_blocks.{i}.{k}.conv.weight" in sd:
                    out.update(
                        {
                            f"up_blocks.{up}.upsamplers.0.{name}": v
                            for name, v in _take(sd, f"output_blocks.{i}.{k}").items()
                        }
                    )
                else:
                    _resblock(sd, f"output_blocks.{i}.{k}", f"up_blocks.{up}.upsamplers.0", out)
            i += 1
    assert not sd, f"unmapped keys: {sorted(sd)}"
    return out


def diffusers_unet2d(params: dict, unet_sd: dict):
    from diffusers import UNet2DModel

    levels = len(params["channel_mult"])
    attn = [2**lvl in params["attention_resolutions"] for lvl in range(levels)]
    resnet = params.get("resblock_updown", False)
    down = ["AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if resnet else "DownBlock2D") for a in attn]
    up = ["AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if resnet else "UpBlock2D") for a in reversed(attn)]
    ref = UNet2DModel(
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        down_block_types=down,
        up_block_types=up,
        block_out_channels=[params["model_channels"] * m for m in params["channel_mult"]],
        layers_per_block=params["num_res_blocks"],
        attention_head_dim=params["num_head_channels"],
        resnet_time_scale_shift="scale_shift" if params.get("use_scale_shift_norm") else "default",
        downsample_type="resnet" if resnet else "conv",
        upsample_type="resnet" if resnet else "conv",
        num_class_embeds=params.get("num_classes"),
        attn_norm_num_groups=32,
    )
    ref.load_state_dict(ldm_to_unet2d(unet_sd, params), strict=True)
    return ref.eval()


@pytest.mark.parametrize("params", [LDM_UNCOND, LDM_CLASS, LDM_SR], ids=["uncond", "class-cond", "superres-concat"])
def test_legacy_attention_unet_matches_diffusers(tmp_path, params):
    model = build(params, seed=23)
    ckpt = load_file(save_original_checkpoint(tmp_path / "model.safetensors", unet=model))
    ref = diffusers_unet2d(params, strip_prefix(ckpt, UNET_PREFIX))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, params["in_channels"], 16, 16, generator=g)
    t = torch.tensor([3.25, 777.0])
    y = torch.tensor([3, 9]) if params.get("num_classes") else None
    with torch.no_grad():
        ours = model(x, t, y=y)
        theirs = ref(x, t, class_labels=y).sample
    assert (ours - theirs).abs().max().item() <= 1e-4
    inferred = UNetConfig.from_state_dict(strip_prefix(ckpt, UNET_PREFIX)).to_dict()
    declared = model.config.to_dict()
    assert {k: v for k, v in inferred.items() if k not in NOT_IN_WEIGHTS} == {
        k: v for k, v in declared.items() if k not in NOT_IN_WEIGHTS
    }


def _qkv_attention_original(qkv: torch.Tensor, n_heads: int, legacy: bool) -> torch.Tensor:
    """The original QKVAttentionLegacy / QKVAttention maths (einsum with split q, k scaling)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_head_split_matches_original(new_order):
    block = randomize_(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order), 5)
    x = torch.randn(2, 64, 4, 6)
    with torch.no_grad():
        flat = x.reshape(2, 64, -1)
        ref = flat + block.proj_out(_qkv_attention_original(block.qkv(block.norm(flat)), 4, legacy=not new_order))
        out = block(x)
    assert (out - ref.reshape(x.shape)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# dtypes, layouts, errors


def test_bfloat16_and_channels_last_run():
    model = build(SD2, seed=3)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 40), torch.tensor([500.0])
    with torch.no_grad():
        ref = model(x, t, context=ctx)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context=ctx)
        bf = model.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert (cl - ref).abs().max().item() <= 1e-4
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("params", [SD1, SD2], ids=["sd1", "sd2-linear-proj"])
def test_cpu_inference_layouts_compute_the_same(monkeypatch, params):
    """At inference on the CPU the feed-forward runs over row chunks, and once prepacked the UNet runs its
    activations in channels_last: the numbers of the plain forward (the grad path: no chunks, NCHW), and a plain
    NCHW output."""
    import latentgen.unet as unet_module
    from latentgen.loading.weights import prepack

    model = build(params, seed=5)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, params["context_dim"]), torch.tensor([500.0, 20.0])
    with torch.enable_grad():
        ref = model(x, t, context=ctx).detach()
    chunks, layouts = [], []
    ff = next(m for m in model.modules() if isinstance(m, unet_module.FeedForward))
    ff.net.register_forward_hook(lambda mod, args, out: chunks.append(args[0].shape[0]))
    model.input_blocks[1][0].in_layers[2].register_forward_hook(
        lambda mod, args, out: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    # three fp32 projection rows per chunk: the 2 x 8 x 8 rows of the first level end in a short chunk
    monkeypatch.setattr(unet_module, "FF_CHUNK_BYTES", 3 * 4 * ff.net[0].proj.out_features)
    with torch.no_grad():
        plain = model(x, t, context=ctx)
        assert layouts == [False] and not model.cpu_channels_last
        chunks.clear()
        prepack(model)
        assert model.cpu_channels_last
        out = model(x, t, context=ctx)
    assert set(chunks[:-1]) == {3} and 1 <= chunks[-1] <= 3 and sum(chunks) == 2 * 8 * 8
    assert out.is_contiguous() and out.shape == ref.shape and layouts == [False, True]
    assert max_scaled_err(plain, ref) <= 1e-5
    assert max_scaled_err(out, ref) <= 1e-5


def test_scalar_timestep_broadcasts():
    model = build(SD1, seed=4)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.equal(model(x, 250.0, context=ctx), model(x, torch.tensor([250.0, 250.0]), context=ctx))


def test_class_conditional_needs_labels():
    model = build(LDM_CLASS, seed=6)
    with pytest.raises(InputError, match="class labels"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1.0]))


def test_strict_load_rejects_bad_state_dicts():
    model = UNetModel(UNetConfig.from_ldm_params(SD1))
    good = model.state_dict()
    missing = {k: v for k, v in good.items() if k != "middle_block.1.proj_in.weight"}
    unexpected = {**good, "middle_block.1.extra.weight": torch.zeros(1)}
    bad_shape = {**good, "out.2.weight": torch.zeros(4, 32, 1, 1)}
    for sd in (missing, unexpected, bad_shape):
        with pytest.raises(RuntimeError):
            UNetModel(UNetConfig.from_ldm_params(SD1)).load_state_dict(sd, strict=True)


def test_config_round_trip_and_errors():
    cfg = UNetConfig.from_ldm_params(SD2)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert UNetConfig.from_ldm_params(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        UNetConfig.from_ldm_params({**SD2, "bogus": 1})
    with pytest.raises(ConfigError, match="num_head_channels"):
        UNetModel(UNetConfig.from_ldm_params({**SD2, "num_head_channels": 64}))
    with pytest.raises(CheckpointError, match=re.escape("input_blocks.0.0.weight")):
        UNetConfig.from_state_dict({"time_embed.0.weight": torch.zeros(4, 4)})
