"""latentgen vs diffusers: speed, peak memory and start-up on the same random weights (issue 5).

    python benchmarks/bench.py --quick     # minutes on 2 cores: SD-size "2 UNet steps + VAE decode", tiny e2e
    python benchmarks/bench.py             # full: SD-size txt2img 20 steps dpmpp_2m CFG 7.5 at 512x512, 2048² decode,
                                           # stable-diffusion.cpp (benchmarks/sdcpp.py), attention micro-benchmark
    python benchmarks/bench.py --dry-run   # what the sd.cpp and attention sections would run; nothing is touched

Every measured job runs in its own process (so peak RSS is that job's alone, read with os.wait4), latentgen
and diffusers alternate, and ratios are latentgen / diffusers of the medians. Weights: random (std 1/sqrt(fan_in),
norms ~1) for every key of the real SD 1.5 single file (/work/shared/fixtures/sd15-keys.json), stored once in
fp16 in the cache folder; the diffusers copy is made from that file by diffusers' own single-file converters.
Writes benchmarks/RESULTS.md. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = Path(os.environ.get("LATENTGEN_FIXTURES", HERE.parent.parent / "shared" / "fixtures"))
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
SEED = 1234


# ------------------------------------------------------------------------------------------- machine


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def matmul_gflops(dtype_name: str, n: int = 1024, budget_s: float = 4.0) -> float:
    """Best-of GFLOP/s of an n×n matmul (the machine's attainable dense rate in this dtype)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < budget_s or best == math.inf:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# -------------------------------------------------------------------------------------- model files


def sd15_ldm_config() -> dict:
    """configs/stable-diffusion/v1-inference.yaml of CompVis/stable-diffusion, as a dict."""
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 64,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": 0.18215,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": 32,
                        "in_channels": 4,
                        "out_channels": 4,
                        "model_channels": 320,
                        "attention_resolutions": [4, 2, 1],
                        "num_res_blocks": 2,
                        "channel_mult": [1, 2, 4, 4],
                        "num_heads": 8,
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": 768,
                        "use_checkpoint": True,
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "monitor": "val/rec_loss",
                        "lossconfig": {"target": "torch.nn.Identity"},
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": 128,
                            "ch_mult": [1, 2, 4, 4],
                            "num_res_blocks": 2,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                    },
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            },
        }
    }


def schedule_buffers() -> dict:
    """The 12 DDPM buffers of an original checkpoint (scaled-linear betas, as SD 1.x)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": ac.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return {k: v.float() for k, v in out.items()}


def random_tensor(key: str, shape: list[int], gen):
    """Random weight that keeps activations O(1): std 1/sqrt(fan_in) for matrices and kernels, norm scales ~1."""
    import torch

    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    t = torch.randn(shape, generator=gen)
    if len(shape) >= 2 and "embedding" not in key:
        return (t / math.sqrt(math.prod(shape[1:]))).half()
    if "norm" in key and key.endswith("weight") or key.endswith(("ln_1.weight", "ln_2.weight")):
        return (1 + 0.02 * t).half()
    return (0.02 * t).half()


def make_sd15_file(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    keys = json.loads((FIXTURES / "sd15-keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    sched = schedule_buffers()
    tensors = {k: sched[k] if k in sched else random_tensor(k, shape, gen) for k, shape in keys.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def make_diffusers_folder(src: Path, ldm_config: dict, folder: Path, text_heads: int) -> None:
    """diffusers components converted from the original file by diffusers' single-file converters."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = load_file(str(src))
    dtype = ckpt["model.diffusion_model.input_blocks.0.0.weight"].dtype
    unet_cfg = create_unet_diffusers_config_from_ldm(ldm_config, ckpt)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_cfg), assign=True)
    vae_cfg = create_vae_diffusers_config_from_ldm(ldm_config, ckpt)
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_cfg), assign=True)
    text_sd = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    text_sd.pop("embeddings.position_ids", None)
    pre = "cond_stage_model.transformer.text_model."
    hidden = ckpt[pre + "embeddings.token_embedding.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[5]) for k in ckpt if k.startswith(pre + "encoder.layers."))
    with torch.device("meta"):
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=text_heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
    missing = text.load_state_dict(text_sd, strict=False, assign=True)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "position_ids" not in k], missing
    emb = getattr(text, "text_model", text).embeddings
    if hasattr(emb, "position_ids"):  # a non-persistent buffer: still on the meta device
        emb.register_buffer("position_ids", torch.arange(77)[None], persistent=False)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        m.to(dtype).save_pretrained(folder / name, safe_serialization=True)
    DPMSolverMultistepScheduler(**scheduler_kwargs()).save_pretrained(folder / "scheduler")


