#!/usr/bin/env bash
# GPU benchmark for issue 5: one short script for a lent CUDA machine (fits in about 4 minutes).
# Builds random SD 1.5-size weights (fp16 single file + the diffusers folder made by diffusers' converters) if
# absent, then times latentgen and diffusers in the same process, alternating (two rounds each), in fp16:
#   load, UNet CFG step (batch 2, 64x64 latent, 77-token context), VAE decode 512x512, txt2img end to end
#   (20 steps DPM++ 2M Karras, CFG 7.5, 512x512), peak CUDA memory, and latentgen's UNet in channels_last.
# Usage (repository root): bash benchmarks/gpu.sh [OUTDIR]   -> OUTDIR/gpu-results.json (and stdout)
# Needs diffusers importable and LATENTGEN_FIXTURES pointing at a folder with sd15-keys.json (default
# ../shared/fixtures).
set -euo pipefail
OUT="${1:-${OUT:-/tmp/gpu-bench}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
CACHE="${LATENTGEN_BENCH_CACHE:-benchmarks/.cache}"
# GPU_BENCH_DEVICE=cpu GPU_BENCH_TINY=1: a dry run of this script on a CPU with the tiny SD1-like model
[ "${GPU_BENCH_DEVICE:-cuda}" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" - "$CACHE" "$OUT" <<'EOF'
import json, os, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
import bench

cache, out = Path(sys.argv[1]), Path(sys.argv[2])
cache.mkdir(parents=True, exist_ok=True)
t = time.perf_counter()
tiny = os.environ.get("GPU_BENCH_TINY") == "1"
src, df = bench.make_tiny(cache) if tiny else bench.make_sd15(cache)
print(f"weights ready in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
dev = os.environ.get("GPU_BENCH_DEVICE", "cuda")
dt = torch.float16 if dev == "cuda" else torch.float32
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
ctx_dim, size = (48, 64) if tiny else (768, 512)
torch.set_grad_enabled(False)


def timed(fn, reps=5):
    fn(); sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 64, 64, generator=g).to(dev, dt)
ctx = torch.randn(2, 77, ctx_dim, generator=g).to(dev, dt)
tt = torch.tensor([500.0, 500.0], device=dev)
z = torch.randn(1, 4, 64, 64, generator=g).to(dev, dt)
res = {}
for rnd in range(2):  # alternate the tools twice
    for tool in ("latentgen", "diffusers"):
        if cuda:
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        r = res.setdefault(tool, {"load_s": [], "unet_s": [], "decode_s": [], "e2e_s": []})
        t0 = time.perf_counter()
        if tool == "latentgen":
            from latentgen import pipelines
            from latentgen.loading.bundle import load_model
            b = load_model(str(src), device=dev, dtype=dt)
            unet = lambda: b.unet(x, tt, context=ctx)
            dec = lambda: b.first_stage.decode_latent(z)
            st = pipelines.Settings(steps=20, sampler="dpmpp_2m", karras=True, spacing="leading", cfg=7.5)
            e2e = lambda: pipelines.txt2img(b, [bench.PROMPT], [bench.NEGATIVE], [bench.SEED], size, size, st)
        else:
            p = bench.load_diffusers(str(df), dt).to(dev)
            p.set_progress_bar_config(disable=True)
            unet = lambda: p.unet(x, tt, encoder_hidden_states=ctx).sample
            dec = lambda: p.vae.decode(z).sample
            gen = torch.Generator().manual_seed(bench.SEED)
            e2e = lambda: p(bench.PROMPT, negative_prompt=bench.NEGATIVE, num_inference_steps=20, guidance_scale=7.5,
                            height=size, width=size, generator=gen, output_type="pt").images
        sync(); r["load_s"].append(time.perf_counter() - t0)
        r["unet_s"].append(timed(unet)); r["decode_s"].append(timed(dec, 3)); r["e2e_s"].append(timed(e2e, 2))
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        r["unet_out"] = unet().float().cpu()
        if tool == "latentgen":
            b.unet.to(memory_format=torch.channels_last)
            r.setdefault("unet_cl_s", []).append(timed(unet))
            if cuda:  # the CFG step replayed as one CUDA graph (issue 16 §4: the step is launch-bound at batch 2)
                try:
                    sx, stt, sctx = x.clone(), tt.clone(), ctx.clone()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            b.unet(sx, stt, context=sctx)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        sout = b.unet(sx, stt, context=sctx)
                    r.setdefault("unet_graph_s", []).append(timed(graph.replay))
                    graph.replay(); sync()
                    r["graph_max_abs_diff"] = (sout.float() - unet().float()).abs().max().item()
                    del graph, sout
                except Exception as e:  # reported, the rest of the benchmark goes on
                    r["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        print(tool, {k: v[-1] for k, v in r.items() if isinstance(v, list)}, file=sys.stderr, flush=True)
        del unet, dec, e2e
        b = p = None
diff = (res["latentgen"].pop("unet_out") - res["diffusers"].pop("unet_out")).abs().max().item()
summary = {k: {m: (min(v[m]) if isinstance(v[m], list) else v[m]) for m in v} for k, v in res.items()}
lg, dfs = summary["latentgen"], summary["diffusers"]
summary["ratio_unet"] = lg["unet_s"] / dfs["unet_s"]
summary["ratio_unet_channels_last"] = lg["unet_cl_s"] / dfs["unet_s"]
if "unet_graph_s" in lg:
    summary["ratio_unet_cuda_graph"] = lg["unet_graph_s"] / dfs["unet_s"]
summary["ratio_decode"] = lg["decode_s"] / dfs["decode_s"]
summary["ratio_e2e"] = lg["e2e_s"] / dfs["e2e_s"]
summary["cfg_steps_per_s"] = {"latentgen": 1 / lg["unet_s"], "diffusers": 1 / dfs["unet_s"]}
summary["unet_max_abs_diff_fp16"] = diff
summary["device"] = torch.cuda.get_device_name() if cuda else "cpu"
summary["torch"] = torch.__version__
print(json.dumps(summary, indent=1))
(out / "gpu-results.json").write_text(json.dumps(summary, indent=1))
EOF
# SDXL base size (issue 13): GPU_BENCH_SDXL=1 bash benchmarks/gpu.sh -> OUTDIR/sdxl-results.md (random full-size
# SDXL weights, about 7 GB of fp16 in the cache, built on first use; fp16 and bf16; 20 steps at 1024x1024)
if [ "${GPU_BENCH_SDXL:-0}" = 1 ]; then
  "$PY" benchmarks/bench_sdxl.py --device "${GPU_BENCH_DEVICE:-cuda}" --dtypes float16,bfloat16 --steps 20 --reps 3 \
    --cache "$CACHE" --out "$OUT/sdxl-results.md"
fi
