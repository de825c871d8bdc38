"""Detection: the ModelConfig of a checkpoint from its key names and tensor shapes, an original config and
diffusers' hints; what cannot be told from the file is marked as a guess."""

from __future__ import annotations

import json
from dataclasses import replace

from ..config import ModelConfig
from ..errors import CheckpointError
from .files import RawCheckpoint
from .layout import COND_PREFIX, FIRST_STAGE_PREFIX, LOW_SCALE_PREFIX, UNET_PREFIX, split_prefix
from .original_config import ldm_params, low_scale_from_ldm, schedule_from_ldm
from .sdxl import SDXL_COND_PREFIX, is_sdxl, sdxl_config


def _cond_overrides_from_hints(hints: dict) -> dict:
    te = hints.get("text_encoder") or {}
    out = {k: te[k] for k in ("num_attention_heads", "hidden_act", "layer_norm_eps") if k in te}
    if te:
        out["layer"] = "last"
    if hints.get("pad_token") is not None:
        out["pad_token_id"] = 49407 if hints["pad_token"] == "<|endoftext|>" else 0
    return out


def _unet_overrides_from_hints(hints: dict) -> dict:
    cfg = hints.get("unet") or {}
    if not cfg:
        return {}
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    chans = cfg["block_out_channels"]
    heads = heads if isinstance(heads, list) else [heads] * len(chans)
    per_head = {c // h for c, h in zip(chans, heads)}
    if len(set(heads)) > 1 and len(per_head) == 1:
        out = {"num_head_channels": per_head.pop(), "num_heads": -1}
    else:
        out = {"num_heads": heads[0], "num_head_channels": -1}
    only_cross = cfg.get("only_cross_attention", False)  # diffusers' name for disable_self_attentions
    only_cross = only_cross if isinstance(only_cross, list) else [bool(only_cross)] * len(chans)
    out["disable_self_attentions"] = tuple(only_cross) if any(only_cross) else None
    return out


def detect_config(raw: RawCheckpoint, *, ldm_config: dict | None = None, overrides: dict | None = None) -> ModelConfig:
    """Everything about the model that the file (and an optional original config) can tell."""
    from ..autoencoder import AutoencoderConfig
    from ..text.config import CondConfig
    from ..unet import UNetConfig

    overrides = overrides or {}
    if raw.format == "latentgen":
        try:
            cfg = ModelConfig.from_dict(json.loads(raw.metadata["latentgen"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{raw.path}: latentgen metadata is damaged ({e})") from e
        cfg.prediction_source = "metadata"
        return cfg
    sd = raw.tensors
    if is_sdxl(sd):  # from the weights alone (an sgm --config adds nothing the file does not show)
        parts = (split_prefix(sd, p) for p in (UNET_PREFIX, FIRST_STAGE_PREFIX, SDXL_COND_PREFIX))
        return sdxl_config(*parts, raw.path, raw.hints)
    unet_sd, fs_sd, cond_sd = (split_prefix(sd, p) for p in (UNET_PREFIX, FIRST_STAGE_PREFIX, COND_PREFIX))
    if not fs_sd:
        raise CheckpointError(f"{raw.path}: no first_stage_model.* (autoencoder) weights in the checkpoint")
    sched: dict = {}
    params = None
    if ldm_config is not None:
        params = ldm_params(ldm_config)
        unet_cfg = UNetConfig.from_ldm_params(params["unet_config"]["params"])
        fs_cfg = AutoencoderConfig.from_ldm_params(params["first_stage_config"]["params"])
        cond_cfg = CondConfig.from_ldm(params.get("cond_stage_config") or {}, cond_sd)
        sched = schedule_from_ldm(params)
    else:
        unet_cfg = UNetConfig.from_state_dict(unet_sd)
        fs_cfg = AutoencoderConfig.from_state_dict(fs_sd)
        cond_cfg = CondConfig.from_state_dict(cond_sd)
        if cond_cfg.kind == "class" and unet_cfg.use_spatial_transformer:
            # CompVis' class-conditional LDMs (cin256) use 32 channels per head, not SD's 8 heads
            unet_cfg = replace(unet_cfg, num_heads=-1, num_head_channels=32)
    unet_cfg = replace(unet_cfg, **{**_unet_overrides_from_hints(raw.hints), **overrides.get("unet", {})})
    cond_cfg = replace(cond_cfg, **{**_cond_overrides_from_hints(raw.hints), **overrides.get("cond", {})})
    if (raw.hints.get("vae") or {}).get("norm_num_groups"):  # not visible in the weights
        fs_cfg = replace(fs_cfg, norm_groups=int(raw.hints["vae"]["norm_num_groups"]))

    lat = fs_cfg.embed_dim
    extra_in = unet_cfg.in_channels - lat
    family = {"clip": "sd1", "open_clip": "sd2"}.get(cond_cfg.kind, "ldm")
    if cond_cfg.kind == "clip" and raw.hints.get("text_encoder", {}).get("hidden_act") == "gelu":
        family = "sd2"  # a diffusers SD 2.x folder: OpenCLIP already converted to a CLIPTextModel
    concat = None
    if extra_in == lat + 1:
        concat = "inpaint"
    elif extra_in == 3:
        concat = "lowres"
    elif extra_in != 0:
        raise CheckpointError(
            f"{raw.path}: UNet takes {unet_cfg.in_channels} channels but the first stage gives {lat}; "
            f"{extra_in} extra channels match neither inpainting ({lat + 1}) nor super-resolution (3)"
        )
    aug = _noise_augmentation(raw, params)
    if aug:
        _check_noise_augmentation(raw.path, aug, unet_cfg, concat)
    has_context = cond_cfg.kind != "none"
    key = (
        sched.get("conditioning_key")
        or ("hybrid-adm" if aug else None)
        or (("hybrid" if has_context else "concat") if concat else ("crossattn" if has_context else "none"))
    )
    cfg = ModelConfig(
        unet=unet_cfg,
        first_stage=fs_cfg,
        cond=cond_cfg,
        family=family,
        conditioning_key=key,
        concat=concat,
        scale_factor=0.18215 if fs_cfg.kind == "kl" else 1.0,
        **aug,
    )
    if aug:
        for k, v in X4_UPSCALER.items():
            setattr(cfg, k, v)
        cfg.recommended = dict(X4_RECOMMENDED)
    if "scale_factor" in sd:
        cfg.scale_factor = float(sd["scale_factor"])
    vae_hint = raw.hints.get("vae") or {}
    if "scaling_factor" in vae_hint:
        cfg.scale_factor = float(vae_hint["scaling_factor"])
    sched_hint = raw.hints.get("scheduler") or {}
    if sched_hint:
        cfg.beta_schedule = sched_hint.get("beta_schedule", cfg.beta_schedule)
        cfg.linear_start = float(sched_hint.get("beta_start", cfg.linear_start))
        cfg.linear_end = float(sched_hint.get("beta_end", cfg.linear_end))
        cfg.timesteps = int(sched_hint.get("num_train_timesteps", cfg.timesteps))
        if "prediction_type" in sched_hint:
            cfg.prediction = "v" if sched_hint["prediction_type"] == "v_prediction" else "eps"
            cfg.prediction_source = "config"
    if sched:
        cfg.beta_schedule, cfg.timesteps = sched["beta_schedule"], sched["timesteps"]
        cfg.linear_start, cfg.linear_end = sched["linear_start"], sched["linear_end"]
        cfg.prediction, cfg.prediction_source = sched["prediction"], "config"
        cfg.scale_factor = sched["scale_factor"]
        cfg.conditioning_key = sched["conditioning_key"]
    if cfg.prediction_source == "default" and family == "sd2" and concat is None:
        # SD 2.x 512 (eps) and 768 (v) share every key and shape: the file cannot tell.
        cfg.prediction, cfg.prediction_source = "v", "guess"
    return cfg


def _noise_augmentation(raw: RawCheckpoint, params: dict | None) -> dict:
    """ModelConfig fields of the low-res image's noise augmentation (SD 2 x4 upscaler), {} for none: from the
    original config's low_scale_config, a diffusers folder's low_res_scheduler, or an original file's
    low_scale_model.* buffers (the x4-upscaling.yaml values; the buffers themselves give the schedule)."""
    if params is not None:
        return low_scale_from_ldm(params)
    low = raw.hints.get("low_res_scheduler")
    if low:
        index = raw.hints.get("model_index") or {}
        return {
            "max_noise_level": int(index.get("max_noise_level", X4_MAX_NOISE_LEVEL)),
            "low_scale_beta_schedule": low.get("beta_schedule", "scaled_linear"),
            "low_scale_timesteps": int(low.get("num_train_timesteps", 1000)),
            "low_scale_linear_start": float(low.get("beta_start", 1e-4)),
            "low_scale_linear_end": float(low.get("beta_end", 2e-2)),
        }
    if any(k.startswith(LOW_SCALE_PREFIX) for k in raw.tensors):
        return {"max_noise_level": X4_MAX_NOISE_LEVEL}
    return {}


def _check_noise_augmentation(path: str, aug: dict, unet_cfg, concat: str | None) -> None:
    """The noise level is a class label of the UNet, the noised image its 3 extra input channels."""
    classes = unet_cfg.num_classes
    if concat != "lowres" or classes is None or aug["max_noise_level"] >= classes:
        raise CheckpointError(
            f"{path}: low-res noise augmentation (low_scale_model, max_noise_level {aug['max_noise_level']}) needs a "
            f"UNet taking the low-res image (3 extra channels) and noise levels as class labels (num_classes > "
            f"max_noise_level); this one has in_channels {unet_cfg.in_channels}, num_classes {classes}: "
            "pass the checkpoint's own --config"
        )


# What configs/stable-diffusion/x4-upscaling.yaml says and an x4 upscaler file cannot: its latent scale,
# schedule, parameterisation and noise-augmentation limit; the CFG scale and noise level diffusers defaults to.
X4_UPSCALER = {"scale_factor": 0.08333, "linear_start": 0.0001, "linear_end": 0.02, "prediction": "v"}


X4_MAX_NOISE_LEVEL = 350


X4_RECOMMENDED = {"cfg": 9.0, "noise_level": 20}
