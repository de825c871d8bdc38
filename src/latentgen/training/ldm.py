"""`train_ldm`: ε- or v-prediction on the frozen autoencoder's scaled latents, with no / class / text /
super-resolution / inpainting conditioning and condition dropout for classifier-free guidance."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from .batches import BatchStream, MicroPlan, open_data, plan_micro_batches, step_seed
from .distributed import Dist, autocast, setup_distributed
from .loop import cast_copy, lr_at, run_trainer, save_grid, set_lr, stderr_log
from .options import COND_CHOICES, LDM_FILE, STATE_FILE, LDMOptions, TrainResult, check_run_options
from .state import EMA, TrainState, check_resume, prepare_out, save_state


def cond_name(cfg) -> str:
    """The --cond value that describes a ModelConfig."""
    if cfg.concat == "lowres":
        return "sr"
    if cfg.concat == "inpaint":
        return "inpaint"
    return {"bert": "text", "class": "class", "none": "none"}.get(cfg.cond.kind, "text")


def class_names(dataset) -> list[str]:
    """Class of an item: for the shapes set, colour and shape of the first object ("red circle"); for a
    folder, its caption (each distinct caption is a class)."""
    from ..data import COLOURS, SHAPES, ShapesDataset

    if isinstance(dataset, ShapesDataset):
        return [f"{c} {s}" for c in COLOURS for s in SHAPES]
    names = sorted(set(dataset.captions))
    if len(names) < 2 or "" in names:
        raise InputError(
            f"--cond class needs every image of '{dataset.root}' captioned with its class name (at least two classes)"
        )
    return names


def class_label(dataset, names: list[str], caption: str) -> int:
    from ..data import ShapesDataset, parse_caption

    if isinstance(dataset, ShapesDataset):
        obj = parse_caption(caption).objects[0]
        return names.index(f"{obj.colour} {obj.shape}")
    return names.index(caption)


def ldm_config(opts: LDMOptions, first_stage_cfg, scale: float, n_classes: int | None, captions: bool):
    """A new model's config: text conditioning for --cond text, and for --cond inpaint when captions exist."""
    from ..config import ModelConfig
    from ..text.config import CondConfig
    from ..unet import UNetConfig

    if any(opts.model_channels * m % 32 for m in opts.channel_mult):
        raise ConfigError(
            f"--model-channels {opts.model_channels} × --channel-mult must give multiples of 32 "
            "(GroupNorm with 32 groups); e.g. --model-channels 32 or 64"
        )
    lat = first_stage_cfg.embed_dim
    text = opts.cond == "text" or (opts.cond == "inpaint" and captions)
    if opts.cond == "class":
        cond = CondConfig(kind="class", n_classes=n_classes + 1, embed_dim=opts.class_dim, null_label=n_classes)
    elif text:
        cond = CondConfig(
            kind="bert",
            n_embed=opts.text_dim,
            n_layer=opts.text_layers,
            heads=opts.text_heads,
            dim_head=opts.text_dim // opts.text_heads,
            max_seq_len=opts.text_length,
        )
    else:
        cond = CondConfig(kind="none")
    extra = {"sr": 3, "inpaint": lat + 1}.get(opts.cond, 0)
    concat = {"sr": "lowres", "inpaint": "inpaint"}.get(opts.cond)
    ctx = cond.context_dim
    unet = UNetConfig(
        in_channels=lat + extra,
        out_channels=lat,
        model_channels=opts.model_channels,
        attention_resolutions=tuple(opts.attention_resolutions),
        num_res_blocks=opts.num_res_blocks,
        channel_mult=tuple(opts.channel_mult),
        num_head_channels=opts.num_head_channels,
        use_spatial_transformer=ctx is not None,
        transformer_depth=opts.transformer_depth,
        context_dim=ctx,
        image_size=opts.size // first_stage_cfg.factor,
    )
    key = ("hybrid" if ctx else "concat") if concat else ("crossattn" if ctx else "none")
    return ModelConfig(
        unet=unet,
        first_stage=first_stage_cfg,
        cond=cond,
        family="latentgen",
        prediction=opts.prediction,
        prediction_source="metadata",
        conditioning_key=key,
        concat=concat,
        scale_factor=scale,
        name=Path(opts.out or opts.resume).name,
    )


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The super-resolution input: an image in [-1, 1] downsampled by the autoencoder's factor f (bicubic,
    antialiased), so it lies at latent resolution (LDM Sec. 4.4; concat conditioning)."""
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def _load_ae(path: str, device):
    from ..loading.bundle import load_first_stage

    try:
        return load_first_stage(path, device=device)
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"--ae {path}: not an autoencoder latentgen can load ({e})") from e


@dataclass
class LDMTrainer:
    opts: LDMOptions
    dist: Dist
    stream: BatchStream
    plan: MicroPlan
    cfg: object  # ModelConfig
    unet: nn.Module
    cond: nn.Module
    first_stage: nn.Module
    schedule: object
    opt: torch.optim.Optimizer
    emas: dict
    classes: list[str] | None = None
    cache: dict | None = None  # --cache-latents: {"enc": every item's encoder output, "captions": [...]}
    unet_ddp: nn.Module = field(init=False)  # the UNet under DistributedDataParallel (itself in one process)
    cond_ddp: nn.Module = field(init=False)  # the conditioning stage, likewise where it is trained

    def __post_init__(self) -> None:
        self.unet_ddp, self.cond_ddp = self.dist.wrap(self.unet), self.dist.wrap(self.cond)

    @torch.no_grad()
    def fill_cache(self) -> None:
        """--cache-latents: every item's encoder output (KL moments / VQ latent) and caption, computed once up
        front (each rank encodes its share, then all gather; --workers processes render / load the images), so
        steps only draw the posterior noise and never touch the images again, except for sr / inpaint."""
        from ..autoencoder import DiagonalGaussian

        ds, dist = self.stream.dataset, self.dist
        per = -(-len(ds) // dist.world)
        mine = torch.utils.data.Subset(ds, range(dist.rank * per, min(len(ds), (dist.rank + 1) * per)))
        loader = torch.utils.data.DataLoader(mine, batch_size=max(self.plan.size, 16), num_workers=self.opts.workers)
        encs, captions = [], []
        for batch in loader:
            e = self.first_stage.encode(batch["image"].to(dist.device))
            encs.append(e.moments if isinstance(e, DiagonalGaussian) else e)
            captions += batch["caption"]
        enc = torch.cat(encs)
        if dist.world > 1:
            pad = enc.new_zeros((per - enc.shape[0], *enc.shape[1:]))
            parts = [enc.new_empty((per, *enc.shape[1:])) for _ in range(dist.world)]
            torch.distributed.all_gather(parts, torch.cat([enc, pad]))
            enc = torch.cat(parts)[: len(ds)]
            everyone: list = [None] * dist.world
            torch.distributed.all_gather_object(everyone, captions)
            captions = [c for part in everyone for c in part]
        self.cache = {"enc": enc, "captions": captions}
        if self.cfg.cond.kind == "bert":  # token ids too: the tokenizer costs ~0.15 ms per caption and step
            unique = sorted(set(captions) | {""})
            ids = torch.cat([self.cond.tokenize(unique[i : i + 4096]) for i in range(0, len(unique), 4096)])
            row = {c: i for i, c in enumerate(unique)}
            self.cache["ids"] = ids[torch.tensor([row[c] for c in captions])]
            self.cache["empty"] = ids[row[""]]

    @torch.no_grad()
    def latents(self, x: torch.Tensor, g: torch.Generator | None, index: list[int] | None = None) -> torch.Tensor:
        """Scaled latent: a posterior sample (LDM get_first_stage_encoding) × scale factor; from the cache of
        encoder outputs where the items' indices are given and --cache-latents is on."""
        if self.cache is None or index is None:
            z = self.first_stage.encode_latent(x, generator=g, sample=g is not None)
            return z.float() * self.cfg.scale_factor
        from ..autoencoder import DiagonalGaussian

        enc = self.cache["enc"][torch.as_tensor(index, device=self.cache["enc"].device)]
        if self.cfg.first_stage.kind == "kl":
            posterior = DiagonalGaussian(enc)
            enc = posterior.sample(g) if g is not None else posterior.mode()
        return enc.float() * self.cfg.scale_factor

    def lowres(self, x: torch.Tensor) -> torch.Tensor:
        return downsample(x, self.cfg.factor)

    def conditioning(self, batch: dict, x: torch.Tensor, g: torch.Generator) -> dict:
        """Denoiser kwargs of a micro-batch; text / class dropped with probability --cond-drop."""
        opts, kind, n = self.opts, self.cfg.cond.kind, len(batch["caption"])
        drop = torch.rand(n, generator=g) < opts.cond_drop
        kw: dict = {}
        if kind == "bert" and self.cache is not None:  # fill_cache tokenized every caption
            ids = self.cache["ids"][torch.tensor(batch["index"])]
            ids = torch.where(drop[:, None], self.cache["empty"], ids)
            kw["context"] = self.cond_ddp(ids.to(self.dist.device))
        elif kind == "bert":
            prompts = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            kw["context"] = self.cond_ddp(self.cond.tokenize(prompts).to(self.dist.device))
        elif kind == "class":
            labels = [
                self.cfg.cond.null_label if d else class_label(self.stream.dataset, self.classes, c)
                for c, d in zip(batch["caption"], drop.tolist())
            ]
            kw["context"] = self.cond_ddp(torch.tensor(labels, device=self.dist.device))
        if self.cfg.concat == "lowres":
            kw["concat"] = self.lowres(x)
        elif self.cfg.concat == "inpaint":
            from ..data import random_mask

            mask = torch.stack([random_mask(x.shape[-2], x.shape[-1], g) for _ in range(n)]).to(x.device)
            masked = self.latents(x * (1 - mask), g)
            kw["concat"] = torch.cat([F.interpolate(mask, size=masked.shape[-2:]), masked], dim=1)
        return kw

    def step(self, step: int) -> dict:
        from ..denoiser import training_loss

        opts, dist, plan = self.opts, self.dist, self.plan
        indices = self.stream.indices(step)
        set_lr(self.opt, lr_at(opts, step))
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for n, j in enumerate(plan.mine):
            mine = indices[j * plan.size : (j + 1) * plan.size]
            if self.cache is not None and self.cfg.concat is None:  # no image needed
                batch, x = {"caption": [self.cache["captions"][i] for i in mine], "index": mine}, None
            else:
                batch = self.stream.items(mine)
                x = batch["image"].to(dist.device)
            g = torch.Generator().manual_seed(step_seed(opts.seed, step, j))
            with dist.accumulating(self.unet_ddp, self.cond_ddp, last=n == len(plan.mine) - 1):
                with autocast(dist, opts.bf16):
                    kw = self.conditioning(batch, x, g)
                    z0 = self.latents(x, g, batch["index"])
                    loss = training_loss(self.unet_ddp, self.schedule, self.cfg.prediction, z0, kw, g)
                (loss / len(plan.mine)).backward()
            total += loss.item() / len(plan.mine)
        self.opt.step()
        for name, m in (("unet", self.unet), ("cond", self.cond)):
            if name in self.emas:
                self.emas[name].update(m)
        return {"loss": total}

    def ema_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.emas["unet"].module, self.emas["cond"].module if "cond" in self.emas else self.cond

    def save(self, out: Path, step: int, meta: dict) -> Path:
        from ..loading.bundle import save_model

        if not self.dist.main:
            return out / LDM_FILE
        emas = {k: v for k, v in self.emas.items()}
        save_state(
            out / STATE_FILE,
            step=step,
            modules={"unet": self.unet, "cond": self.cond, "first_stage": self.first_stage},
            optimizers={"ldm": self.opt},
            emas=emas,
            meta=meta,
        )
        unet, cond = self.ema_modules()
        d = self.opts.save_dtype
        extra = {"step": str(step), "training": json.dumps(self.opts.identity())}
        if self.classes:
            extra["class_names"] = json.dumps(self.classes)
        save_model(
            out / LDM_FILE,
            self.cfg,
            cast_copy(unet, d),
            cast_copy(self.first_stage, d),
            cast_copy(cond, d),
            metadata=extra,
        )
        return out / LDM_FILE

    def bundle(self):
        from ..loading.bundle import ModelBundle

        unet, cond = self.ema_modules()
        return ModelBundle(self.cfg, unet, self.first_stage, cond, self.schedule, "<training>", "latentgen")

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        from .. import pipelines

        n = min(4, len(self.stream.dataset))
        batch = self.stream.items(list(range(n)))
        x01 = (batch["image"] + 1) / 2
        bundle, kind, concat = self.bundle(), self.cfg.cond.kind, self.cfg.concat
        guided = 3.0 if self.opts.cond_drop > 0 and kind in ("bert", "class") else 1.0
        settings = pipelines.Settings(steps=self.opts.sample_steps, sampler="dpmpp_2m", cfg=guided)
        seeds = list(range(n))
        prompts = batch["caption"] if kind == "bert" else [""] * n
        if kind == "class":
            prompts = [str(class_label(self.stream.dataset, self.classes, c)) for c in batch["caption"]]
        size = x01.shape[-1]
        if concat == "lowres":
            low = (self.lowres(batch["image"]) + 1) / 2
            rows = [low, pipelines.superres(bundle, low, seeds, settings), x01]
        elif concat == "inpaint":
            from ..data import random_mask

            g = torch.Generator().manual_seed(step_seed(self.opts.seed, 0xA5))
            masks = torch.stack([random_mask(size, size, g) for _ in range(n)])
            settings.strength = 1.0
            res = pipelines.inpaint(bundle, x01, masks, prompts, [""] * n, seeds, settings)
            rows = [x01 * (1 - masks), res, x01]
        else:
            rows = [pipelines.txt2img(bundle, prompts, [""] * n, seeds, size, size, settings), x01]
        save_grid(
            rows,
            out / "samples" / f"step-{step:07d}.png",
            {"latentgen": json.dumps({"task": "train-ldm", "step": step, "prompts": prompts})},
        )


