"""`latentgen txt2img`, `img2img`, `inpaint` and `superres`."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Optional

import typer

from ..errors import ConfigError, InputError
from .adapters import ADAPTER_OPTIONS, PromptAdapters
from .app import command, note
from .batch import base_seed, check_options, run_generation
from .options import (
    CfgOpt,
    ClassOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EmaOpt,
    EtaOpt,
    HeightOpt,
    JsonOpt,
    KarrasOpt,
    LowMemOpt,
    ModelOpt,
    NegativeOpt,
    NumOpt,
    OutOpt,
    OverwriteOpt,
    PredictionOpt,
    QuietOpt,
    SamplerOpt,
    SchedulerOpt,
    SeedOpt,
    SpacingOpt,
    StepsOpt,
    WeightsOpt,
    WidthOpt,
    keyword_params,
    with_options,
)
from .recipe import _recipe, _recipe_run
from .sdxl import (
    AestheticOpt,
    CropOpt,
    NegAestheticOpt,
    OriginalSizeOpt,
    RefinerOpt,
    RefinerStartOpt,
    TargetSizeOpt,
    item_sdxl,
    load_refiner,
    sdxl_meta,
    sdxl_settings,
)
from .session import Session

RecipeOpt = typer.Option(None, "--recipe", help="Regenerate the image whose PNG recipe this is.")


@command()
@with_options(ADAPTER_OPTIONS)
def txt2img(
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - to read prompts / JSON lines from stdin."),
    negative: Optional[str] = NegativeOpt,
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: Optional[str] = SamplerOpt,
    karras: Optional[bool] = KarrasOpt,
    scheduler: Optional[str] = SchedulerOpt,
    spacing: Optional[str] = SpacingOpt,
    cfg: Optional[float] = CfgOpt,
    eta: Optional[float] = EtaOpt,
    seed: Optional[int] = SeedOpt,
    num: int = NumOpt,
    width: Optional[int] = WidthOpt,
    height: Optional[int] = HeightOpt,
    out: Optional[str] = OutOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    class_label: Optional[int] = ClassOpt,
    ema: bool = EmaOpt,
    low_memory: Optional[bool] = LowMemOpt,
    weights: Optional[str] = WeightsOpt,
    recipe: Optional[str] = RecipeOpt,
    hires: Optional[float] = typer.Option(
        None, "--hires", help="Hires fix: upscale the first pass by SCALE, then refine it with img2img."
    ),
    hires_steps: Optional[int] = typer.Option(None, "--hires-steps", help="Second-pass steps (default: --steps)."),
    hires_strength: float = typer.Option(0.7, "--hires-strength", help="Second-pass denoising strength, (0, 1]."),
    hires_upscaler: str = typer.Option(
        "latent", "--hires-upscaler", help="latent, latent-bicubic, latent-antialiased or lanczos (decode, resize)."
    ),
    hires_sampler: Optional[str] = typer.Option(None, "--hires-sampler", help="Second-pass sampler (default: same)."),
    hires_prompt: Optional[str] = typer.Option(None, "--hires-prompt", help="Second-pass prompt (default: same)."),
    rng: Optional[str] = typer.Option(
        None, "--rng", help="Noise source: cpu (default; diffusers, ComfyUI), cuda (A1111 'GPU'), nv (A1111 'NV')."
    ),
    subseed: Optional[int] = typer.Option(None, "--subseed", help="A1111 variation seed V (image i: V+i)."),
    subseed_strength: Optional[float] = typer.Option(
        None, "--subseed-strength", help="How far towards the variation seed's noise, 0..1 (A1111's slerp)."
    ),
    ensd: Optional[int] = typer.Option(
        None, "--eta-noise-seed-delta", help="A1111's ENSD: step noise of ancestral/SDE samplers from seed + N."
    ),
    original_size: Optional[str] = OriginalSizeOpt,
    crop: Optional[str] = CropOpt,
    target_size: Optional[str] = TargetSizeOpt,
    aesthetic_score: Optional[float] = AestheticOpt,
    negative_aesthetic_score: Optional[float] = NegAestheticOpt,
    refiner: Optional[str] = RefinerOpt,
    refiner_start: Optional[float] = RefinerStartOpt,
    **adapters,
) -> None:
    """Generate images from text (or class labels, or nothing for unconditional models).

    SDXL: 1024x1024 by default. Without a negative prompt (or with an empty one) the base's unconditional text
    embeddings are zeros (the original code; diffusers with negative_prompt=None); a negative prompt is encoded.
    The refiner always encodes its negative ('' by default) with --negative-aesthetic-score."""
    rec = _recipe(recipe)
    seeding = _seed_options(rec, rng, subseed, subseed_strength, ensd)
    hires_fix = _hires_options(rec, hires, hires_steps, hires_strength, hires_upscaler, hires_sampler, hires_prompt)
    if rec:
        prompt = rec.get("prompt", "") if prompt is None else prompt
        negative = rec.get("negative", "") if negative is None else negative
        class_label = rec.get("class") if class_label is None else class_label
        seed, model, dtype, prediction, ema = _recipe_run(rec, seed, model, dtype, prediction, ema)
        weights = weights or rec.get("weights")
        if rec.get("a1111"):
            skipped = "; ".join(rec["unhonoured"]) or "nothing"
            note(f"{recipe}: an A1111 image; not honoured: {skipped} (the model is --model's)", quiet)
    check_options(
        steps=steps,
        sampler=sampler,
        spacing=spacing,
        cfg=cfg,
        eta=eta,
        seed=seed,
        num=num,
        width=width,
        height=height,
        dtype=dtype,
        **{"class": class_label},
    )
    sess = Session(
        "txt2img", model, prediction, config, dtype, device, quiet, as_json, overwrite, out, ema, low_memory, weights
    )
    from .. import pipelines

    kind = sess.bundle.config.cond.kind
    if sess.bundle.config.concat is not None:
        task = "inpaint" if sess.bundle.config.concat == "inpaint" else "superres"
        raise ConfigError(
            f"model {sess.bundle.config.name} is an {sess.bundle.config.concat} model: use `latentgen {task}`"
        )
    if kind == "class" and class_label is None and prompt != "-":
        raise ConfigError(
            f"model {sess.bundle.config.name} is class-conditional: pass --class N "
            f"(0..{sess.bundle.config.cond.n_classes - 1})"
        )
    if kind in ("none", "class") and prompt not in (None, "", "-"):
        note(f"model {sess.bundle.config.name} takes no text ({kind} conditioning): the prompt is only recorded", quiet)
    items = sess.read_items(prompt)
    sess.check_outputs(items, num)
    defaults = sess.settings(steps, sampler, karras, spacing, cfg, eta, recipe=rec, scheduler=scheduler)
    defaults = replace(defaults, **seeding)
    defaults.check()
    sdxl_opts = dict(
        original_size=original_size,
        crop=crop,
        target_size=target_size,
        aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score,
        recipe=rec,
    )
    defaults = sdxl_settings(defaults, sess.bundle.config, **sdxl_opts)
    if (refiner or rec.get("refiner")) and hires_fix is not None:
        raise ConfigError("--refiner and --hires together are not supported: use one of them")
    ref_bundle, ref_start = load_refiner(sess, refiner, refiner_start, low_memory, rec)
    w0, h0 = sess.size(width, height, rec)
    pipelines.check_size(sess.bundle, w0, h0)
    pipelines.guard_memory(sess.bundle, num, w0, h0, defaults)
    extras = PromptAdapters(sess, **adapters, recipe=rec)
    base = base_seed(seed, quiet)

    def make(item, seeds):
        st = _item_settings(sess, item, defaults)
        sub = None if defaults.subseed is None else defaults.subseed + (seeds[0] - base)  # advances with the seed
        st = replace(st, **{**seeding, "subseed": sub})
        st = sdxl_settings(st, sess.bundle.config, **item_sdxl(item, sdxl_opts))
        w, h = int(item.get("width", w0)), int(item.get("height", h0))
        text = item.get("prompt", "")
        neg = item.get("negative", negative or "")
        plain, plain_neg, adapter_meta = extras.apply(item, st, text, neg)
        conds = [item.get("class", class_label)] * len(seeds) if kind == "class" else [plain] * len(seeds)
        if kind == "class" and conds[0] is None:
            raise ConfigError('this model is class-conditional: give the item a "class" or pass --class N')
        total = st.steps + (int(hires_fix.second_pass(st).steps * hires_fix.strength) if hires_fix else 0)
        bar = sess.progress(total, text[:40] or "txt2img")
        try:
            if hires_fix is None:
                refine = {"refiner": ref_bundle, "refiner_start": ref_start} if ref_bundle is not None else {}
                imgs = pipelines.txt2img(
                    sess.bundle, conds, [plain_neg] * len(seeds), seeds, w, h, st, callback=bar, **refine
                )
            else:
                from ..hires import txt2img_hires
                from ..text.prompts import extract_lora_tags

                hf = hires_fix  # the second pass runs on the same LoRAs: tags in --hires-prompt are only removed
                if hf.prompt:
                    hf = replace(hf, prompt=extract_lora_tags(hf.prompt)[0])
                imgs = txt2img_hires(sess.bundle, conds, [plain_neg] * len(seeds), seeds, w, h, st, hf, callback=bar)
        finally:
            bar.close()
        meta = {
            "task": "txt2img",
            **_sampling_meta(text, neg, st),
            "width": w,
            "height": h,
            **_model_meta(sess),
            "ema": ema,
            **sdxl_meta(st, sess.bundle.config),
            **adapter_meta,
        }
        if ref_bundle is not None:
            meta.update(refiner=ref_bundle.path, refiner_start=ref_start)
        if kind == "class":
            meta["class"] = conds[0]
        if hires_fix is not None:
            meta["hires"] = _hires_record(sess, hires_fix, st, w, h)
        meta.update(rng=st.rng, subseed=st.subseed, subseed_strength=st.subseed_strength, ensd=st.ensd)
        return imgs, meta

    run_generation(sess, items, base, num, make, {})
    sess.finish()


def _session(task: str, o) -> Session:
    """The Session of a command whose model and output options are the attributes of `o`."""
    args = (o.model, o.prediction, o.config, o.dtype, o.device, o.quiet, o.as_json, o.overwrite, o.out, o.ema)
    return Session(task, *args, o.low_memory, o.weights)


def _item_settings(sess: Session, item: dict, defaults, strength: float = 0.75):
    """The settings of one batch item: its own steps, sampler, cfg and scheduler, else the command's."""
    return sess.settings(
        item.get("steps", defaults.steps),
        item.get("sampler", defaults.sampler),
        defaults.karras,
        defaults.spacing,
        item.get("cfg", defaults.cfg),
        defaults.eta,
        strength,
        scheduler=item.get("scheduler", defaults.scheduler),
    )


