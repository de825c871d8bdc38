"""Loading checkpoints by path: the ORIGINAL code's tiny checkpoints reproduce that code's outputs,
architectures are detected from keys, full-size key sets load strictly, and bad files fail clearly."""

import copy
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latentgen.denoiser import CFGDenoiser, Denoiser, get_sigmas, prepare_noise, to_latent
from latentgen.errors import CheckpointError, ConfigError
from latentgen.loading.bundle import bundle_from_raw, describe, load_model
from latentgen.loading.files import RawCheckpoint, read_checkpoint
from latentgen.samplers import get_sampler

HEADS = {"sd1-tiny": 4, "sd2-tiny": 4}


def close(a, b, tol):
    a, b = a.float(), b.float()
    err = ((a - b).abs() / b.abs().clamp(min=1)).max().item()
    assert err <= tol, f"max scaled error {err:.3g} > {tol}"
    return err


def load_fixture(fixtures_dir, fixture_config, name):
    cfg = fixture_config(name)
    overrides = {"cond": {"num_attention_heads": HEADS[name]}} if name in HEADS else None
    bundle = load_model(str(fixtures_dir / f"{name}.safetensors"), config=cfg, overrides=overrides)
    ref = load_file(str(fixtures_dir / f"{name}.orig-ref.safetensors"))
    return bundle, ref, cfg


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny", "ldm-kl-bert-tiny"])
def test_fixture_modules_match_original_code(fixtures_dir, fixture_config, name):
    bundle, ref, _ = load_fixture(fixtures_dir, fixture_config, name)
    with torch.no_grad():
        close(
            bundle.unet(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"]), ref["out.unet.out"], 1e-5
        )
        post = bundle.first_stage.encode(ref["in.vae.image"])
        close(post.mean, ref["out.vae.mean"], 1e-5)
        close(post.logvar, ref["out.vae.logvar"], 1e-5)
        close(bundle.first_stage.decode_latent(ref["in.vae.z"]), ref["out.vae.decoded"], 1e-5)
        z = ref["in.vae.z"]
        close(bundle.first_stage.decode_latent(z / bundle.config.scale_factor), ref["out.vae.decode_first_stage"], 1e-5)
        close(bundle.cond(ref["in.text.ids"]), ref["out.text.cond"], 1e-5)


@pytest.mark.parametrize(
    "name,sampler,key",
    [
        ("sd1-tiny", "ddim", "ddim"),
        ("sd1-tiny", "plms", "pndm"),
        ("sd2-tiny", "ddim", "ddim"),
        ("ldm-kl-bert-tiny", "ddim", "ddim"),
    ],
)
def test_fixture_sampling_run_matches_original_code(fixtures_dir, fixture_config, name, sampler, key):
    """The original DDIMSampler / PLMSSampler, 10 steps, CFG, from the same x_T."""
    bundle, ref, _ = load_fixture(fixtures_dir, fixture_config, name)
    meta = json.loads(
        json.dumps(
            __import__("safetensors").safe_open(str(fixtures_dir / f"{name}.orig-ref.safetensors"), "pt").metadata()
        )
    )
    steps, scale = int(meta["steps"]), float(meta["guidance_scale"])
    with torch.no_grad():
        cond = bundle.cond(ref["in.sample.ids"])
        uncond = bundle.cond(ref["in.sample.ids_uncond"]).expand_as(cond)
    close(cond, ref["out.sample.cond"], 1e-5)
    sigmas = get_sigmas(bundle.schedule, steps, sampler=sampler, spacing="leading")
    if key == "ddim":
        t = bundle.schedule.sigma_to_t(sigmas[:-1]).round().long()
        assert sorted(t.tolist()) == sorted(ref["out.sample.ddim.timesteps"].tolist())
    x = prepare_noise(ref["in.sample.x_T"], sigmas, sampler, "leading")
    model = CFGDenoiser(Denoiser(bundle.unet, bundle.schedule, bundle.config.prediction))
    with torch.no_grad():
        x = get_sampler(sampler)(
            model, x, sigmas, extra_args={"cond": {"context": cond}, "uncond": {"context": uncond}, "cond_scale": scale}
        )
        z = to_latent(x, sigmas[-1])
        close(z, ref[f"out.sample.{key}.latents"], 1e-4)
        img = bundle.first_stage.decode_latent(z / bundle.config.scale_factor)
    expected = ref[f"out.sample.{key}.images"]
    if expected.min() >= 0:  # stored as [0, 1]
        img = (img / 2 + 0.5).clamp(0, 1)
    close(img, expected, 1e-4)


def test_detection_without_config(fixtures_dir):
    sd1 = describe(
        load_model(str(fixtures_dir / "sd1-tiny.safetensors"), overrides={"cond": {"num_attention_heads": 4}})
    )
    assert (sd1["family"], sd1["prediction"], sd1["factor"], sd1["latent_channels"]) == ("sd1", "eps", 2, 4)
    assert sd1["conditioning"] == "clip" and sd1["context_dim"] == 48 and sd1["concat"] is None
    ov2 = {"cond": {"num_attention_heads": 4}, "unet": {"num_head_channels": 8}}
    sd2 = describe(load_model(str(fixtures_dir / "sd2-tiny.safetensors"), overrides=ov2))
    assert sd2["family"] == "sd2" and sd2["prediction"] == "v" and sd2["prediction_source"] == "guess"
    assert any("--prediction" in n for n in sd2["notes"])
    forced = load_model(str(fixtures_dir / "sd2-tiny.safetensors"), prediction="eps", overrides=ov2)
    assert forced.config.prediction == "eps" and forced.config.prediction_source == "option"
    bert = describe(load_model(str(fixtures_dir / "ldm-kl-bert-tiny.safetensors")))
    assert (bert["family"], bert["conditioning"], bert["factor"]) == ("ldm", "bert", 8)


def _meta_raw(keys_json):
    shapes = json.loads(keys_json.read_text())
    tensors = {
        k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float32)
        for k, s in shapes.items()
    }
    return RawCheckpoint(str(keys_json), "original", tensors), shapes


