"""8-bit weights (`--weights int8`): the quantisation against torch's own per-channel quantiser, the bytes really
held, and images against the fp32 image of the same seed on the fixtures made by the original code and on the
shipped default model (PSNR ≥ 30 dB), through the pipelines and the CLI; bad combinations refused in one line."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from latentgen import pipelines
from latentgen.cli.app import app
from latentgen.images import read_png_text
from latentgen.loading.bundle import load_model
from latentgen.loading.weights import INT8_LAYERS, int8_weights, quantize_int8, weight_bytes

HEADS = {"sd1-tiny": 4, "sd2-tiny": 4}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def fixture_bundle(fixtures_dir, fixture_config, name, **kw):
    overrides = {"cond": {"num_attention_heads": HEADS[name]}} if name in HEADS else None
    return load_model(str(fixtures_dir / f"{name}.safetensors"), config=fixture_config(name), overrides=overrides, **kw)


def test_quantize_int8_matches_torch_per_channel_symmetric_quantiser():
    """Scales and integers equal torch.ao's per-channel symmetric observer and quantize_per_channel (range ±127),
    for Linear- and Conv-shaped weights; an all-zero channel quantises to 0 (and dequantises to 0)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    g = torch.Generator().manual_seed(0)
    for shape in ((24, 40), (16, 8, 3, 3), (12, 6, 1)):
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
        w[3] = 0
        q, s = quantize_int8(w)
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],) + (1,) * (len(shape) - 1)
        obs = PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
        )
        obs(w)
        scale, zero = obs.calculate_qparams()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated, not yet gone
            ref = torch.quantize_per_channel(w, scale.float(), zero, 0, torch.qint8).int_repr()
        live = torch.arange(shape[0]) != 3
        torch.testing.assert_close(s.flatten()[live], scale.float()[live], rtol=1e-6, atol=0)
        assert torch.equal(q[live], ref[live]) and not q[3].any()
        err = (q * s - w).abs()
        assert (err <= s / 2 * (1 + 1e-6)).all() and (q.abs().amax(dim=tuple(range(1, len(shape))))[live] == 127).all()


