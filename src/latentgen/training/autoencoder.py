"""`train_autoencoder`: the LDM first stage (paper Sec. 3.1, App. G), KL- or VQ-regularised, with the
reconstruction, perceptual, adversarial and regularisation losses."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .batches import BatchStream, MicroPlan, open_data, plan_micro_batches, step_seed
from .distributed import Dist, autocast, setup_distributed
from .loop import cast_copy, lr_at, run_trainer, save_grid, set_lr, stderr_log
from .losses import HingeLoss, NLayerDiscriminator, adaptive_weight, perceptual_loss, perceptual_name
from .options import AE_FILE, STATE_FILE, AEOptions, TrainResult, check_run_options
from .state import EMA, check_resume, prepare_out, save_state


def ae_config(opts: AEOptions):
    from ..autoencoder import AutoencoderConfig

    levels = int(round(math.log2(opts.f))) + 1
    if opts.f < 1 or 2 ** (levels - 1) != opts.f:
        raise ConfigError(f"--f {opts.f} must be a power of two (1, 2, 4, 8, ...)")
    mult = tuple(opts.ch_mult) if opts.ch_mult else (1, 2, 4, 4, 4, 4)[:levels]
    if len(mult) != levels:
        raise ConfigError(f"--ch-mult {','.join(map(str, mult))} has {len(mult)} levels; --f {opts.f} needs {levels}")
    if opts.norm_groups < 1 or any(opts.ch * m % opts.norm_groups for m in mult):
        raise ConfigError(
            f"--ch {opts.ch} × --ch-mult must give multiples of --norm-groups {opts.norm_groups} (GroupNorm)"
        )
    if opts.reg not in ("kl", "vq"):
        raise ConfigError(f"--reg must be kl or vq, not {opts.reg!r}")
    return AutoencoderConfig(
        kind=opts.reg,
        embed_dim=opts.embed_dim,
        z_channels=opts.embed_dim,
        ch=opts.ch,
        ch_mult=mult,
        num_res_blocks=opts.num_res_blocks,
        attn_resolutions=tuple(opts.attn_resolutions),
        resolution=opts.size,
        double_z=opts.reg == "kl",
        n_embed=opts.n_embed if opts.reg == "vq" else None,
        norm_groups=opts.norm_groups,
    )


@dataclass
class AETrainer:
    opts: AEOptions
    dist: Dist
    stream: BatchStream
    plan: MicroPlan
    ae: nn.Module
    disc: nn.Module
    perceptual: nn.Module
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA
    ae_ddp: nn.Module = field(init=False)  # the autoencoder under DistributedDataParallel (itself in one process)
    disc_ddp: nn.Module = field(init=False)  # the discriminator's hinge loss, likewise

    def __post_init__(self) -> None:
        self.ae_ddp = self.dist.wrap(self.ae)
        self.disc_ddp = self.dist.wrap(HingeLoss(self.disc))

    def generator_loss(self, x: torch.Tensor, g: torch.Generator, step: int):
        """taming LPIPSWithDiscriminator / VQLPIPSWithDiscriminator, optimizer_idx 0."""
        opts = self.opts
        if opts.reg == "kl":
            rec, posterior = self.ae_ddp(x, sample_posterior=True, generator=g)
        else:
            rec, qloss, _ = self.ae_ddp(x)
        rec_loss = (x - rec).abs()
        if opts.l2_weight:
            rec_loss = rec_loss + opts.l2_weight * (x - rec).pow(2)
        p_loss = self.perceptual(x.float(), rec.float()) if opts.perceptual_weight > 0 else rec.new_zeros(())
        rec_loss = rec_loss + opts.perceptual_weight * p_loss
        terms = {"rec": (x - rec).abs().mean().item(), "p": p_loss.mean().item()}
        if opts.reg == "kl":
            nll = rec_loss.sum() / rec_loss.shape[0]
            kl = posterior.kl().sum() / x.shape[0]
            loss = nll + opts.kl_weight * kl
            terms["kl"] = kl.item()
        else:
            nll = rec_loss.mean()
            loss = nll + opts.codebook_weight * qloss.mean()
            terms["q"] = qloss.mean().item()
        if step >= opts.disc_start:
            g_loss = -self.disc(rec).mean()
            d_weight = adaptive_weight(nll, g_loss, self.ae.decoder.conv_out.weight) * opts.disc_weight
            loss = loss + d_weight * g_loss
            terms.update(g=g_loss.item(), d_weight=d_weight.item())
        return loss, rec.detach(), terms

    def step(self, step: int) -> dict:
        opts, dist, plan = self.opts, self.dist, self.plan
        indices = self.stream.indices(step)
        set_lr(self.opt_ae, lr_at(opts, step))
        set_lr(self.opt_d, lr_at(opts, step))
        self.opt_ae.zero_grad(set_to_none=True)
        self.disc.requires_grad_(False)
        recs, totals = {}, {}
        for n, j in enumerate(plan.mine):
            x = self.stream.items(indices[j * plan.size : (j + 1) * plan.size])["image"].to(dist.device)
            g = torch.Generator().manual_seed(step_seed(opts.seed, step, j))
            with dist.accumulating(self.ae_ddp, last=n == len(plan.mine) - 1):
                with autocast(dist, opts.bf16):
                    loss, rec, terms = self.generator_loss(x, g, step)
                (loss / len(plan.mine)).backward()
            recs[j] = (x, rec)
            for k, v in {"loss": loss.item(), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v / len(plan.mine)
        self.opt_ae.step()
        self.ema.update(self.ae)
        if step >= opts.disc_start:
            self.disc.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for n, j in enumerate(plan.mine):
                x, rec = recs[j]
                with dist.accumulating(self.disc_ddp, last=n == len(plan.mine) - 1):
                    with autocast(dist, opts.bf16):
                        d_loss = self.disc_ddp(x, rec)
                    (d_loss / len(plan.mine)).backward()
                totals["d"] = totals.get("d", 0.0) + d_loss.item() / len(plan.mine)
            self.opt_d.step()
        return totals

    @torch.no_grad()
    def scale_factor(self) -> float:
        """1 / std of the EMA model's latents on the first global batch (LDM Sec. 4.3.2)."""
        x = self.stream.items(self.stream.indices(0))["image"].to(self.dist.device)
        z = self.ema.module.encode_latent(x)
        return float(1.0 / z.float().std().clamp(min=1e-8))

    def save(self, out: Path, step: int, meta: dict) -> Path:
        from ..loading.layout import FIRST_STAGE_PREFIX
        from ..loading.safetensors import write_safetensors

        scale = self.scale_factor()  # collective-free: every rank computes it, rank 0 writes
        if not self.dist.main:
            return out / AE_FILE
        save_state(
            out / STATE_FILE,
            step=step,
            modules={"ae": self.ae, "disc": self.disc},
            optimizers={"ae": self.opt_ae, "disc": self.opt_d},
            emas={"ae": self.ema},
            meta=meta,
        )
        module = cast_copy(self.ema.module, self.opts.save_dtype)
        tensors = {FIRST_STAGE_PREFIX + k: v for k, v in module.state_dict().items()}
        info = {
            "autoencoder": json.dumps({"config": self.ema.module.config.to_dict(), "scale_factor": scale}),
            "perceptual_loss": perceptual_name(self.perceptual),
            "step": str(step),
            "training": json.dumps(self.opts.identity()),
        }
        write_safetensors(out / AE_FILE, tensors, info)
        return out / AE_FILE

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        x = self.stream.items(list(range(min(8, len(self.stream.dataset)))))["image"].to(self.dist.device)
        rec = self.ema.module.decode_latent(self.ema.module.encode_latent(x))
        save_grid(
            [(x + 1) / 2, ((rec.float() + 1) / 2).clamp(0, 1)],
            out / "samples" / f"step-{step:07d}.png",
            {"latentgen": json.dumps({"task": "train-ae", "step": step, "rows": ["input", "reconstruction"]})},
        )