def _sampling_meta(prompt: str, negative: str, st) -> dict:
    """The recipe's prompt and sampling keys, in the order every generation command writes them."""
    return {
        "prompt": prompt,
        "negative": negative,
        "steps": st.steps,
        "sampler": st.sampler,
        "scheduler": st.schedule_name,
        "karras": st.schedule_name == "karras",
        "spacing": st.spacing,
        "cfg": st.cfg,
        "eta": st.eta,
    }


def _model_meta(sess: Session) -> dict:
    return {"prediction": sess.bundle.config.prediction, "model_path": sess.model_path}


def _check_image_size(sess: Session, x, what: str, scale: int = 1) -> None:
    """Image sides (× the model's upscaling) must be multiples of the model's size step."""
    from ..pipelines import size_multiple

    m = size_multiple(sess.bundle) // scale
    w, h = x.shape[-1], x.shape[-2]
    if w % m or h % m:
        raise InputError(
            f"{what} is {w}x{h}: both sides must be multiples of {m} for model {sess.bundle.config.name} "
            f"(crop or resize it, e.g. to {max(m, w // m * m)}x{max(m, h // m * m)})"
        )


def _load_input_image(path: str):
    from ..images import load_image, to_tensor

    return to_tensor(load_image(path))


def _parse_extend(extend: Optional[str]) -> tuple[int, int, int, int] | None:
    if not extend:
        return None
    try:
        vals = tuple(int(v) for v in extend.split(","))
        if len(vals) != 4 or min(vals) < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--extend must be four non-negative pixel counts L,T,R,B, not '{extend}'") from None
    return vals  # type: ignore[return-value]


