"""latentgen's UNet CFG call against diffusers' UNet2DConditionModel in ONE process, alternating (issue 16 §2).

    python benchmarks/unet_inproc.py                       # SD 1.5 size, 512², fp32, full weights and as stored
    python benchmarks/unet_inproc.py --rounds 10 --latent 64 --modes full

Whole-process benchmarks (bench.py) time one UNet call per process with `--quick`; on a noisy 2-core host single
calls in separate processes vary by ±15%, more than the difference being measured. Here both UNets are loaded from
the same random fp16 file (bench.py's cache: the file and its diffusers copy) into one process, fp32, batch 2, 77
tokens, and called in turn, the order reversed every round. Prints each round, then one JSON object: medians of
wall and process CPU time, their ratios to diffusers, the median of the per-round ratios, and the outputs' max
difference to diffusers'.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def alternate(fns: dict, rounds: int, ref: str, log=print) -> dict:
    """Call every function of `fns` once per round, in order on even rounds and reversed on odd ones; medians of
    wall and CPU time, ratios to `ref`'s, and the median of the per-round wall ratios."""
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        log(f"round {r}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "rounds": rounds,
        "wall_s": {k: round(v, 3) for k, v in med.items()},
        "cpu_s": {k: round(v, 3) for k, v in med_cpu.items()},
        "ratio_wall": {k: round(v / med[ref], 3) for k, v in med.items()},
        "ratio_cpu": {k: round(v / med_cpu[ref], 3) for k, v in med_cpu.items()},
        "ratio_per_round": {k: round(statistics.median(a / b for a, b in zip(wall[k], wall[ref])), 3) for k in names},
        "all_wall_s": {k: [round(t, 2) for t in v] for k, v in wall.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / ".cache" / "sd15-random-fp16.safetensors"))
    ap.add_argument("--diffusers", default=str(HERE / ".cache" / "sd15-random-diffusers"), help="its diffusers copy")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512²)")
    ap.add_argument("--modes", default="full,stored", help="latentgen weights: full (prepacked), stored")
    a = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from latentgen.loading.bundle import load_model
    from latentgen.loading.weights import prepack

    torch.set_grad_enabled(False)
    df = UNet2DConditionModel.from_pretrained(Path(a.diffusers) / "unet", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    s = a.latent
    x, c = torch.randn(2, 4, s, s, generator=g), torch.randn(2, 77, df.config.cross_attention_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    calls = {}
    for mode in a.modes.split(","):
        unet = prepack(load_model(a.model, device="cpu", dtype=torch.float32, low_memory=mode == "stored").unet)
        calls[f"latentgen {mode}"] = functools.partial(unet, x, t, context=c)
    calls["diffusers"] = lambda: df(x, t, encoder_hidden_states=c).sample
    outs = {k: f() for k, f in calls.items()}  # warm-up: packs the weights, builds the oneDNN primitives
    result = alternate(calls, a.rounds, "diffusers")
    result["max_diff_to_diffusers"] = {k: float((o - outs["diffusers"]).abs().max()) for k, o in outs.items()}
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
