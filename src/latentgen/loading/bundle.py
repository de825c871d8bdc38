"""The ModelBundle: a checkpoint's config, UNet, first stage and conditioning stage built and loaded strictly,
on a device and dtype, with full or low-memory weights; saving in our own layout; the first stage alone."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import PREDICTIONS, ModelConfig, resolve_model
from ..errors import CheckpointError, ConfigError, HeadCountError
from .detect import detect_config
from .files import RawCheckpoint, read_checkpoint
from .layout import (
    COND_PREFIX,
    FIRST_STAGE_PREFIX,
    FORMAT_TAG,
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    LOW_SCALE_PREFIX,
    SCHEDULE_BUFFERS,
    UNET_PREFIX,
    load_strict,
    split_prefix,
)
from .mapped_pages import release_after_each
from .safetensors import PlainReader, read_converted, write_safetensors
from .sdxl import SDXL_COND_PREFIX, SDXL_IGNORED_KEYS, read_and_guessed, variant
from .weights import check_weight_storage, int8_weights, upcast_on_use


@dataclass
class ModelBundle:
    config: ModelConfig
    unet: nn.Module
    first_stage: nn.Module
    cond: nn.Module
    schedule: object  # denoiser.DiscreteSchedule
    path: str
    format: str
    notes: list[str] = field(default_factory=list)
    low_scale: object = None  # denoiser.DiscreteSchedule of the low-res noise augmentation, None without one

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for m in (self.unet, self.first_stage, self.cond):
            m.to(device=device, dtype=dtype)
        if next(self.unet.parameters()).is_cuda:  # measured on an H100, fp16 SD 1.5 UNet: 0.84 vs 0.93 of
            self.unet.to(memory_format=torch.channels_last)  # diffusers' step time (benchmarks/RESULTS.md)
        return self


def _ema_unet(sd: dict, unet_sd: dict, source: str) -> dict:
    """CompVis LitEma stores `model_ema.diffusion_model<name without dots>`."""
    out = {}
    for k in unet_sd:
        ek = "model_ema.diffusion_model" + k.replace(".", "")
        if ek not in sd:
            raise CheckpointError(f"{source}: --ema asked for, but EMA weight {ek} is missing")
        out[k] = sd[ek]
    return out


@contextmanager
def empty_weights():
    """Build modules with parameters on the meta device (no memory, no random init); buffers stay real.
    The checkpoint's tensors are then assigned, so weights exist once in memory."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip_meta(init):  # random init of a meta tensor is a no-op, but torch routes it through its Python
        def run(tensor, *args, **kwargs):  # refs, whose first use imports torch._dynamo (2 s of a 9 s txt2img)
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

        return run

    inits = {name: getattr(nn.init, name) for name in _INITS}
    nn.Module.register_parameter = on_meta
    for name, init in inits.items():
        setattr(nn.init, name, skip_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, init in inits.items():
            setattr(nn.init, name, init)


_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


def build_modules(cfg: ModelConfig):
    from ..autoencoder import build_autoencoder
    from ..text.config import build_conditioner
    from ..text.sdxl import SDXLConditioner
    from ..unet import UNetModel

    cond = SDXLConditioner(cfg.cond) if cfg.family == "sdxl" else build_conditioner(cfg.cond)
    return UNetModel(cfg.unet), build_autoencoder(cfg.first_stage), cond


def _discrete_schedule(ac, beta_schedule: str, timesteps: int, linear_start: float, linear_end: float):
    """The file's ā buffer when it fits, else ā from the β schedule."""
    from ..denoiser import DiscreteSchedule, make_betas

    if ac is not None and ac.numel() == timesteps and ac.device.type != "meta":
        return DiscreteSchedule(ac.double())
    return DiscreteSchedule.from_betas(make_betas(beta_schedule, timesteps, linear_start, linear_end))


def make_schedule(cfg: ModelConfig, tensors: dict | None = None):
    return _discrete_schedule(
        (tensors or {}).get("alphas_cumprod"), cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end
    )


def make_low_scale_schedule(cfg: ModelConfig, tensors: dict | None = None):
    """The noise-augmentation schedule (ImageConcatWithNoiseAugmentation), None for models without one."""
    if cfg.max_noise_level is None:
        return None
    ac = (tensors or {}).get(LOW_SCALE_PREFIX + "alphas_cumprod")
    return _discrete_schedule(
        ac, cfg.low_scale_beta_schedule, cfg.low_scale_timesteps, cfg.low_scale_linear_start, cfg.low_scale_linear_end
    )


def load_model(
    model: str | None = None,
    *,
    prediction: str | None = None,
    config: str | Path | dict | None = None,
    overrides: dict | None = None,
    ema: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    low_memory: bool | None = False,
    weights: str | None = None,
) -> ModelBundle:
    """Load a model by registry name or path (file or diffusers folder) with strict key checking.
    `low_memory`, `weights`: see :func:`bundle_from_raw`."""
    path, entry = resolve_model(model)
    raw = read_checkpoint(path)
    return bundle_from_raw(
        raw,
        entry=entry,
        prediction=prediction,
        config=config,
        overrides=overrides,
        ema=ema,
        device=device,
        dtype=dtype,
        low_memory=low_memory,
        weights=weights,
    )


def resolve_config(
    raw: RawCheckpoint,
    *,
    entry: dict | None = None,
    prediction: str | None = None,
    config: str | Path | dict | None = None,
    overrides: dict | None = None,
) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig of a checkpoint (file, original config, registry entry and options together) and notes on
    what was guessed."""
    entry = entry or {}
    path = raw.path
    if raw.format == "first_stage":
        raise CheckpointError(f"{path}: holds only an autoencoder, not a diffusion model (use it with encode/decode)")
    if isinstance(config, (str, Path)):
        from .original_config import read_config_file

        config = read_config_file(config)
    elif config is None and entry.get("config"):
        from .original_config import read_config_file

        config = read_config_file(entry["config"])
    cfg = detect_config(raw, ldm_config=config, overrides=overrides)
    cfg.name = entry.get("name") or cfg.name or Path(path).stem
    for k in ("steps", "cfg", "sampler", "width", "height", "noise_level"):
        if k in entry:
            cfg.recommended[k] = entry[k]
    if prediction is None and entry.get("prediction") and cfg.prediction_source in ("default", "guess"):
        prediction, source = entry["prediction"], "registry"
    else:
        source = "option"
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ConfigError(f"--prediction must be one of {', '.join(PREDICTIONS)}, not '{prediction}'")
        cfg.prediction, cfg.prediction_source = prediction, source
    notes = []
    if cfg.prediction_source == "guess":
        notes.append(
            f"prediction type guessed as '{cfg.prediction}' (SD 2.x eps and v files look alike): "
            "pass --prediction eps|v if images look wrong"
        )

    return cfg, notes


def bundle_from_raw(
    raw: RawCheckpoint,
    *,
    entry: dict | None = None,
    prediction: str | None = None,
    config: str | Path | dict | None = None,
    overrides: dict | None = None,
    ema: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    low_memory: bool | None = False,
    weights: str | None = None,
) -> ModelBundle:
    """Build the modules a checkpoint describes and load its weights strictly (meta tensors allowed).
    `low_memory` (CPU, a single file): weights stored in a lower precision than `dtype` stay as stored, memory-mapped,
    and each layer gets its weights upcast when it runs (:func:`upcast_on_use`): the same results, about half
    the memory for an fp16 file computed in fp32, slower per UNet step. False: the UNet's and the decoder's upcast
    at load (the text and image encoders, run once per prompt or image, still keep theirs as stored). None (the
    CLI default): False when the weights in `dtype` take under a third of the memory available, else True.
    `weights="int8"`: the Linear / Conv layers of the UNet, the text encoder and the image decoder hold int8
    weights with a scale per output channel, quantised from the stored ones and dequantised to `dtype` layer by
    layer as they run (:func:`int8_weights`); everything else is kept as with low memory."""
    check_weight_storage(weights)
    cfg, notes = resolve_config(raw, entry=entry, prediction=prediction, config=config, overrides=overrides)
    path = raw.path
    sd = raw.tensors
    cpu_file = dtype == torch.float32 and torch.device(device).type == "cpu" and raw.format != "diffusers"
    if low_memory is None and cpu_file:  # auto: the UNet and decoder upcast at load (faster) when that fits easily
        from latentgen.memory import available_memory

        need = sum(v.numel() for v in sd.values() if v.is_floating_point()) * dtype.itemsize
        avail = available_memory()
        low_memory = avail is None or 3 * need > avail
    low_memory = (bool(low_memory) or weights is not None) and cpu_file
    # with full weights too, the text and image encoders (run once per prompt or image) keep theirs as stored
    cond_prefix = SDXL_COND_PREFIX if cfg.family == "sdxl" else COND_PREFIX
    keep = (cond_prefix, FIRST_STAGE_PREFIX + "encoder.", FIRST_STAGE_PREFIX + "quant_conv.") if cpu_file else ()
    if dtype is not None and not low_memory and weights is None:  # weights exist once in memory, in the asked dtype
        todo = [
            k
            for k, v in sd.items()
            if v.is_floating_point()
            and v.dtype != dtype
            and not k.startswith(keep)
            and k not in SCHEDULE_BUFFERS
            and not k.startswith(LOW_SCALE_PREFIX)
        ]
        if raw.format != "diffusers" and Path(raw.path).is_file():
            sd.update(read_converted(raw.path, todo, dtype))
        else:  # a diffusers folder: its tensors were renamed and stacked from several files
            for k in todo:
                sd[k] = sd[k].to(dtype)
    unet_sd, fs_sd, cond_sd = (split_prefix(sd, p) for p in (UNET_PREFIX, FIRST_STAGE_PREFIX, cond_prefix))
    if ema:
        unet_sd = _ema_unet(sd, unet_sd, path)
    stray = [
        k
        for k in sd
        if not k.startswith((UNET_PREFIX, FIRST_STAGE_PREFIX, cond_prefix))
        and k not in IGNORED_KEYS | SDXL_IGNORED_KEYS
        and not k.startswith(IGNORED_PREFIXES)
    ]
    if stray:
        more = f" (+{len(stray) - 4} more)" if len(stray) > 4 else ""
        raise CheckpointError(f"{path}: unexpected keys outside the model: {', '.join(stray[:4])}{more}")
    try:
        with empty_weights():
            unet, first_stage, cond = build_modules(cfg)
    except HeadCountError as e:
        if raw.format == "latentgen" or config is not None:
            raise
        raise HeadCountError(
            f"{path}: {str(e).split(';')[0]}, the convention for its family (SD 1.x: 8 heads, SD 2.x: 64 channels "
            "a head); the head count is not in the weights: pass --config with the checkpoint's original config"
        ) from e
    load_strict(unet, unet_sd, what="UNet (model.diffusion_model.*)", source=path)
    load_strict(first_stage, fs_sd, what="first stage (first_stage_model.*)", source=path)
    try:
        cond.load_original_state_dict(cond_sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: conditioning ({cond_prefix}*): {e}") from e
    bundle = ModelBundle(
        cfg, unet, first_stage, cond, make_schedule(cfg, sd), path, raw.format, notes, make_low_scale_schedule(cfg, sd)
    )
    for m in (unet, first_stage, cond):
        m.eval().requires_grad_(False)
    if weights == "int8":  # quantised from the stored weights, before anything else is converted
        _quantize(raw, sd, (unet, cond, first_stage.decoder, first_stage.post_quant_conv), dtype)
        first_stage.compute_dtype = dtype
    if cpu_file:  # weights not converted as they were read are upcast as their layers run
        for m in (unet, first_stage, cond) if low_memory else (cond, first_stage.encoder, first_stage.quant_conv):
            upcast_on_use(m, dtype)
        if low_memory and weights is None:  # resident UNet weights: the running block's, not the whole UNet's
            release_after_each([*unet.input_blocks, unet.middle_block, *unet.output_blocks], path)
        first_stage.compute_dtype = dtype
        return bundle
    return bundle.to(device=device, dtype=dtype)


def _quantize(raw: RawCheckpoint, sd: dict, modules, dtype: torch.dtype) -> None:
    """int8 weights for `modules`. From a single file, each weight is read on its own with a plain read (found by
    the storage address of its memory-mapped tensor) and dropped once quantised, so the file's pages for those
    weights are never mapped in: the peak stays near the int8 weights, not the file's size plus them."""
    if raw.format == "diffusers" or not Path(raw.path).is_file():
        for m in modules:
            int8_weights(m, dtype)
        return
    at = {(v.data_ptr(), v.shape, v.dtype): k for k, v in sd.items() if v.is_floating_point() and v.numel()}
    with PlainReader(raw.path) as reader:

        def source(w: torch.Tensor) -> torch.Tensor:
            key = at.get((w.data_ptr(), w.shape, w.dtype))
            return reader.read(key) if key is not None else w

        for m in modules:
            int8_weights(m, dtype, source)


def save_model(
    path: str | Path,
    cfg: ModelConfig,
    unet: nn.Module,
    first_stage: nn.Module,
    cond: nn.Module,
    *,
    metadata: dict | None = None,
    overwrite: bool = True,
) -> None:
    """latentgen's own format: the original single-file layout + the ModelConfig as JSON metadata."""
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update({FIRST_STAGE_PREFIX + k: v for k, v in first_stage.state_dict().items()})
    cond_prefix = SDXL_COND_PREFIX if cfg.family == "sdxl" else COND_PREFIX
    tensors.update({cond_prefix + k: v for k, v in cond.original_state_dict().items()})
    sched, low = make_schedule(cfg), make_low_scale_schedule(cfg)
    tensors["alphas_cumprod"] = sched.alphas_cumprod.float()
    if low is not None:
        tensors[LOW_SCALE_PREFIX + "alphas_cumprod"] = low.alphas_cumprod.float()
    meta = {"format": FORMAT_TAG, "latentgen": json.dumps(cfg.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    write_safetensors(path, tensors, meta, overwrite=overwrite)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(bundle: ModelBundle) -> dict:
    """What `latentgen info` prints."""
    params = {"unet": count_params(bundle.unet), "first_stage": count_params(bundle.first_stage)}
    params["cond"] = count_params(bundle.cond)
    return _description(bundle.config, bundle.path, bundle.format, params, bundle.notes)


def describe_file(model: str, *, prediction: str | None = None, config: str | Path | dict | None = None) -> dict:
    """`latentgen info`: the loaded model's description; where the modules cannot be built because the weights do
    not show the head count and the convention does not fit, what the weights show (the UNet's parameters counted
    from its tensors), with the failed assumption in `unknown` and a note on the option that fixes it."""
    try:
        return describe(load_model(model, prediction=prediction, config=config))
    except HeadCountError as e:
        path, entry = resolve_model(model)
        raw = read_checkpoint(path)
        cfg, notes = resolve_config(raw, entry=entry, prediction=prediction, config=config)
        from ..autoencoder import build_autoencoder
        from ..text.config import build_conditioner

        with empty_weights():  # the parts that do not depend on the head count
            first_stage, cond = build_autoencoder(cfg.first_stage), build_conditioner(cfg.cond)
        unet = sum(v.numel() for k, v in raw.tensors.items() if k.startswith(UNET_PREFIX) and v.is_floating_point())
        params = {"unet": unet, "first_stage": count_params(first_stage), "cond": count_params(cond)}
        d = _description(cfg, path, raw.format, params, [*notes, str(e).split(": ", 1)[-1]])
        d["unknown"] = ["attention heads"]
        return d


def _description(cfg: ModelConfig, path: str, fmt: str, params: dict, notes: list[str]) -> dict:
    return {
        "path": path,
        "format": fmt,
        "name": cfg.name,
        "family": cfg.family,
        "variant": variant(cfg),
        "variant_source": read_and_guessed(cfg) if variant(cfg) else None,
        "prediction": cfg.prediction,
        "prediction_source": cfg.prediction_source,
        "first_stage": cfg.first_stage.kind,
        "latent_channels": cfg.latent_channels,
        "factor": cfg.factor,
        "scale_factor": cfg.scale_factor,
        "conditioning": cfg.cond.kind,
        "conditioning_key": cfg.conditioning_key,
        "concat": cfg.concat,
        "context_dim": cfg.unet.context_dim,
        "unet_in_channels": cfg.unet.in_channels,
        "num_classes": cfg.unet.num_classes,
        "max_noise_level": cfg.max_noise_level,
        "params": params,
        "schedule": {
            "beta_schedule": cfg.beta_schedule,
            "timesteps": cfg.timesteps,
            "linear_start": cfg.linear_start,
            "linear_end": cfg.linear_end,
        },
        "recommended": cfg.recommended,
        "notes": notes,
    }


class FirstStage:
    """An autoencoder with its latent scale factor: what `encode` / `decode` need."""

    def __init__(self, module: nn.Module, cfg, scale_factor: float, name: str, device):
        self.module, self.cfg, self.scale_factor, self.name = module, cfg, float(scale_factor), name
        self.device = torch.device(device)
        self.factor = cfg.factor
        w = module.post_quant_conv.weight.detach().float().cpu().contiguous()
        import hashlib

        self.fingerprint = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]

    def encode_latent(self, x, generator=None, sample=False):
        return self.module.encode_latent(x, generator=generator, sample=sample)

    def decode_scaled(self, z):
        return (self.module.decode_latent(z / self.scale_factor).float() / 2 + 0.5).clamp(0, 1)

    def latent_metadata(self, shape) -> dict:
        return {
            "format": "latentgen-latent/1",
            "model": self.name,
            "first_stage": self.cfg.kind,
            "scale_factor": repr(self.scale_factor),
            "shape": json.dumps(list(shape)),
            "latent_channels": str(self.cfg.embed_dim),
            "factor": str(self.factor),
            "fingerprint": self.fingerprint,
        }

    def check_latent(self, z, meta: dict, source: str) -> None:
        from ..errors import InputError

        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise InputError(
                f"{source}: latent of shape {tuple(z.shape)} does not fit model {self.name}, whose first "
                f"stage takes [N, {self.cfg.embed_dim}, H, W] latents"
            )
        fp = meta.get("fingerprint")
        if fp and fp != self.fingerprint:
            raise InputError(
                f"{source}: latent was made by another first stage (model {meta.get('model', '?')}); "
                f"decode it with that model (--model) instead of {self.name}"
            )


def load_first_stage(model: str | None, *, device="cpu") -> FirstStage:
    from ..autoencoder import AutoencoderConfig, build_autoencoder

    path, entry = resolve_model(model)
    raw = read_checkpoint(path)
    name = entry.get("name") or Path(path).stem
    if raw.format == "first_stage":
        fs_sd = split_prefix(raw.tensors, FIRST_STAGE_PREFIX) or raw.tensors
        if "autoencoder" in raw.metadata:
            meta = json.loads(raw.metadata["autoencoder"])
            cfg = AutoencoderConfig.from_dict(meta["config"])
            scale = float(meta.get("scale_factor", 1.0))
        else:
            cfg = AutoencoderConfig.from_state_dict(fs_sd)
            scale = 0.18215 if cfg.kind == "kl" else 1.0
    else:
        mc = detect_config(raw)
        cfg, scale = mc.first_stage, mc.scale_factor
        fs_sd = split_prefix(raw.tensors, FIRST_STAGE_PREFIX)
    with empty_weights():
        module = build_autoencoder(cfg)
    load_strict(module, fs_sd, what="first stage", source=path, ignore=(r"loss\..*",))
    module.eval().requires_grad_(False).to(device=device, dtype=torch.float32)  # fp16/bf16 storage → float32
    return FirstStage(module, cfg, scale, name, device)
