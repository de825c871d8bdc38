"""txt2img, img2img, inpaint, superres, encode and decode as plain functions over a ModelBundle.

Every task is one loop (DESIGN.md): noise → σ-schedule sampler over a denoiser → latent → decoder.
Seeds become noise here: image i of a request uses its own `torch.Generator("cpu").manual_seed(seed_i)`
for everything random about it (posterior sample, initial noise, ancestral noise), so an image never
depends on the batch it was made in. Functions return tensors in [0, 1]; they never write files.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from . import validation
from .autoencoder import DiagonalGaussian
from .denoiser import (
    CFGDenoiser,
    Denoiser,
    get_sigmas,
    network_dtype,
    noise_for_img2img,
    prepare_noise,
    q_sample,
    quantize_timesteps,
    strength_sigmas,
    to_latent,
)
from .errors import ConfigError, InputError
from .loading.bundle import ModelBundle, make_low_scale_schedule
from .loading.mapped_pages import drop_mapped_pages
from .loading.weights import free_scratch
from .memory import check_fits, upcast_working_set
from .noise import make_generator, slerp
from .samplers import get_sampler, randn
from .schedulers import check_scheduler, default_scheduler
from .text import prompts as prompts_mod
from .text.prompts import check_options as check_prompt_options
from .text.schedule import BatchSchedule, ScheduledConditioning, schedule_steps


@dataclass
class Settings:
    steps: int = 25
    sampler: str = "dpmpp_2m"
    karras: bool | None = None  # alias: True = scheduler "karras", False = "normal" (when no scheduler is named)
    spacing: str = "leading"
    cfg: float = 7.5
    eta: float = 0.0
    strength: float = 0.75  # img2img / inpaint with an ordinary model
    extra: dict = field(default_factory=dict)
    clip_skip: int = 1  # A1111's "Clip skip" (CLIP text encoders)
    emphasis: str = "original"  # text.prompts.EMPHASES
    embeddings: dict = field(default_factory=dict)  # textual-inversion name -> vectors [n, D] (SDXL: {clip_l, clip_g})
    scheduler: str | None = None  # schedulers.SCHEDULERS; None: the sampler's default (default_scheduler)
    rng: str = "cpu"  # noise.RNGS
    subseed: int | None = None  # A1111 variation seed (image i: subseed + i), blended in at subseed_strength
    subseed_strength: float = 0.0
    ensd: int = 0  # A1111's eta noise seed delta: step noise from seed + ensd
    # SDXL size and aesthetic conditioning (CLI order: W,H and X,Y); None: the output size and 0,0
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @property
    def schedule_name(self) -> str:
        """The σ schedule this run uses: the one named, else --karras/--no-karras, else the sampler's default."""
        if self.scheduler is not None:
            return self.scheduler
        if self.karras is not None:
            return "karras" if self.karras else "normal"
        return default_scheduler(self.sampler)

    def check(self, where: str = "cli") -> None:
        """The settings through the validation layer (latentgen.validation), named as `where` spells them; then
        the schedule, the RNG and the variation seed's strength."""
        fields = ("steps", "sampler", "karras", "spacing", "cfg", "eta", "strength")
        validation.check({k: getattr(self, k) for k in fields}, where)
        get_sampler(self.sampler)  # latentgen's own name here: the CLI has mapped A1111's
        check_scheduler(self.schedule_name)
        make_generator(0, self.rng)  # an unknown source, or cuda without a GPU: one line naming --rng
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise ConfigError(f"--subseed-strength must be in [0, 1], not {self.subseed_strength}")
        check_prompt_options(self.clip_skip, self.emphasis)


def generators(seeds: list[int], rng: str = "cpu") -> list:
    """One generator per image (noise.make_generator: CPU torch, CUDA torch or A1111's NV Philox)."""
    return [make_generator(s, rng) for s in seeds]


def initial_noise(shape, seeds: list[int], gens: list, settings: Settings, device) -> tuple[torch.Tensor, list]:
    """Each image's starting noise from its generator, blended with its variation seed's noise when asked
    (A1111: variation seed subseed + i, slerp at subseed_strength), and the generators the sampler draws its
    step noise from (re-seeded with seed + ENSD when an eta noise seed delta is set, as A1111)."""
    noise = randn(shape, gens, device)
    if settings.subseed is not None and settings.subseed_strength != 0:
        sub = randn(shape, generators([settings.subseed + i for i in range(len(seeds))], settings.rng), device)
        noise = torch.stack([slerp(settings.subseed_strength, a, b) for a, b in zip(noise, sub)])
    if settings.ensd:
        gens = generators([s + settings.ensd for s in seeds], settings.rng)
    return noise, gens