def _outpaint_canvas(image, mask, extend):
    """Pad the canvas by L,T,R,B (edge colours) and mark the new border for repainting."""
    import torch.nn.functional as F

    from ..validation import MAX_SIDE

    left, top, right, bottom = extend
    w, h = image.shape[-1] + left + right, image.shape[-2] + top + bottom
    if max(w, h) > MAX_SIDE:
        raise ConfigError(
            f"--extend {left},{top},{right},{bottom} makes a {w}x{h} canvas: the limit is {MAX_SIDE} a side"
        )
    image = F.pad(image, (left, right, top, bottom), mode="replicate")
    mask = F.pad(mask, (left, right, top, bottom), value=1.0)
    return image, mask


EDIT_OPTIONS = keyword_params(
    negative=(Optional[str], NegativeOpt),
    model=(Optional[str], ModelOpt),
    steps=(Optional[int], StepsOpt),
    sampler=(Optional[str], SamplerOpt),
    karras=(Optional[bool], KarrasOpt),
    scheduler=(Optional[str], SchedulerOpt),
    spacing=(Optional[str], SpacingOpt),
    cfg=(Optional[float], CfgOpt),
    eta=(Optional[float], EtaOpt),
    seed=(Optional[int], SeedOpt),
    num=(int, NumOpt),
    out=(Optional[str], OutOpt),
    dtype=(str, DtypeOpt),
    device=(str, DeviceOpt),
    as_json=(bool, JsonOpt),
    overwrite=(bool, OverwriteOpt),
    quiet=(bool, QuietOpt),
    prediction=(Optional[str], PredictionOpt),
    config=(Optional[str], ConfigOpt),
    ema=(bool, EmaOpt),
    low_memory=(Optional[bool], LowMemOpt),
    weights=(Optional[str], WeightsOpt),
    original_size=(Optional[str], OriginalSizeOpt),
    crop=(Optional[str], CropOpt),
    target_size=(Optional[str], TargetSizeOpt),
)
"""The options img2img and inpaint take after their own: `EditJob`'s."""