def train_autoencoder(opts: AEOptions, *, log=stderr_log, callback=None) -> TrainResult:
    """Train a KL or VQ first stage (see the module docstring). Writes DIR/autoencoder.safetensors
    (EMA weights, `loading.bundle.load_first_stage` format) and DIR/state.safetensors."""
    from ..autoencoder import AutoencoderConfig, build_autoencoder
    from ..loading.bundle import load_first_stage

    t_begin = time.perf_counter()
    check_run_options(opts)
    dist = setup_distributed(opts.device)
    out, state = prepare_out(opts)
    dataset = open_data(opts)
    plan = plan_micro_batches(opts, dist)
    perceptual = perceptual_loss(opts).to(dist.device)
    torch.manual_seed(opts.seed)
    if state is not None:
        check_resume(state, "autoencoder", opts)
        cfg = AutoencoderConfig.from_dict(state.json("model_config"))
        ae = build_autoencoder(cfg)
    elif opts.init:
        fs = load_first_stage(opts.init)
        ae, cfg = fs.module.float().requires_grad_(True), fs.cfg
    else:
        cfg = ae_config(opts)
        ae = build_autoencoder(cfg)
    disc = NLayerDiscriminator(cfg.out_ch, opts.disc_ch, opts.disc_layers)
    if state is not None:
        state.load_module("ae", ae)
        state.load_module("disc", disc)
    ae.to(dist.device).train().requires_grad_(True)
    disc.to(dist.device).train()
    opt_ae = torch.optim.Adam(ae.parameters(), lr=opts.lr, betas=tuple(opts.adam_betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts.lr, betas=tuple(opts.adam_betas))
    ema = EMA(ae, opts.ema_decay)
    start = 0
    if state is not None:
        state.restore(optimizers={"ae": opt_ae, "disc": opt_d}, emas={"ae": ema})
        start = state.step
    trainer = AETrainer(
        opts, dist, BatchStream(dataset, opts.batch_size, opts.seed), plan, ae, disc, perceptual, opt_ae, opt_d, ema
    )
    meta = {
        "kind": "autoencoder",
        "run": opts.identity(),
        "model_config": cfg.to_dict(),
        "perceptual_loss": perceptual_name(perceptual),
    }
    if dist.main:
        log(
            f"train-ae: {cfg.kind.upper()} f={cfg.factor}, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M "
            f"params, perceptual loss: {perceptual_name(perceptual)}, {dist.world} process(es), from step {start}"
        )
    return run_trainer(opts, dist, trainer, start, out, AE_FILE, meta, log, callback, t_begin)
