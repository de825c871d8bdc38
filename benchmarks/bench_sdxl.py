"""latentgen vs diffusers' StableDiffusionXLPipeline on the same random SDXL-size weights (issue 13).

    python benchmarks/bench_sdxl.py                        # CPU: fp32 and bf16, 1024², 4 steps (long: hours)
    python benchmarks/bench_sdxl.py --device cuda --dtypes fp16,bf16 --steps 20
    python benchmarks/bench_sdxl.py --tiny                 # a dry run on the tiny sgm fixture (seconds)

Weights: random (bench.random_tensor) for every key of the real `sd_xl_base_1.0.safetensors`
(../shared/fixtures/sdxl/sdxl-base-keys.json), fp16 in the cache folder; the diffusers folder is made from that
file by diffusers' own single-file converters. Each job runs in its own process (peak RSS = that job's, via
os.wait4); latentgen and diffusers alternate. Measures: load, UNet CFG step (batch 2, 128x128 latent, 77 tokens,
the vector), VAE decode 1024², txt2img end to end (DPM++ 2M Karras, CFG 5), peak RSS (CPU) or peak CUDA memory.
Appends its table to --out (default benchmarks/RESULTS.md). Targets: time and memory <= 0.8 of diffusers'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402

SDXL_FIXTURES = bench.FIXTURES / "sdxl"
PROMPT = bench.PROMPT


def make_sdxl_file(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    keys = json.loads((SDXL_FIXTURES / "sdxl-base-keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    tensors = {k: bench.random_tensor(k, shape, gen) for k, shape in keys.items() if k != "denoiser.sigmas"}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def make_sdxl_diffusers_folder(src: Path, config: dict, folder: Path) -> None:
    """unet/, vae/, text_encoder/, text_encoder_2/, scheduler/ converted from the single file by diffusers."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ckpt = load_file(str(src))
    sgm = config["sgm_config"]
    ucfg = create_unet_diffusers_config_from_ldm(sgm, ckpt)
    ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), assign=True)
    vcfg = create_vae_diffusers_config_from_ldm(sgm, ckpt, scaling_factor=0.13025)
    with torch.device("meta"):
        vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), assign=True)
    l_cfg, g_cfg = config["text_encoders"]
    with torch.device("meta"):
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=l_cfg["hidden_size"],
                intermediate_size=l_cfg["intermediate_size"],
                num_hidden_layers=l_cfg["num_hidden_layers"],
                num_attention_heads=l_cfg["num_attention_heads"],
                hidden_act="quick_gelu",
            )
        )
        text_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=g_cfg["width"],
                intermediate_size=int(g_cfg["width"] * g_cfg["mlp_ratio"]),
                num_hidden_layers=g_cfg["layers"],
                num_attention_heads=g_cfg["heads"],
                hidden_act="gelu",
                projection_dim=g_cfg["embed_dim"],
            )
        )
    sd = convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer.")
    sd = {k: v for k, v in sd.items() if k.startswith("text_model.") and "position_ids" not in k}
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    text.load_state_dict(sd, strict=False, assign=True)
    text_2.load_state_dict(convert_open_clip_checkpoint(text_2, ckpt, "conditioner.embedders.1.model."), assign=True)
    for m in (text, text_2):  # non-persistent position_ids buffers are still on the meta device
        emb = getattr(m, "text_model", m).embeddings
        if hasattr(emb, "position_ids"):
            emb.register_buffer("position_ids", torch.arange(77)[None], persistent=False)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text), ("text_encoder_2", text_2)):
        m.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    DPMSolverMultistepScheduler(**bench.scheduler_kwargs()).save_pretrained(folder / "scheduler")


def prepare(cache: Path, tiny: bool) -> tuple[Path, Path, dict]:
    if tiny:
        src, config = SDXL_FIXTURES / "sdxl-base-tiny.safetensors", SDXL_FIXTURES / "sdxl-base-tiny.json"
    else:
        src, config = cache / "sdxl-base-random-fp16.safetensors", SDXL_FIXTURES / "sdxl-base-config.json"
        if not src.exists():
            make_sdxl_file(src)
    config = json.loads(config.read_text())
    df = cache / ("sdxl-tiny-diffusers" if tiny else "sdxl-base-diffusers")
    if not (df / "scheduler").exists():
        make_sdxl_diffusers_folder(src, config, df)
    return src, df, config


def load_diffusers(folder: str, dtype, device: str):
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from latentgen.text.tokenizers import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!")
    for t in (tok, tok_2):
        t.model_max_length = 77
    f = Path(folder)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(f / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(f / "text_encoder", dtype=dtype),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(f / "text_encoder_2", dtype=dtype),
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=UNet2DConditionModel.from_pretrained(f / "unet", torch_dtype=dtype),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(f / "scheduler"),
        add_watermarker=False,
    ).to(device)


