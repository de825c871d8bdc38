"""Original LDM / SD configs (`v1-inference.yaml`, `models/ldm/*/config.yaml`, JSON alike): reading them
(YAML with `yaml.safe_load` only) and taking the schedule, UNet and low-scale parameters out of them."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

# LDM calls the sqrt-linear schedule "linear"; diffusers (and we) call it "scaled_linear".
_LDM_BETA_SCHEDULES = {"linear": "scaled_linear", "cosine": "cosine", "sqrt_linear": "linear"}


# The model classes of the published configs (CompVis/latent-diffusion, CompVis/stable-diffusion,
# Stability-AI/stablediffusion, Stability-AI/generative-models) and what becomes of each.
LDM_MODELS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
}
REFUSED_MODELS = {
    "ldm.models.diffusion.ddpm.DDPM": "a pixel-space DDPM, not a latent diffusion model",
    "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion": "depth-to-image (depth_stage_config: MiDaS)",
    "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion": "unCLIP image-embedding conditioning",
}
SGM_ENGINE = "sgm.models.diffusion.DiffusionEngine"
UNET_TARGETS = {
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel",
}
FIRST_STAGE_TARGETS = {
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.models.autoencoder.VQModelInterface",
    "ldm.models.autoencoder.VQModel",
    "sgm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
}
REFUSED_FIRST_STAGES = {
    "ldm.models.autoencoder.IdentityFirstStage": "pixel-space models",
    "sgm.models.autoencoder.AutoencodingEngine": "encoder_config / decoder_config autoencoders (video decoders)",
}
REFUSED_COND = {
    "__is_first_stage__": "the masked image encoded by the first stage and concatenated (CompVis inpainting_big)",
    "ldm.modules.encoders.modules.SpatialRescaler": "semantic-map conditioning (SpatialRescaler)",
}
CONDITIONING_KEYS = {"crossattn", "concat", "hybrid", "adm", "hybrid-adm"}
# sgm GeneralConditioner embedders that have an ldm cond_stage_config equal to them.
SGM_TEXT_EMBEDDERS = {
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}
SGM_SDXL_EMBEDDERS = {
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
}
SGM_V_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
SGM_EPS_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"
SGM_DISCRETIZATION = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"


def _unsupported(part: str, what: str) -> ConfigError:
    return ConfigError(f"config: {part} is not supported ({what})")


def ldm_params(ldm_config: dict) -> dict:
    """The `model.params` of an original YAML/JSON config (nested or bare form), checked and normalised: every
    published variant is accepted or refused with one line naming the part that is not supported. An sgm
    `DiffusionEngine` config (generative-models) is translated into the ldm form; `cond_stage_config` becomes a
    mapping (`__is_unconditional__`, and `torch.nn.Identity` with concat conditioning, mean no conditioning stage)."""
    if not isinstance(ldm_config, dict):
        raise ConfigError("config is not a mapping: pass an original LDM/SD YAML or JSON config")
    node = ldm_config.get("ldm_config", ldm_config)
    node = node.get("model", node) if isinstance(node, dict) else node
    if not isinstance(node, dict):
        raise ConfigError("config has no model mapping: pass an original LDM/SD YAML or JSON config")
    target = node.get("target")
    params = node.get("params", node)
    if not isinstance(params, dict):
        raise ConfigError("config: model.params is not a mapping")
    if target == SGM_ENGINE:
        params = _from_sgm(params)
    elif target in REFUSED_MODELS:
        raise _unsupported(f"model target {target}", REFUSED_MODELS[target])
    elif target is not None and target not in LDM_MODELS:
        raise _unsupported(f"model target {target!r}", f"known: {', '.join(sorted(LDM_MODELS | {SGM_ENGINE}))}")
    if "unet_config" not in params:
        raise ConfigError("config has no model.params.unet_config: pass an original LDM/SD YAML or JSON config")
    params = dict(params)
    _check_target(params, "unet_config", UNET_TARGETS, {})
    if "first_stage_config" not in params:
        raise ConfigError("config has no model.params.first_stage_config (the autoencoder)")
    _check_target(params, "first_stage_config", FIRST_STAGE_TARGETS, REFUSED_FIRST_STAGES)
    key = params.get("conditioning_key")
    if key is not None and key not in CONDITIONING_KEYS:
        raise _unsupported(f"conditioning_key {key!r}", f"known: {', '.join(sorted(CONDITIONING_KEYS))}")
    params["cond_stage_config"] = _cond_stage(params.get("cond_stage_config"), key)
    return params


def _check_target(params: dict, name: str, known: set[str], refused: dict[str, str]) -> None:
    node = params[name]
    if not isinstance(node, dict) or not isinstance(node.get("params", {}), dict):
        raise ConfigError(f"config: {name} must be a mapping with target and params")
    target = node.get("target")
    if target in refused:
        raise _unsupported(f"{name} target {target}", refused[target])
    if target is not None and target not in known:
        raise _unsupported(f"{name} target {target!r}", f"known: {', '.join(sorted(known))}")


def _cond_stage(node, conditioning_key: str | None) -> dict:
    """cond_stage_config as a mapping the text config reads (kind from its target)."""
    if node is None or node == "__is_unconditional__":
        return {"target": "__is_unconditional__"}
    if isinstance(node, str):
        raise _unsupported(f"cond_stage_config {node}", REFUSED_COND.get(node, "not a known stage"))
    if not isinstance(node, dict):
        raise ConfigError("config: cond_stage_config must be a mapping or __is_unconditional__")
    target = node.get("target")
    if target == "torch.nn.Identity":  # bsr_sr: the low-res image itself, concatenated to the latent
        if conditioning_key != "concat":
            raise _unsupported("cond_stage_config torch.nn.Identity", f"with conditioning_key {conditioning_key!r}")
        return {"target": "__is_unconditional__"}
    if target in REFUSED_COND:
        raise _unsupported(f"cond_stage_config target {target}", REFUSED_COND[target])
    if (node.get("params") or {}).get("use_tokenizer") is False:
        raise _unsupported(f"cond_stage_config {target} with use_tokenizer: false", "layout tokens, not text")
    return node


def _from_sgm(params: dict) -> dict:
    """A generative-models `DiffusionEngine` config in the ldm form (SD 2.1 ones; SDXL is read from its weights)."""
    out: dict = {"scale_factor": params.get("scale_factor", 1.0)}
    net = params.get("network_config") or {}
    out["unet_config"] = net
    embedders = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    targets = [e.get("target") for e in embedders if isinstance(e, dict)]
    if SGM_SDXL_EMBEDDERS & set(targets) and net.get("target") in UNET_TARGETS:
        raise ConfigError("config: SDXL needs no --config: latentgen reads SDXL from the checkpoint alone")
    if net.get("target") not in UNET_TARGETS:
        raise _unsupported(f"network_config target {net.get('target')!r}", "video and other non-image UNets")
    if len(targets) != 1 or targets[0] not in SGM_TEXT_EMBEDDERS:
        raise _unsupported(f"conditioner_config embedders {targets}", "one CLIP or OpenCLIP text embedder is")
    out["cond_stage_config"] = {"target": SGM_TEXT_EMBEDDERS[targets[0]], "params": embedders[0].get("params") or {}}
    out["conditioning_key"] = "crossattn"
    if "first_stage_config" in params:
        out["first_stage_config"] = params["first_stage_config"]
    den = (params.get("denoiser_config") or {}).get("params") or {}
    scaling = (den.get("scaling_config") or {}).get("target")
    if scaling not in (SGM_EPS_SCALING, SGM_V_SCALING):
        raise _unsupported(f"denoiser scaling_config {scaling!r}", "EpsScaling and VScaling are")
    out["parameterization"] = "v" if scaling == SGM_V_SCALING else "eps"
    disc = den.get("discretization_config") or {}
    if disc.get("target", SGM_DISCRETIZATION) != SGM_DISCRETIZATION:
        raise _unsupported(f"discretization_config {disc.get('target')!r}", "LegacyDDPMDiscretization is")
    dp = disc.get("params") or {}
    out["linear_start"] = dp.get("linear_start", 0.00085)
    out["linear_end"] = dp.get("linear_end", 0.012)
    out["timesteps"] = dp.get("num_timesteps", den.get("num_idx", 1000))
    return out


def schedule_from_ldm(params: dict) -> dict:
    sched = params.get("beta_schedule", "linear")
    return {
        "beta_schedule": _LDM_BETA_SCHEDULES.get(sched, sched),
        "timesteps": int(params.get("timesteps", 1000)),
        "linear_start": float(params.get("linear_start", 0.00085)),
        "linear_end": float(params.get("linear_end", 0.012)),
        "prediction": "v" if params.get("parameterization", "eps") == "v" else "eps",
        "scale_factor": float(params.get("scale_factor", 1.0)),
        "conditioning_key": params.get("conditioning_key") or "none",
    }


LOW_SCALE_TARGET = "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation"


def low_scale_from_ldm(params: dict) -> dict:
    """ModelConfig fields of an original `low_scale_config` (LatentUpscaleDiffusion); {} when there is none."""
    node = params.get("low_scale_config")
    if not node:
        return {}
    if node.get("target", LOW_SCALE_TARGET) != LOW_SCALE_TARGET:
        raise ConfigError(f"low_scale_config target {node.get('target')!r} is not supported; only {LOW_SCALE_TARGET}")
    p = node.get("params") or {}
    sched = p.get("noise_schedule_config") or {}
    kind = sched.get("beta_schedule", "linear")
    return {
        "max_noise_level": int(p.get("max_noise_level", 1000)),
        "low_scale_beta_schedule": _LDM_BETA_SCHEDULES.get(kind, kind),
        "low_scale_timesteps": int(sched.get("timesteps", 1000)),
        "low_scale_linear_start": float(sched.get("linear_start", 1e-4)),
        "low_scale_linear_end": float(sched.get("linear_end", 2e-2)),
    }


def read_config_file(path: str | Path) -> dict:
    """Read an original LDM config (.yaml/.yml/.json); YAML with `yaml.safe_load` only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