def test_int8_layers_hold_int8_and_compute_with_the_dequantised_weight():
    """Each Linear / Conv1d / Conv2d holds int8 + one fp32 scale per output channel (its bytes: a quarter plus the
    scales), computes what the plain layer does with q·s as its weight, and keeps no dense copy after running."""
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Flatten(2), nn.Conv1d(8, 4, 1))
    head = nn.Linear(16, 5)
    for p in (*net.parameters(), *head.parameters()):
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(2, 3, 4, 4, generator=g)
    plain = {i: (m.weight.detach().clone(), quantize_int8(m.weight)) for i, m in enumerate([*net[:2], net[3], head])}
    before = weight_bytes(net) + weight_bytes(head)
    for m in (net, head):
        int8_weights(m.eval().requires_grad_(False), torch.float32)
    layers = [*net[:2], net[3], head]
    for i, m in enumerate(layers):
        stored = m.parametrizations.weight.original
        assert stored.dtype == torch.int8 and torch.equal(stored, plain[i][1][0])
    n_w = sum(w.numel() for w, _ in plain.values())
    n_out = sum(w.shape[0] for w, _ in plain.values())
    assert weight_bytes(net) + weight_bytes(head) == before - 3 * n_w + 4 * n_out
    with torch.no_grad():
        h = x
        for i, m in enumerate(net):
            if i in (0, 1):
                h = torch.nn.functional.conv2d(h, plain[i][1][0].float() * plain[i][1][1], m.bias, padding=m.padding)
            elif i == 3:
                h = torch.nn.functional.conv1d(h, plain[2][1][0].float() * plain[2][1][1], m.bias)
            else:
                h = m(h)
        want = torch.nn.functional.linear(h, plain[3][1][0].float() * plain[3][1][1], head.bias)
        got = head(net(x))
    # float32 rounding of other kernels (oneDNN's matmul, the small convolutions unfolded), relative to the scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert weight_bytes(net) + weight_bytes(head) == before - 3 * n_w + 4 * n_out
    assert net[0].weight.dtype == torch.float32 and head.compute_dtype == torch.float32


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny", "ldm-kl-bert-tiny"])
def test_int8_bundle_on_the_original_fixtures(fixtures_dir, fixture_config, name):
    """The fixtures (made by the original CompVis / Stability code): with weights="int8" every Linear / Conv of the
    UNet, text encoder and image decoder holds int8 (the UNet's bytes ≤ 0.27 of fp32), the image encoder and the
    rest are untouched; the UNet output stays near the original code's, and txt2img (CFG 7.5, 4 steps) and
    img2img images are ≥ 30 dB from the fp32 images of the same seeds."""
    from safetensors.torch import load_file

    full = fixture_bundle(fixtures_dir, fixture_config, name)
    q = fixture_bundle(fixtures_dir, fixture_config, name, weights="int8")
    for part in (q.unet, q.cond, q.first_stage.decoder, q.first_stage.post_quant_conv):
        layers = [m for m in part.modules() if isinstance(m, INT8_LAYERS)]
        assert layers and all(m.parametrizations.weight.original.dtype == torch.int8 for m in layers)
    assert weight_bytes(q.unet) <= 0.27 * weight_bytes(full.unet)
    enc = [p.dtype for p in q.first_stage.encoder.parameters()]
    assert torch.int8 not in enc
    ref = load_file(str(fixtures_dir / f"{name}.orig-ref.safetensors"))
    with torch.no_grad():
        out = q.unet(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"])
    want = ref["out.unet.out"]
    rel = ((out - want).norm() / want.norm()).item()
    assert 0 < rel < 0.06, rel  # int8 is not exact, and not far off (measured: 0.029)
    st = pipelines.Settings(steps=4, sampler="dpmpp_2m", cfg=7.5)
    prompts = (["a red cube"], ["blurry"])
    a = pipelines.txt2img(full, *prompts, [3], 32, 32, st)
    b = pipelines.txt2img(q, *prompts, [3], 32, 32, st)
    assert psnr(a, b) >= 30, psnr(a, b)
    a2 = pipelines.img2img(full, a, *prompts, [4], st)
    b2 = pipelines.img2img(q, a, *prompts, [4], st)
    assert psnr(a2, b2) >= 30, psnr(a2, b2)


def test_int8_sdxl_fixture(fixtures_dir):
    """The tiny SDXL base made by the original sgm code: both text encoders, the UNet and the decoder hold int8, and
    txt2img (CFG 7.5, 4 steps) is ≥ 30 dB from the fp32 image (measured 40.0 dB)."""
    path = fixtures_dir / "sdxl" / "sdxl-base-tiny.safetensors"
    if not path.exists():
        pytest.skip(f"{path} not found")
    full, q = load_model(str(path)), load_model(str(path), weights="int8")
    layers = [
        m for part in (q.unet, q.cond, q.first_stage.decoder) for m in part.modules() if isinstance(m, INT8_LAYERS)
    ]
    assert layers and all(m.parametrizations.weight.original.dtype == torch.int8 for m in layers)
    assert weight_bytes(q.unet) <= 0.27 * weight_bytes(full.unet)
    st = pipelines.Settings(steps=4, sampler="dpmpp_2m", cfg=7.5)
    a = pipelines.txt2img(full, ["a red cube"], ["blurry"], [3], 64, 64, st)
    b = pipelines.txt2img(q, ["a red cube"], ["blurry"], [3], 64, 64, st)
    assert psnr(a, b) >= 30, psnr(a, b)


def test_int8_weights_are_read_from_the_file_without_its_memory_map(fixtures_dir, fixture_config, monkeypatch):
    """From a single file, every quantised UNet and decoder weight (and the SD1 text encoder's, whose names map one
    to one) is read on its own with a plain read, not through the memory map, and quantises to what the file's
    tensor does."""
    from safetensors.torch import load_file

    import latentgen.loading.bundle as B

    read, plain = [], B.PlainReader.read
    monkeypatch.setattr(B.PlainReader, "read", lambda self, key: read.append(key) or plain(self, key))
    q = fixture_bundle(fixtures_dir, fixture_config, "sd1-tiny", weights="int8")
    file = load_file(str(fixtures_dir / "sd1-tiny.safetensors"))
    want = {}
    for prefix, part in (("model.diffusion_model.", q.unet), ("first_stage_model.decoder.", q.first_stage.decoder)):
        for name, m in part.named_modules():
            if isinstance(m, INT8_LAYERS):
                want[prefix + name + ".weight"] = m.parametrizations.weight.original
    assert set(want) <= set(read) and any(k.startswith("cond_stage_model.") for k in read)
    for key, stored in want.items():
        assert torch.equal(stored, quantize_int8(file[key])[0]), key


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255


def test_cli_int8_on_the_shipped_default_model_and_its_recipe(workdir):
    """The shipped default model at its default settings: `--weights int8` gives an image ≥ 30 dB from the fp32
    one of the same seed, records "weights": "int8" in the PNG recipe, and `--recipe` regenerates it exactly."""
    common = ("txt2img", "a red circle above a blue square", "--seed", 3, "--dtype", "fp32", "--quiet")
    r = cli(*common, "--out", "full.png")
    assert r.exit_code == 0, r.stderr
    r = cli(*common, "--weights", "int8", "--out", "q.png", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["weights"] == "int8"
    assert json.loads(read_png_text("q.png")["latentgen"])["weights"] == "int8"
    assert "weights" not in json.loads(read_png_text("full.png")["latentgen"])
    p = 10 * math.log10(1 / ((pixels("full.png") - pixels("q.png")) ** 2).mean())
    assert 30 <= p < math.inf, p
    r = cli("txt2img", "--recipe", "q.png", "--out", "again.png", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(pixels("again.png"), pixels("q.png"))


@pytest.mark.parametrize(
    "args,words",
    [
        (["--weights", "int4"], ["--weights", "int8", "int4"]),
        (["--weights", "int8", "--full-weights"], ["--weights int8", "--full-weights"]),
    ],
)
def test_cli_bad_weights_refused_in_one_line(workdir, args, words):
    r = cli("txt2img", "x", "--seed", 1, "--out", "sub/x.png", *args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    assert not (workdir / "sub").exists()
