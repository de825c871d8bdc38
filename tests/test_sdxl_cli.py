"""SDXL through the command line: txt2img with size conditioning and the bit-exact --recipe, the base +
refiner ensemble, img2img with a refiner alone, encode / decode, the 1024² default, and bad SDXL options
(one line on stderr, exit 2, nothing written)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_reference import (
    BASE,
    SDXL_DIR,
    base_components,
    inpaint_single_file,
    refiner_single_file,
    save_folder,
    tiny_refiner_unet,
)
from typer.testing import CliRunner

from latentgen import pipelines
from latentgen.cli.app import app
from latentgen.cli.session import Session
from latentgen.images import read_png_text, to_pil
from latentgen.loading.bundle import load_model
from latentgen.loading.weights import prepack
from latentgen.pipelines import Settings

pytestmark = [
    pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_pipelines import _scheduler

    c = base_components()
    parts = dict(
        unet=tiny_refiner_unet(), vae=c["vae"], text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"]
    )
    folder = tmp_path_factory.mktemp("refiner") / "refiner"
    return str(save_folder(parts, folder, _scheduler("euler", False, "epsilon"), requires_aesthetics_score=True))


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    """The tiny refiner as an original single file (sd_xl_refiner's layout), read from the file alone."""
    pytest.importorskip("diffusers")
    return str(refiner_single_file(tiny_refiner_unet(), tmp_path_factory.mktemp("refiner") / "refiner.safetensors"))


def packed(path):
    """The bundle as the CLI runs it on the CPU in fp32 (convolutions prepacked), for bit-exact comparisons."""
    bundle = load_model(path)
    for m in (bundle.unet, bundle.first_stage):
        prepack(m)
    return bundle


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def as_png_pixels(img: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(img))


COMMON = ["--model", str(BASE), "--dtype", "fp32", "--steps", 3, "--width", 72, "--height", 40]


def test_txt2img_with_size_conditioning_and_bit_exact_recipe():
    args = ["txt2img", "a red cube", *COMMON, "--original-size", "500,300", "--crop", "8,4", "--seed", 5]
    r = cli(*args, "--no-karras", "--out", "a.png")
    assert r.exit_code == 0, r.stderr
    st = Settings(steps=3, karras=False, cfg=5.0, original_size=(500, 300), crop=(8, 4))
    want = pipelines.txt2img(packed(str(BASE)), ["a red cube"], [""], [5], 72, 40, st)[0]
    assert np.array_equal(pixels("a.png"), as_png_pixels(want))
    recipe = json.loads(read_png_text("a.png")["latentgen"])
    assert recipe["sdxl"]["original_size"] == [500, 300] and recipe["sdxl"]["crop"] == [8, 4]
    assert recipe["cfg"] == 5.0  # the model's recommendation
    r2 = cli("txt2img", "--recipe", "a.png", "--out", "b.png")
    assert r2.exit_code == 0, r2.stderr
    assert np.array_equal(pixels("a.png"), pixels("b.png"))


def test_batch_items_override_size_conditioning():
    lines = '{"prompt": "a", "original_size": [500, 300], "out": "p.png"}\n{"prompt": "a", "out": "q.png"}\n'
    r = CliRunner().invoke(app, ["txt2img", "-", *map(str, COMMON), "--seed", 1], input=lines)
    assert r.exit_code == 0, r.stderr
    assert json.loads(read_png_text("p.png")["latentgen"])["sdxl"]["original_size"] == [500, 300]
    assert json.loads(read_png_text("q.png")["latentgen"])["sdxl"]["original_size"] is None
    assert not np.array_equal(pixels("p.png"), pixels("q.png"))


def test_default_size_is_1024():
    bundle = load_model(str(BASE))
    assert Session.size(SimpleNamespace(bundle=bundle), None, None) == (1024, 1024)


def test_refiner_ensemble_and_refiner_alone(refiner_dir):
    r = cli(
        "txt2img", "a fox", *COMMON, "--seed", 2, "--refiner", refiner_dir, "--refiner-start", 0.6, "--out", "e.png"
    )
    assert r.exit_code == 0, r.stderr
    st = Settings(steps=3, cfg=5.0)
    base, ref = packed(str(BASE)), packed(refiner_dir)
    want = pipelines.txt2img(base, ["a fox"], [""], [2], 72, 40, st, refiner=ref, refiner_start=0.6)[0]
    assert np.array_equal(pixels("e.png"), as_png_pixels(want))
    assert json.loads(read_png_text("e.png")["latentgen"])["refiner_start"] == 0.6
    r = cli(
        "img2img",
        "e.png",
        "a fox",
        "--model",
        refiner_dir,
        "--dtype",
        "fp32",
        "--steps",
        4,
        "--strength",
        0.5,
        "--aesthetic-score",
        7.5,
        "--seed",
        3,
        "--out",
        "r.png",
    )
    assert r.exit_code == 0, r.stderr
    img = torch.from_numpy(pixels("e.png")).permute(2, 0, 1)[None].float() / 255
    st = Settings(steps=4, cfg=5.0, strength=0.5, aesthetic_score=7.5)
    want = pipelines.img2img(ref, img, ["a fox"], [""], [3], st)[0]
    assert np.array_equal(pixels("r.png"), as_png_pixels(want))


def test_refiner_stays_loaded_for_a_batch(refiner_file, monkeypatch):
    """A 2-item JSON-lines batch with --refiner (a single file): the base and the refiner are each loaded once,
    and every item gets the ensemble's image."""
    from latentgen.loading import bundle as bundle_mod

    loads = []
    real = bundle_mod.bundle_from_raw
    monkeypatch.setattr(bundle_mod, "bundle_from_raw", lambda raw, **kw: loads.append(raw.path) or real(raw, **kw))
    lines = '{"prompt": "a fox", "out": "p.png"}\n{"prompt": "a cat", "out": "q.png"}\n'
    args = ["txt2img", "-", *map(str, COMMON), "--seed", 4, "--refiner", refiner_file, "--refiner-start", 0.6]
    r = CliRunner().invoke(app, [str(a) for a in args], input=lines)
    assert r.exit_code == 0, r.stderr
    assert sorted(loads) == sorted([str(BASE), refiner_file])
    st = Settings(steps=3, cfg=5.0)
    base, ref = packed(str(BASE)), packed(refiner_file)
    want = pipelines.txt2img(base, ["a cat"], [""], [5], 72, 40, st, refiner=ref, refiner_start=0.6)[0]
    assert np.array_equal(pixels("q.png"), as_png_pixels(want))
    assert json.loads(read_png_text("q.png")["latentgen"])["refiner"] == refiner_file


def test_refiner_that_cannot_fit_is_one_line(refiner_file, monkeypatch):
    """Weights that cannot fit beside the base (a small memory limit), or a load that runs out of memory: one
    line naming --refiner and the way out, exit 2, nothing written."""
    from latentgen import memory
    from latentgen.loading import bundle as bundle_mod

    args = ["txt2img", "x", *COMMON, "--refiner", refiner_file, "--out", "o.png"]
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**20)
    r = cli(*args)
    monkeypatch.undo()
    real = bundle_mod.bundle_from_raw

    def oom(raw, **kw):
        if raw.path == refiner_file:
            raise MemoryError
        return real(raw, **kw)

    monkeypatch.setattr(bundle_mod, "bundle_from_raw", oom)
    r2 = cli(*args)
    for res, why in (
        (r, r"its weights take at least \d+ MiB, 1 MiB is available"),
        (r2, "loading it ran out of memory"),
    ):
        assert res.exit_code == 2, (res.stderr, res.exception)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(
            f"--refiner .*: not enough memory for the base and the refiner together \\({why}\\); run the base alone",
            lines[0],
        ), lines
        assert res.stdout == "" and not Path("o.png").exists()


