"""The `latentgen` command line, through the real Typer app (CliRunner) and, for exit codes, stderr and
torchrun, through subprocesses. Images made by the CLI are compared with the pipelines (which
tests/test_pipelines.py checks against diffusers) on the same seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny_models import bert_from_fixture, random_model, sd1_from_fixture
from typer.testing import CliRunner

from latentgen import pipelines
from latentgen.cli.app import app
from latentgen.hires import Hires, txt2img_hires
from latentgen.images import read_png_text, to_pil
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings

ROOT = Path(__file__).resolve().parents[1]
FP32 = ("--dtype", "fp32")  # runs compared with fp32 references (`auto` may pick bf16 on a bf16-native CPU)


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixtures_dir, fixture_config):
    d = tmp_path_factory.mktemp("models")
    out = {
        k: str(random_model(k, d / f"{k}.safetensors", seed=i))
        for i, k in enumerate(("class", "uncond", "sr", "inpaint"))
    }
    out["other"] = str(random_model("uncond", d / "other.safetensors", seed=9))  # another first stage
    out["sd1"] = str(sd1_from_fixture(fixtures_dir, fixture_config, d / "sd1.safetensors"))
    out["bert"] = str(bert_from_fixture(fixtures_dir, fixture_config, d / "bert.safetensors"))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~40x faster than contending threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def cli(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def save_image(path, size=(16, 16), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# ------------------------------------------------------------------------------------------ txt2img


def test_txt2img_images_records_and_metadata_match_pipeline(models):
    r = cli(
        "txt2img",
        *FP32,
        "a red circle",
        "--model",
        models["sd1"],
        "--seed",
        7,
        "--num",
        2,
        "--json",
        "--out",
        "o/{index:03d}-{seed}-{prompt}.png",
        "--negative",
        "blurry",
    )
    assert r.exit_code == 0, r.stderr
    recs = json_lines(r.stdout)  # stdout: only the results
    assert [x["seed"] for x in recs] == [7, 8] and [x["index"] for x in recs] == [0, 1]
    assert recs[0]["path"] == "o/000-7-a-red-circle.png"
    assert recs[0]["steps"] == 2 and recs[0]["sampler"] == "dpmpp_2m" and recs[0]["karras"] is True  # recommended
    b = load_model(models["sd1"])
    ref = pipelines.txt2img(b, ["a red circle"] * 2, ["blurry"] * 2, [7, 8], 16, 16, Settings(steps=2))
    for rec, img in zip(recs, ref):
        assert np.array_equal(pixels(rec["path"]), np.asarray(to_pil(img)))
    text = read_png_text(recs[1]["path"])
    params = text["parameters"].splitlines()
    assert params[0] == "a red circle" and params[1] == "Negative prompt: blurry"
    for field in (
        "Steps: 2",
        "Sampler: DPM++ 2M Karras",
        "CFG scale: 7.5",
        "Seed: 8",
        "Size: 16x16",
        f"Model hash: {recs[1]['model_hash']}",
        "Model: sd1-tiny",
    ):
        assert field in params[2]
    recipe = json.loads(text["latentgen"])
    assert {k: v for k, v in recs[1].items() if k not in ("path", "seconds")} == recipe


@pytest.mark.parametrize(
    "args,sampler,scheduler,shown",
    [
        ([], "dpmpp_2m", "karras", "Sampler: DPM++ 2M Karras, CFG"),
        (["--sampler", "ddim"], "ddim", "normal", "Sampler: DDIM, Schedule type: Normal, CFG"),
        (["--sampler", "DPM2 a Karras"], "dpm2_a", "karras", "Sampler: DPM2 a Karras, CFG"),
        (["--sampler", "euler", "--scheduler", "ays"], "euler", "ays", "Sampler: Euler, Schedule type: Align Your"),
        (["--sampler", "uni_pc", "--karras"], "uni_pc", "karras", "Sampler: UniPC Karras, CFG"),
    ],
)
def test_schedule_follows_the_sampler_and_is_recorded(models, args, sampler, scheduler, shown):
    """The CLI runs what it records: the pipeline's pixels with that sampler and schedule (within the 1/255 the
    CLI's weight handling may round differently, cf. test_low_memory_gives_the_same_png), and not another's."""
    common = ("--model", models["sd1"], "--seed", 5, "--steps", 4, "--dtype", "fp32", "--json", "--out", "s.png")
    r = cli("txt2img", "a dot", *common, *args)
    assert r.exit_code == 0, r.stderr
    rec = json_lines(r.stdout)[0]
    assert (rec["sampler"], rec["scheduler"]) == (sampler, scheduler)
    assert shown in read_png_text("s.png")["parameters"]
    b = load_model(models["sd1"])
    got = pixels("s.png").astype(int)
    for sched, same in ((scheduler, True), ("normal" if scheduler != "normal" else "karras", False)):
        ref = pipelines.txt2img(b, ["a dot"], [""], [5], 16, 16, Settings(steps=4, sampler=sampler, scheduler=sched))
        assert (np.abs(got - np.asarray(to_pil(ref[0])).astype(int)).max() <= 1) == same


def test_hires_fix_writes_the_target_size_and_a1111_keys(models):
    common = ("--model", models["sd1"], "--seed", 9, "--dtype", "fp32", "--json")
    hires = ("--hires", 2, "--hires-steps", 3, "--hires-sampler", "Euler a")
    r = cli("txt2img", "a dot", *common, *hires, "--out", "h.png")
    assert r.exit_code == 0, r.stderr
    rec = json_lines(r.stdout)[0]
    assert pixels("h.png").shape == (32, 32, 3) and rec["width"] == 16 and rec["hires"]["width"] == 32
    params = read_png_text("h.png")["parameters"]
    for field in ("Size: 16x16", "Denoising strength: 0.7", "Hires upscale: 2", "Hires steps: 3"):
        assert field in params, params
    assert "Hires upscaler: Latent" in params and "Hires sampler: Euler a" in params
    b = load_model(models["sd1"])
    st = Settings(steps=2)
    ref = txt2img_hires(b, ["a dot"], [""], [9], 16, 16, st, Hires(2.0, steps=3, sampler="euler_a"))
    assert np.abs(pixels("h.png").astype(int) - np.asarray(to_pil(ref[0])).astype(int)).max() <= 1
    r2 = cli("txt2img", "--recipe", "h.png", "--out", "h2.png")
    assert r2.exit_code == 0, r2.stderr
    assert np.array_equal(pixels("h.png"), pixels("h2.png"))


def test_variation_seed_and_nv_rng_are_recorded_and_replayed(models):
    common = ("--model", models["sd1"], "--seed", 20, "--num", 2, "--dtype", "fp32", "--json", "--sampler", "euler_a")
    seeding = ("--rng", "nv", "--subseed", 70, "--subseed-strength", 0.25, "--eta-noise-seed-delta", 31337)
    r = cli("txt2img", "a dot", *common, *seeding, "--out", "v{i}.png")
    assert r.exit_code == 0, r.stderr
    recs = json_lines(r.stdout)
    assert [x["subseed"] for x in recs] == [70, 71] and recs[1]["rng"] == "nv"
    params = read_png_text("v1.png")["parameters"]
    for field in ("Seed: 21", "Variation seed: 71", "Variation seed strength: 0.25", "ENSD: 31337", "RNG: NV"):
        assert field in params, params
    b = load_model(models["sd1"])
    st = Settings(steps=2, sampler="euler_a", rng="nv", subseed=70, subseed_strength=0.25, ensd=31337)
    ref = pipelines.txt2img(b, ["a dot"] * 2, [""] * 2, [20, 21], 16, 16, st)
    assert np.abs(pixels("v1.png").astype(int) - np.asarray(to_pil(ref[1])).astype(int)).max() <= 1
    r2 = cli("txt2img", "--recipe", "v1.png", "--out", "w.png")
    assert r2.exit_code == 0, r2.stderr
    assert np.array_equal(pixels("v1.png"), pixels("w.png"))


def test_recipe_from_an_a1111_png(models):
    """--recipe reads A1111's `parameters` when the PNG has no latentgen recipe: sampler name, schedule type,
    steps, CFG, seed, size and RNG."""
    from latentgen.images import save_png

    text = "a dot\nNegative prompt: blur\nSteps: 3, Sampler: Euler, Schedule type: Karras, CFG scale: 4, Seed: 77, "
    save_png(Image.new("RGB", (8, 8)), "a1111.png", text={"parameters": text + "Size: 16x24, RNG: CPU"})
    r = cli("txt2img", "--recipe", "a1111.png", "--model", models["sd1"], "--dtype", "fp32", "--json", "--out", "r.png")
    assert r.exit_code == 0, r.stderr
    rec = json_lines(r.stdout)[0]
    assert (rec["sampler"], rec["scheduler"], rec["steps"], rec["seed"], rec["negative"]) == (
        "euler",
        "karras",
        3,
        77,
        "blur",
    )
    b = load_model(models["sd1"])
    st = Settings(steps=3, sampler="euler", scheduler="karras", cfg=4.0)
    ref = pipelines.txt2img(b, ["a dot"], ["blur"], [77], 16, 24, st)
    assert np.abs(pixels("r.png").astype(int) - np.asarray(to_pil(ref[0])).astype(int)).max() <= 1


def test_recipe_regenerates_bit_exactly(models):
    r = cli(
        "txt2img",
        "a lighthouse",
        "--model",
        models["sd1"],
        "--seed",
        3,
        "--num",
        2,
        "--sampler",
        "euler_a",
        "--cfg",
        4,
        "--no-karras",
        "--width",
        24,
        "--out",
        "a{i}.png",
    )
    assert r.exit_code == 0, r.stderr
    r2 = cli("txt2img", "--recipe", "a1.png", "--out", "b.png")
    assert r2.exit_code == 0, r2.stderr
    assert np.array_equal(pixels("a1.png"), pixels("b.png"))
    assert pixels("b.png").shape == (16, 24, 3)
    assert not np.array_equal(pixels("a0.png"), pixels("b.png"))  # image 1 used seed S+1


def test_stdin_batch_streams_results_and_reports_bad_lines(models):
    lines = [
        "a cat",
        '{"prompt": "a dog", "seed": 100, "out": "dog.png"}',
        "{bad json",
        '{"prompt": "x", "what": 1}',
        "",
        '{"prompt": "a fox", "num": 2, "cfg": 1}',
    ]
    r = cli(
        "txt2img",
        "-",
        "--model",
        models["sd1"],
        "--seed",
        10,
        "--json",
        "--out",
        "o/{index}-{seed}.png",
        input="\n".join(lines) + "\n",
    )
    assert r.exit_code == 1  # some items failed, the batch went on
    recs = json_lines(r.stdout)
    ok = [x for x in recs if "error" not in x]
    assert [(x["prompt"], x["seed"], x["path"]) for x in ok] == [
        ("a cat", 10, "o/0-10.png"),
        ("a dog", 100, "dog.png"),
        ("a fox", 14, "o/4-14.png"),
        ("a fox", 15, "o/5-15.png"),
    ]
    assert ok[2]["cfg"] == 1.0
    errors = [x for x in recs if "error" in x]
    assert len(errors) == 2 and "stdin line 3" in errors[0]["error"] and "unknown keys" in errors[1]["error"]
    assert len(r.stderr.strip().splitlines()) == 2  # one line per failure, nothing else with a seed given
    assert all(Path(x["path"]).is_file() for x in ok)
    # an image of the batch is reproduced alone from its seed
    alone = cli("txt2img", "a fox", "--model", models["sd1"], "--seed", 15, "--cfg", 1, "--out", "alone.png")
    assert alone.exit_code == 0 and np.array_equal(pixels("alone.png"), pixels("o/5-15.png"))


def test_plain_output_seed_note_and_quiet(models):
    r = cli("txt2img", "hi", "--model", models["sd1"], "--out", "x.png")
    assert r.exit_code == 0 and r.stdout == "x.png\n"
    seed = int(r.stderr.split("seed ")[1].split()[0])  # a random seed is always printed ...
    assert json.loads(read_png_text("x.png")["latentgen"])["seed"] == seed  # ... and recorded
    q = cli("txt2img", "hi", "--model", models["sd1"], "--out", "y.png", "--quiet")
    assert q.exit_code == 0 and q.stderr == ""


def test_existing_output_needs_overwrite(models):
    Path("keep.png").write_bytes(b"precious")
    r = cli("txt2img", "hi", "--model", models["sd1"], "--seed", 1, "--out", "keep.png")
    assert r.exit_code == 2 and "--overwrite" in r.stderr and Path("keep.png").read_bytes() == b"precious"
    r = cli("txt2img", "hi", "--model", models["sd1"], "--seed", 1, "--out", "keep.png", "--overwrite")
    assert r.exit_code == 0 and pixels("keep.png").shape == (16, 16, 3)
    assert not list(Path(".").glob(".keep.png.*"))  # no temporary file left behind


# ---------------------------------------------------------------------------------------- families


def test_class_conditional_and_unconditional_models(models):
    r = cli("txt2img", *FP32, "--model", models["class"], "--class", 3, "--seed", 5, "--cfg", 2, "--out", "c.png")
    assert r.exit_code == 0, r.stderr
    b = load_model(models["class"])
    ref = pipelines.txt2img(b, [3], [""], [5], 16, 16, Settings(steps=2, cfg=2.0))  # CFG against the null class
    assert np.array_equal(pixels("c.png"), np.asarray(to_pil(ref[0])))
    assert json.loads(read_png_text("c.png")["latentgen"])["class"] == 3
    missing = cli("txt2img", "--model", models["class"], "--out", "d.png")
    assert missing.exit_code == 2 and "--class" in missing.stderr and not Path("d.png").exists()
    u = cli("txt2img", *FP32, "--model", models["uncond"], "--seed", 2, "--out", "u.png")
    assert u.exit_code == 0, u.stderr
    bu = load_model(models["uncond"])
    ref = pipelines.txt2img(bu, [""], [""], [2], 16, 16, Settings(steps=2))
    assert np.array_equal(pixels("u.png"), np.asarray(to_pil(ref[0])))


def test_bert_model_takes_real_prompts(models):
    r = cli("txt2img", *FP32, "a painting of a tree", "--model", models["bert"], "--seed", 1, "--out", "t.png")
    assert r.exit_code == 0, r.stderr
    b = load_model(models["bert"])
    ref = pipelines.txt2img(b, ["a painting of a tree"], [""], [1], 16, 16, Settings(steps=2))
    assert np.array_equal(pixels("t.png"), np.asarray(to_pil(ref[0])))


def test_dtype_bf16_on_request_and_auto_keeps_small_models_in_fp32(models, monkeypatch):
    """`--dtype bf16` runs the networks in bf16 (slowly without native bf16) and records it; `auto` on a
    bf16-native CPU keeps a UNet under BF16_MIN_UNET_PARAMS in fp32, so it equals `--dtype fp32` bit for bit."""
    from latentgen.cli import device

    r = cli("txt2img", "a red circle", "--model", models["sd1"], "--seed", 3, "--dtype", "bf16", "--out", "b.png")
    assert r.exit_code == 0, r.stderr
    b = load_model(models["sd1"], dtype=torch.bfloat16)
    ref = pipelines.txt2img(b, ["a red circle"], [""], [3], 16, 16, Settings(steps=2))
    assert np.array_equal(pixels("b.png"), np.asarray(to_pil(ref[0])))
    assert json.loads(read_png_text("b.png")["latentgen"])["dtype"] == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    for name, dtype in (("auto.png", "auto"), ("fp32.png", "fp32")):
        r = cli("txt2img", "a red circle", "--model", models["sd1"], "--seed", 3, "--dtype", dtype, "--out", name)
        assert r.exit_code == 0, r.stderr
        assert json.loads(read_png_text(name)["latentgen"])["dtype"] == "float32"
    assert np.array_equal(pixels("auto.png"), pixels("fp32.png"))
    assert device.pick_dtype("auto", "cpu", unet_params=device.BF16_MIN_UNET_PARAMS) == torch.bfloat16
    assert device.pick_dtype("auto", "cpu", unet_params=6_700_000) == torch.float32


def test_img2img_inpaint_outpaint_superres(models):
    img, mask = save_image("in.png"), save_image("mask.png", mode="L", seed=1)
    r = cli(
        "img2img", *FP32, img, "a boat", "--model", models["sd1"], "--strength", 0.5, "--seed", 4, "--out", "i2i.png"
    )
    assert r.exit_code == 0, r.stderr
    b = load_model(models["sd1"])
    x = torch.from_numpy(pixels(img) / 255.0).float().permute(2, 0, 1)[None]
    ref = pipelines.img2img(b, x, ["a boat"], [""], [4], Settings(steps=2, strength=0.5))
    assert np.array_equal(pixels("i2i.png"), np.asarray(to_pil(ref[0])))
    r = cli(
        "inpaint",
        *FP32,
        img,
        "--mask",
        mask,
        "a hat",
        "--model",
        models["inpaint"],
        "--seed",
        1,
        "--out",
        "ip.png",
        "--mask-blur",
        1,
    )
    assert r.exit_code == 0, r.stderr
    rec = json.loads(read_png_text("ip.png")["latentgen"])
    assert rec["task"] == "inpaint" and rec["mask_blur"] == 1
    r = cli(
        "inpaint",
        *FP32,
        img,
        "wider",
        "--extend",
        "4,0,4,4",
        "--model",
        models["inpaint"],
        "--seed",
        1,
        "--out",
        "op.png",
    )
    assert r.exit_code == 0, r.stderr
    assert pixels("op.png").shape == (20, 24, 3)
    r = cli(
        "superres",
        *FP32,
        save_image("low.png", (8, 8)),
        "--model",
        models["sr"],
        "--scale",
        2,
        "--seed",
        0,
        "--out",
        "sr.png",
    )
    assert r.exit_code == 0, r.stderr
    assert pixels("sr.png").shape == (16, 16, 3)


# -------------------------------------------------------------------------------------- bad input


BAD = {
    "missing image": (["img2img", "nope.png", "x", "--model", "{sd1}"], "nope.png"),
    "unreadable image": (["img2img", "junk.png", "x", "--model", "{sd1}"], "not a readable image"),
    "mask size": (["inpaint", "in.png", "--mask", "small.png", "x", "--model", "{inpaint}"], "--resize-mask"),
    "width": (["txt2img", "x", "--model", "{sd1}", "--width", "15"], "--width 15"),
    "strength 0": (["img2img", "in.png", "x", "--strength", "0", "--model", "{sd1}"], "--strength"),
    "strength 1.5": (["img2img", "in.png", "x", "--strength", "1.5", "--model", "{sd1}"], "--strength"),
    "sampler": (["txt2img", "x", "--model", "{sd1}", "--sampler", "magic"], "magic"),
    "scheduler": (["txt2img", "x", "--model", "{sd1}", "--scheduler", "zigzag"], "--scheduler"),
    "hires scale": (["txt2img", "x", "--model", "{sd1}", "--hires", "0.5"], "--hires 0.5"),
    "hires upscaler": (["txt2img", "x", "--model", "{sd1}", "--hires", "2", "--hires-upscaler", "esr"], "--hires-up"),
    "hires off": (["txt2img", "x", "--model", "{sd1}", "--hires-steps", "3"], "needs --hires"),
    "rng": (["txt2img", "x", "--model", "{sd1}", "--rng", "mt"], "--rng"),
    "subseed strength": (["txt2img", "x", "--model", "{sd1}", "--subseed-strength", "0.5"], "--subseed"),
    "model name": (["txt2img", "x", "--model", "no-such-model"], "no-such-model"),
    "steps": (["txt2img", "x", "--model", "{sd1}", "--steps", "0"], "--steps"),
    "out dir": (["txt2img", "x", "--model", "{sd1}", "--out", "afile/{index}.png"], "afile"),
    "extend": (["inpaint", "in.png", "x", "--extend", "1,2,3", "--model", "{inpaint}"], "--extend"),
    "class for txt2img": (["txt2img", "x", "--model", "{inpaint}"], "latentgen inpaint"),
    "decode shape": (["decode", "bad.safetensors", "--out", "d.png", "--model", "{sd1}"], "shape"),
    "recipe": (["txt2img", "--recipe", "in.png"], "no latentgen recipe"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(models, case):
    from safetensors.torch import save_file

    save_image("in.png")
    save_image("small.png", (8, 8), mode="L")
    Path("junk.png").write_bytes(b"not an image")
    Path("afile").write_text("a file, not a directory")
    save_file({"latent": torch.zeros(1, 3, 4, 4)}, "bad.safetensors")
    args, needle = BAD[case]
    r = cli(*[a.format(**models) if a.startswith("{") and a.endswith("}") and "index" not in a else a for a in args])
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: error:") and needle in lines[0], r.stderr
    assert r.stdout == "" and not list(Path(".").glob("out/*")) and not Path("d.png").exists()


def test_console_script_exit_codes_and_stderr(models, workdir):
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "cache")}
    p = subprocess.run(
        [sys.executable, "-m", "latentgen.cli", "txt2img", "x", "--model", "no-such-model"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and "no-such-model" in p.stderr
    p = subprocess.run(
        [sys.executable, "-c", "import sys, latentgen.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert p.stdout.strip() == "False"  # --help stays fast: no torch import


# ------------------------------------------------------------------------------- encode / decode / info


def test_encode_decode_roundtrip_and_incompatible_first_stage(models):
    img = save_image("in.png")
    r = cli("encode", img, "--out", "z.safetensors", "--model", models["sd1"])
    assert r.exit_code == 0 and r.stdout == "z.safetensors\n", r.stderr
    with safe_open("z.safetensors", "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latent")
    assert meta["model"] == "sd1" and float(meta["scale_factor"]) == pytest.approx(0.18215)
    assert json.loads(meta["shape"]) == [1, 4, 8, 8] == list(z.shape)
    b = load_model(models["sd1"])
    x = torch.from_numpy(pixels(img) / 255.0).float().permute(2, 0, 1)[None]
    assert torch.allclose(z, pipelines.encode(b, x), atol=1e-6)
    r = cli("decode", "z.safetensors", "--out", "d.png", "--model", models["sd1"])
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(pixels("d.png"), np.asarray(to_pil(pipelines.decode(b, z)[0])))
    r = cli("decode", "z.safetensors", "--out", "e.png", "--model", models["other"])
    assert r.exit_code == 2 and "another first stage" in r.stderr and not Path("e.png").exists()


def test_info_and_models(models, workdir):
    r = cli("info", models["class"], "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["conditioning"] == "class" and d["factor"] == 2 and d["latent_channels"] == 4
    (workdir / "models.toml").write_text(
        f'default = "mine"\n[models.mine]\npath = "{models["uncond"]}"\n'
        '[models.gone]\npath = "/nowhere/x.safetensors"\n'
    )
    r = cli("models", "--json")
    recs = {x["name"]: x for x in json_lines(r.stdout)}
    assert recs["mine"]["present"] and recs["mine"]["default"] and not recs["gone"]["present"]
    r = cli("txt2img", "--seed", 0, "--out", "default.png")  # the registry default, no --model
    assert r.exit_code == 0 and Path("default.png").is_file(), r.stderr


def test_no_default_model_says_pass_model(monkeypatch, workdir):
    import latentgen.loading.files

    monkeypatch.setattr(latentgen.loading.files, "builtin_dir", lambda: workdir / "no-assets")
    r = cli("txt2img", "x")
    assert r.exit_code == 2 and "--model" in r.stderr


def test_low_memory_gives_the_same_png(workdir):
    """--low-memory keeps the shipped fp16 weights as stored and upcasts per layer: the same image as
    --full-weights, which upcasts them all at load (and then runs its convolutions on prepacked weights, whose
    float32 rounding differs in the last bits: at most 1/255 apart). The default, where memory allows, is
    --full-weights."""
    for flag, name in ((["--full-weights"], "a.png"), (["--low-memory"], "b.png"), ([], "c.png")):
        r = cli("txt2img", "a red circle", "--seed", "5", "--steps", "6", "--out", name, "--quiet", *flag)
        assert r.exit_code == 0, r.stderr
    assert np.abs(pixels("a.png").astype(int) - pixels("b.png").astype(int)).max() <= 1
    assert np.array_equal(pixels("a.png"), pixels("c.png"))
    r = cli("superres", "a.png", "--seed", "5", "--steps", "3", "--out", "up.png", "--quiet", "--low-memory")
    assert r.exit_code == 0 and Image.open("up.png").size == (256, 256), r.stderr


def test_shipped_default_models_work_with_no_options(workdir):
    """A fresh install: txt2img, superres and encode/decode run on the models inside the package."""
    r = cli("txt2img", "a red circle above a blue square", "--seed", "3", "--out", "c.png", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "c.png" and Image.open("c.png").size == (64, 64)
    from latentgen.data import check_image  # the pictures show what the prompt says (evaluation: 92%)

    good = 0
    for seed in range(5):
        cli("txt2img", "a red circle above a blue square", "--seed", seed, "--out", f"s{seed}.png", "--quiet")
        good += check_image(Image.open(f"s{seed}.png"), "a red circle above a blue square")["all"]
    assert good >= 4, good
    Image.new("RGB", (16, 16), (200, 40, 40)).save("low.png")
    r = cli("superres", "low.png", "--seed", "3", "--steps", "4", "--out", "up.png", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert Image.open("up.png").size == (64, 64)
    assert cli("encode", "c.png", "--out", "z.safetensors").exit_code == 0
    assert cli("decode", "z.safetensors", "--out", "d.png").exit_code == 0
    assert Image.open("d.png").size == (64, 64)


# ------------------------------------------------------------------------------------------ torchrun


def test_torchrun_two_cpu_ranks_split_items_and_records_are_complete(models, workdir):
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "latentgen.cli",
        "txt2img",
        "-",
        "--model",
        models["sd1"],
        "--seed",
        "20",
        "--json",
        "--quiet",
        "--out",
        "t/{index}.png",
    ]
    p = subprocess.run(cmd, input="a\nb\n{bad\nd\n", capture_output=True, text=True, env=env, timeout=120)
    recs = json_lines("\n".join(line for line in p.stdout.splitlines() if line.startswith("{")))
    assert p.returncode != 0  # one item failed (torchrun reports the worker's exit 1)
    assert [x["index"] for x in recs] == [0, 1, 2, 3] and "error" in recs[2]
    assert {x["device"] for x in recs if "error" not in x} == {"cpu"}
    cli("txt2img", "d", "--model", models["sd1"], "--seed", 23, "--out", "single.png")
    assert np.array_equal(pixels("single.png"), pixels("t/3.png"))  # rank 1 made it, identically
