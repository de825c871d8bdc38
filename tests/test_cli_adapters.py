"""--lora / <lora:...> tags / per-item "loras", --embedding, --clip-skip, --emphasis on the command line: images equal
the pipelines on the merged weights (tests/test_lora.py holds the merge to diffusers), an item without LoRAs after
one with them is bit-identical to a plain run, A1111 metadata keys, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_cli import cli, json_lines, pixels
from tiny_models import sd1_from_fixture

from latentgen import pipelines
from latentgen.adapters.lora import Merged, lora_deltas
from latentgen.images import read_png_text, to_pil
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, fixtures_dir, fixture_config):
    d = tmp_path_factory.mktemp("m")
    return str(sd1_from_fixture(fixtures_dir, fixture_config, d / "sd1.safetensors"))


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def make_lora(bundle, path, seed, scale=0.5):
    """A kohya LoRA on every attention projection of the UNet and the text encoder's q/v, random."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    layers = [
        ("lora_unet_" + n.replace(".", "_"), m)
        for n, m in bundle.unet.named_modules()
        if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    layers += [
        ("lora_te_text_model_" + n.replace(".", "_"), m)
        for n, m in bundle.cond.text_model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    ]
    for key, m in layers:
        out, inp = m.weight.shape
        sd[f"{key}.lora_down.weight"] = torch.randn(2, inp, generator=g) * scale / inp**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g) * scale
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    return sd


BASE = ("--steps", 2, "--dtype", "fp32", "--width", 16, "--height", 16)


def test_lora_options_tags_and_items(sd1, tmp_path):
    bundle = load_model(sd1)
    (tmp_path / "loras").mkdir()
    a = make_lora(bundle, tmp_path / "loras" / "style.safetensors", 1)
    b = make_lora(bundle, tmp_path / "detail.safetensors", 2)
    items = [
        {"prompt": "a boat <lora:style:te=0.6:unet=0.9>", "seed": 3, "out": "o/0.png"},
        {"prompt": "a boat", "seed": 3, "out": "o/1.png"},
        {"prompt": "a boat", "seed": 3, "out": "o/2.png", "loras": {"style": 0.5}},
    ]
    r = cli(
        "txt2img",
        "-",
        "--model",
        sd1,
        *BASE,
        "--lora",
        f"{tmp_path / 'detail.safetensors'}:0.7",
        "--lora-dir",
        tmp_path / "loras",
        "--json",
        input="\n".join(map(json.dumps, items)) + "\n",
    )
    assert r.exit_code == 0, r.stderr
    recs = json_lines(r.stdout)
    da = lora_deltas(bundle, a, "style")
    db = lora_deltas(bundle, b, "detail")
    st = Settings(steps=2)
    merged = Merged()

    def ref(pairs):
        merged.set(pairs)
        try:
            return np.asarray(to_pil(pipelines.txt2img(bundle, ["a boat"], [""], [3], 16, 16, st)[0]))
        finally:
            merged.restore()

    want = [
        ref([(d, 0.7) for d in db] + [(d, 0.6 if d.part == "te" else 0.9) for d in da]),
        ref([(d, 0.7) for d in db]),
        ref([(d, 0.7) for d in db] + [(d, 0.5) for d in da]),
    ]
    for rec, w in zip(recs, want):
        assert np.array_equal(pixels(rec["path"]), w), rec["path"]
    assert [x["name"] for x in recs[0]["loras"]] == ["detail", "style"]
    params = read_png_text(recs[0]["path"])["parameters"]
    assert params.splitlines()[0] == "a boat <lora:style:te=0.6:unet=0.9>"  # the prompt as written
    sha = {x["name"]: x["sha256"] for x in recs[0]["loras"]}
    assert f'Lora hashes: "detail: {sha["detail"][:12]}, style: {sha["style"][:12]}"' in params

    # without --lora, an item after one with LoRAs is bit-identical to a run that never saw any
    items = [
        {"prompt": "a boat <lora:style:1>", "seed": 3, "out": "p/0.png"},
        {"prompt": "a boat", "seed": 3, "out": "p/1.png"},
    ]
    r = cli(
        "txt2img", "-", "--model", sd1, *BASE, "--lora-dir", tmp_path / "loras", input="\n".join(map(json.dumps, items))
    )
    assert r.exit_code == 0, r.stderr
    plain = cli("txt2img", "a boat", "--model", sd1, *BASE, "--seed", 3, "--out", "plain.png")
    assert plain.exit_code == 0, plain.stderr
    assert np.array_equal(pixels("p/1.png"), pixels("plain.png"))
    assert not np.array_equal(pixels("p/0.png"), pixels("plain.png"))