def worker(job: dict) -> dict:
    """One job in this process: `what` is unet (CFG step), decode or e2e, for `tool` latentgen or diffusers."""
    import torch

    torch.set_grad_enabled(False)
    dtype, device, size, what = getattr(torch, job["dtype"]), job["device"], job["size"], job["what"]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if job["tool"] == "latentgen":
        from latentgen import pipelines
        from latentgen.loading.bundle import load_model
        from latentgen.loading.weights import prepack

        bundle = load_model(job["model"], device=device, dtype=dtype, low_memory=None if not cuda else False)
        if device == "cpu" and dtype == torch.float32:  # as the CLI does
            for m in (bundle.unet, bundle.first_stage):
                prepack(m)
        unet, adm, scale = bundle.unet, bundle.config.unet.adm_in_channels, bundle.config.scale_factor
        ctx_dim = bundle.config.unet.context_dim
        step = lambda x, t, c, y: unet(x, t, context=c, y=y)  # noqa: E731
        decode = lambda z: pipelines.decode(bundle, z)  # noqa: E731
        st = pipelines.Settings(steps=job["steps"], sampler="dpmpp_2m", karras=True, cfg=5.0)
        e2e = lambda: pipelines.txt2img(bundle, [PROMPT], [""], [bench.SEED], size, size, st)  # noqa: E731
    else:
        pipe = load_diffusers(job["model"], dtype, device)
        unet, adm, scale = pipe.unet, pipe.unet.config.projection_class_embeddings_input_dim, 0.13025
        ctx_dim = pipe.unet.config.cross_attention_dim
        pooled = adm - 6 * 256

        def step(x, t, c, y):
            ids = torch.tensor([[size, size, 0, 0, size, size]] * x.shape[0], device=x.device, dtype=x.dtype)
            return unet(x, t, c, added_cond_kwargs={"text_embeds": y[:, :pooled], "time_ids": ids}).sample

        def decode(z):
            if pipe.vae.dtype == torch.float16:  # the pipeline's force_upcast
                pipe.upcast_vae()
            return pipe.vae.decode(z.to(pipe.vae.dtype) / scale).sample

        def e2e():
            gen = torch.Generator("cpu").manual_seed(bench.SEED)
            kw = dict(num_inference_steps=job["steps"], guidance_scale=5.0, generator=gen, output_type="np")
            return pipe(PROMPT, height=size, width=size, **kw).images

    sync()
    t_load = time.perf_counter() - t0
    g = torch.Generator().manual_seed(bench.SEED)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    c, y = (
        torch.randn(2, 77, ctx_dim, generator=g).to(device, dtype),
        torch.randn(2, adm, generator=g).to(device, dtype),
    )
    t = torch.tensor([500.0, 500.0], device=device)
    fn = {"unet": lambda: step(x, t, c, y), "decode": lambda: decode(x[:1]), "e2e": e2e}[what]
    times = []
    for _ in range(job["reps"]):
        t1 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t1)
    out = {"load_s": t_load, "run_s": min(times), "runs": times}
    if cuda:
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list: float32, bfloat16, float16")
    ap.add_argument("--steps", type=int, default=4, help="txt2img steps end to end")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per job (the fastest is reported)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of each job (fresh processes)")
    ap.add_argument("--jobs", default="unet,decode,e2e", help="comma list of the jobs to run: unet, decode, e2e")
    ap.add_argument("--tiny", action="store_true", help="dry run on the tiny sgm fixture at 128 px")
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if not {w.strip() for w in args.jobs.split(",") if w.strip()} <= {"unet", "decode", "e2e"}:
        ap.error(f"--jobs {args.jobs!r}: use a comma list of unet, decode, e2e")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src, df, _ = prepare(cache, args.tiny)
    size = 128 if args.tiny else args.size
    rep = bench.Report()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rep.add(
        f"## SDXL base size ({'tiny fixture dry run' if args.tiny else 'random full-size weights'}), "
        f"{args.device}, {time.strftime('%Y-%m-%d')}",
        "",
        f"`python benchmarks/bench_sdxl.py --device {args.device} --dtypes {args.dtypes} --steps {args.steps} "
        f"--jobs {args.jobs} --reps {args.reps}`; "
        f"{bench.cpu_model() if args.device == 'cpu' else args.device}; {size}x{size}; fastest of {args.reps} "
        f"calls, {args.rounds} round(s). Ratio = latentgen / diffusers (target <= 0.8).",
        "",
    )
    rows = []
    for dt in dtypes:
        for what in [w.strip() for w in args.jobs.split(",") if w.strip()]:
            jobs = {
                tool: {
                    "tool": tool,
                    "model": str(src if tool == "latentgen" else df),
                    "dtype": dt,
                    "what": what,
                    "device": args.device,
                    "size": size,
                    "steps": args.steps,
                    "reps": args.reps,
                }
                for tool in ("latentgen", "diffusers")
            }
            cmd = lambda j: [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(j)]  # noqa: E731
            res = {k: [] for k in jobs}
            for _ in range(args.rounds):
                for k, j in jobs.items():
                    res[k].append(bench.run_measured(cmd(j)))
            lg, df_ = (min(r["run_s"] for r in res[k]) for k in ("latentgen", "diffusers"))
            mem_key = "cuda_peak_gib" if args.device.startswith("cuda") else "rss_gib"
            mlg, mdf = (max(r[mem_key] for r in res[k]) for k in ("latentgen", "diffusers"))
            rows.append(
                [
                    dt,
                    what,
                    f"{lg:.3f} s",
                    f"{df_:.3f} s",
                    f"{lg / df_:.2f}",
                    f"{mlg:.2f}",
                    f"{mdf:.2f}",
                    f"{mlg / mdf:.2f}",
                ]
            )
    mem = "peak CUDA GiB" if args.device.startswith("cuda") else "peak RSS GiB"
    rep.table(["dtype", "job", "latentgen", "diffusers", "ratio", f"{mem} lg", f"{mem} df", "ratio"], rows)
    with open(args.out, "a") as f:
        f.write("\n" + "\n".join(rep.lines) + "\n")


if __name__ == "__main__":
    main()