def size_multiple(bundle: ModelBundle) -> int:
    """Image sides must be multiples of the first stage's factor f; the UNet takes latents of any size (where a
    level halves an odd side it upsamples to the skip's size, as diffusers)."""
    return bundle.config.factor


def check_size(bundle: ModelBundle, width: int, height: int) -> None:
    m = size_multiple(bundle)
    for name, v in (("width", width), ("height", height)):
        if v < m or v % m:
            raise InputError(
                f"--{name} {v} is not a positive multiple of {m} (the first stage's factor): use {max(m, v // m * m)}"
            )


def guard_memory(bundle: ModelBundle, n: int, width: int, height: int, settings: Settings) -> None:
    """The memory guard (latentgen.memory): refuse, before any latent is allocated, a job of n images of
    width × height that cannot fit in the memory available on the model's device."""
    device, dtype = _params(bundle)
    guided = settings.cfg != 1.0 and bundle.config.cond.kind != "none"
    upcast = upcast_working_set(bundle.unet, dtype.itemsize)
    check_fits(
        bundle.config, n, width, height, dtype.itemsize, tile=AUTO_TILE, device=device, guided=guided, upcast=upcast
    )


def latent_shape(bundle: ModelBundle, n: int, width: int, height: int) -> tuple[int, ...]:
    f = bundle.config.factor
    return (n, bundle.config.latent_channels, height // f, width // f)


def _params(bundle: ModelBundle):
    return next(bundle.unet.parameters()).device, network_dtype(bundle.unet)


# ------------------------------------------------------------------------------------------ conditioning


def once_per_distinct(enc, texts) -> torch.Tensor:
    """`enc(texts)` with each distinct text through the encoder once (a batch of one prompt, or a repeated
    negative): the rows of the distinct texts' encoding, repeated. The longest prompt is among the distinct
    ones, so the chunk padding is the same."""
    texts = list(texts)
    try:
        distinct = list(dict.fromkeys(texts))
    except TypeError:  # unhashable prompts: encoded as given
        return enc(texts)
    if len(distinct) == len(texts):
        return enc(texts)
    return enc(distinct)[[distinct.index(t) for t in texts]]


def releasing_text_pages(encode):
    """After encoding on the CPU: the text encoder's memory-mapped pages and freed transients go back to the OS
    (they would otherwise add to the UNet's peak; see loading.mapped_pages)."""

    def run(bundle: ModelBundle, *args, **kwargs):
        out = encode(bundle, *args, **kwargs)
        if _params(bundle)[0].type == "cpu":
            drop_mapped_pages(bundle.path)
            release_free_memory()
        return out

    run.__doc__, run.__name__ = encode.__doc__, encode.__name__
    return run


@releasing_text_pages
def encode_prompts(
    bundle: ModelBundle, prompts: list, negatives: list, settings: Settings, sdxl: dict | None = None
) -> tuple[dict, dict | None]:
    """Conditioning kwargs for the denoiser: cross-attention context (text) or class labels; SDXL also the
    vector y, from the size / aesthetic conditioning `sdxl` (see `sdxl_conditioning`). CLIP prompts are read as
    A1111 does (weights, 75-token chunks, BREAK, clip skip, textual inversion: text.prompts), BERT prompts alike
    (weights, chunks of the encoder's context, BREAK); the prompt and
    the negative are encoded alike, and may end up with different chunk counts."""
    cfg = settings.cfg
    cond_mod = bundle.cond
    device, dtype = _params(bundle)
    kind = bundle.config.cond.kind
    if kind == "sdxl":
        text = dict(emphasis=settings.emphasis, embeddings=settings.embeddings)  # no clip skip on SDXL (A1111)
        cond, uncond = cond_mod.guidance_pair(list(prompts), list(negatives), cfg != 1.0, **(sdxl or {}), **text)
        move = lambda d: {k: v.to(device, dtype) for k, v in d.items()}  # noqa: E731
        return move(cond), None if uncond is None else move(uncond)
    if kind == "none":
        return {}, None
    if kind == "class":
        labels = torch.tensor([int(p) for p in prompts], device=device)
        cond = {"context": cond_mod.encode(labels).to(dtype)}
        if cfg == 1.0:
            return cond, None
        if cond_mod.null_label is None:
            raise ConfigError(f"{bundle.config.name} has no null class to guide against: pass --cfg 1")
        null = torch.full_like(labels, cond_mod.null_label)
        return cond, {"context": cond_mod.encode(null).to(dtype)}
    if kind in ("clip", "open_clip"):
        if kind == "clip" and settings.clip_skip > cond_mod.cfg.num_hidden_layers:
            raise ConfigError(
                f"--clip-skip {settings.clip_skip} exceeds the text encoder's {cond_mod.cfg.num_hidden_layers} layers"
            )
        opts = dict(clip_skip=settings.clip_skip, emphasis=settings.emphasis, embeddings=settings.embeddings)

        def enc(texts):
            return prompts_mod.encode_prompts(cond_mod, list(texts), **opts)
    elif kind == "bert":

        def enc(texts):
            return prompts_mod.encode_bert_prompts(cond_mod, list(texts), emphasis=settings.emphasis)
    else:
        enc = cond_mod.encode
    with torch.no_grad():
        ctx = once_per_distinct(enc, prompts).to(device, dtype)
        unc = None if cfg == 1.0 else {"context": once_per_distinct(enc, negatives).to(device, dtype)}
    return {"context": ctx}, unc


EDITED_KINDS = ("clip", "open_clip", "sdxl", "bert")  # the conditioners that read A1111's prompt syntax


def encode_conditioning(
    bundle: ModelBundle,
    prompts: list,
    negatives: list,
    settings: Settings,
    sdxl: dict | None = None,
    first_pass: int | None = None,
) -> tuple[dict, dict | None, ScheduledConditioning | None]:
    """`encode_prompts` with A1111's prompt editing and alternation (text.schedule): (cond, uncond, edits), where
    edits, when a prompt or negative changes during the run, swaps the text conditioning per model call (else
    None, and the conditioning is encode_prompts' own). The schedules cover `settings.steps` (twice that for the
    samplers A1111 counts as second order); `first_pass`: the hires pass's first-pass schedule steps. Every
    distinct text is encoded once, the prompts' and the negatives' in one call (each list padded to the other's
    length with its last text, which no call uses)."""
    guided = settings.cfg != 1.0
    if bundle.config.cond.kind in EDITED_KINDS:
        steps = schedule_steps(settings.steps, settings.sampler)
        ps, ns = BatchSchedule.of(prompts, steps, first_pass), BatchSchedule.of(negatives, steps, first_pass)
        if ps.edited or (guided and ns.edited):
            n = max(len(ps.texts), len(ns.texts))
            pad = lambda t: t + t[-1:] * (n - len(t))  # noqa: E731
            table, utable = encode_prompts(bundle, pad(ps.texts), pad(ns.texts), settings, sdxl)
            edits = ScheduledConditioning(ps, table, ns if guided else None, utable)
            return edits.at("cond"), edits.at("uncond") if guided else None, edits
        prompts, negatives = [ps.texts[r[0][1]] for r in ps.rows], [ns.texts[r[0][1]] for r in ns.rows]
    return (*encode_prompts(bundle, prompts, negatives, settings, sdxl), None)


def sdxl_conditioning(bundle: ModelBundle, settings: Settings, width: int, height: int) -> dict | None:
    """SDXL's size (and, for the refiner, aesthetic) conditioning in (h, w) / (top, left) order, with diffusers'
    defaults: original = target = the output size, crop 0,0. None for other families."""
    if bundle.config.cond.kind != "sdxl":
        return None
    hw = lambda wh: (height, width) if wh is None else (wh[1], wh[0])  # noqa: E731
    return {
        "original_size": hw(settings.original_size),
        "crop": (settings.crop[1], settings.crop[0]),
        "target_size": hw(settings.target_size),
        "aesthetic_score": settings.aesthetic_score,
        "negative_aesthetic_score": settings.negative_aesthetic_score,
    }


# -------------------------------------------------------------------------------------------- sampling


def _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, wrap=None, edits=None):
    den = Denoiser(
        bundle.unet, bundle.schedule, bundle.config.prediction, quantize=quantize_timesteps(settings.sampler)
    )
    model = CFGDenoiser(den) if edits is None else edits.wrap(CFGDenoiser(den))
    if wrap is not None:
        model = wrap(model)
    fn = get_sampler(settings.sampler)
    extra = {"cond": cond, "uncond": uncond, "cond_scale": settings.cfg}
    opts = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    with torch.no_grad():
        return fn(model, x, sigmas, extra_args=extra, callback=callback, generator=gens, **opts)