def scheduler_kwargs() -> dict:
    """diffusers' DPM++ 2M Karras as latentgen's dpmpp_2m with --karras and leading spacing."""
    return dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
    )


def make_tiny(cache: Path) -> tuple[Path, Path]:
    """The sd1-tiny fixture (original code's weights) in latentgen format + as a diffusers folder."""
    from latentgen.loading.bundle import load_model, save_model

    lg, df = cache / "tiny-sd1.safetensors", cache / "tiny-sd1-diffusers"
    cfg = json.loads((FIXTURES / "sd1-tiny.json").read_text())
    if not lg.exists():
        b = load_model(
            str(FIXTURES / "sd1-tiny.safetensors"), config=cfg, overrides={"cond": {"num_attention_heads": 4}}
        )
        b.config.name = "tiny-sd1"
        save_model(lg, b.config, b.unet, b.first_stage, b.cond)
    if not df.exists():
        make_diffusers_folder(FIXTURES / "sd1-tiny.safetensors", cfg["ldm_config"], df, text_heads=4)
    return lg, df


def make_sd15(cache: Path) -> tuple[Path, Path]:
    src, df = cache / "sd15-random-fp16.safetensors", cache / "sd15-random-diffusers"
    if not src.exists():
        print(f"writing {src} (random SD 1.5-size weights, fp16) ...", file=sys.stderr)
        make_sd15_file(src)
    if not df.exists():
        print(f"converting {src} to a diffusers folder ...", file=sys.stderr)
        make_diffusers_folder(src, sd15_ldm_config(), df, text_heads=12)
    return src, df


# ------------------------------------------------------------------------------------------- workers


class Timer:
    """Forward-hook stopwatch on a module: wall seconds of each call."""

    def __init__(self, module):
        self.calls: list[float] = []
        module.register_forward_pre_hook(lambda *_: setattr(self, "t0", time.perf_counter()))
        module.register_forward_hook(lambda *_: self.calls.append(time.perf_counter() - self.t0))


def tokenizer_for_diffusers():
    from transformers import CLIPTokenizer

    from latentgen.text.tokenizers import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = 77
    return tok


