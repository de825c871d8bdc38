"""Micro-benchmark: CPU fp32 self-attention, torch's SDPA against blocked matmuls (issue 16 §2, tried and dropped).

The blocked kernel is softmax(Q Kᵀ / √d) V as `baddbmm` + softmax + `bmm` over blocks of queries, the heads folded
into the batch, each block's scores at most 32 MiB. It runs at the matrix-multiply rate but materialises every
score; torch's CPU flash kernel (SDPA on 4-d inputs) does not. SDPA on 3-d inputs (heads folded in) is also timed:
it does not take the flash kernel, which made the blocked kernel look faster in a first trial.

    python benchmarks/attention.py                 # SD 1.5's largest self-attention: batch 2, 8 heads, 4096 × 40
    python benchmarks/attention.py --rounds 7 --tokens 4096 --heads 8 --head-dim 40 --batch 2

One process, the two kernels alternating on the same inputs, median of the rounds; prints one JSON object
(seconds, GFLOP/s, ratio blocked / SDPA, max relative difference). A number from a loaded machine is indicative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

BLOCK_BYTES = 32 * 2**20


def blocked_attention(q, k, v):
    """softmax(Q Kᵀ / √d) V for [..., n, d] inputs over blocks of queries, leading dims folded into one batch."""
    import torch

    lead, n, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    m = k.shape[-2]
    qf, kt, vf = q.reshape(-1, n, d), k.reshape(-1, m, d).transpose(1, 2), v.reshape(-1, m, v.shape[-1])
    out = q.new_empty(qf.shape[0], n, vf.shape[-1])
    rows = max(1, BLOCK_BYTES // (qf.shape[0] * m * q.element_size()))
    zero = q.new_zeros(1, 1, 1)
    for i in range(0, n, rows):
        s = torch.baddbmm(zero, qf[:, i : i + rows], kt, beta=0, alpha=d**-0.5)
        torch.bmm(torch.softmax(s, -1, out=s), vf, out=out[:, i : i + rows])
    return out.reshape(*lead, n, vf.shape[-1])


def measure(batch: int, heads: int, tokens: int, head_dim: int, rounds: int, threads: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g) for _ in range(3))
    kernels = {
        "sdpa": F.scaled_dot_product_attention,
        "sdpa_3d": lambda q, k, v: F.scaled_dot_product_attention(*(t.flatten(0, 1) for t in (q, k, v))).view(q.shape),
        "blocked": blocked_attention,
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.no_grad():
        ref, _, got = (f(q, k, v) for f in kernels.values())  # warm-up, and the parity of this run
        for _ in range(rounds):
            for name, f in kernels.items():
                t = time.perf_counter()
                f(q, k, v)
                times[name].append(time.perf_counter() - t)
    flop = 4 * batch * heads * tokens * tokens * head_dim
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shape": {"batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim},
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "seconds": {name: round(t, 4) for name, t in med.items()},
        "gflops": {name: round(flop / t / 1e9, 2) for name, t in med.items()},
        "ratio_blocked_to_sdpa": round(med["blocked"] / med["sdpa"], 3),
        "ratio_sdpa_3d_to_sdpa": round(med["sdpa_3d"] / med["sdpa"], 3),
        "max_rel_diff": float(((got - ref).abs().max() / ref.abs().max()).item()),
        "all_seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    print(json.dumps(measure(a.batch, a.heads, a.tokens, a.head_dim, a.rounds, a.threads)))


if __name__ == "__main__":
    main()