def test_clip_skip_and_emphasis_recorded(sd1):
    r = cli(
        "txt2img",
        "a (boat:1.3)",
        "--model",
        sd1,
        *BASE,
        "--seed",
        1,
        "--clip-skip",
        2,
        "--emphasis",
        "no-norm",
        "--out",
        "a.png",
    )
    assert r.exit_code == 0, r.stderr
    params = read_png_text("a.png")["parameters"]
    assert "Clip skip: 2" in params and "Emphasis: No norm" in params
    bundle = load_model(sd1)
    ref = pipelines.txt2img(
        bundle, ["a (boat:1.3)"], [""], [1], 16, 16, Settings(steps=2, clip_skip=2, emphasis="no-norm")
    )
    assert np.array_equal(pixels("a.png"), np.asarray(to_pil(ref[0])))
    r = cli("txt2img", "a boat", "--model", sd1, *BASE, "--seed", 1, "--out", "b.png")
    params = read_png_text("b.png")["parameters"]
    assert "Clip skip" not in params and "Emphasis" not in params and "Lora" not in params


def test_bad_adapter_input(sd1, tmp_path):
    def fails(*args, match):
        r = cli("txt2img", "a boat", "--model", sd1, *BASE, "--out", "x.png", *args)
        assert r.exit_code == 2, (r.exit_code, r.stderr)
        assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x.png").exists()

    fails("--lora", "missing.safetensors", match="--lora missing.safetensors: no such file")
    wrong = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1024),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 4),
    }
    save_file(wrong, str(tmp_path / "sd2.safetensors"))
    fails("--lora", tmp_path / "sd2.safetensors", match="made for another model family")
    torch.save({"a": torch.zeros(1)}, tmp_path / "old.pt")
    fails("--lora", tmp_path / "old.pt", match="pickle checkpoints are refused")
    fails("--clip-skip", 0, match="--clip-skip must be at least 1")
    fails("--emphasis", "loud", match="--emphasis 'loud' is unknown")
    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "wide.safetensors"))
    fails("--embedding", tmp_path / "wide.safetensors", match="vectors are 1024 wide but the text encoder's are 48")
    # a tag naming a LoRA that is not there fails that item (exit 1), nothing written
    r = cli("txt2img", "a <lora:nothere:1>", "--model", sd1, *BASE, "--out", "x.png")
    assert r.exit_code == 1 and "LoRA 'nothere' not found" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_recipe_replays_adapters_and_refuses_changed_files(sd1, tmp_path):
    bundle = load_model(sd1)
    make_lora(bundle, tmp_path / "style.safetensors", 5)
    save_file({"emb_params": torch.randn(2, 48) * 0.3}, str(tmp_path / "tok.safetensors"))
    r = cli(
        "txt2img",
        "a tok boat",
        "--model",
        sd1,
        *BASE,
        "--seed",
        2,
        "--lora",
        f"{tmp_path / 'style.safetensors'}:0.8",
        "--embedding",
        tmp_path / "tok.safetensors",
        "--clip-skip",
        2,
        "--out",
        "a.png",
    )
    assert r.exit_code == 0, r.stderr
    params = read_png_text("a.png")["parameters"]
    assert 'TI hashes: "tok: ' in params and 'Lora hashes: "style: ' in params
    r = cli("txt2img", "--recipe", "a.png", "--out", "b.png")
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(pixels("a.png"), pixels("b.png"))
    plain = cli("txt2img", "a tok boat", "--model", sd1, *BASE, "--seed", 2, "--out", "c.png")
    assert plain.exit_code == 0 and not np.array_equal(pixels("a.png"), pixels("c.png"))
    make_lora(bundle, tmp_path / "style.safetensors", 6)  # the file changes
    r = cli("txt2img", "--recipe", "a.png", "--out", "d.png")
    assert r.exit_code == 2 and "style.safetensors has changed since the image was made" in r.stderr, r.stderr
    assert not (tmp_path / "d.png").exists()