def load_diffusers(folder: str, dtype):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    f = Path(folder)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(f / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(f / "text_encoder", dtype=dtype),
        tokenizer=tokenizer_for_diffusers(),
        unet=UNet2DConditionModel.from_pretrained(f / "unet", torch_dtype=dtype),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(f / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def worker_txt2img(job: dict) -> dict:
    """One txt2img in this process; per-module wall times from forward hooks; the image saved as .npy."""
    import numpy as np
    import torch

    torch.set_grad_enabled(False)
    dtype = getattr(torch, job["dtype"])
    t0 = time.perf_counter()
    steps, size = job["steps"], job["size"]
    if job["tool"] == "latentgen":
        from latentgen import pipelines
        from latentgen.loading.bundle import load_model
        from latentgen.loading.weights import prepack

        bundle = load_model(job["model"], dtype=dtype, low_memory=not job["full"])
        if dtype == torch.float32:  # as the CLI does on CPU (a no-op for layers upcast on use)
            for m in (bundle.unet, bundle.first_stage):
                prepack(m)
        t_load = time.perf_counter() - t0
        timers = {"unet": Timer(bundle.unet), "decode": Timer(bundle.first_stage.decoder), "text": Timer(bundle.cond)}
        st = pipelines.Settings(steps=steps, sampler="dpmpp_2m", karras=True, spacing="leading", cfg=7.5)
        t1 = time.perf_counter()
        img = pipelines.txt2img(bundle, [PROMPT], [NEGATIVE], [SEED], size, size, st)
        img = img[0].permute(1, 2, 0).float().numpy()
    else:
        pipe = load_diffusers(job["model"], dtype)
        t_load = time.perf_counter() - t0
        timers = {"unet": Timer(pipe.unet), "decode": Timer(pipe.vae.decoder), "text": Timer(pipe.text_encoder)}
        t1 = time.perf_counter()
        img = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]
    t_run = time.perf_counter() - t1
    np.save(job["image"], (np.asarray(img) * 255).round().clip(0, 255).astype(np.uint8))
    return {"load_s": t_load, "run_s": t_run, **{f"{k}_calls": v.calls for k, v in timers.items()}}


def worker_decode(job: dict) -> dict:
    """A large VAE decode (latentgen: tiled automatically above 768 px)."""
    import torch

    torch.set_grad_enabled(False)
    size, dtype = job["size"], getattr(torch, job["dtype"])
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(SEED))
    t0 = time.perf_counter()
    if job["tool"] == "latentgen":
        from latentgen import pipelines
        from latentgen.loading.bundle import load_model
        from latentgen.loading.weights import prepack

        bundle = load_model(job["model"], dtype=dtype, low_memory=None)  # the CLI default
        if dtype == torch.float32:
            prepack(bundle.first_stage)
        t1 = time.perf_counter()
        img = pipelines.decode(bundle, z)
    else:
        pipe = load_diffusers(job["model"], dtype)
        pipe.vae.enable_tiling()
        t1 = time.perf_counter()
        img = pipe.vae.decode(z.to(dtype) / 0.18215).sample
    return {"load_s": t1 - t0, "run_s": time.perf_counter() - t1, "shape": list(img.shape)}


def worker_diffusers_e2e(job: dict) -> dict:
    """The diffusers side of "process start to PNG written" (the latentgen side is its own CLI)."""
    import torch

    pipe = load_diffusers(job["model"], getattr(torch, job["dtype"]))
    img = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=job["size"],
        width=job["size"],
        num_inference_steps=job["steps"],
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    img.save(job["out"])
    return {}


WORKERS = {"txt2img": worker_txt2img, "decode": worker_decode, "diffusers_e2e": worker_diffusers_e2e}