@torch.no_grad()
def measure_scale(first_stage: nn.Module, stream: BatchStream, batches: int, device) -> float:
    """LDM Sec. 4.3.2 / App. D.1: rescale latents to unit variance, scale = 1 / std(z) over the first batches
    (posterior means; every rank computes the same value)."""
    zs = []
    for step in range(max(batches, 1)):
        x = stream.items(stream.indices(step))["image"].to(device)
        zs.append(first_stage.encode_latent(x).float())
    return float(1.0 / torch.cat(zs).std().clamp(min=1e-8))


def _build_ldm(opts: LDMOptions, state: TrainState | None, stream: BatchStream, classes, dist: Dist, log):
    """(ModelConfig, unet, cond, first_stage) for a fresh run, a fine-tune (--init) or a resume."""
    from ..config import ModelConfig
    from ..loading.bundle import build_modules, load_model

    if state is not None:
        cfg = ModelConfig.from_dict(state.json("model_config"))
        unet, first_stage, cond = build_modules(cfg)
        for name, m in (("unet", unet), ("cond", cond), ("first_stage", first_stage)):
            state.load_module(name, m)
        return cfg, unet, cond, first_stage
    if opts.init:
        if opts.ae:
            raise ConfigError("--ae and --init both given: a fine-tune uses the autoencoder inside --init; drop --ae")
        bundle = load_model(opts.init, dtype=None)  # plain modules in the stored dtype (no upcast-on-use wrappers)
        cfg = bundle.config
        if cond_name(cfg) != opts.cond:
            raise ConfigError(f"--init {opts.init} is a '{cond_name(cfg)}' model; pass --cond {cond_name(cfg)}")
        cfg.prediction, cfg.prediction_source = opts.prediction, "metadata"
        return cfg, bundle.unet.float(), bundle.cond.float(), bundle.first_stage.float()
    if not opts.ae:
        raise ConfigError("--ae AE.safetensors is required (the autoencoder from train-ae), or --init CKPT")
    fs = _load_ae(opts.ae, dist.device)
    scale = measure_scale(fs.module, stream, opts.scale_batches, dist.device)
    if dist.main:
        log(f"train-ldm: latent scale factor 1/std = {scale:.5g} (measured on {opts.scale_batches} batches)")
    cfg = ldm_config(opts, fs.cfg, scale, len(classes) if classes else None, _has_captions(stream.dataset))
    unet, _, cond = build_modules(cfg)
    return cfg, unet, cond, fs.module.float()


