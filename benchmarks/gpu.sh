#!/usr/bin/env bash
# GPU check for issue 5 — prepared, NOT yet run (the task that wrote it had no GPU).
# One short script for a lent machine (about 15 min of device time in all): builds the random SD 1.5-size
# weights if absent, then times latentgen vs diffusers, alternating, in fp16 on CUDA:
#   UNet CFG step (batch 2, 64x64 latent), VAE decode 512x512, peak CUDA memory, max pixel difference.
# Usage (repository root): bash benchmarks/gpu.sh [OUTDIR]   -> OUTDIR/gpu-results.json
set -euo pipefail
OUT="${1:-${OUT:-/tmp/gpu-bench}}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
CACHE="${LATENTGEN_BENCH_CACHE:-benchmarks/.cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 540 "$PY" - "$CACHE" "$OUT" <<'EOF'
import json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
import bench

cache, out = Path(sys.argv[1]), Path(sys.argv[2])
cache.mkdir(parents=True, exist_ok=True)
src, df = bench.make_sd15(cache)
dev, dt = "cuda", torch.float16
torch.set_grad_enabled(False)

def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 64, 64, generator=g).to(dev, dt)
ctx = torch.randn(2, 77, 768, generator=g).to(dev, dt)
t = torch.tensor([500.0, 500.0], device=dev)
z = torch.randn(1, 4, 64, 64, generator=g).to(dev, dt)
res = {}
for rnd in range(2):  # alternate the tools twice
    for tool in ("latentgen", "diffusers"):
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        if tool == "latentgen":
            from latentgen.checkpoint import load_model
            b = load_model(str(src), device=dev, dtype=dt)
            unet = lambda: b.unet(x, t, context=ctx)
            dec = lambda: b.first_stage.decode_latent(z)
        else:
            p = bench.load_diffusers(str(df), dt).to(dev)
            unet = lambda: p.unet(x, t, encoder_hidden_states=ctx).sample
            dec = lambda: p.vae.decode(z).sample
        r = res.setdefault(tool, {"unet_s": [], "decode_s": []})
        r["unet_s"].append(timed(unet)); r["decode_s"].append(timed(dec, 3))
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        r["unet_out"] = unet().float().cpu()
        del unet, dec
        b = p = None
diff = (res["latentgen"].pop("unet_out") - res["diffusers"].pop("unet_out")).abs().max().item()
summary = {k: {"unet_s": min(v["unet_s"]), "decode_s": min(v["decode_s"]), "peak_gib": v["peak_gib"]} for k, v in res.items()}
summary["ratio_unet"] = summary["latentgen"]["unet_s"] / summary["diffusers"]["unet_s"]
summary["ratio_decode"] = summary["latentgen"]["decode_s"] / summary["diffusers"]["decode_s"]
summary["unet_max_abs_diff_fp16"] = diff
summary["device"] = torch.cuda.get_device_name()
print(json.dumps(summary, indent=1))
(out / "gpu-results.json").write_text(json.dumps(summary, indent=1))
EOF