def test_recipe_reads_a1111_png(sd1, tmp_path):
    from PIL import Image, PngImagePlugin

    bundle = load_model(sd1)
    (tmp_path / "loras").mkdir()
    make_lora(bundle, tmp_path / "loras" / "style.safetensors", 7)
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a (boat:1.2) <lora:style:0.7>\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 5, "
        "Seed: 77, Size: 16x16, Model hash: 0123456789, Model: v1-5, Clip skip: 2, Face restoration: CodeFormer, "
        'Lora hashes: "style: 0123456789ab", Version: v1.9.0',
    )
    Image.new("RGB", (16, 16)).save(tmp_path / "a1111.png", pnginfo=info)
    r = cli(
        "txt2img",
        "--recipe",
        tmp_path / "a1111.png",
        "--model",
        sd1,
        "--dtype",
        "fp32",
        "--lora-dir",
        tmp_path / "loras",
        "--out",
        "r.png",
    )
    assert r.exit_code == 0, r.stderr
    assert "not honoured: Face restoration: CodeFormer" in r.stderr
    assert "LoRA style: " in r.stderr and "is not the file the image was made with (hash 0123456789ab)" in r.stderr
    r2 = cli(
        "txt2img",
        "a (boat:1.2) <lora:style:0.7>",
        "--negative",
        "blurry",
        "--model",
        sd1,
        "--dtype",
        "fp32",
        "--steps",
        3,
        "--sampler",
        "Euler a",
        "--cfg",
        5,
        "--seed",
        77,
        "--width",
        16,
        "--height",
        16,
        "--clip-skip",
        2,
        "--rng",
        "nv",  # no RNG field: A1111's default GPU noise, which NV gives on any device
        "--lora-dir",
        tmp_path / "loras",
        "--out",
        "d.png",
    )
    assert r2.exit_code == 0, r2.stderr
    assert np.array_equal(pixels("r.png"), pixels("d.png"))


def test_img2img_and_inpaint_take_loras(sd1, tmp_path):
    from test_cli import save_image

    from latentgen.images import load_image, to_tensor

    bundle = load_model(sd1)
    sd = make_lora(bundle, tmp_path / "style.safetensors", 8)
    img = save_image(tmp_path / "in.png")
    mask = tmp_path / "mask.png"
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m, "L").save(mask)
    common = (
        "--model",
        sd1,
        "--steps",
        2,
        "--dtype",
        "fp32",
        "--seed",
        9,
        "--lora",
        f"{tmp_path / 'style.safetensors'}:0.9",
    )
    assert cli("img2img", img, "a boat", *common, "--strength", 0.6, "--out", "i.png").exit_code == 0
    assert cli("inpaint", img, "a boat", *common, "--mask", mask, "--strength", 0.8, "--out", "p.png").exit_code == 0
    merged = Merged()
    merged.set([(d, 0.9) for d in lora_deltas(bundle, sd, "s")])
    x, mx = to_tensor(load_image(img)), to_tensor(load_image(str(mask), mode="L"))
    ri = pipelines.img2img(bundle, x, ["a boat"], [""], [9], Settings(steps=2, strength=0.6))
    rp = pipelines.inpaint(bundle, x, mx, ["a boat"], [""], [9], Settings(steps=2, strength=0.8))
    assert np.array_equal(pixels("i.png"), np.asarray(to_pil(ri[0])))
    assert np.array_equal(pixels("p.png"), np.asarray(to_pil(rp[0])))


