"""Original LDM / SD configs (`v1-inference.yaml`, `models/ldm/*/config.yaml`, JSON alike): reading them
(YAML with `yaml.safe_load` only) and taking the schedule, UNet and low-scale parameters out of them."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

# LDM calls the sqrt-linear schedule "linear"; diffusers (and we) call it "scaled_linear".
_LDM_BETA_SCHEDULES = {"linear": "scaled_linear", "cosine": "cosine", "sqrt_linear": "linear"}


def ldm_params(ldm_config: dict) -> dict:
    """The `model.params` dict of an original YAML/JSON config (accepts the nested or the bare form)."""
    node = ldm_config.get("ldm_config", ldm_config)
    node = node.get("model", node)
    params = node.get("params", node)
    if "unet_config" not in params:
        raise ConfigError("config has no model.params.unet_config: pass an original LDM/SD YAML or JSON config")
    return params


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
    """Read an original LDM config (.yaml/.yml/.json). YAML needs PyYAML, which we do not require."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        import json

        return json.loads(text)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError as e:
        raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or pass the config as JSON") from e
    return yaml.safe_load(text)
