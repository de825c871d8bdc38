#!/usr/bin/env python
"""Evaluate the default models on held-out shapes data and write OUT/results.md + OUT/grid.png.

- autoencoder: PSNR of reconstructions (posterior mode) of held-out 64x64 images;
- txt2img: prompt adherence judged by data.check_image on N images of held-out captions: the share of
  images where "all" holds, and the share per attribute (background, colours, shapes, sizes, relation, count);
- superres: PSNR of the 4x super-resolved image vs the ground truth, and of bicubic upsampling vs the truth.

Held-out data: shapes samples drawn from a seed range (--seed, default 10^9) that training (shapes:N, seed 0)
never reaches.

    python scripts/evaluate_default.py --ae runs/default/ae/autoencoder.safetensors \
        --txt2img runs/default/txt2img/model.safetensors --superres runs/default/superres/model.safetensors \
        --out runs/default/eval --n 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from latentgen import pipelines
from latentgen.data import ShapesDataset, check_image
from latentgen.images import atomic_path
from latentgen.loading.bundle import load_first_stage, load_model
from latentgen.training.ldm import downsample
from latentgen.training.loop import save_grid

ATTRIBUTES = ("background", "colours", "shapes", "sizes", "relation", "count", "all")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE), images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def held_out(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    ds = ShapesDataset(n, seed, size)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def eval_autoencoder(path: str, images: torch.Tensor, bs: int) -> tuple[dict, torch.Tensor]:
    fs = load_first_stage(path)
    recs = torch.cat(
        [fs.decode_scaled(fs.encode_latent(images[s]) * fs.scale_factor) for s in batches(len(images), bs)]
    )
    truth = (images + 1) / 2
    return {"psnr": psnr(recs, truth)}, recs


def eval_txt2img(path: str, captions: list[str], settings, bs: int, size: int) -> tuple[dict, torch.Tensor]:
    bundle = load_model(path)
    outs = []
    for s in batches(len(captions), bs):
        prompts = captions[s]
        outs.append(
            pipelines.txt2img(bundle, prompts, [""] * len(prompts), list(range(s.start, s.stop)), size, size, settings)
        )
    images = torch.cat(outs)
    checks = [check_image(img * 2 - 1, cap) for img, cap in zip(images, captions)]
    return {k: sum(c[k] for c in checks) / len(checks) for k in ATTRIBUTES}, images


def eval_superres(path: str, images: torch.Tensor, settings, bs: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    bundle = load_model(path)
    f = bundle.config.factor
    low = (downsample(images, f) + 1) / 2
    sr = torch.cat(
        [pipelines.superres(bundle, low[s], list(range(s.start, s.stop)), settings) for s in batches(len(images), bs)]
    )
    bicubic = F.interpolate(low, scale_factor=f, mode="bicubic", align_corners=False).clamp(0, 1)
    truth = (images + 1) / 2
    return {"psnr": psnr(sr, truth), "psnr_bicubic": psnr(bicubic, truth)}, sr, low


def markdown(results: dict, args) -> str:
    lines = [f"# latentgen default models — held-out shapes (n={args.n}, seed {args.seed})", ""]
    if "ae" in results:
        lines += ["| autoencoder | PSNR (dB) |", "| --- | --- |", f"| {args.ae} | {results['ae']['psnr']:.2f} |", ""]
    if "txt2img" in results:
        r = results["txt2img"]
        lines += [
            f"txt2img: {args.steps} steps {args.sampler}, CFG {args.cfg}",
            "",
            "| " + " | ".join(ATTRIBUTES) + " |",
            "|" + " --- |" * len(ATTRIBUTES),
            "| " + " | ".join(f"{r[k]:.1%}" for k in ATTRIBUTES) + " |",
            "",
        ]
    if "superres" in results:
        r = results["superres"]
        lines += [
            "| superres | PSNR (dB) |",
            "| --- | --- |",
            f"| LDM-SR | {r['psnr']:.2f} |",
            f"| bicubic | {r['psnr_bicubic']:.2f} |",
            "",
        ]
    if results.get("prompts"):
        lines += [
            "Grid rows: ground truth, autoencoder reconstruction, txt2img of the caption, bicubic, superres.",
            "Columns (captions):",
            "",
        ] + [f"{i + 1}. {p}" for i, p in enumerate(results["prompts"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ae")
    ap.add_argument("--txt2img")
    ap.add_argument("--superres")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64, help="held-out images per evaluation")
    ap.add_argument("--seed", type=int, default=10**9)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grid", type=int, default=8, help="columns of the grid PNG")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = held_out(args.n, args.seed, args.size)
    k = min(args.grid, args.n)
    results, rows = {"prompts": captions[:k]}, [(images[:k] + 1) / 2]
    if args.ae:
        results["ae"], recs = eval_autoencoder(args.ae, images, args.batch)
        rows.append(recs[:k])
    if args.txt2img:
        settings = pipelines.Settings(steps=args.steps, sampler=args.sampler, cfg=args.cfg)
        results["txt2img"], gen = eval_txt2img(args.txt2img, captions, settings, args.batch, args.size)
        rows.append(gen[:k])
    if args.superres:
        settings = pipelines.Settings(steps=args.steps, sampler=args.sampler, cfg=1.0)
        results["superres"], sr, low = eval_superres(args.superres, images, settings, args.batch)
        rows += [F.interpolate(low[:k], scale_factor=args.size // low.shape[-1], mode="bicubic").clamp(0, 1), sr[:k]]
    text = markdown(results, args)
    with atomic_path(out / "results.md", overwrite=True) as tmp:
        tmp.write_text(text)
    with atomic_path(out / "results.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    save_grid(rows, out / "grid.png", {"latentgen": json.dumps({"prompts": captions[:k]})})
    print(text)
    print(out / "results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