def test_recipe_refuses_a_changed_model(sd1, tmp_path):
    import shutil

    from safetensors.torch import load_file

    model = tmp_path / "copy.safetensors"
    shutil.copy(sd1, model)
    assert cli("txt2img", "a boat", "--model", model, *BASE, "--seed", 1, "--out", "a.png").exit_code == 0
    sd = load_file(str(model))
    sd["model.diffusion_model.out.2.bias"] += 1
    from safetensors import safe_open

    with safe_open(str(sd1), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(model), metadata=meta)
    r = cli("txt2img", "--recipe", "a.png", "--out", "b.png")
    assert r.exit_code == 2 and "copy.safetensors has changed since the image was made" in r.stderr, r.stderr
    assert not (tmp_path / "b.png").exists()


def test_emphasis_names_round_trip_through_a1111_text():
    from latentgen.infotext import adapter_fields, parse_parameters

    for ours, a1111 in (("no-norm", "No norm"), ("none", "Ignore"), ("literal", "None")):
        (field,) = adapter_fields({"emphasis": ours})
        assert field == f"Emphasis: {a1111}"
        rec, skipped = parse_parameters(f"x\nSteps: 2, Seed: 1, {field}, Size: 16x16")
        assert rec["emphasis"] == ours and not skipped


def test_parse_a1111_parameters_hand_worked():
    from latentgen.infotext import parse_parameters

    text = (
        "masterpiece, (a cat:1.2) <lora:style:0.8>\non a mat\nNegative prompt: blurry,\nlowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: abcdef1234, Model: v1-5, Variation seed: 99, Variation seed strength: 0.3, ENSD: 31337, "
        "RNG: NV, Denoising strength: 0.55, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (bicubic), "
        'Clip skip: 2, Emphasis: No norm, Lora hashes: "style: 0123456789ab, other: ba9876543210", '
        "Face restoration: CodeFormer, Version: v1.9.0"
    )
    rec, skipped = parse_parameters(text)
    assert rec["prompt"] == "masterpiece, (a cat:1.2) <lora:style:0.8>\non a mat"
    assert rec["negative"] == "blurry,\nlowres"
    assert (rec["steps"], rec["sampler"], rec["scheduler"], rec["cfg"], rec["seed"]) == (
        20,
        "dpmpp_2m",
        "karras",
        7.0,
        1234,
    )
    assert (rec["width"], rec["height"], rec["clip_skip"], rec["emphasis"]) == (512, 768, 2, "no-norm")
    assert (rec["subseed"], rec["subseed_strength"], rec["ensd"], rec["rng"]) == (99, 0.3, 31337, "nv")
    assert rec["hires"] == dict(
        scale=2.0, strength=0.55, upscaler="latent-bicubic", steps=10, sampler=None, prompt=None
    )
    assert rec["lora_hashes"] == {"style": "0123456789ab", "other": "ba9876543210"}
    assert skipped == ["Face restoration: CodeFormer"]
    rec, _ = parse_parameters("just a prompt")
    assert rec == {"prompt": "just a prompt", "negative": "", "rng": "nv"}  # A1111's default: GPU noise (NV)


def test_hires_prompt_tags_are_removed(sd1, tmp_path):
    (tmp_path / "loras").mkdir()
    make_lora(load_model(sd1), tmp_path / "loras" / "style.safetensors", 9)
    common = ("a boat <lora:style:1>", "--model", sd1, *BASE, "--seed", 5, "--hires", 2, "--hires-steps", 2)
    common += ("--lora-dir", tmp_path / "loras")
    r = cli("txt2img", *common, "--hires-prompt", "a red boat <lora:style:1>", "--out", "t.png")
    assert r.exit_code == 0, r.stderr
    r = cli("txt2img", *common, "--hires-prompt", "a red boat ", "--out", "p.png")
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(pixels("t.png"), pixels("p.png"))