AESTHETIC_OPTIONS = keyword_params(
    aesthetic_score=(Optional[float], AestheticOpt), negative_aesthetic_score=(Optional[float], NegAestheticOpt)
)


class EditJob:
    """img2img and inpaint: an input image (and mask) denoised towards each item's prompt.

    `opts` are the command's `EDIT_OPTIONS`, its aesthetic scores and its `ADAPTER_OPTIONS`."""

    def __init__(self, task: str, image: str, prompt: Optional[str], strength: float, opts: dict):
        self.task, self.image, self.prompt, self.strength = task, image, prompt, strength
        self.adapters = {p.name: opts.pop(p.name) for p in ADAPTER_OPTIONS}
        self.sdxl_opts = {
            "original_size": opts.pop("original_size"),
            "crop": opts.pop("crop"),
            "target_size": opts.pop("target_size"),
            "aesthetic_score": opts.pop("aesthetic_score", None),
            "negative_aesthetic_score": opts.pop("negative_aesthetic_score", None),
        }
        self.o = SimpleNamespace(**opts)

    def check_options(self, **extra) -> None:
        o = self.o
        check_options(
            steps=o.steps,
            sampler=o.sampler,
            spacing=o.spacing,
            cfg=o.cfg,
            eta=o.eta,
            seed=o.seed,
            num=o.num,
            strength=self.strength,
            **extra,
            dtype=o.dtype,
        )

    def session(self) -> Session:
        return _session(self.task, self.o)

    def run(self, sess: Session, init, denoise, extra_meta: dict) -> None:
        """Every item through `denoise(init, prompts, negatives, seeds, settings, callback)`, checked first."""
        from .. import pipelines

        o = self.o
        items = sess.read_items(self.prompt)
        sess.check_outputs(items, o.num)
        defaults = sess.settings(
            o.steps, o.sampler, o.karras, o.spacing, o.cfg, o.eta, self.strength, scheduler=o.scheduler
        )
        defaults = sdxl_settings(defaults, sess.bundle.config, **self.sdxl_opts)
        pipelines.guard_memory(sess.bundle, o.num, init.shape[-1], init.shape[-2], defaults)
        extras = PromptAdapters(sess, **self.adapters)
        base = base_seed(o.seed, o.quiet)

        def make(item, seeds):
            st = _item_settings(sess, item, defaults, item.get("strength", self.strength))
            st = sdxl_settings(st, sess.bundle.config, **item_sdxl(item, self.sdxl_opts))
            text, neg = item.get("prompt", ""), item.get("negative", o.negative or "")
            plain, plain_neg, adapter_meta = extras.apply(item, st, text, neg)
            n = len(seeds)
            bar = sess.progress(st.steps, text[:40] or self.task)
            try:
                imgs = denoise(init.expand(n, -1, -1, -1), [plain] * n, [plain_neg] * n, seeds, st, bar)
            finally:
                bar.close()
            return imgs, {
                "task": self.task,
                **_sampling_meta(text, neg, st),
                "strength": st.strength,
                "width": init.shape[-1],
                "height": init.shape[-2],
                "init_image": self.image,
                **extra_meta,
                **_model_meta(sess),
                **sdxl_meta(st, sess.bundle.config),
                **adapter_meta,
            }

        run_generation(sess, items, base, o.num, make, {})
        sess.finish()


