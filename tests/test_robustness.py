"""The hostile-input catalogue (issue 15): files, images, options, JSON lines and faults, each run through the real
CLI on tiny random models (2 steps, 16×16). Every case asserts the exit code, the shape of stderr (one line that
names the culprit, never a traceback) and that no partial or temporary file is left behind.

Exit codes: 0 done, 1 some items failed (or the disk filled), 2 usage error, 70 internal error (a bug), 130 Ctrl-C,
143 SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_png import write_png, write_png_header
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from tiny_models import random_model
from typer.testing import CliRunner

from latentgen.cli import app

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {k: str(random_model(k, d / f"{k}.safetensors", seed=i)) for i, k in enumerate(("sd1", "inpaint", "sr"))}


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    monkeypatch.delenv("LATENTGEN_DEBUG", raising=False)
    return tmp_path


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


def cli(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_line(r, code: int, match: str) -> str:
    """Exit `code`, stderr exactly one `latentgen: error:` line containing `match`, no traceback."""
    err = r.stderr
    assert r.exit_code == code, (r.exit_code, err, r.exception)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: error: "), err
    assert match in lines[0], (match, lines[0])
    assert "Traceback" not in err
    return lines[0]


def image(path, size=(16, 16), seed=0, mode="RGB") -> str:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def recipe_png(path, **fields) -> str:
    info = PngInfo()
    info.add_itxt("latentgen", fields.pop("_raw", None) or json.dumps({"task": "txt2img", "prompt": "x", **fields}))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return str(path)


def header_file(path, header: bytes, length: int | None = None, tail: bytes = b"\0" * 16) -> str:
    n = len(header) if length is None else length
    Path(path).write_bytes(n.to_bytes(8, "little") + header + tail)
    return str(path)


# ------------------------------------------------------------------------------------------- model files


def _model_cases(d: Path, models: dict) -> dict[str, tuple[str, str]]:
    """name → (model path, what the one line must say)."""
    good = Path(models["sd1"]).read_bytes()
    (d / "half.safetensors").write_bytes(good[: len(good) // 2])
    big = json.dumps({"w": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}})
    header_file(d / "claims100gb.safetensors", big.encode())
    header_file(d / "hugeheader.safetensors", b"{}", length=2**60)
    header_file(d / "notjson.safetensors", b"{not json!")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    save_file({"foo": torch.zeros(2)}, str(d / "nounet.safetensors"))
    torch.save({"state_dict": {"a": torch.zeros(1)}}, d / "model.ckpt")
    shutil.copy(d / "model.ckpt", d / "zip-in-disguise.safetensors")
    (d / "raw-pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    (d / "loop-a.safetensors").symlink_to(d / "loop-b.safetensors")
    (d / "loop-b.safetensors").symlink_to(d / "loop-a.safetensors")
    (d / "dangling.safetensors").symlink_to(d / "gone.safetensors")
    (d / "folder").mkdir()
    return {
        "missing": (str(d / "nope.safetensors"), "no such file"),
        "truncated": (str(d / "half.safetensors"), "half.safetensors"),
        "claims 100 GB": (str(d / "claims100gb.safetensors"), "its header claims 100000000"),
        "header length 2**60": (str(d / "hugeheader.safetensors"), "its header claims"),
        "header not JSON": (str(d / "notjson.safetensors"), "damaged header"),
        "empty file": (str(d / "empty.safetensors"), "too short for a header"),
        "random bytes": (str(d / "noise.safetensors"), "not a readable safetensors file"),
        "no UNet keys": (str(d / "nounet.safetensors"), "no model.diffusion_model.* keys"),
        "pickle .ckpt": (str(d / "model.ckpt"), "pickle checkpoints are refused"),
        "zip pickle named .safetensors": (str(d / "zip-in-disguise.safetensors"), "pickle checkpoints are refused"),
        "raw pickle named .safetensors": (str(d / "raw-pickle.safetensors"), "pickle checkpoints are refused"),
        "symlink loop": (str(d / "loop-a.safetensors"), "a loop of symbolic links"),
        "dangling symlink": (str(d / "dangling.safetensors"), "broken symbolic link"),
        "folder without unet/": (str(d / "folder"), "folder"),
        "unknown registry name": ("no-such-model", "unknown model 'no-such-model'"),
    }


MODEL_CASES = [
    "missing",
    "truncated",
    "claims 100 GB",
    "header length 2**60",
    "header not JSON",
    "empty file",
    "random bytes",
    "no UNet keys",
    "pickle .ckpt",
    "zip pickle named .safetensors",
    "raw pickle named .safetensors",
    "symlink loop",
    "dangling symlink",
    "folder without unet/",
    "unknown registry name",
]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, models):
    return _model_cases(tmp_path_factory.mktemp("bad-models"), models)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_file(case, bad_models, workdir):
    path, say = bad_models[case]
    r = cli("txt2img", "x", "--model", path, "--seed", 1, "--out", "o.png")
    one_line(r, 2, say)
    assert files(workdir) == set()


def test_model_and_image_without_read_permission(models, workdir):
    """chmod 000: one line, exit 2. Root reads such files anyway, so as root the CLI runs in a user namespace
    (`unshare --user`: the same user without its capabilities), skipped where that is not allowed."""
    locked = workdir / "locked.safetensors"
    shutil.copy(models["sd1"], locked)
    img = Path(image(workdir / "locked.png"))
    for p in (locked, img):
        p.chmod(0)
    prefix = []
    if IS_ROOT:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode:
            pytest.skip("root reads unreadable files, and no user namespace is available to drop that")
        prefix = ["unshare", "--user"]
    base = [sys.executable, "-m", "latentgen.cli"]
    for args, say in (
        (["txt2img", "x", "--model", locked], "locked.safetensors: permission denied: make it readable"),
        (["img2img", img, "x", "--model", models["sd1"]], "locked.png: cannot read the image (permission denied)"),
    ):
        cmd = [*prefix, *base, *map(str, args), "--seed", "1", "--out", str(workdir / "o.png")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and say in lines[0], p.stderr
    assert files(workdir) == {"locked.safetensors", "locked.png"}


def test_config_file_missing(models, workdir):
    r = cli("txt2img", "x", "--model", models["sd1"], "--config", "nope.yaml", "--seed", 1, "--out", "o.png")
    one_line(r, 2, "nope.yaml")


# ------------------------------------------------------------------------------------------------ images


def _image_cases(d: Path) -> dict[str, tuple[list, str]]:
    """name → (img2img/inpaint arguments after the model, what the one line says)."""
    good = image(d / "good.png")
    data = (d / "good.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    (d / "junk.png").write_bytes(b"junk")
    write_png_header(d / "bomb.png", 30000, 30000)
    image(d / "odd.png", (15, 16))
    image(d / "small-mask.png", (8, 8), mode="L")
    (d / "dir.png").mkdir()
    recipe_png(d / "steps-many.png", steps="many", seed=1)
    recipe_png(d / "seed-abc.png", seed="abc")
    recipe_png(d / "cfg-nan.png", seed=1, _raw='{"task": "txt2img", "cfg": NaN, "seed": 1}')
    recipe_png(d / "damaged.png", _raw="{broken")
    recipe_png(d / "list.png", _raw="[1, 2]")
    Image.new("RGB", (16, 16)).save(d / "plain.png")
    return {
        "missing image": (["img2img", str(d / "nope.png"), "x"], "no such image file"),
        "truncated PNG": (["img2img", str(d / "trunc.png"), "x"], "not a readable image"),
        "junk bytes": (["img2img", str(d / "junk.png"), "x"], "not a readable image"),
        "decompression bomb": (["img2img", str(d / "bomb.png"), "x"], "image too large: 30000x30000, the limit is"),
        "image is a directory": (["img2img", str(d / "dir.png"), "x"], "is a directory"),
        "size not a multiple": (["img2img", str(d / "odd.png"), "x"], "is 15x16: both sides must be multiples"),
        "mask of another size": (
            ["inpaint", good, "x", "--mask", str(d / "small-mask.png")],
            "mask " + str(d / "small-mask.png") + " is 8x8",
        ),
        "mask missing": (["inpaint", good, "x", "--mask", str(d / "nope-mask.png")], "no such image file"),
        "mask a bomb": (["inpaint", good, "x", "--mask", str(d / "bomb.png")], "image too large"),
        "recipe steps many": (["txt2img", "--recipe", str(d / "steps-many.png")], 'recipe: "steps" must be an integer'),
        "recipe seed abc": (["txt2img", "--recipe", str(d / "seed-abc.png")], 'recipe: "seed" must be an integer'),
        "recipe cfg NaN": (["txt2img", "--recipe", str(d / "cfg-nan.png")], 'recipe: "cfg" must be a finite number'),
        "recipe damaged": (["txt2img", "--recipe", str(d / "damaged.png")], "damaged latentgen recipe"),
        "recipe not an object": (["txt2img", "--recipe", str(d / "list.png")], "not a JSON object"),
        "recipe absent": (["txt2img", "--recipe", str(d / "plain.png")], "has no latentgen recipe"),
        "recipe a bomb": (["txt2img", "--recipe", str(d / "bomb.png")], "image too large"),
    }


IMAGE_CASES = [
    "missing image",
    "truncated PNG",
    "junk bytes",
    "decompression bomb",
    "image is a directory",
    "size not a multiple",
    "mask of another size",
    "mask missing",
    "mask a bomb",
    "recipe steps many",
    "recipe seed abc",
    "recipe cfg NaN",
    "recipe damaged",
    "recipe not an object",
    "recipe absent",
    "recipe a bomb",
]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    return _image_cases(tmp_path_factory.mktemp("bad-images"))


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image(case, bad_images, models, workdir):
    args, say = bad_images[case]
    model = models["inpaint"] if args[0] == "inpaint" else models["sd1"]
    one_line(cli(*args, "--model", model, "--seed", 1, "--out", "o.png"), 2, say)
    assert files(workdir) == set()


def test_16_bit_and_exif_rotated_images_are_read_as_viewers_show_them(models, workdir):
    v = np.full((16, 16), 32896, dtype=np.uint16)  # mid-grey 128 in 16 bits
    write_png("g16.png", v)
    Image.new("RGB", (16, 16), (128, 128, 128)).save("g8.png")
    for name in ("g16", "g8"):
        r = cli("encode", f"{name}.png", "--out", f"{name}.safetensors", "--model", models["sd1"])
        assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    assert torch.equal(load_file("g16.safetensors")["latent"], load_file("g8.safetensors")["latent"])
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    Image.new("RGB", (32, 16), (200, 30, 30)).save("r.jpg", exif=exif)
    r = cli("encode", "r.jpg", "--out", "r.safetensors", "--model", models["sd1"])
    assert r.exit_code == 0, r.stderr
    assert tuple(load_file("r.safetensors")["latent"].shape[-2:]) == (16, 8)  # 32 high, 16 wide at f=2


# ----------------------------------------------------------------------------------------------- options

OPTION_CASES = {
    "--width 0": (["--width", "0"], "--width 0 is out of range: use 1..8192"),
    "--width 100000": (["--width", "100000"], "--width 100000 is out of range"),
    "--height -8": (["--height", "-8"], "--height -8 is out of range"),
    "--width 15": (["--width", "15"], "--width 15 is not a positive multiple of 2 (the first stage's factor): use 14"),
    "--steps 0": (["--steps", "0"], "--steps 0 is out of range: use 1..1000"),
    "--steps 100000": (["--steps", "100000"], "--steps 100000 is out of range"),
    "--cfg nan": (["--cfg", "nan"], "--cfg must be a finite number, not nan"),
    "--cfg inf": (["--cfg", "inf"], "--cfg must be a finite number, not inf"),
    "--cfg -inf": (["--cfg", "-inf"], "--cfg must be a finite number"),
    "--cfg -3": (["--cfg", "-3"], "--cfg -3 is out of range"),
    "--eta -1": (["--sampler", "ddim", "--eta", "-1"], "--eta -1 is out of range: use [0, 1]"),
    "--eta nan": (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number"),
    "--seed 2**70": (
        ["--seed", str(2**70)],
        "--seed 1180591620717411303424 is out of range: use 0..9223372036854775807",
    ),
    "--seed -5": (["--seed", "-5"], "or -1 for a random seed"),
    "--seed max + num": (["--seed", str(2**63 - 1), "--num", "2", "--out", "{index}.png"], "+ 2 images passes"),
    "--num 0": (["--num", "0"], "--num 0 is out of range: use 1..64"),
    "--num 1e9": (["--num", "1000000000"], "--num 1000000000 is out of range"),
    "--sampler magic": (["--sampler", "magic"], "--sampler must name a sampler: unknown sampler 'magic'"),
    "--spacing even": (["--spacing", "even"], "--spacing must be one of leading, trailing, linspace"),
    "--dtype int8": (["--dtype", "int8"], "--dtype must be one of auto"),
    "--device tpu": (["--device", "tpu"], "--device must be auto, cpu, cuda or mps"),
    "--out pattern field": (["--out", "{nope}.png"], "--out pattern '{nope}.png' is invalid"),
    "--out one name, 2 images": (["--num", "2"], "names one file but 2 images are made"),
    "memory: 64 of 8192²": (
        ["--num", "64", "--width", "8192", "--height", "8192", "--out", "{index}.png"],
        "64 images of 8192x8192 need about",
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option(case, models, workdir):
    extra, say = OPTION_CASES[case]
    args = ["txt2img", "x", "--model", models["sd1"], *extra]
    if "--seed" not in extra:
        args += ["--seed", "1"]
    if "--out" not in extra:
        args += ["--out", "o.png"]
    t0 = time.perf_counter()
    one_line(cli(*args), 2, say)
    assert files(workdir) == set()
    assert time.perf_counter() - t0 < 30  # refused before any large allocation


OTHER_OPTION_CASES = {
    "--strength 0": (["img2img", "{img}", "x", "--strength", "0"], "--strength 0 is out of range: use (0, 1]"),
    "--strength 2": (["img2img", "{img}", "x", "--strength", "2"], "--strength 2 is out of range"),
    "--mask-blur -1": (["inpaint", "{img}", "x", "--mask", "{img}", "--mask-blur", "-1"], "--mask-blur -1"),
    "--extend 1,2": (["inpaint", "{img}", "x", "--extend", "1,2"], "--extend must be four"),
    "--extend 100000": (["inpaint", "{img}", "x", "--extend", "100000,0,0,0"], "the limit is 8192 a side"),
    "--noise-level 5000": (["superres", "{low}", "--noise-level", "5000"], "--noise-level 5000 is out of range"),
    "--noise-level for LDM-SR": (["superres", "{low}", "--noise-level", "20"], "does not noise its low-res input"),
}


@pytest.mark.parametrize("case", list(OTHER_OPTION_CASES))
def test_bad_option_of_other_tasks(case, models, workdir):
    args, say = OTHER_OPTION_CASES[case]
    inputs = workdir.parent / f"{workdir.name}-in"
    inputs.mkdir()
    paths = {"img": image(inputs / "img.png"), "low": image(inputs / "low.png", (8, 8))}
    args = [a.format(**paths) if a.startswith("{") else a for a in args]
    model = {"img2img": "sd1", "inpaint": "inpaint", "superres": "sr"}[args[0]]
    one_line(cli(*args, "--model", models[model], "--seed", 1, "--out", "o.png"), 2, say)
    assert files(workdir) == set()


def test_out_is_an_existing_directory_even_with_overwrite(models, workdir):
    (workdir / "outdir").mkdir()
    for extra in ([], ["--overwrite"]):
        one_line(cli("txt2img", "x", "--model", models["sd1"], "--seed", 1, "--out", "outdir", *extra), 2, "directory")
    r = cli("encode", image("in.png"), "--out", "outdir", "--model", models["sd1"], "--overwrite")
    one_line(r, 2, "is a directory")
    assert files(workdir) == {"in.png"}


def test_existing_output_is_kept_without_overwrite(models, workdir):
    Path("o.png").write_bytes(b"precious")
    one_line(cli("txt2img", "x", "--model", models["sd1"], "--seed", 1, "--out", "o.png"), 2, "pass --overwrite")
    assert Path("o.png").read_bytes() == b"precious"


def test_seed_minus_one_is_random_and_reported(models, workdir):
    r = cli("txt2img", "x", "--model", models["sd1"], "--seed", -1, "--out", "o.png")
    assert r.exit_code == 0, r.stderr
    seed = int(r.stderr.split("seed ")[1].split()[0])
    assert json.loads(Image.open("o.png").text["latentgen"])["seed"] == seed != -1


# -------------------------------------------------------------------------------------------- JSON lines

BAD_LINES = {
    "seed abc": ('{"prompt": "a", "seed": "abc"}', 'stdin line 1: "seed" must be an integer'),
    "cfg high": ('{"prompt": "a", "cfg": "high"}', 'stdin line 1: "cfg" must be a number'),
    "num 1e9": ('{"prompt": "a", "num": 1e9}', 'stdin line 1: "num" 1000000000 is out of range: use 1..64'),
    "steps 0": ('{"steps": 0}', '"steps" 0 is out of range'),
    "width 0": ('{"width": 0}', '"width" 0 is out of range'),
    "cfg NaN": ('{"cfg": NaN}', '"cfg" must be a finite number'),
    "seed 2**70": ('{"seed": 1180591620717411303424}', '"seed" 1180591620717411303424 is out of range'),
    "prompt a number": ('{"prompt": 5}', '"prompt" must be a string'),
    "sampler unknown": ('{"sampler": "magic"}', '"sampler" must name a sampler'),
    "unknown key": ('{"prompt": "a", "colour": 1}', "unknown keys ['colour']"),
    "trailing data": ('{"prompt": "a"} {"seed": 2}', "bad JSON line (Extra data"),
    "broken JSON": ('{"prompt": ', "bad JSON line"),
    "memory": ('{"num": 64, "width": 8192, "height": 8192}', "64 images of 8192x8192 need about"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_json_line_fails_alone(case, models, workdir):
    line, say = BAD_LINES[case]
    stdin = f'{line}\n{{"prompt": "good"}}\n'
    r = cli("txt2img", "-", "--model", models["sd1"], "--seed", 1, "--out", "o/{index}.png", input=stdin)
    assert r.exit_code == 1, (r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: error: 0: ") and say in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout.split()
    assert len(out) == 1 and Path(out[0]).is_file() and files(workdir) == {out[0]}


def test_crlf_line_endings_are_stripped(models, workdir):
    r = cli(
        "txt2img", "-", "--model", models["sd1"], "--seed", 1, "--json", "--out", "{index}.png", input="a b\r\nc\r\n"
    )
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in recs] == ["a b", "c"]
    text = Image.open(recs[0]["path"]).text
    assert "\r" not in text["parameters"] and json.loads(text["latentgen"])["prompt"] == "a b"


def test_empty_stdin_is_a_usage_error(models, workdir):
    one_line(cli("txt2img", "-", "--model", models["sd1"], "--seed", 1, input="\n\r\n"), 2, "no prompts on stdin")


# ------------------------------------------------------------------------------------------------ faults


def test_internal_error_is_one_line_with_its_own_exit_code(models, workdir, monkeypatch):
    from latentgen import pipelines

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(pipelines, "txt2img", broken)
    r = cli("txt2img", "x", "--model", models["sd1"], "--seed", 1, "--out", "o.png")
    assert r.exit_code == 70
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("latentgen: internal error: AttributeError: 'NoneType' object has no attribute 'shape'")
    assert " at cli/generate.py:" in lines[0] and " in make " in lines[0] and "LATENTGEN_DEBUG=1" in lines[0]
    monkeypatch.setenv("LATENTGEN_DEBUG", "1")
    r = cli("txt2img", "x", "--model", models["sd1"], "--seed", 1, "--out", "o.png")
    assert r.exit_code == 70 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("latentgen: internal error: AttributeError")
    assert files(workdir) == set()


def test_full_disk_stops_the_batch_with_one_line(models, workdir, monkeypatch):
    """The disk fills while an image is written (simulated: the PNG writer raises ENOSPC): that item fails with one
    line, the batch stops (the next images would fail too), exit 1, nothing left behind."""
    import errno

    calls = []

    def full(self, fp, *a, **k):
        calls.append(fp)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    r = cli("txt2img", "-", "--model", models["sd1"], "--seed", 1, "--out", "o/{index}.png", input="a\nb\nc\n")
    assert r.exit_code == 1 and len(calls) == 1
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "No space left on device" in line[0] and "o/0.png" in line[0], r.stderr
    assert files(workdir) == set()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
        capture_output=True,
    )
    return p.returncode == 0


def test_full_disk_on_a_small_tmpfs(models, workdir):
    """A real full disk: a 64 KiB tmpfs, filled, in a user + mount namespace (skipped where that is not allowed).
    The image and a checkpoint written there fail with one line; the previous checkpoint stays intact."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user namespaces)")
    kept = f'from safetensors.torch import load_file as f; print("kept:", f("{mnt}/ckpt.safetensors")["a"].tolist())'
    script = f"""
set -u
mount -t tmpfs -o size=64k tmpfs {mnt}
{sys.executable} -c 'import torch; from latentgen.loading.safetensors import write_safetensors as w; \
w("{mnt}/ckpt.safetensors", {{"a": torch.ones(4)}}, {{}})'
cat /dev/zero > {mnt}/fill 2>/dev/null
{sys.executable} -m latentgen.cli txt2img - --model {models["sd1"]} --seed 1 --out '{mnt}/{{index}}.png' <<EOF
a
b
EOF
echo "rc=$?"
{sys.executable} -c 'import torch; from latentgen.loading.safetensors import write_safetensors as w; \
from latentgen.errors import OutputError
try:
    w("{mnt}/ckpt.safetensors", {{"a": torch.zeros(100000)}}, {{}})
except OutputError as e:
    print("ckpt:", e.fatal, e)'
{sys.executable} -c '{kept}'
ls -A {mnt}
"""
    p = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    out = p.stdout.splitlines()
    assert "rc=1" in out, (p.stdout, p.stderr)
    err = [x for x in p.stderr.splitlines() if x.startswith("latentgen:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in p.stderr, p.stderr
    assert any(x.startswith("ckpt: True cannot write") and "No space left on device" in x for x in out), out
    assert "kept: [1.0, 1.0, 1.0, 1.0]" in out
    assert out[-2:] == ["ckpt.safetensors", "fill"]  # no image, no temporary file


def _default_sigint() -> None:
    """In the child: Ctrl-C's default disposition. A test run launched in the background by a non-interactive shell
    inherits SIGINT ignored (POSIX), and the CLI, like any program, leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _batch(models, out_pattern: str, n: int, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "latentgen.cli", "txt2img", "-", "--model", models["sd1"], "--seed", "1"]
        + ["--out", out_pattern, "--width", "64", "--height", "64", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=_default_sigint,
    )


def _complete_pngs(folder: Path) -> list[Path]:
    pngs = sorted(folder.glob("*.png"))
    for p in pngs:
        with Image.open(p) as im:
            im.load()  # a partial file would fail here
    return pngs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT], ids=["TERM", "KILL", "INT"])
def test_signal_mid_batch(sig, models, workdir):
    """After the first image of a long batch: SIGTERM exits 143 and SIGINT 130 with one line, the image in flight
    discarded; SIGKILL leaves only complete images. Never a partial PNG or (TERM, INT) a temporary file."""
    p = _batch(models, str(workdir / "o" / "{index:03d}.png"), 200)
    p.stdin.write("".join(f"prompt {i}\n" for i in range(200)))
    p.stdin.close()
    first = p.stdout.readline()
    assert first.strip().endswith("000.png"), p.stderr.read()
    p.send_signal(sig)
    p.wait(timeout=60)
    rest, err = p.stdout.read(), p.stderr.read()
    pngs = _complete_pngs(workdir / "o")
    assert 1 <= len(pngs) < 200
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
        return
    assert p.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1] in (
        "latentgen: interrupted",
        "latentgen: terminated (SIGTERM): the image in progress was discarded",
    )
    assert [x.name for x in (workdir / "o").iterdir()] == [x.name for x in pngs]  # no temporary file
    assert len(pngs) == 1 + len(rest.split())  # every path printed is a complete image, and only those


def test_two_writers_to_one_file(models, workdir):
    """Two processes race for one --out name without --overwrite: one writes it, the other refuses (exit 2 before
    work, or 1 when the file appeared while it was writing); the file is one complete image."""
    procs = [_batch(models, str(workdir / "same.png"), 1) for _ in range(2)]
    for p in procs:
        p.stdin.write("x\n")
        p.stdin.close()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 1], [0, 2]), results
    loser = next(e for c, e in results if c)
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1 and "overwrite" in loser
    assert _complete_pngs(workdir) == [workdir / "same.png"] and files(workdir) == {"same.png"}


def test_nan_weights_warn_in_one_line_naming_the_tensors(models, workdir):
    from safetensors import safe_open

    with safe_open(models["sd1"], "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "first_stage_model.decoder.conv_out.bias"
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, "nan.safetensors", metadata=meta)
    r = cli("txt2img", "x", "--model", "nan.safetensors", "--seed", 1, "--out", "o.png")
    assert r.exit_code == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentgen: warning: the decoded image has NaN/Inf pixels"), lines
    assert f"1 weight tensor holds NaN/Inf: {key}" in lines[0] and "invalid value" not in r.stderr