@pytest.mark.parametrize(
    "keys,family,context,unet_m,prediction",
    [("sd15-keys.json", "sd1", 768, 859.52, "eps"), ("sd21-v-keys.json", "sd2", 1024, 865.91, "v")],
)
def test_full_size_key_sets_load_strictly(fixtures_dir, keys, family, context, unet_m, prediction):
    """The complete SD 1.5 / 2.1 key lists (from the original code on the meta device) are detected and
    load into our modules with strict key and shape checks, and our modules save exactly those names."""
    raw, shapes = _meta_raw(fixtures_dir / keys)
    bundle = bundle_from_raw(raw, device=None, dtype=None)
    d = describe(bundle)
    assert d["family"] == family and d["context_dim"] == context and d["prediction"] == prediction
    assert abs(d["params"]["unet"] / 1e6 - unet_m) < 0.01
    ours = {"model.diffusion_model." + k: list(v.shape) for k, v in bundle.unet.state_dict().items()}
    ours.update({"first_stage_model." + k: list(v.shape) for k, v in bundle.first_stage.state_dict().items()})
    theirs = {k: v for k, v in shapes.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    assert ours == theirs


# --------------------------------------------------------------------------------------------- bad files


def _tiny_copy(fixtures_dir, tmp_path, edit):
    sd = load_file(str(fixtures_dir / "sd1-tiny.safetensors"))
    edit(sd)
    p = tmp_path / "edited.safetensors"
    save_file(sd, str(p))
    return p


def test_missing_unexpected_misshaped_keys_are_named(fixtures_dir, tmp_path):
    ov = {"cond": {"num_attention_heads": 4}}
    p = _tiny_copy(fixtures_dir, tmp_path, lambda sd: sd.pop("model.diffusion_model.out.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing: out\.2\.bias"):
        load_model(str(p), overrides=ov)
    p = _tiny_copy(fixtures_dir, tmp_path, lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected: extra\.weight"):
        load_model(str(p), overrides=ov)
    p = _tiny_copy(fixtures_dir, tmp_path, lambda sd: sd.update({"mystery.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"mystery\.weight"):
        load_model(str(p), overrides=ov)

    def reshape(sd):
        sd["first_stage_model.quant_conv.bias"] = torch.zeros(3)

    p = _tiny_copy(fixtures_dir, tmp_path, reshape)
    with pytest.raises(CheckpointError, match=r"mis-shaped: quant_conv\.bias"):
        load_model(str(p), overrides=ov)


def test_pickles_are_refused(tmp_path):
    for name in ("model.ckpt", "model.pt", "model.bin"):
        p = tmp_path / name
        p.write_bytes(b"\x80\x02}q\x00.")
        with pytest.raises(CheckpointError, match="pickle.*safetensors"):
            read_checkpoint(p)
    disguised = tmp_path / "zip.safetensors"
    disguised.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="pickle"):
        read_checkpoint(disguised)


def test_truncated_and_corrupt_files(fixtures_dir, tmp_path):
    data = (fixtures_dir / "sd1-tiny.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        read_checkpoint(tmp_path)


def test_unknown_model_name_and_bad_prediction(fixtures_dir):
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="--prediction"):
        load_model(str(fixtures_dir / "ldm-kl-bert-tiny.safetensors"), prediction="x0")


def test_ema_weights(fixtures_dir, tmp_path):
    """CompVis LitEma stores `model_ema.<name without dots>`: ignored by default, used with ema=True."""

    def add_ema(sd):
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model.") :].replace(".", "")] = sd[k] + 1.0
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)

    p = _tiny_copy(fixtures_dir, tmp_path, add_ema)
    ov = {"cond": {"num_attention_heads": 4}}
    plain, ema = load_model(str(p), overrides=ov), load_model(str(p), overrides=ov, ema=True)
    w = "out.2.weight"
    assert torch.equal(ema.unet.state_dict()[w], plain.unet.state_dict()[w] + 1.0)

    def drop_one(sd):
        add_ema(sd)
        sd.pop("model_ema.diffusion_modelout2weight")

    p = _tiny_copy(fixtures_dir, tmp_path, drop_one)
    with pytest.raises(CheckpointError, match="EMA weight model_ema.diffusion_modelout2weight is missing"):
        load_model(str(p), overrides=ov, ema=True)


def test_latentgen_format_round_trip(fixtures_dir, fixture_config, tmp_path):
    """save_model writes the original layout + config JSON; the file then needs no config or overrides."""
    from latentgen.loading.bundle import save_model

    b, ref, _ = load_fixture(fixtures_dir, fixture_config, "sd2-tiny")
    out = tmp_path / "mine.safetensors"
    save_model(out, b.config, b.unet, b.first_stage, b.cond)
    again = load_model(str(out))
    assert again.format == "latentgen" and again.config.prediction == "v"
    assert again.config.prediction_source == "metadata"
    with torch.no_grad():
        close(again.unet(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"]), ref["out.unet.out"], 1e-5)
        close(again.cond(ref["in.text.ids"]), ref["out.text.cond"], 1e-5)
    # the file is also an ordinary original-layout checkpoint
    raw = read_checkpoint(out)
    assert any(k.startswith("cond_stage_model.") for k in raw.tensors)


def test_read_converted_equals_converting_the_mapped_tensors(tmp_path):
    """The dtype conversion at load reads the file with plain reads (no mapped pages kept): the same values as
    converting the memory-mapped tensors, for every stored dtype; a truncated file fails clearly."""
    from latentgen.loading.safetensors import read_converted, read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "h": torch.randn(3, 5, generator=g).half(),
        "b": torch.randn(7, generator=g).bfloat16(),
        "f": torch.randn(2, 2, 2, generator=g),
        "s": torch.tensor(2.5, dtype=torch.float16),
        "e": torch.empty(0, 4, dtype=torch.float16),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    mapped, _ = read_safetensors(path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = read_converted(path, list(tensors), dtype)
        for k, v in mapped.items():
            assert got[k].dtype == dtype and got[k].shape == v.shape and torch.equal(got[k], v.to(dtype)), k
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_converted(path, list(tensors), torch.float32)


def _half_file(fixtures_dir, fixture_config, tmp_path):
    """The sd1-tiny fixture saved in fp16."""
    from latentgen.loading.bundle import save_model

    bundle, _, _ = load_fixture(fixtures_dir, fixture_config, "sd1-tiny")
    half = tmp_path / "half.safetensors"
    save_model(half, bundle.config, bundle.unet.half(), bundle.first_stage.half(), bundle.cond.half())
    return half


def test_fp16_file_loads_in_fp32_exactly(fixtures_dir, fixture_config, tmp_path):
    """A fp16 file loaded with dtype float32 holds exactly the fp16 values, upcast (through read_converted); on CPU
    the text and image encoders keep theirs as stored (upcast as they run)."""
    half = _half_file(fixtures_dir, fixture_config, tmp_path)
    loaded = load_model(str(half), dtype=torch.float32)
    want = load_file(str(half))
    for name, module in (
        ("model.diffusion_model.", loaded.unet),
        ("first_stage_model.decoder.", loaded.first_stage.decoder),
    ):
        for k, v in module.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, want[name + k].float()), k


def test_low_memory_keeps_fp16_weights_and_gives_the_same_images(fixtures_dir, fixture_config, tmp_path):
    """low_memory: an fp16 file computed in fp32 keeps its weights in fp16 (memory-mapped) and upcasts each layer's
    as it runs: txt2img and img2img (encoder path) give the upcast copy's images to float32 rounding (the stored
    layers run oneDNN's matmul and, for small outputs, convolutions as one matrix product; the copy runs F.linear
    and F.conv2d), in half the weight memory."""
    from latentgen import pipelines
    from latentgen.denoiser import network_dtype

    half = _half_file(fixtures_dir, fixture_config, tmp_path)
    full, lean = load_model(str(half)), load_model(str(half), low_memory=True)
    weight_bytes = {
        name: sum(p.numel() * p.element_size() for m in (b.unet, b.first_stage, b.cond) for p in m.parameters())
        for name, b in (("full", full), ("lean", lean))
    }
    hot = sum(
        p.numel()
        for m in (full.unet, full.first_stage.decoder, full.first_stage.post_quant_conv)
        for p in m.parameters()
    )
    assert weight_bytes["lean"] + 2 * hot == weight_bytes["full"]  # full: only the UNet and the decoder in fp32
    assert {p.dtype for m in (full.cond, full.first_stage.encoder) for p in m.parameters()} == {torch.float16}
    assert network_dtype(lean.unet) == torch.float32 and lean.unet.input_blocks[0][0].weight.dtype == torch.float32
    st = pipelines.Settings(steps=4, sampler="euler")
    a = pipelines.txt2img(full, ["a red cube"], ["blurry"], [3], 32, 32, st)
    b = pipelines.txt2img(lean, ["a red cube"], ["blurry"], [3], 32, 32, st)
    assert not torch.equal(a, pipelines.txt2img(lean, ["a red cube"], ["blurry"], [4], 32, 32, st))
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    a2 = pipelines.img2img(full, a, ["a blue cube"], [""], [4], st)
    b2 = pipelines.img2img(lean, a, ["a blue cube"], [""], [4], st)
    torch.testing.assert_close(b2, a2, rtol=0, atol=2e-5)


def test_low_memory_auto_upcasts_at_load_only_when_that_fits_easily(
    fixtures_dir, fixture_config, tmp_path, monkeypatch
):
    """low_memory=None (the CLI default): full fp32 weights when they take under a third of the available memory,
    else weights kept as stored; low memory where the available memory is unknown."""
    import latentgen.memory as mem

    half = _half_file(fixtures_dir, fixture_config, tmp_path)
    fp32_bytes = sum(v.numel() * 4 for v in load_file(str(half)).values() if v.is_floating_point())
    for avail, lean in ((3 * fp32_bytes + 1, False), (3 * fp32_bytes - 1, True), (None, True)):
        monkeypatch.setattr(mem, "available_memory", lambda avail=avail: avail)
        conv = load_model(str(half), low_memory=None).unet.input_blocks[0][0]
        stored = conv.parametrizations.weight.original if lean else conv.weight
        assert stored.dtype == (torch.float16 if lean else torch.float32), avail
    monkeypatch.undo()
    if os.path.exists("/proc/meminfo"):
        assert mem.available_memory() > 0


def test_stored_layers_run_fast_and_compute_what_plain_layers_do(monkeypatch):
    """Layers whose weights are upcast (fp16) or dequantised (int8) on use run, in fp32 on the CPU without grad,
    Linear through oneDNN's matmul and small convolution outputs (≤ UNFOLD_MAX positions) as one matrix product of
    the unfolded input: outputs equal nn.Conv2d / nn.Linear on the same dense weights at float32 precision, for
    strides, dilations, no bias and 1x1 kernels; grouped convolutions, large outputs and grad mode take F.conv2d.
    All layers share one scratch buffer for their dense weight: running them in turn stays right."""
    from latentgen.loading import weights as W

    torch.manual_seed(0)

    def layers():
        return nn.ModuleList(
            [
                nn.Conv2d(8, 12, 3, padding=1),
                nn.Conv2d(12, 12, 3, stride=2, padding=1, bias=False),
                nn.Conv2d(12, 12, 3, padding=2, dilation=2),
                nn.Conv2d(12, 6, 1),
                nn.Conv2d(6, 6, 3, padding=1, groups=2),
                nn.Linear(6, 10),
                nn.Linear(10, 10, bias=False),
            ]
        )

    def run(ls, x):
        for m in ls[:5]:
            x = m(x)
        x = x.flatten(2).transpose(1, 2)
        return ls[6](ls[5](x))

    base = layers().half()  # the stored weights
    dense = copy.deepcopy(base).float()
    lean = copy.deepcopy(base)
    W.upcast_on_use(lean, torch.float32)
    assert [type(m).__mro__[1] for m in lean] == [W.StoredConv2d] * 5 + [W.StoredLinear] * 2
    q = copy.deepcopy(base).float()
    W.int8_weights(q, torch.float32)
    unfolds, convs = [], []
    real_unfold, real_conv = torch.nn.functional.unfold, torch.nn.functional.conv2d
    monkeypatch.setattr(W.F, "unfold", lambda *a, **k: unfolds.append(1) or real_unfold(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: convs.append(1) or real_conv(*a, **k))
    with torch.no_grad():
        for hw, n_unfold in ((6, 4), (40, 0)):  # 2·6·6 = 72 positions: unfolded; 2·20·20 = 800 (strided): not
            x = torch.randn(2, 8, hw, hw)
            unfolds.clear(), convs.clear()
            got = run(lean, x)
            assert (len(unfolds), len(convs)) == (n_unfold, 5 - n_unfold)  # the grouped one always convolves
            torch.testing.assert_close(got, run(dense, x), rtol=1e-5, atol=1e-5)
            with torch.enable_grad():
                torch.testing.assert_close(got, run(lean, x), rtol=1e-5, atol=1e-5)
                want = run(q, x)  # the plain path: F.conv2d / F.linear on the dequantised weights
            torch.testing.assert_close(run(q, x), want, rtol=1e-5, atol=1e-5)
    assert lean[0].weight.dtype == torch.float32 and lean[0].parametrizations.weight.original.dtype == torch.float16


def test_prepacked_layers_compute_what_plain_layers_do():
    """prepack (CPU fp32 generation): each Conv2d's and Linear's weight is held once in oneDNN's layout. Outputs
    match nn.Conv2d / nn.Linear at float32 precision, also for an input size other than the one packed for;
    `.weight`, state_dict() and grad mode still see the dense weight; upcast-on-use and bf16 layers are left
    alone."""
    from helpers_models import randomize_
    from tiny_models import tiny_unet

    from latentgen.loading.weights import PackedConv2d, PackedLinear, prepack, upcast_on_use
    from latentgen.unet import UNetModel

    torch.manual_seed(0)
    plain = randomize_(UNetModel(tiny_unet(context_dim=16)), 1).eval().requires_grad_(False)
    packed = copy.deepcopy(plain)
    prepack(packed)
    convs = [m for m in packed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert {type(m) for m in convs} == {PackedConv2d, PackedLinear}
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        for hw in ((16, 16), (24, 8), (16, 16)):  # packed at the first size; other sizes still right
            x = torch.randn(2, 4, *hw, generator=g)
            torch.testing.assert_close(
                packed(x, torch.tensor([10.0, 500.0]), ctx),
                plain(x, torch.tensor([10.0, 500.0]), ctx),
                rtol=1e-5,
                atol=1e-5,
            )
    assert all("weight" not in m._parameters for m in convs)  # the dense copy is gone
    sd, ref = packed.state_dict(), plain.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert torch.equal(packed.input_blocks[0][0].weight, plain.input_blocks[0][0].weight)
    assert torch.equal(packed.time_embed[0].weight, plain.time_embed[0].weight)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.enable_grad():
        torch.testing.assert_close(packed(x, 3.0, ctx[:1]), plain(x, 3.0, ctx[:1]), rtol=1e-5, atol=1e-5)

    lean = copy.deepcopy(plain).half()
    upcast_on_use(lean, torch.float32)
    bf = copy.deepcopy(plain).bfloat16()
    for m in (lean, bf):
        prepack(m)
        assert not any(isinstance(c, (PackedConv2d, PackedLinear)) for c in m.modules())
