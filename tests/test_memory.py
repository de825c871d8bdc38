"""The memory guard (latentgen.memory): the estimate against a measured peak, and refusal before any latent is
allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import random_model

from latentgen import memory, pipelines
from latentgen.errors import InputError
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import gc, json, sys, torch
torch.set_num_threads(1)
from latentgen import memory, pipelines
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings
b = load_model(sys.argv[1]); st = Settings(steps=1, sampler="euler")
pipelines.txt2img(b, ["a"], [""], [0], 16, 16, st)  # warm: kernels, allocator, oneDNN
gc.collect(); pipelines.release_free_memory()
def status(field):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident set
before = status("VmRSS")
n, side = int(sys.argv[2]), int(sys.argv[3])
pipelines.txt2img(b, ["a"] * n, [""] * n, list(range(n)), side, side, st)
peak = status("VmHWM") - before
est = memory.estimate(b.config, n, side, side, 4, tile=pipelines.AUTO_TILE)
print(json.dumps({"peak": peak, "estimate": est.total}))
"""


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return random_model("sd1", tmp_path_factory.mktemp("mem") / "sd1.safetensors")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_estimate_is_above_the_measured_peak_and_not_far(sd1):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    }
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, str(sd1), "2", "256"], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    # measured 107-253 MiB over runs (the allocator keeps a varying part of the warm-up run's memory), estimated
    # 409 MiB: an upper bound, and not far above (2.5x, or a fixed 384 MiB where the peak is small)
    assert r["peak"] <= r["estimate"] <= max(2.5 * r["peak"], r["peak"] + 384 * 2**20), r


def test_estimate_grows_with_every_dimension(sd1):
    cfg = load_model(str(sd1)).config

    def est(n=1, side=256, elem=4, guided=True):
        return memory.estimate(cfg, n, side, side, elem, tile=pipelines.AUTO_TILE, guided=guided).total

    assert est(2) > est(1) and est(side=512) > est() and est(elem=4) > est(elem=2) and est() > est(guided=False)
    e = memory.estimate(cfg, 1, 100000, 64, 4, tile=pipelines.AUTO_TILE)
    assert e.unet > 2**30 and e.first_stage < e.unet  # the first stage runs in tiles, the UNet whole


def test_a_job_that_cannot_fit_is_refused_before_any_latent(sd1, monkeypatch):
    b = load_model(str(sd1))
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 200 * 2**20)

    def no_noise(*a, **k):
        raise AssertionError("latents allocated before the memory check")

    monkeypatch.setattr(pipelines, "randn", no_noise)
    with pytest.raises(
        InputError, match=r"^4 images of 1024x1024 need about .* GiB of memory but 200 MiB is available"
    ):
        pipelines.txt2img(b, ["a"] * 4, [""] * 4, [0, 1, 2, 3], 1024, 1024, Settings(steps=2))
    import torch

    with pytest.raises(InputError, match="need about"):
        pipelines.img2img(b, torch.rand(4, 3, 1024, 1024), ["a"] * 4, [""] * 4, [0, 1, 2, 3], Settings(steps=2))
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 64 * 2**30)
    with pytest.raises(AssertionError, match="latents allocated"):  # fits: goes on to draw the noise
        pipelines.txt2img(b, ["a"], [""], [0], 16, 16, Settings(steps=2))


def test_available_memory_reads_this_machine():
    avail = memory.available_memory()
    assert avail is None or 0 < avail < 2**50


def test_weights_upcast_as_they_run_count_three_copies_of_the_largest(sd1, tmp_path, monkeypatch):
    """--low-memory (CPU fp32, an fp16 file) keeps the UNet's weights as stored: the guard adds three fp32 copies
    of its largest weight (upcast, oneDNN copy, packed reorder); with full weights nothing is added."""
    from latentgen.loading.bundle import save_model

    b32 = load_model(str(sd1))
    half = tmp_path / "half.safetensors"
    save_model(half, b32.config, b32.unet.half(), b32.first_stage.half(), b32.cond.half())
    largest = max(p.numel() for p in b32.unet.parameters())
    lean, full = load_model(str(half), low_memory=True), load_model(str(half), low_memory=False)
    assert memory.upcast_working_set(lean.unet, 4) == 3 * 4 * largest
    assert memory.upcast_working_set(full.unet, 4) == 0
    seen = []
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 0)
    monkeypatch.setattr(pipelines, "check_fits", lambda *a, **k: seen.append(k["upcast"]) or 0)
    for b in (lean, full):
        pipelines.guard_memory(b, 1, 16, 16, Settings(steps=1))
    assert seen == [3 * 4 * largest, 0]