def sigmas_for(bundle: ModelBundle, settings: Settings) -> torch.Tensor:
    return get_sigmas(
        bundle.schedule,
        settings.steps,
        sampler=settings.sampler,
        spacing=settings.spacing,
        scheduler=settings.schedule_name,
        ays_table="sdxl" if bundle.config.family == "sdxl" else "sd1",
    )


def tail(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """img2img's σ tail (SDEdit, Meng et al. 2021), as diffusers' get_timesteps picks it."""
    out = strength_sigmas(sigmas, strength)
    if len(out) < 2:
        raise ConfigError(f"--strength {strength} with {len(sigmas) - 1} steps leaves no step to run: raise either")
    return out


# ------------------------------------------------------------------------------ first stage, tiled

# latent pixels: larger latents are decoded / encoded in tiles (1024 px at f=8: SDXL's native size runs whole, as
# in A1111 and diffusers)
AUTO_TILE = 128
TILE_OVERLAP = 16  # latent pixels shared by neighbouring tiles, cross-faded with linear ramps
MIN_TILE = 16


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures, whatever type the backend raises."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "not enough memory" in msg)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of side `tile` covering [0, length), neighbours sharing >= `overlap` samples."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def ramp(start: int, size: int, length: int, width: int) -> torch.Tensor:
    """Blend weights of one tile along one axis: 1 inside, a linear ramp over `width` samples on each side that
    borders another tile (none at the image border), so the normalised sum cross-fades seamlessly."""
    w = torch.ones(size)
    width = min(width, size // 2)
    if width > 0:
        up = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1)
        if start > 0:
            w[:width] = up
        if start + size < length:
            w[-width:] = torch.minimum(w[-width:], up.flip(0))
    return w


def blend_tiles(fn, x: torch.Tensor, tile: int, overlap: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """fn over overlapping tiles of x, blended. Tiles are laid out on the latent grid: a tile of side `tile`
    latent pixels is `tile * in_scale` input and `tile * out_scale` output pixels (decode 1 → f, encode f → 1)."""
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    th, tw = min(tile, h), min(tile, w)
    out = weight = None
    for y in tile_starts(h, tile, overlap):
        for x0 in tile_starts(w, tile, overlap):
            piece = fn(x[..., y * in_scale : (y + th) * in_scale, x0 * in_scale : (x0 + tw) * in_scale])
            if out is None:
                out = torch.zeros((*piece.shape[:2], h * out_scale, w * out_scale), device=piece.device)
                weight = torch.zeros((h * out_scale, w * out_scale), device=piece.device)
            wy = ramp(y * out_scale, th * out_scale, h * out_scale, overlap * out_scale)
            wx = ramp(x0 * out_scale, tw * out_scale, w * out_scale, overlap * out_scale)
            wt = (wy[:, None] * wx[None, :]).to(piece.device)
            ys, xs = slice(y * out_scale, (y + th) * out_scale), slice(x0 * out_scale, (x0 + tw) * out_scale)
            out[..., ys, xs] += piece.float() * wt
            weight[ys, xs] += wt
    return (out / weight).to(piece.dtype)


def _group_norm_with(m: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x with given per-sample, per-group statistics [n, groups] instead of x's own."""
    n, c = x.shape[:2]
    y = F.batch_norm(x.float().reshape(1, n * m.num_groups, -1), mean.flatten(), var.flatten(), eps=m.eps)
    y = y.reshape(x.shape).to(x.dtype)
    return y * m.weight.view(1, c, 1, 1) + m.bias.view(1, c, 1, 1) if m.affine else y


@contextmanager
def shared_norm_stats(fn, module: torch.nn.Module, preview: torch.Tensor):
    """Run fn(preview) once, recording the input statistics of every GroupNorm in `module`; inside the block
    those layers normalise with the recorded statistics instead of their input's own. Tiles decoded inside
    then all normalise alike, as parts of one image do, so they join without seams (with per-tile statistics
    a tile's colours and contrast drift with its content). `preview` is the whole input, subsampled to fit."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    stats = {}

    def record(m, args):
        g = args[0].float().reshape(args[0].shape[0], m.num_groups, -1)
        stats[m] = (g.mean(-1), g.var(-1, unbiased=False))

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        fn(preview)
    finally:
        for h in hooks:
            h.remove()
    for m in stats:
        m.forward = partial(_group_norm_with, m, *stats[m])
    try:
        yield
    finally:
        for m in stats:
            del m.forward  # back to GroupNorm.forward


def _with_tiles(
    fn,
    x: torch.Tensor,
    latent_side: int,
    tile: int | None,
    overlap: int,
    in_scale: int,
    out_scale: int,
    what: str,
    module: torch.nn.Module,
) -> torch.Tensor:
    """Whole when small, in tiles when large (tile=None: above AUTO_TILE; tile=0: never) or when the whole
    input runs out of memory; tiles are halved while they still do. The tiles share the GroupNorm statistics
    of one pass over x subsampled to a tile's size (`shared_norm_stats`; `module` holds the norms)."""
    if tile is None:
        tile = AUTO_TILE if latent_side > AUTO_TILE else 0
    size = tile or latent_side
    while True:
        try:
            if size >= latent_side:
                return fn(x)
            step = -(-latent_side // size)  # the preview: every step-th sample (averaging would lower the variance)
            with shared_norm_stats(fn, module, x[..., ::step, ::step]):
                return blend_tiles(fn, x, size, min(overlap, size // 4), in_scale, out_scale)
        except Exception as e:
            if not is_out_of_memory(e) or size <= MIN_TILE:
                if is_out_of_memory(e):
                    raise InputError(
                        f"out of memory in the first stage's {what} even in {size}-latent-pixel tiles: "
                        "use a smaller image or --device cpu"
                    ) from e
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(MIN_TILE, min(size, latent_side) // 2)


def decode_latents(
    first_stage, z: torch.Tensor, *, tile: int | None = None, overlap: int = TILE_OVERLAP
) -> torch.Tensor:
    """Unscaled latent → image in about [-1, 1] (not clamped), tiled for large latents or on out-of-memory."""
    z = z.to(next(first_stage.parameters()).device, network_dtype(first_stage))
    f = first_stage.config.factor
    return _with_tiles(first_stage.decode_latent, z, max(z.shape[-2:]), tile, overlap, 1, f, "decoder", first_stage)


def encode_latents(
    first_stage,
    x: torch.Tensor,
    gens: list[torch.Generator] | None = None,
    *,
    tile: int | None = None,
    overlap: int = TILE_OVERLAP,
) -> torch.Tensor:
    """Image in [-1, 1] → unscaled latent. KL: the posterior parameters are blended across tiles, then the
    mode is taken, or one sample per image from its own generator (as diffusers' img2img)."""
    x = x.to(next(first_stage.parameters()).device, network_dtype(first_stage))
    f = first_stage.config.factor

    def params(part):
        post = first_stage.encode(part)
        return post.moments if isinstance(post, DiagonalGaussian) else post

    raw = _with_tiles(params, x, max(x.shape[-2:]) // f, tile, overlap, f, 1, "encoder", first_stage)
    if first_stage.config.kind != "kl":
        return raw
    if gens is None:
        return DiagonalGaussian(raw).mode()
    return torch.cat([DiagonalGaussian(raw[i : i + 1]).sample(g) for i, g in enumerate(gens)])


def release_free_memory() -> None:
    """Give memory freed so far back to the OS (glibc keeps freed heap memory for reuse; the decoder's large
    buffers come from elsewhere, so that memory would only add to its peak). A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decode(bundle: ModelBundle, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Scaled latent → image in [0, 1] (as diffusers: (x/2 + 0.5).clamp(0, 1))."""
    if z.device.type == "cpu":
        drop_mapped_pages(bundle.path)  # the UNet's weights, where memory-mapped (--low-memory)
        free_scratch()  # and the buffer its layers upcast their weights into
        release_free_memory()
    with torch.no_grad(), upcast_vae(bundle):
        img = decode_latents(bundle.first_stage, z / bundle.config.scale_factor, tile=tile)
    img = img.float()
    if not torch.isfinite(img).all():
        warn_non_finite(bundle)
    return (img / 2 + 0.5).clamp(0, 1)


def non_finite_weights(bundle: ModelBundle, limit: int = 3) -> tuple[list[str], int]:
    """Names of the first `limit` weights holding NaN or Inf (original checkpoint names), and how many there are."""
    from .loading.layout import COND_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX

    bad = []
    for prefix, module in (
        (UNET_PREFIX, bundle.unet),
        (FIRST_STAGE_PREFIX, bundle.first_stage),
        (COND_PREFIX, bundle.cond),
    ):
        sd = module.original_state_dict() if hasattr(module, "original_state_dict") else module.state_dict()
        for name, t in sd.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad.append(prefix + name)
    return bad[:limit], len(bad)


def warn_non_finite(bundle: ModelBundle) -> None:
    """One warning line when an image came out NaN/Inf (its pixels become black), naming the culprits."""
    import warnings

    names, n = non_finite_weights(bundle)
    more = " …" if n > len(names) else ""
    where = (
        f"{n} weight tensor{'s hold' if n > 1 else ' holds'} NaN/Inf: {', '.join(names)}{more}"
        if n
        else "the weights are finite: the sampling overflowed (try --dtype fp32)"
    )
    warnings.warn(f"the decoded image has NaN/Inf pixels (shown black); {where}", RuntimeWarning, stacklevel=2)


@contextmanager
def upcast_vae(bundle: ModelBundle):
    """The SDXL VAE overflows in fp16 (NaN, black images): encode / decode with it in fp32 and cast it back
    after, as diffusers' `force_upcast` does. Other first stages, other dtypes (bf16 has fp32's range): as they
    are."""
    fs = bundle.first_stage
    if not bundle.config.vae_force_upcast or network_dtype(fs) != torch.float16:
        yield
        return
    fs.to(torch.float32)
    try:
        yield
    finally:
        fs.to(torch.float16)


def encode(
    bundle: ModelBundle, images: torch.Tensor, gens: list[torch.Generator] | None = None, tile: int | None = None
) -> torch.Tensor:
    """Images in [0, 1] → scaled latents. KL: a posterior sample drawn from each image's generator
    (as diffusers' img2img), or the mode without generators."""
    with torch.no_grad(), upcast_vae(bundle):
        z = encode_latents(bundle.first_stage, images * 2 - 1, gens, tile=tile)
    return z * bundle.config.scale_factor


def txt2img(
    bundle: ModelBundle,
    prompts: list,
    negatives: list,
    seeds: list[int],
    width: int,
    height: int,
    settings: Settings,
    callback=None,
    refiner: ModelBundle | None = None,
    refiner_start: float = 0.8,
) -> torch.Tensor:
    """Text to image. With a `refiner` (SDXL's ensemble of experts, diffusers' `denoising_end` /
    `denoising_start`): the base runs the steps whose timestep is at least (1 - refiner_start)·T, the refiner
    the rest, on the same latent; the refiner's first stage decodes."""
    z = txt2img_latent(bundle, prompts, negatives, seeds, width, height, settings, callback, refiner, refiner_start)
    return decode(bundle if refiner is None else refiner, z)


def txt2img_latent(
    bundle: ModelBundle,
    prompts: list,
    negatives: list,
    seeds: list[int],
    width: int,
    height: int,
    settings: Settings,
    callback=None,
    refiner: ModelBundle | None = None,
    refiner_start: float = 0.8,
) -> torch.Tensor:
    """txt2img up to the scaled latent (before the decoder), the refiner taking over at `refiner_start`."""
    settings.check()
    check_size(bundle, width, height)
    if bundle.config.concat is not None:
        raise InputError(
            f"{bundle.config.name} is a {bundle.config.concat} model: use `latentgen "
            f"{'inpaint' if bundle.config.concat == 'inpaint' else 'superres'}`"
        )
    guard_memory(bundle, len(seeds), width, height, settings)
    device, dtype = _params(bundle)
    gens = generators(seeds, settings.rng)
    sigmas = sigmas_for(bundle, settings)
    noise, gens = initial_noise(latent_shape(bundle, len(seeds), width, height), seeds, gens, settings, device)
    x = prepare_noise(noise, sigmas, settings.sampler, settings.spacing)
    sdxl = sdxl_conditioning(bundle, settings, width, height)
    cond, uncond, edits = encode_conditioning(bundle, prompts, negatives, settings, sdxl)
    if refiner is None:
        x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, edits=edits)
        return to_latent(x, sigmas[-1])
    k = refiner_split(bundle, sigmas, settings, refiner_start)
    x = _sample(bundle, x, sigmas[: k + 1], settings, cond, uncond, gens, callback, edits=edits)
    sdxl = sdxl_conditioning(refiner, settings, width, height)
    cond, uncond, ref_edits = encode_conditioning(refiner, prompts, negatives, settings, sdxl)
    if ref_edits is not None:  # the refiner's model calls continue the base's count (A1111's apply_refiner)
        ref_edits.calls = edits.calls
    x = _sample(refiner, x.to(_params(refiner)[0]), sigmas[k:], settings, cond, uncond, gens, callback, edits=ref_edits)
    return to_latent(x, sigmas[-1])


def refiner_split(bundle: ModelBundle, sigmas: torch.Tensor, settings: Settings, start: float) -> int:
    """How many of the steps the base runs before the refiner takes over at fraction `start` of the schedule:
    those whose timestep t >= round(T - start·T) (diffusers' `denoising_end`; the refiner's `denoising_start`
    keeps the others)."""
    if not 0.0 < start < 1.0:
        raise ConfigError(f"--refiner-start must be in (0, 1), not {start}")
    total = bundle.schedule.num_timesteps
    cutoff = int(round(total - start * total))
    t = bundle.schedule.sigma_to_t(sigmas[:-1], quantize=quantize_timesteps(settings.sampler))
    k = int((t >= cutoff).sum())
    if k == 0 or k == len(t):
        raise ConfigError(
            f"--refiner-start {start} with {settings.steps} steps leaves "
            f"{'the base' if k == 0 else 'the refiner'} no step: move it towards 0.5 or raise --steps"
        )
    return k


def img2img(
    bundle: ModelBundle,
    images: torch.Tensor,
    prompts: list,
    negatives: list,
    seeds: list[int],
    settings: Settings,
    callback=None,
) -> torch.Tensor:
    """SDEdit: encode, noise to the strength's σ, run the tail of the schedule."""
    settings.check()
    check_size(bundle, images.shape[-1], images.shape[-2])
    guard_memory(bundle, images.shape[0], images.shape[-1], images.shape[-2], settings)
    gens = generators(seeds, settings.rng)
    z0 = encode(bundle, images, gens)
    return decode(bundle, img2img_latent(bundle, z0, prompts, negatives, gens, settings, callback))


def img2img_latent(
    bundle: ModelBundle,
    z0: torch.Tensor,
    prompts: list,
    negatives: list,
    gens: list,
    settings: Settings,
    callback=None,
    first_pass: int | None = None,
) -> torch.Tensor:
    """SDEdit from a scaled latent: noise it to the strength's σ with the next draws of `gens`, run the tail.
    `first_pass`: the hires pass's first-pass schedule steps (prompt editing counts on from them)."""
    sigmas = tail(sigmas_for(bundle, settings), settings.strength)
    noise = randn(tuple(z0.shape), gens, z0.device)
    x = noise_for_img2img(z0.float(), noise, sigmas[0])
    f = bundle.config.factor
    sdxl = sdxl_conditioning(bundle, settings, z0.shape[-1] * f, z0.shape[-2] * f)
    cond, uncond, edits = encode_conditioning(bundle, prompts, negatives, settings, sdxl, first_pass)
    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, edits=edits)
    return to_latent(x, sigmas[-1])


def inpaint(
    bundle: ModelBundle,
    images: torch.Tensor,
    masks: torch.Tensor,
    prompts: list,
    negatives: list,
    seeds: list[int],
    settings: Settings,
    callback=None,
) -> torch.Tensor:
    """Repaint where mask = 1. A 9-channel inpainting UNet gets [mask↓, E(masked image)] as concat
    conditioning (as diffusers' StableDiffusionInpaintPipeline); any other model keeps the known region by
    replacing it, at every step, with the original latent re-noised to the current σ."""
    settings.check()
    check_size(bundle, images.shape[-1], images.shape[-2])
    if masks.shape[-2:] != images.shape[-2:]:
        raise InputError(
            f"mask is {masks.shape[-1]}x{masks.shape[-2]} but the image is "
            f"{images.shape[-1]}x{images.shape[-2]}: pass a mask of the same size or --resize-mask"
        )
    guard_memory(bundle, images.shape[0], images.shape[-1], images.shape[-2], settings)
    masks = (masks >= 0.5).to(images.dtype)
    device, dtype = _params(bundle)
    gens = generators(seeds, settings.rng)
    sdxl = sdxl_conditioning(bundle, settings, images.shape[-1], images.shape[-2])
    cond, uncond, edits = encode_conditioning(bundle, prompts, negatives, settings, sdxl)
    sigmas = sigmas_for(bundle, settings)
    n = images.shape[0]
    shape = latent_shape(bundle, n, images.shape[-1], images.shape[-2])
    if bundle.config.concat == "inpaint":
        if settings.strength < 1.0:
            z0 = encode(bundle, images, gens)
            sigmas = tail(sigmas, settings.strength)
            x = noise_for_img2img(z0.float(), randn(shape, gens, device), sigmas[0])
        else:
            x = prepare_noise(randn(shape, gens, device), sigmas, settings.sampler, settings.spacing)
        masked = images * (masks < 0.5) + 0.5 * (masks >= 0.5)  # repainted pixels → 0 in [-1, 1], as diffusers
        mz = encode(bundle, masked, gens)
        m = F.interpolate(masks, size=shape[-2:]).to(device, dtype)
        concat = torch.cat([m, mz.to(dtype)], dim=1)
        cond = {**cond, "concat": concat}
        if uncond is not None:
            uncond = {**uncond, "concat": concat}
        x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, edits=edits)
        return decode(bundle, to_latent(x, sigmas[-1]))
    if bundle.config.concat is not None:
        raise InputError(f"{bundle.config.name} is a super-resolution model: use `latentgen superres`")
    z0 = encode(bundle, images, gens).float()
    sigmas = tail(sigmas, settings.strength)
    noise = randn(shape, gens, device)
    x = noise_for_img2img(z0, noise, sigmas[0])
    keep = 1.0 - F.interpolate(masks, size=shape[-2:], mode="bilinear", align_corners=False).to(device).clamp(0, 1)
    keep = (keep > 0.999).float()  # known region: pixels entirely outside the (dilated) mask

    def wrap(model):
        def blended(x, sigma, **kw):
            s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma
            x = keep * (z0 + noise * s) + (1 - keep) * x
            return keep * z0 + (1 - keep) * model(x, sigma, **kw)

        return blended

    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, wrap=wrap, edits=edits)
    z = to_latent(x, sigmas[-1])
    z = keep * z0 + (1 - keep) * z
    return decode(bundle, z)


DEFAULT_NOISE_LEVEL = 20  # diffusers' StableDiffusionUpscalePipeline default


def noise_level_for(bundle: ModelBundle, noise_level: int | None) -> int | None:
    """The noise level a super-resolution run uses: the given one (checked against the model's
    max_noise_level), else the model's recommendation, else 20; None for models without noise augmentation,
    which refuse a given level."""
    cfg = bundle.config
    if cfg.max_noise_level is None:
        if noise_level is not None:
            raise ConfigError(
                f"--noise-level {noise_level}: model {cfg.name} does not noise its low-res input "
                "(only the SD 2 x4 upscaler does); drop --noise-level"
            )
        return None
    level = int(cfg.recommended.get("noise_level", DEFAULT_NOISE_LEVEL) if noise_level is None else noise_level)
    if not 0 <= level <= cfg.max_noise_level:
        raise InputError(
            f"--noise-level {level} is outside 0..{cfg.max_noise_level} (the max_noise_level of model "
            f"{cfg.name}): pick a level in that range"
        )
    return level


def augment_lowres(bundle: ModelBundle, lowres: torch.Tensor, level: int, gens: list[torch.Generator]):
    """Noise augmentation of the low-res image (stablediffusion's ImageConcatWithNoiseAugmentation, the SD 2 x4
    upscaler): q-sample it at `level` of its own schedule with noise from each image's generator, and give the
    level to the UNet as class label y. Returns (noised image, {"y": levels})."""
    schedule = bundle.low_scale or make_low_scale_schedule(bundle.config)
    noise = randn(tuple(lowres.shape), gens, lowres.device)
    noised = q_sample(schedule, lowres.float(), level, noise)
    return noised, {"y": torch.full((lowres.shape[0],), level, dtype=torch.long, device=lowres.device)}


def superres(
    bundle: ModelBundle,
    images: torch.Tensor,
    seeds: list[int],
    settings: Settings,
    callback=None,
    prompts: list | None = None,
    negatives: list | None = None,
    noise_level: int | None = None,
) -> torch.Tensor:
    """LDM-SR (Rombach et al. §4.4): the low-res image in [-1, 1], at latent resolution, is concatenated to
    the latent the UNet denoises; the output is f times larger. The SD 2 x4 upscaler first noises the image to
    `noise_level` (drawn before the initial latent noise, as diffusers' StableDiffusionUpscalePipeline) and is
    guided by the prompt (CFG): cond and uncond get the same noised image and level."""
    settings.check()
    if bundle.config.concat != "lowres":
        raise InputError(f"{bundle.config.name} is not a super-resolution model (its UNet takes no low-res image)")
    level = noise_level_for(bundle, noise_level)
    f = bundle.config.factor
    guard_memory(bundle, images.shape[0], images.shape[-1] * f, images.shape[-2] * f, settings)
    device, dtype = _params(bundle)
    gens = generators(seeds, settings.rng)
    n, _, h, w = images.shape
    lowres = (images * 2 - 1).to(device)
    extra = {}
    if level is not None:
        lowres, extra = augment_lowres(bundle, lowres, level, gens)
    lowres = lowres.to(dtype)
    sigmas = sigmas_for(bundle, settings)
    x = prepare_noise(
        randn((n, bundle.config.latent_channels, h, w), gens, device), sigmas, settings.sampler, settings.spacing
    )
    p = prompts or [""] * n
    cond, uncond, edits = encode_conditioning(bundle, p, negatives or [""] * n, settings)
    cond = {**cond, "concat": lowres, **extra}
    if uncond is not None:
        uncond = {**uncond, "concat": lowres, **extra}
    x = _sample(bundle, x, sigmas, settings, cond, uncond, gens, callback, edits=edits)
    return decode(bundle, to_latent(x, sigmas[-1]))
