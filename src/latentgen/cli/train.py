"""`latentgen train-ae` and `latentgen train-ldm`: argument parsing over latentgen.training; torch is imported
inside the commands. Under `torchrun --nproc_per_node N` for data parallelism. Exit codes: 0 done,
130 interrupted by Ctrl-C / 143 by SIGTERM (a checkpoint was written), 2 usage error."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import typer

from ..errors import ConfigError
from .app import command
from .options import keyword_params, with_options


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers like 0.5,0.9, not {text!r}") from None


def _ints(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers like 1,2,4, not {text!r}") from None


def _finish(result) -> None:
    if result.interrupted:
        print(f"latentgen: interrupted at step {result.step}; continue with --resume {result.out}", file=sys.stderr)
    print(result.model_path)
    if result.interrupted:
        raise SystemExit(128 + (result.signal or 2))


DataOpt = typer.Option(
    ..., "--data", help="Image folder (captions: NAME.txt or captions.jsonl) or 'shapes[:N[:SEED]]'."
)


OutOpt = typer.Option(None, "--out", help="Output folder (checkpoints, training state, samples).")


SizeOpt = typer.Option(64, "--size", help="Training image size in pixels (square crops).")


StepsOpt = typer.Option(1000, "--steps", help="Total optimisation steps (a resumed run continues up to this).")


BatchOpt = typer.Option(8, "--batch-size", help="Global batch size (all processes together).")


MicroOpt = typer.Option(
    None,
    "--micro-batch",
    help="Micro-batch size (default: batch / processes); the global "
    "batch is cut into micro-batches, each with its own random numbers.",
)


WarmupOpt = typer.Option(0, "--warmup", help="Linear learning-rate warm-up steps.")


DecayOpt = typer.Option("constant", "--lr-decay", help="After warm-up: constant, or cosine (to lr/10 at --steps).")


SeedOpt = typer.Option(0, "--seed", help="Seed of data order, noise and initial weights.")


EmaOpt = typer.Option(0.999, "--ema-decay", help="EMA decay; the saved model holds the EMA weights.")


SaveOpt = typer.Option(500, "--save-every", help="Write a checkpoint every N steps (and at the end).")


SampleOpt = typer.Option(0, "--sample-every", help="Write a sample grid PNG to OUT/samples every N steps (0: never).")


LogOpt = typer.Option(10, "--log-every", help="Print progress on stderr every N steps.")


Bf16Opt = typer.Option(False, "--bf16", help="bf16 autocast where the device supports it.")


ResumeOpt = typer.Option(None, "--resume", help="Continue the run in this folder (same options; --steps may grow).")


OverwriteOpt = typer.Option(False, "--overwrite", help="Start over in an --out folder that holds another run.")


InitOpt = typer.Option(None, "--init", help="Fine-tune from this checkpoint (any file latentgen loads).")


DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available).")


SaveDtypeOpt = typer.Option("float32", "--save-dtype", help="Storage of the saved model: float32, float16, bfloat16.")


BudgetOpt = typer.Option(
    0.0,
    "--time-budget",
    help="Seconds for the whole run: --steps shrinks to what fits at the "
    "speed of the first steps (the log says the step count; 0: off).",
)


RUN_OPTIONS = keyword_params(
    ema_decay=(float, EmaOpt),
    save_every=(int, SaveOpt),
    sample_every=(int, SampleOpt),
    log_every=(int, LogOpt),
    bf16=(bool, Bf16Opt),
    resume=(Optional[str], ResumeOpt),
    overwrite=(bool, OverwriteOpt),
    init=(Optional[str], InitOpt),
    device=(Optional[str], DeviceOpt),
    save_dtype=(str, SaveDtypeOpt),
    time_budget=(float, BudgetOpt),
)
"""The options both training commands end with (`RunOptions`'s); each takes them as ``**run``."""


def _options(cls, given: dict, **parsed):
    """`cls` (AEOptions, LDMOptions) from a command's parameters (its `locals()` on entry, ``**run`` included),
    with the `parsed` values in place of the option strings."""
    values = {**given, **given["run"], **parsed}
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@command("train-ae")
@with_options(RUN_OPTIONS)
def train_ae(
    data: str = DataOpt,
    reg: str = typer.Option("kl", "--reg", help="Regularisation: kl (KL penalty) or vq (vector quantisation)."),
    f: int = typer.Option(4, "--f", help="Downsampling factor of the latent space (power of two)."),
    out: Optional[str] = OutOpt,
    size: int = SizeOpt,
    steps: int = StepsOpt,
    batch_size: int = BatchOpt,
    micro_batch: Optional[int] = MicroOpt,
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate (autoencoder and discriminator)."),
    warmup: int = WarmupOpt,
    lr_decay: str = DecayOpt,
    seed: int = SeedOpt,
    ch: int = typer.Option(64, "--ch", help="Base channel count of encoder/decoder."),
    ch_mult: Optional[str] = typer.Option(None, "--ch-mult", help="Channel multipliers per level, e.g. 1,2,4."),
    num_res_blocks: int = typer.Option(1, "--num-res-blocks", help="ResnetBlocks per level."),
    attn_resolutions: Optional[str] = typer.Option(None, "--attn-resolutions", help="Feature sizes with attention."),
    embed_dim: int = typer.Option(4, "--embed-dim", help="Latent channels."),
    n_embed: int = typer.Option(256, "--n-embed", help="Codebook size (vq)."),
    kl_weight: float = typer.Option(1e-6, "--kl-weight", help="Weight of the KL penalty (kl)."),
    codebook_weight: float = typer.Option(1.0, "--codebook-weight", help="Weight of the VQ loss (vq)."),
    perceptual_weight: float = typer.Option(1.0, "--perceptual-weight", help="Weight of the perceptual loss."),
    lpips_vgg: Optional[str] = typer.Option(
        None,
        "--lpips-vgg",
        help="VGG16 weights (torchvision keys, optional "
        "LPIPS lin heads) in safetensors: use LPIPS; else a Laplacian-pyramid "
        "loss.",
    ),
    disc_start: int = typer.Option(1000, "--disc-start", help="Step at which the adversarial loss starts."),
    disc_weight: float = typer.Option(0.5, "--disc-weight", help="Weight of the adaptive adversarial loss."),
    disc_layers: int = typer.Option(3, "--disc-layers", help="PatchGAN discriminator depth."),
    disc_ch: int = typer.Option(64, "--disc-ch", help="PatchGAN discriminator base channels."),
    norm_groups: int = typer.Option(
        32,
        "--norm-groups",
        help="GroupNorm groups (32 as the original; fewer keep more colour contrast in narrow, flat-image models).",
    ),
    l2_weight: float = typer.Option(0.0, "--l2-weight", help="Weight of an MSE term beside the L1 pixel loss."),
    adam_betas: str = typer.Option("0.5,0.9", "--adam-betas", help="Adam betas of autoencoder and discriminator."),
    **run,
) -> None:
    """Train a KL or VQ autoencoder (L1 + perceptual + PatchGAN + KL/VQ); writes OUT/autoencoder.safetensors."""
    given = dict(locals())
    from ..training.autoencoder import train_autoencoder
    from ..training.options import AEOptions

    opts = _options(
        AEOptions,
        given,
        ch_mult=_ints(ch_mult, "--ch-mult"),
        attn_resolutions=_ints(attn_resolutions, "--attn-resolutions") or (),
        adam_betas=_floats(adam_betas, "--adam-betas"),
    )
    _finish(train_autoencoder(opts))


@command("train-ldm")
@with_options(RUN_OPTIONS)
def train_ldm(
    data: str = DataOpt,
    ae: Optional[str] = typer.Option(None, "--ae", help="Frozen autoencoder (from train-ae, or any model file)."),
    cond: str = typer.Option("none", "--cond", help="Conditioning: none, class, text, sr or inpaint."),
    out: Optional[str] = OutOpt,
    prediction: str = typer.Option("eps", "--prediction", help="What the UNet predicts: eps or v."),
    cond_drop: float = typer.Option(0.1, "--cond-drop", help="Probability of dropping text/class (for CFG)."),
    size: int = SizeOpt,
    steps: int = StepsOpt,
    batch_size: int = BatchOpt,
    micro_batch: Optional[int] = MicroOpt,
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    warmup: int = WarmupOpt,
    lr_decay: str = DecayOpt,
    seed: int = SeedOpt,
    model_channels: int = typer.Option(64, "--model-channels", help="UNet base channels."),
    channel_mult: str = typer.Option("1,2,2", "--channel-mult", help="UNet channel multipliers per level."),
    num_res_blocks: int = typer.Option(1, "--num-res-blocks", help="UNet ResBlocks per level."),
    attention_resolutions: str = typer.Option(
        "2,4", "--attention-resolutions", help="Downsampling rates with attention (1 = latent resolution)."
    ),
    num_head_channels: int = typer.Option(32, "--num-head-channels", help="Width of each attention head."),
    transformer_depth: int = typer.Option(1, "--transformer-depth", help="Transformer blocks per attention."),
    text_dim: int = typer.Option(128, "--text-dim", help="Width of the BERT text transformer (text)."),
    text_layers: int = typer.Option(2, "--text-layers", help="Depth of the BERT text transformer (text)."),
    text_heads: int = typer.Option(4, "--text-heads", help="Heads of the BERT text transformer (text)."),
    text_length: int = typer.Option(
        77, "--text-length", help="Tokens per prompt of the BERT text transformer (longer prompts are cut; text)."
    ),
    class_dim: int = typer.Option(64, "--class-dim", help="Class embedding width (class)."),
    scale_batches: int = typer.Option(4, "--scale-batches", help="Batches used to measure the latent scale."),
    sample_steps: int = typer.Option(20, "--sample-steps", help="Sampler steps of the sample grids."),
    cache_latents: bool = typer.Option(
        False,
        "--cache-latents",
        help="Encode every image once, up front, and keep "
        "the encoder outputs in memory (8 KB per 64x64 image at f=4; 128 KB at "
        "512x512 f=8).",
    ),
    workers: int = typer.Option(0, "--workers", help="Processes that render / load images for --cache-latents."),
    **run,
) -> None:
    """Train a latent diffusion model on a frozen autoencoder; writes OUT/model.safetensors (EMA weights)."""
    given = dict(locals())
    from ..training.ldm import train_ldm as train
    from ..training.options import LDMOptions

    opts = _options(
        LDMOptions,
        given,
        channel_mult=_ints(channel_mult, "--channel-mult"),
        attention_resolutions=_ints(attention_resolutions, "--attention-resolutions"),
    )
    _finish(train(opts))