# -------------------------------------------------------------------------------------------- driver


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """As `run`, with the child's own peak RSS (ru_maxrss of the reaped child, not of all children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    threads = [
        threading.Thread(target=lambda s=s, b=b: b.append(s.read()))
        for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))
    ]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(cmd[:8])} failed ({code}):\n{b''.join(err_chunks).decode()[-3000:]}")
    lines = b"".join(out_chunks).decode().strip().splitlines()
    res = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    res.update(wall_s=wall, rss_gib=usage.ru_maxrss / 2**20, load=load_average())
    return res


def run_worker(job: dict) -> dict:
    return run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)])


def alternate(jobs: dict[str, dict], reps: int, log) -> dict[str, list[dict]]:
    """Run each named job `reps` times, interleaved (A B A B ...), so slow drifts in load hit both alike."""
    out: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(reps):
        for name, job in jobs.items():
            job = dict(job)
            if "image" in job:
                job["image"] = job["image"].replace(".npy", f"-{r}.npy")
            res = run_worker(job)
            log(f"  {name} rep {r}: wall {res['wall_s']:.1f}s rss {res['rss_gib']:.2f} GiB load {res['load']}")
            out[name].append(res)
    return out


def med(results: list[dict], key) -> float:
    vals = [key(r) if callable(key) else r[key] for r in results]
    return statistics.median(vals)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def unet_gflop_per_call(batch: int, latent: int) -> float:
    """FLOPs of one SD 1.5 UNet call (conv, matmul, attention), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentgen.unet import UNetConfig, UNetModel

    params = dict(sd15_ldm_config()["model"]["params"]["unet_config"]["params"])
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_ldm_params(params))
        x, c = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, 768)
        t = torch.full((batch,), 500.0)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, context=c)
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------------------------- report


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, file=sys.stderr)

    def table(self, header: list[str], rows: list[list]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for r in rows:
            self.add("| " + " | ".join(str(c) for c in r) + " |")
        self.add("")


def fmt(x, nd=2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def bench_startup(rep: Report, cache: Path, tiny_lg: Path, tiny_df: Path, reps: int, bf16_ok: bool) -> dict:
    import numpy as np
    from PIL import Image

    lg_bin = str(Path(sys.executable).with_name("latentgen"))
    helps = [run_measured([lg_bin, "--help"])["wall_s"] for _ in range(reps)]
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, latentgen.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    rep.add(
        "## Start-up",
        "",
        f"`latentgen --help`: median {statistics.median(helps):.3f} s over {reps} runs "
        f"(target < 0.3 s); torch imported by `import latentgen.cli`: {probe}. Load average: {load_average()}.",
        "",
    )

    size, steps = 64, 20
    rows, e2e = [], {}
    variants = [("latentgen fp32", "fp32"), ("latentgen --dtype auto", "auto"), ("latentgen bf16", "bf16")]
    for r in range(reps):
        for name, opt in variants:
            out = cache / f"tiny-{opt}-{r}.png"
            out.unlink(missing_ok=True)
            res = run_measured(
                [
                    lg_bin,
                    "txt2img",
                    PROMPT,
                    "--negative",
                    NEGATIVE,
                    "--model",
                    str(tiny_lg),
                    "--steps",
                    str(steps),
                    "--sampler",
                    "dpmpp_2m",
                    "--karras",
                    "--spacing",
                    "leading",
                    "--cfg",
                    "7.5",
                    "--seed",
                    str(SEED),
                    "--width",
                    str(size),
                    "--height",
                    str(size),
                    "--dtype",
                    opt,
                    "--out",
                    str(out),
                    "--quiet",
                    "--overwrite",
                ]
            )
            res["png"] = str(out)
            e2e.setdefault(name, []).append(res)
        for dname, dt in (("diffusers fp32", "float32"), ("diffusers bf16", "bfloat16")):
            out = cache / f"tiny-diffusers-{dt}-{r}.png"
            res = run_worker(
                {
                    "kind": "diffusers_e2e",
                    "model": str(tiny_df),
                    "dtype": dt,
                    "size": size,
                    "steps": steps,
                    "out": str(out),
                }
            )
            res["png"] = str(out)
            e2e.setdefault(dname, []).append(res)

    def img(name):
        return np.asarray(Image.open(e2e[name][0]["png"]).convert("RGB"))

    base = {n: med(v, "wall_s") for n, v in e2e.items()}
    ref32 = img("latentgen fp32")
    for name, v in e2e.items():
        other = "diffusers bf16" if name.endswith("bf16") and name.startswith("latentgen") else "diffusers fp32"
        ratio = base[name] / base[other] if name.startswith("latentgen") else None
        rss_ratio = med(v, "rss_gib") / med(e2e[other], "rss_gib") if name.startswith("latentgen") else None
        maxdiff = (
            int(np.abs(img(name).astype(int) - img(other.replace("latentgen", "diffusers")).astype(int)).max())
            if name.startswith("latentgen")
            else None
        )
        rows.append(
            [
                name,
                fmt(base[name]),
                fmt(med(v, "rss_gib")),
                fmt(ratio),
                fmt(rss_ratio),
                fmt(psnr(img(name), ref32), 1),
                "—" if maxdiff is None else maxdiff,
                v[0]["load"],
            ]
        )
    rep.add(
        "## (b) Tiny SD1-like model (sd1-tiny fixture), process start to PNG written",
        "",
        f"txt2img {size}x{size}, {steps} steps dpmpp_2m Karras, CFG 7.5, seed {SEED}; median of {reps}, "
        "alternating. Ratios vs diffusers fp32 (bf16 rows vs diffusers bf16). PSNR vs latentgen fp32 image.",
        "",
    )
    rep.table(
        [
            "run",
            "wall s",
            "peak RSS GiB",
            "wall ratio",
            "RSS ratio",
            "PSNR dB vs fp32",
            "max px diff vs diffusers",
            "load avg (1st run)",
        ],
        rows,
    )
    return {"help_s": statistics.median(helps), "tiny": base}


def bench_sd(
    rep: Report, src: Path, df: Path, cache: Path, steps: int, reps: int, dtypes: list[str], matmul: dict
) -> None:
    import numpy as np

    size = 512
    lat = size // 8
    gflop = unet_gflop_per_call(2, lat)
    rows, eff_rows = [], []
    images = {}
    for dt in dtypes:
        variants = {
            "latentgen --low-memory": ("latentgen", False),
            "latentgen --full-weights": ("latentgen", True),
            "diffusers": ("diffusers", False),
        }
        jobs = {
            f"{name} {dt}": {
                "kind": "txt2img",
                "tool": tool,
                "model": str(src if tool == "latentgen" else df),
                "dtype": dt,
                "steps": steps,
                "size": size,
                "full": full,
                "image": str(cache / f"sd-{name.replace(' --', '-')}-{dt}-{steps}.npy"),
            }
            for name, (tool, full) in variants.items()
        }
        res = alternate(jobs, reps, lambda s: print(s, file=sys.stderr))
        for name in res:
            images[name] = np.load(jobs[name]["image"].replace(".npy", "-0.npy"))
        # the steady step: the first call also packs weights (latentgen) and builds oneDNN primitives (both)
        unet = {n: med(v, lambda r: statistics.median(r["unet_calls"][1:] or r["unet_calls"])) for n, v in res.items()}
        dec = {n: med(v, lambda r: sum(r["decode_calls"])) for n, v in res.items()}
        txt = {n: med(v, lambda r: sum(r["text_calls"])) for n, v in res.items()}
        run = {n: med(v, "run_s") for n, v in res.items()}
        load = {n: med(v, "load_s") for n, v in res.items()}
        wall = {n: med(v, "wall_s") for n, v in res.items()}
        rss = {n: med(v, "rss_gib") for n, v in res.items()}
        b = f"diffusers {dt}"
        est = {n: txt[n] + 20 * unet[n] + dec[n] for n in res}
        for a in (f"latentgen --low-memory {dt}", f"latentgen --full-weights {dt}"):
            maxdiff = int(np.abs(images[a].astype(int) - images[b].astype(int)).max())
            rows.append(
                [
                    a.removeprefix("latentgen "),
                    fmt(unet[a]),
                    fmt(unet[b]),
                    fmt(unet[a] / unet[b]),
                    fmt(dec[a]),
                    fmt(dec[b]),
                    fmt(dec[a] / dec[b]),
                    fmt(load[a]),
                    fmt(load[b]),
                    fmt(run[a] / run[b]),
                    fmt(wall[a] / wall[b]),
                    fmt(est[a]) + " / " + fmt(est[b]),
                    fmt(est[a] / est[b]),
                    fmt(rss[a]),
                    fmt(rss[b]),
                    fmt(rss[a] / rss[b]),
                    maxdiff,
                    res[a][0]["load"] + " … " + res[b][-1]["load"],
                ]
            )
        peak = matmul.get(dt)
        for n in res:
            ach = gflop / unet[n]
            eff_rows.append(
                [n, fmt(gflop, 0), fmt(unet[n]), fmt(ach, 1), fmt(peak, 1), f"{100 * ach / peak:.0f}%" if peak else "—"]
            )
    rep.add(
        f"## (a) SD 1.5-size (random weights, 860M UNet), 512x512, dpmpp_2m Karras, CFG 7.5, {steps} steps",
        "",
        f"Median of {reps} alternating runs, each its own process. UNet s = one CFG call (batch 2) after the first; "
        "decode s = VAE decoder at 512²; run = text encode + sampling + decode; wall = process incl. imports and load. "
        "e2e@20 = text + 20 UNet calls + decode (measured directly in full mode, extrapolated in --quick).",
        "",
    )
    rep.table(
        [
            "latentgen",
            "UNet s lg",
            "UNet s df",
            "UNet ratio",
            "decode s lg",
            "decode s df",
            "decode ratio",
            "load s lg",
            "load s df",
            "run ratio",
            "wall ratio",
            "e2e@20 s lg / df",
            "e2e@20 ratio",
            "RSS GiB lg",
            "RSS GiB df",
            "RSS ratio",
            "max px diff",
            "load avg",
        ],
        rows,
    )
    if len(dtypes) == 2:
        fp32_img, bf_img = images["latentgen --full-weights float32"], images["latentgen --full-weights bfloat16"]
        rep.add(f"SD-size bf16 vs fp32 image (same seed, {steps} steps): PSNR {psnr(bf_img, fp32_img):.1f} dB.", "")
    rep.add("### UNet compute efficiency", "")
    rep.table(
        [
            "run",
            "GFLOP / UNet call (b=2, 64²)",
            "s / call",
            "achieved GFLOP/s",
            "matmul GFLOP/s (same dtype)",
            "efficiency",
        ],
        eff_rows,
    )


def bench_decode_2048(rep: Report, src: Path, df: Path) -> None:
    rows = []
    for tool, model in (("latentgen", src), ("diffusers", df)):
        res = run_worker({"kind": "decode", "tool": tool, "model": str(model), "dtype": "float32", "size": 2048})
        rows.append([tool, fmt(res["run_s"], 1), fmt(res["rss_gib"]), res["load"]])
    rep.add(
        "## 2048x2048 VAE decode (SD-size autoencoder, fp32, tiled)",
        "",
        "latentgen: pipelines.decode (tiles above 768 px automatically); diffusers: vae.enable_tiling(). "
        "Target: latentgen peak RSS <= 8 GiB. RSS includes the whole loaded model.",
        "",
    )
    rep.table(["tool", "decode s", "peak RSS GiB", "load avg"], rows)


def bench_sdcpp(rep: Report, src: Path, cache: Path | None, reps: int) -> None:
    """latentgen against stable-diffusion.cpp's sd-cli on the same file (benchmarks/sdcpp.py)."""
    import sdcpp

    cache = cache or sdcpp.default_cache()
    res = sdcpp.measure(src, cache, 256, 2, reps, os.cpu_count() or 2, log=lambda s: rep.add(s))
    rep.add(
        "## stable-diffusion.cpp (sd-cli built from the stable-diffusion-cpp-python sdist, GGML_NATIVE)",
        "",
        f"Same random SD 1.5-size fp16 file, 256², 2 steps DPM++ 2M, CFG 7.5, whole processes, median of {reps} "
        "alternating rounds; time / peak RSS ratios are latentgen / sd.cpp. Load averages: "
        f"{res['load'][0]} … {res['load'][-1]}.",
        "",
    )
    rep.table(sdcpp.HEADER, sdcpp.table_rows(res))


def bench_attention(rep: Report) -> None:
    """CPU fp32 self-attention at SD 1.5's largest shape, SDPA against latentgen's blocked kernel (one process)."""
    r = run_measured([sys.executable, str(HERE / "attention.py"), "--rounds", "5"])
    rep.add(
        "## Attention micro-benchmark (benchmarks/attention.py)",
        "",
        "Batch 2, 8 heads, 4096 tokens, head dim 40, fp32, one process, alternating, median of 5.",
        "",
    )
    names = {"sdpa": "torch SDPA (4-d)", "sdpa_3d": "torch SDPA, heads folded (3-d)", "blocked": "blocked matmuls"}
    rep.table(
        ["kernel", "s", "GFLOP/s", "ratio to SDPA"],
        [
            [label, r["seconds"][k], r["gflops"][k], f"{r['seconds'][k] / r['seconds']['sdpa']:.2f}"]
            for k, label in names.items()
        ],
    )
    rep.add(f"Blocked vs SDPA: max relative difference {r['max_rel_diff']:.1e}.", "")


def dry_run(args) -> None:
    """The commands of the sd.cpp and attention sections (the others run this script's own workers)."""
    import sdcpp

    model = Path(args.cache) / "sd15-random-fp16.safetensors"
    cache = Path(args.sdcpp_cache) if args.sdcpp_cache else sdcpp.default_cache()
    skip = set(filter(None, args.skip.split(",")))
    print("# sections:", ", ".join(s for s in SECTIONS if s not in skip))
    if "sdcpp" not in skip:
        print("# sdcpp")
        print("\n".join(sdcpp.dry_run(model, cache, 256, 2, args.sd_reps or args.reps, os.cpu_count() or 2)))
    if "attention" not in skip:
        print("# attention")
        print(f"{sys.executable} {HERE / 'attention.py'} --rounds 5")


SECTIONS = ("startup", "sd", "decode2048", "sdcpp", "attention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SD-size: 2 steps + decode instead of 20 steps")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measured job (median reported)")
    ap.add_argument("--sd-reps", type=int, default=None, help="repetitions of the SD-size jobs")
    ap.add_argument("--cache", default=str(HERE / ".cache"), help="where the random weights are kept")
    ap.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="SD-size bf16 runs: auto = only on CPUs with native bf16 (AMX / avx512_bf16)",
    )
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--sdcpp-cache", default=None, help="where sd-cli is built and kept (default: outside the repo)")
    ap.add_argument("--dry-run", action="store_true", help="print the sd.cpp and attention commands; run nothing")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["kind"]](job)))
        return
    if args.dry_run:
        dry_run(args)
        return

    import torch

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    rep = Report()
    matmul = {"float32": matmul_gflops("float32"), "bfloat16": matmul_gflops("bfloat16", n=512, budget_s=2)}
    bf16 = native_bf16() if args.bf16 == "auto" else args.bf16 == "on"
    from latentgen.cli.device import pick_dtype

    rep.add(
        "# latentgen vs diffusers benchmark",
        "",
        f"Generated by `python benchmarks/bench.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, native bf16 (AMX / avx512_bf16): {native_bf16()}",
        f"- torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads); python {platform.python_version()}",
        f"- measured matmul: fp32 {matmul['float32']:.1f} GFLOP/s (1024²), bf16 {matmul['bfloat16']:.1f} "
        "GFLOP/s (512²)",
        f"- `--dtype auto` on this CPU picks: {pick_dtype('auto', 'cpu')}",
        f"- load average at start: {load_average()} (the machine is shared: timings are noisy; ratios come "
        "from alternating runs)",
        "",
    )
    if "startup" not in skip:
        tiny_lg, tiny_df = make_tiny(cache)
        bench_startup(rep, cache, tiny_lg, tiny_df, args.reps, bf16)
    if not {"sd", "decode2048", "sdcpp"} <= skip:
        src, df = make_sd15(cache)
    if "sd" not in skip:
        dtypes = ["float32"] + (["bfloat16"] if bf16 else [])
        bench_sd(
            rep,
            src,
            df,
            cache,
            2 if args.quick else 20,
            args.sd_reps or (args.reps if args.quick else 1),
            dtypes,
            matmul,
        )
        if not bf16:
            rep.add(
                f"SD-size bf16 not run: this CPU has no native bf16 (bf16 matmul {matmul['bfloat16']:.1f} vs fp32 "
                f"{matmul['float32']:.1f} GFLOP/s); `--dtype auto` picks fp32 here, so the auto row equals fp32. "
                "Force with --bf16 on.",
                "",
            )
    if "decode2048" not in skip and not args.quick:
        bench_decode_2048(rep, src, df)
    if "sdcpp" not in skip:
        bench_sdcpp(rep, src, Path(args.sdcpp_cache) if args.sdcpp_cache else None, args.sd_reps or args.reps)
    if "attention" not in skip:
        bench_attention(rep)
    Path(args.out).write_text("\n".join(rep.lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