def test_info_names_single_file_refiner_and_inpaint(refiner_file, tmp_path):
    inpaint = tmp_path / "inpaint.safetensors"
    inpaint_single_file(inpaint)
    for path, name, read in (
        (refiner_file, "sdxl-refiner", "read bigG text encoders, vector 1408, UNet in 4 channels"),
        (inpaint, "sdxl-inpaint", "read CLIP-L + bigG text encoders, vector 1664, UNet in 9 channels"),
        (BASE, "sdxl-base", "read CLIP-L + bigG text encoders, vector 1664, UNet in 4 channels"),
    ):
        r = cli("info", path)
        assert r.exit_code == 0, r.stderr
        family = next(line for line in r.stdout.splitlines() if line.startswith("family"))
        assert f"sdxl ({name}: {read}; assumed 64 channels per head, eps prediction" in family, family
        assert json.loads(cli("info", path, "--json").stdout)["variant"] == name


def test_inpaint_from_single_file():
    """`latentgen inpaint --model FILE` on the SDXL inpainting single file (9-channel UNet, read from the file
    alone) gives pipelines.inpaint's image (itself = diffusers' StableDiffusionXLInpaintPipeline)."""
    inpaint_single_file(Path("inpaint.safetensors"))
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)).save("in.png")
    mask = np.zeros((40, 72), dtype=np.uint8)
    mask[8:32, 16:56] = 255
    Image.fromarray(mask).save("mask.png")
    r = cli(
        "inpaint",
        "in.png",
        "a hat",
        "--mask",
        "mask.png",
        "--model",
        "inpaint.safetensors",
        "--dtype",
        "fp32",
        "--steps",
        3,
        "--seed",
        6,
        "--out",
        "o.png",
    )
    assert r.exit_code == 0, r.stderr
    img = torch.from_numpy(pixels("in.png")).permute(2, 0, 1)[None].float() / 255
    m = torch.from_numpy(mask)[None, None].float() / 255
    want = pipelines.inpaint(
        packed("inpaint.safetensors"), img, m, ["a hat"], [""], [6], Settings(steps=3, cfg=5.0, strength=1.0)
    )
    assert np.array_equal(pixels("o.png"), as_png_pixels(want[0]))


