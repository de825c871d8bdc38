"""The options the generation commands share (Typer option objects), and `with_options`, which declares a run of
options once for several commands."""

from __future__ import annotations

import inspect

import typer

PredictionOpt = typer.Option(None, "--prediction", help="Override what the model predicts: eps or v.")


ConfigOpt = typer.Option(None, "--config", help="Original LDM/SD config (.yaml or .json) for this checkpoint.")


ModelOpt = typer.Option(
    None, "--model", "-m", help="Checkpoint file, diffusers folder or models.toml name (default: the registry default)."
)


NegativeOpt = typer.Option(
    None,
    "--negative",
    "-n",
    help="Negative prompt (classifier-free guidance). SDXL base: none or empty gives zeroed unconditional "
    "text embeddings (as the original code); the refiner encodes it ('' by default).",
)


StepsOpt = typer.Option(None, "--steps", help="Sampling steps (default: the model's recommendation, else 25).")


SamplerOpt = typer.Option(
    None,
    "--sampler",
    help="ddim, plms, ddpm, euler, euler_a, heun, lms, dpm2, dpm2_a, dpmpp_2s_a, dpmpp_2m, dpmpp_sde, dpmpp_2m_sde, "
    "dpmpp_2m_sde_heun, dpmpp_3m_sde, uni_pc, lcm, euler_cfg_pp, dpmpp_2m_cfg_pp, res_multistep; "
    "A1111 names too ('DPM++ 2M Karras', 'Euler a').",
)


SchedulerOpt = typer.Option(
    None,
    "--scheduler",
    help="σ schedule (ComfyUI names): normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta, "
    "linear_quadratic, kl_optimal, ays. Default: the sampler's (karras for DPM++/DPM2, normal otherwise).",
)


KarrasOpt = typer.Option(None, "--karras/--no-karras", help="Alias of --scheduler karras / --scheduler normal.")


SpacingOpt = typer.Option(None, "--spacing", help="Timestep spacing: leading (SD), trailing or linspace.")


CfgOpt = typer.Option(None, "--cfg", help="Classifier-free guidance scale; 1 disables the unconditional pass.")


EtaOpt = typer.Option(None, "--eta", help="DDIM η (0 = deterministic).")


SeedOpt = typer.Option(None, "--seed", help="Seed S; image i uses S+i. Random when omitted (always printed).")


NumOpt = typer.Option(1, "--num", help="Images per prompt.")


WidthOpt = typer.Option(None, "--width", help="Image width in pixels (multiple of the model's factor).")


HeightOpt = typer.Option(None, "--height", help="Image height in pixels.")


OutOpt = typer.Option(
    None,
    "--out",
    "-o",
    help="Output path or pattern: {index}, {seed}, {prompt}, {i}, {model} (e.g. out/{index:05d}-{seed}.png).",
)


DtypeOpt = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16.")


DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


JsonOpt = typer.Option(False, "--json", help="Print one JSON record per image instead of its path.")


OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing output files.")


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr.")


ClassOpt = typer.Option(None, "--class", help="Class label for class-conditional models.")


EmaOpt = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights (model_ema.*).")


LowMemOpt = typer.Option(
    None,
    "--low-memory/--full-weights",
    show_default=False,
    help="CPU, fp32: keep an fp16/bf16 file's weights as stored and upcast each layer's as it "
    "runs (about half the memory, about 10% slower per step), or upcast the UNet's and the decoder's at load. "
    "Default: full weights when they take under a third of the available memory.",
)


WeightsOpt = typer.Option(
    None,
    "--weights",
    help="int8: hold the UNet's, text encoder's and image decoder's layer weights in 8 bits (a scale per output "
    "channel), dequantised layer by layer as they run: about a quarter of the fp32 weight memory, images within a "
    "few levels. Default: as the --low-memory/--full-weights choice.",
)


def keyword_params(**options) -> list[inspect.Parameter]:
    """NAME=(annotation, Typer option) → keyword parameters, in that order, for `with_options`."""
    kw = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(name, kw, default=opt, annotation=a) for name, (a, opt) in options.items()]


def with_options(params: list[inspect.Parameter]):
    """Give a command the Typer options `params` after its own (in --help too). The command takes them as its
    ``**kwargs`` and hands them on whole, so commands that share a run of options declare it once."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=[*own, *params])
        return fn

    return decorate