@command()
@with_options(EDIT_OPTIONS + AESTHETIC_OPTIONS + ADAPTER_OPTIONS)
def img2img(
    image: str = typer.Argument(..., help="Input image."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - for stdin."),
    strength: float = typer.Option(0.75, "--strength", help="How much to change the image, in (0, 1]."),
    **opts,
) -> None:
    """Change an image towards a prompt (SDEdit: encode, noise to the strength's σ, denoise the tail).

    Works with an SDXL refiner alone (--model REFINER), which conditions on --aesthetic-score."""
    job = EditJob("img2img", image, prompt, strength, opts)
    job.check_options()
    init = _load_input_image(image)
    sess = job.session()
    from .. import pipelines

    if sess.bundle.config.concat is not None:
        raise ConfigError(
            f"model {sess.bundle.config.name} is an {sess.bundle.config.concat} model: img2img needs an "
            "ordinary text-to-image model (--model)"
        )
    _check_image_size(sess, init, image)

    def denoise(x, prompts, negatives, seeds, st, bar):
        return pipelines.img2img(sess.bundle, x, prompts, negatives, seeds, st, callback=bar)

    job.run(sess, init, denoise, {})


@command()
@with_options(EDIT_OPTIONS + ADAPTER_OPTIONS)
def inpaint(
    image: str = typer.Argument(..., help="Input image."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - for stdin."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Mask image: white = repaint, black = keep."),
    mask_blur: int = typer.Option(0, "--mask-blur", help="Gaussian blur radius for the mask, in pixels."),
    resize_mask: bool = typer.Option(False, "--resize-mask", help="Resize a mask of another size to the image."),
    extend: Optional[str] = typer.Option(None, "--extend", help="Outpaint: pad the canvas by L,T,R,B pixels."),
    strength: float = typer.Option(1.0, "--strength", help="For the repainted region, in (0, 1]."),
    **opts,
) -> None:
    """Repaint the white part of a mask (or the border added by --extend)."""
    import torch

    job = EditJob("inpaint", image, prompt, strength, opts)
    job.check_options(mask_blur=mask_blur)
    ext = _parse_extend(extend)
    if mask is None and ext is None:
        raise ConfigError("inpaint needs --mask MASK or --extend L,T,R,B")
    from ..images import load_image, to_tensor

    init = _load_input_image(image)
    if mask is not None:
        m_im = load_image(mask, mode="L")
        size = (init.shape[-1], init.shape[-2])
        if m_im.size != size:
            if not resize_mask:
                raise InputError(
                    f"mask {mask} is {m_im.size[0]}x{m_im.size[1]} but the image is {size[0]}x{size[1]}: "
                    "pass a mask of the same size or --resize-mask"
                )
            m_im = m_im.resize(size)
        if mask_blur:
            from PIL import ImageFilter

            m_im = m_im.filter(ImageFilter.GaussianBlur(mask_blur))
        m = to_tensor(m_im)
    else:
        m = torch.zeros_like(init[:, :1])
    if ext is not None:
        init, m = _outpaint_canvas(init, m, ext)
    sess = job.session()
    from .. import pipelines

    if sess.bundle.config.concat == "lowres":
        raise ConfigError(f"model {sess.bundle.config.name} is a super-resolution model: use `latentgen superres`")
    _check_image_size(sess, init, image + (f" extended by {extend}" if extend else ""))

    def denoise(x, prompts, negatives, seeds, st, bar):
        masks = m.expand(len(seeds), -1, -1, -1)
        return pipelines.inpaint(sess.bundle, x, masks, prompts, negatives, seeds, st, callback=bar)

    job.run(sess, init, denoise, {"mask": mask, "mask_blur": mask_blur, "extend": extend})


SUPERRES_OPTIONS = [
    p for p in EDIT_OPTIONS if p.name not in ("negative", "cfg", "original_size", "crop", "target_size")
]
SUPERRES_OPTIONS += keyword_params(recipe=(Optional[str], RecipeOpt))
"""The options superres takes after its own: img2img's but for the text and SDXL ones, then --recipe."""


@command()
@with_options(SUPERRES_OPTIONS)
def superres(
    image: Optional[str] = typer.Argument(None, help="Low-resolution input image (default with --recipe: its input)."),
    scale: Optional[int] = typer.Option(
        None, "--scale", help="Upscaling factor; must equal the model's (4 for LDM-SR)."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="What the image shows (text-guided upscalers: the SD 2 x4)."
    ),
    negative: Optional[str] = NegativeOpt,
    cfg: Optional[float] = CfgOpt,
    noise_level: Optional[int] = typer.Option(
        None,
        "--noise-level",
        help="SD 2 x4 upscaler: noise added to the low-res image, 0..max_noise_level (350); default 20.",
    ),
    **opts,
) -> None:
    """Upscale an image: LDM-SR (low-res image concatenated to the latent) or the SD 2 x4 upscaler (also guided
    by --prompt, its input noised to --noise-level)."""
    from ..config import load_registry

    o = SimpleNamespace(**opts)
    rec = _recipe(o.recipe)
    if rec:
        if rec.get("task") != "superres":
            raise InputError(
                f"{o.recipe}: is a {rec.get('task')} image, not a superres one: pass a PNG made by `latentgen superres`"
            )
        image = image or rec.get("init_image")
        prompt = rec.get("prompt", "") if prompt is None else prompt
        negative = rec.get("negative", "") if negative is None else negative
        noise_level = rec.get("noise_level") if noise_level is None else noise_level
        o.seed, o.model, o.dtype, o.prediction, o.ema = _recipe_run(rec, o.seed, o.model, o.dtype, o.prediction, o.ema)
        o.weights = o.weights or rec.get("weights")
    if image is None:
        raise ConfigError("superres needs an IMAGE argument (or --recipe PNG)")
    if o.model is None:
        o.model = load_registry().get("default_superres") or o.model
    check_options(
        steps=o.steps,
        sampler=o.sampler,
        spacing=o.spacing,
        cfg=cfg,
        eta=o.eta,
        seed=o.seed,
        num=o.num,
        noise_level=noise_level,
        dtype=o.dtype,
    )
    low = _load_input_image(image)
    sess = _session("superres", o)
    from .. import pipelines

    name = sess.bundle.config.name
    if sess.bundle.config.concat != "lowres":
        raise ConfigError(
            f"model {name} is not a super-resolution model (pass --model with an LDM-SR or SD 2 x4 upscaler checkpoint)"
        )
    level = pipelines.noise_level_for(sess.bundle, noise_level)
    text_guided = sess.bundle.config.cond.kind != "none"
    if not text_guided and (prompt or negative or cfg not in (None, 1.0)):
        raise ConfigError(
            f"model {name} takes no text: --prompt, --negative and --cfg need a text-guided upscaler (the SD 2 x4)"
        )
    f = sess.bundle.config.factor
    if scale is not None and scale != f:
        raise ConfigError(f"--scale {scale}: model {name} upscales by {f}")
    _check_image_size(sess, low, image, scale=f)
    sess.check_outputs([{}], o.num)
    defaults = sess.settings(
        o.steps, o.sampler, o.karras, o.spacing, cfg if text_guided else 1.0, o.eta, recipe=rec, scheduler=o.scheduler
    )
    pipelines.guard_memory(sess.bundle, o.num, low.shape[-1] * f, low.shape[-2] * f, defaults)
    base = base_seed(o.seed, o.quiet)
    text, neg = prompt or "", negative or ""

    def make(item, seeds):
        n = len(seeds)
        bar = sess.progress(defaults.steps, text[:40] or "superres")
        try:
            imgs = pipelines.superres(
                sess.bundle,
                low.expand(n, -1, -1, -1),
                seeds,
                defaults,
                callback=bar,
                prompts=[text] * n,
                negatives=[neg] * n,
                noise_level=level,
            )
        finally:
            bar.close()
        return imgs, {
            "task": "superres",
            **_sampling_meta(text, neg, defaults),
            "noise_level": level,
            "width": low.shape[-1] * f,
            "height": low.shape[-2] * f,
            "init_image": image,
            **_model_meta(sess),
            "ema": o.ema,
        }

    run_generation(sess, [{"prompt": text}], base, o.num, make, {})
    sess.finish()


def _hires_options(rec: dict, scale, steps, strength, upscaler, sampler, prompt):
    """The hires fix asked for (--hires), or the one in the recipe, or None."""
    from ..hires import Hires

    if scale is None and rec.get("hires"):
        r = rec["hires"]
        return Hires(r["scale"], r.get("steps"), r["strength"], r["upscaler"], r.get("sampler"), r.get("prompt"))
    if scale is None:
        extra = (("--hires-steps", steps), ("--hires-sampler", sampler), ("--hires-prompt", prompt))
        given = [n for n, v in extra if v is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --hires SCALE (the hires fix is off without it)")
        return None
    if sampler is not None:
        from ..infotext import sampler_from_a1111

        sampler = sampler_from_a1111(sampler)[0]
    h = Hires(float(scale), steps, float(strength), upscaler, sampler, prompt)
    h.check()
    return h


def _hires_record(sess, h, st, w: int, h0: int) -> dict:
    from ..hires import target_size

    tw, th = target_size(sess.bundle, w, h0, h.scale)
    second = h.second_pass(st)
    return {
        "scale": h.scale,
        "steps": h.steps,
        "strength": h.strength,
        "upscaler": h.upscaler,
        "sampler": h.sampler,
        "scheduler": second.schedule_name,
        "prompt": h.prompt,
        "width": tw,
        "height": th,
    }


def _seed_options(rec: dict, rng, subseed, strength, ensd) -> dict:
    """--rng, --subseed, --subseed-strength and --eta-noise-seed-delta, else the recipe's, else the defaults."""
    out = {
        "rng": rng or rec.get("rng") or "cpu",
        "subseed": subseed if subseed is not None else rec.get("subseed"),
        "subseed_strength": float(strength if strength is not None else rec.get("subseed_strength") or 0.0),
        "ensd": int(ensd if ensd is not None else rec.get("ensd") or 0),
    }
    if out["subseed_strength"] and out["subseed"] is None:
        raise ConfigError("--subseed-strength needs --subseed V (the variation seed to blend towards)")
    return out