def _has_captions(dataset) -> bool:
    from ..data import ShapesDataset

    return isinstance(dataset, ShapesDataset) or all(c.strip() for c in getattr(dataset, "captions", [""]))


def train_ldm(opts: LDMOptions, *, log=stderr_log, callback=None) -> TrainResult:
    """Train (or fine-tune) a latent diffusion model on a frozen autoencoder. Writes DIR/model.safetensors
    (EMA weights, `loading.bundle.load_model` format) and DIR/state.safetensors."""
    from ..loading.bundle import make_schedule

    if opts.cond not in COND_CHOICES:
        raise ConfigError(f"--cond must be one of {', '.join(COND_CHOICES)}, not {opts.cond!r}")
    if opts.prediction not in ("eps", "v"):
        raise ConfigError(f"--prediction must be eps or v, not {opts.prediction!r}")
    if not 0.0 <= opts.cond_drop < 1.0:
        raise ConfigError(f"--cond-drop must be in [0, 1), not {opts.cond_drop}")
    t_begin = time.perf_counter()
    check_run_options(opts)
    dist = setup_distributed(opts.device)
    out, state = prepare_out(opts)
    if state is not None:
        check_resume(state, "ldm", opts)
    dataset = open_data(opts, require_captions=opts.cond == "text")
    plan = plan_micro_batches(opts, dist)
    stream = BatchStream(dataset, opts.batch_size, opts.seed)
    classes = class_names(dataset) if opts.cond == "class" else None
    torch.manual_seed(opts.seed)
    cfg, unet, cond, first_stage = _build_ldm(opts, state, stream, classes, dist, log)
    if cfg.factor * (opts.size // cfg.factor) != opts.size:
        raise ConfigError(f"--size {opts.size} is not a multiple of the autoencoder's factor {cfg.factor}")
    first_stage.to(dist.device).eval().requires_grad_(False)
    unet.to(dist.device).train().requires_grad_(True)
    trainable_cond = cfg.cond.kind in ("bert", "class")
    cond.to(dist.device).train().requires_grad_(trainable_cond)
    for unused in cond.unused_in_forward():  # BERT's to_logits: kept for loading, never trained
        unused.requires_grad_(False)
    params = list(unet.parameters()) + (list(cond.parameters()) if trainable_cond else [])
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    emas = {"unet": EMA(unet, opts.ema_decay)}
    if trainable_cond:
        emas["cond"] = EMA(cond, opts.ema_decay)
    start = 0
    if state is not None:
        state.restore(optimizers={"ldm": opt}, emas=emas)
        start = state.step
    schedule = make_schedule(cfg)
    trainer = LDMTrainer(opts, dist, stream, plan, cfg, unet, cond, first_stage, schedule, opt, emas, classes)
    if opts.cache_latents:
        t = time.perf_counter()
        trainer.fill_cache()
        if dist.main:
            log(f"train-ldm: {len(dataset)} items encoded for --cache-latents in {time.perf_counter() - t:.1f} s")
    meta = {"kind": "ldm", "run": opts.identity(), "model_config": cfg.to_dict()}
    if dist.main:
        n = sum(p.numel() for p in unet.parameters()) / 1e6
        log(
            f"train-ldm: cond {cond_name(cfg)} ({cfg.conditioning_key}), {opts.prediction}-prediction, UNet {n:.2f}M "
            f"params, scale {cfg.scale_factor:.5g}, {dist.world} process(es), from step {start}"
        )
    return run_trainer(opts, dist, trainer, start, out, LDM_FILE, meta, log, callback, t_begin)