def test_encode_decode_round_trip():
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8)).save("in.png")
    r = cli("encode", "in.png", "--model", str(BASE), "--out", "z.safetensors")
    assert r.exit_code == 0, r.stderr
    from safetensors import safe_open

    with safe_open("z.safetensors", "pt") as f:
        assert float(f.metadata()["scale_factor"]) == pytest.approx(0.13025)
        assert tuple(f.get_tensor(f.keys()[0]).shape) == (1, 4, 5, 9)
    r = cli("decode", "z.safetensors", "--model", str(BASE), "--out", "d.png")
    assert r.exit_code == 0, r.stderr
    assert pixels("d.png").shape == (40, 72, 3)


BAD = {
    "original size": (["--original-size", "5"], "--original-size must be W,H"),
    "crop": (["--crop", "a,b"], "--crop must be X,Y"),
    "size step": (["--width", 60], "--width 60"),
    "refiner start alone": (["--refiner-start", 0.5], "--refiner-start needs --refiner"),
    "refiner start range": (["--refiner", str(BASE), "--refiner-start", 1.5], "--refiner-start must be in (0, 1)"),
    "refiner is a base": (["--refiner", str(BASE)], "not an SDXL refiner"),
    "refiner with hires": (["--refiner", str(BASE), "--hires", 2], "--refiner and --hires"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sdxl_options_are_one_line_and_exit_2(case):
    extra, needle = BAD[case]
    r = cli("txt2img", "x", "--model", str(BASE), "--steps", 1, *extra)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: error:") and needle in lines[0], r.stderr
    assert r.stdout == "" and not list(Path(".").glob("out/*"))


def test_sdxl_options_refused_for_other_families(fixtures_dir):
    r = cli("txt2img", "x", "--model", str(fixtures_dir / "sd1-tiny.safetensors"), "--target-size", "64,64")
    assert r.exit_code == 2 and "--target-size: SDXL options" in r.stderr
