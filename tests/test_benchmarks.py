"""The benchmark harnesses run with one command; their dry runs say what they would run and touch nothing."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_sdcpp_dry_run_prints_fetch_build_and_alternating_runs(tmp_path):
    """Without a cached sd-cli: the sdist download (no binaries, no deps), cmake + ninja with GGML_NATIVE, then per
    round sd-cli at f16 / q8_0 / f32 and latentgen auto / fp32 / int8 / low-memory on the same file, same size, steps
    and seed."""
    cache, model = tmp_path / "cache", tmp_path / "m.safetensors"
    r = run(
        str(ROOT / "benchmarks" / "sdcpp.py"),
        "--dry-run",
        "--cache",
        str(cache),
        "--model",
        str(model),
        "--reps",
        "2",
        "--size",
        "256",
        "--steps",
        "2",
        "--threads",
        "2",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    cmds = [shlex.split(line) for line in lines if not line.startswith("#")]
    fetch = cmds[0]
    assert fetch[1:4] == ["-m", "pip", "download"] and "stable-diffusion-cpp-python" in fetch
    assert fetch[fetch.index("--no-binary") + 1] == ":all:" and "--no-deps" in fetch
    configure, build = cmds[1], cmds[2]
    assert configure[0] == "cmake" and configure[configure.index("-G") + 1] == "Ninja"
    assert "-DGGML_NATIVE=ON" in configure and configure[configure.index("-S") + 1].endswith("stable-diffusion.cpp")
    assert build[:2] == ["cmake", "--build"]
    runs = cmds[3:]
    assert [line for line in lines if line.startswith("#")] == ["# round 0", "# round 1"] and len(runs) == 14
    sd = [c for c in runs[:7] if c[0].endswith("sd-cli")]
    lg = [c for c in runs[:7] if "latentgen.cli" in c]
    assert [c[0].endswith("sd-cli") for c in runs[:7]] == [True, False, True, False, True, False, False]  # alternating
    assert [c[c.index("--type") + 1] if "--type" in c else "f16" for c in sd] == ["f16", "q8_0", "f32"]
    assert [c[c.index("--dtype") + 1] for c in lg] == ["auto", "fp32", "fp32", "fp32"]
    assert "int8" in lg[2] and "--low-memory" in lg[3]
    for c in sd:
        assert c[c.index("-m") + 1] == str(model) and c[c.index("--sampling-method") + 1] == "dpm++2m"
        assert (c[c.index("-W") + 1], c[c.index("--steps") + 1], c[c.index("-t") + 1]) == ("256", "2", "2")
    for c in lg:
        assert c[c.index("--model") + 1] == str(model) and c[c.index("--sampler") + 1] == "dpmpp_2m"
        assert (c[c.index("--width") + 1], c[c.index("--steps") + 1]) == ("256", "2")
    assert runs[7:] == runs[:7]
    assert not cache.exists() and not model.exists()


def test_sdcpp_jobs_picks_runs_by_name_and_refuses_unknown_ones(tmp_path):
    args = (str(ROOT / "benchmarks" / "sdcpp.py"), "--dry-run", "--cache", str(tmp_path / "c"), "--reps", "1")
    r = run(*args, "--jobs", "sd.cpp f16,latentgen low-memory", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = [
        shlex.split(line) for line in r.stdout.splitlines() if "--sampling-method" in line or "latentgen.cli" in line
    ]
    assert len(runs) == 2 and "--type" not in runs[0] and "--low-memory" in runs[1]
    r = run(*args, "--jobs", "sd.cpp f16,latentgen fast", cwd=tmp_path)
    assert r.returncode != 0 and "unknown latentgen fast" in r.stderr


def test_bench_dry_run_lists_the_sdcpp_section(tmp_path):
    # its own sd-cli cache: a machine that has built sd-cli before would list no build steps
    args = ("--dry-run", "--cache", str(tmp_path / "c"), "--sdcpp-cache", str(tmp_path / "s"))
    r = run(str(ROOT / "benchmarks" / "bench.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sd-cli" in r.stdout and "-DGGML_NATIVE=ON" in r.stdout and "attention.py" in r.stdout
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def bench_module(name: str):
    """benchmarks/NAME.py imported as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_benchmark_kernel_computes_attention(monkeypatch):
    """The blocked kernel the micro-benchmark times is softmax(Q Kᵀ/√d) V: against SDPA and the float64 formula,
    with a ragged last block (≤ 1e-5 relative)."""
    import torch
    import torch.nn.functional as F

    mod = bench_module("attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 40, generator=g) for _ in range(3))
    monkeypatch.setattr(mod, "BLOCK_BYTES", 6 * 64 * 300 * 4)  # 64-query blocks: 300 = 4 x 64 + 44
    got = mod.blocked_attention(q, k, v)
    d = q.double()
    want = torch.softmax(d @ k.double().transpose(-1, -2) / 40**0.5, -1) @ v.double()
    for ref in (F.scaled_dot_product_attention(q, k, v).double(), want):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_gpu_script_parses_and_its_latentgen_imports_resolve():
    """benchmarks/gpu.sh runs only on a lent GPU: its Python must at least parse, and every latentgen name it
    imports must exist (a module renamed since would cost the device time)."""
    import ast
    import importlib
    import re

    text = (ROOT / "benchmarks" / "gpu.sh").read_text()
    body = text.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    ast.parse(body)
    found = re.findall(r"^\s*from (latentgen[\w.]*) import ([\w, ]+)$", body, flags=re.M)
    assert found
    for module, names in found:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def test_in_process_ab_alternates_and_reports_ratios(monkeypatch):
    """benchmarks/unet_inproc.py: every function once per round, the order reversed each round, medians and ratios
    to the reference."""
    mod = bench_module("unet_inproc")
    order, clock = [], [0.0]
    cost = {"fast": 1.0, "ref": 2.0}

    def fn(name):
        def f():
            order.append(name)
            clock[0] += cost[name]

        return f

    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    out = mod.alternate({"fast": fn("fast"), "ref": fn("ref")}, 3, "ref", log=lambda _: None)
    assert order == ["fast", "ref", "ref", "fast", "fast", "ref"]
    assert out["wall_s"] == {"fast": 1.0, "ref": 2.0}
    assert out["ratio_wall"] == {"fast": 0.5, "ref": 1.0} and out["ratio_per_round"]["fast"] == 0.5
