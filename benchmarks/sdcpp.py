"""latentgen against stable-diffusion.cpp's `sd-cli` on the same file (issue 16 §1, §5).

    python benchmarks/sdcpp.py --dry-run          # print every command it would run; touches nothing
    python benchmarks/sdcpp.py                    # fetch + build sd-cli once (cached), then measure
    python benchmarks/bench.py                    # the same, as one section of the whole benchmark

sd-cli is built from the stable-diffusion.cpp sources vendored in the `stable-diffusion-cpp-python` sdist from
PyPI (`pip download --no-binary :all: --no-deps`), with cmake + ninja and `-DGGML_NATIVE=ON`, in a cache folder
outside the repository (default `$XDG_CACHE_HOME/latentgen-bench/sdcpp`, reused between runs; a few minutes on 2
cores). Then, on the random fp16 SD 1.5-size file bench.py makes, each job in its own process (time and peak RSS
from os.wait4), alternating: sd-cli at the file's own type (f16), `--type q8_0` and `--type f32`, and latentgen
`--dtype auto`, `--dtype fp32`, `--dtype fp32 --weights int8` and `--dtype fp32 --low-memory`; 256², 2 steps
DPM++ 2M (sd.cpp's default discrete σ schedule, so latentgen `--no-karras`), CFG 7.5, `-t` = cores.
Ratios are latentgen / sd.cpp of the medians. `--jobs` picks runs by name, `--model` another file (SDXL too):

    python benchmarks/sdcpp.py --model benchmarks/.cache/sdxl-base-random-fp16.safetensors --size 1024 --reps 1 \
        --jobs "sd.cpp f16,latentgen fp32,sd.cpp q8_0,latentgen int8"
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDIST = "stable-diffusion-cpp-python"
SD_TYPES = ("f16", "q8_0", "f32")  # f16: the file's own type (no --type)
LATENTGEN_RUNS = {
    "auto": ["--dtype", "auto"],
    "fp32": ["--dtype", "fp32"],
    "int8": ["--dtype", "fp32", "--weights", "int8"],
    "low-memory": ["--dtype", "fp32", "--low-memory"],
}
PROMPT, NEGATIVE, SEED = "a photograph of an astronaut riding a horse", "blurry", 1234


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentgen-bench" / "sdcpp"


def fetch_command(cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        SDIST,
        "--no-binary",
        ":all:",
        "--no-deps",
        "-d",
        str(cache / "sdist"),
    ]


def build_commands(src: Path, build: Path) -> list[list[str]]:
    configure = [
        "cmake",
        "-S",
        str(src),
        "-B",
        str(build),
        "-G",
        "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DSD_BUILD_EXAMPLES=ON",
        "-DBUILD_SHARED_LIBS=OFF",
    ]
    return [configure, ["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2)]]


def sd_command(binary: Path, model: Path, out: Path, sd_type: str, size: int, steps: int, threads: int) -> list[str]:
    cmd = [
        str(binary),
        "-m",
        str(model),
        "-p",
        PROMPT,
        "-n",
        NEGATIVE,
        "--sampling-method",
        "dpm++2m",
        "--cfg-scale",
        "7.5",
        "-W",
        str(size),
        "-H",
        str(size),
        "--steps",
        str(steps),
        "-s",
        str(SEED),
        "-t",
        str(threads),
        "-o",
        str(out),
    ]
    return cmd + ([] if sd_type == "f16" else ["--type", sd_type])


def latentgen_command(model: Path, out: Path, run: str, size: int, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "latentgen.cli",
        "txt2img",
        PROMPT,
        "--negative",
        NEGATIVE,
        "--model",
        str(model),
        "--sampler",
        "dpmpp_2m",
        "--no-karras",
        "--cfg",
        "7.5",
        "--width",
        str(size),
        "--height",
        str(size),
        "--steps",
        str(steps),
        "--seed",
        str(SEED),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        *LATENTGEN_RUNS[run],
    ]


def jobs(
    binary: Path, model: Path, cache: Path, size: int, steps: int, threads: int, only: list[str] | None = None
) -> dict[str, list[str]]:
    """Every measured job by name (or those named in `only`), in the order one round runs them, the two tools
    alternating."""
    sd = {f"sd.cpp {t}": sd_command(binary, model, cache / f"sd-{t}.png", t, size, steps, threads) for t in SD_TYPES}
    lg = {f"latentgen {r}": latentgen_command(model, cache / f"lg-{r}.png", r, size, steps) for r in LATENTGEN_RUNS}
    out = {}  # the tools interleaved: sd.cpp f16, latentgen auto, sd.cpp q8_0, latentgen fp32, ...
    for pair in itertools.zip_longest(sd.items(), lg.items()):
        out.update(item for item in pair if item is not None)
    if only:
        unknown = sorted(set(only) - set(out))
        if unknown:
            raise SystemExit(f"--jobs: unknown {', '.join(unknown)}; known: {', '.join(out)}")
        out = {name: cmd for name, cmd in out.items() if name in only}
    return out


def vendored_source(cache: Path) -> Path:
    """Unpack the sdist once; its vendor/stable-diffusion.cpp folder is the source tree."""
    archives = sorted((cache / "sdist").glob(f"{SDIST.replace('-', '_')}-*.tar.gz")) + sorted(
        (cache / "sdist").glob(f"{SDIST}-*.tar.gz")
    )
    if not archives:
        raise SystemExit(f"no {SDIST} sdist in {cache / 'sdist'}: the download failed")
    root = cache / "src" / archives[-1].name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(archives[-1]) as tar:
            tar.extractall(root.parent, filter="data")
    src = root / "vendor" / "stable-diffusion.cpp"
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"{root}: no vendor/stable-diffusion.cpp/CMakeLists.txt in the sdist")
    return src


def find_binary(build: Path) -> Path | None:
    for name in ("sd-cli", "sd"):
        for cand in (build / "bin" / name, *build.rglob(name)):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
    return None


def ensure_sd_cli(cache: Path, log=print) -> Path:
    """sd-cli from the cache, else downloaded and built there."""
    build = cache / "build"
    binary = find_binary(build) if build.exists() else None
    if binary:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    log("$ " + shlex.join(fetch_command(cache)))
    subprocess.run(fetch_command(cache), check=True)
    for cmd in build_commands(vendored_source(cache), build):
        log("$ " + shlex.join(cmd))
        subprocess.run(cmd, check=True)
    binary = find_binary(build)
    if binary is None:
        raise SystemExit(f"the build in {build} made no sd-cli (or sd) executable")
    return binary


def measure(
    model: Path, cache: Path, size: int, steps: int, reps: int, threads: int, log=print, only: list[str] | None = None
) -> dict:
    """Median wall time and peak RSS of each job over `reps` alternating rounds, plus latentgen / sd.cpp ratios."""
    from bench import run_measured  # one process per job, its own peak RSS

    binary = ensure_sd_cli(cache, log)
    todo = jobs(binary, model, cache, size, steps, threads, only)
    runs: dict[str, list[dict]] = {name: [] for name in todo}
    for r in range(reps):
        for name, cmd in todo.items():
            res = run_measured(cmd, env={"OMP_NUM_THREADS": str(threads)} if name.startswith("latentgen") else None)
            log(f"  {name} round {r}: {res['wall_s']:.1f} s, {res['rss_gib']:.2f} GiB, load {res['load']}")
            runs[name].append(res)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "rss_gib")} for n, rs in runs.items()}
    return {"binary": str(binary), "median": med, "load": [x["load"] for rs in runs.values() for x in rs]}


def table_rows(result: dict) -> list[list[str]]:
    """One row per latentgen run: time and peak RSS against each sd.cpp type."""
    med = result["median"]
    rows = []
    for run in LATENTGEN_RUNS:
        lg = med.get(f"latentgen {run}")
        if lg is None:
            continue
        row = [f"latentgen {run}", f"{lg['wall_s']:.1f}", f"{lg['rss_gib']:.2f}"]
        for t in SD_TYPES:
            sd = med.get(f"sd.cpp {t}")
            row.append(f"{lg['wall_s'] / sd['wall_s']:.2f} / {lg['rss_gib'] / sd['rss_gib']:.2f}" if sd else "—")
        rows.append(row)
    for t in SD_TYPES:
        sd = med.get(f"sd.cpp {t}")
        if sd:
            rows.append([f"sd.cpp {t}", f"{sd['wall_s']:.1f}", f"{sd['rss_gib']:.2f}", "—", "—", "—"])
    return rows


HEADER = ["run", "wall s", "peak RSS GiB", *(f"time / RSS vs sd.cpp {t}" for t in SD_TYPES)]


def dry_run(
    model: Path, cache: Path, size: int, steps: int, reps: int, threads: int, only: list[str] | None = None
) -> list[str]:
    """The commands a real run would execute, one per line (build steps only if sd-cli is not cached)."""
    build = cache / "build"
    binary = (find_binary(build) if build.exists() else None) or build / "bin" / "sd-cli"
    lines = []
    if not binary.exists():
        src = cache / "src" / f"{SDIST}-VERSION" / "vendor" / "stable-diffusion.cpp"
        lines += [shlex.join(fetch_command(cache)), *(shlex.join(c) for c in build_commands(src, build))]
    for r in range(reps):
        lines += [f"# round {r}"] + [
            shlex.join(c) for c in jobs(binary, model, cache, size, steps, threads, only).values()
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SD 1.5 single file (default: bench.py's random fp16 one)")
    ap.add_argument("--cache", default=None, help="where sd-cli is built and kept (default: outside the repo)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--jobs", default=None, help="comma list of job names, e.g. 'sd.cpp f16,latentgen fp32' (default: all)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands; download, build and run nothing")
    a = ap.parse_args()
    only = [j.strip() for j in a.jobs.split(",") if j.strip()] if a.jobs else None
    cache = Path(a.cache) if a.cache else default_cache()
    model = Path(a.model) if a.model else HERE / ".cache" / "sd15-random-fp16.safetensors"
    if a.dry_run:
        print("\n".join(dry_run(model, cache, a.size, a.steps, a.reps, a.threads, only)))
        return
    if not model.exists():
        from bench import make_sd15_file

        model.parent.mkdir(parents=True, exist_ok=True)
        make_sd15_file(model)
    result = measure(
        model, cache, a.size, a.steps, a.reps, a.threads, log=lambda s: print(s, file=sys.stderr), only=only
    )
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for row in table_rows(result):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
