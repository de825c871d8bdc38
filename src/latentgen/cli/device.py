"""Device and dtype choice for `--device` and `--dtype`."""

from __future__ import annotations

from ..errors import ConfigError


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda or mps, not '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


BF16_MIN_UNET_PARAMS = 100_000_000  # `--dtype auto` on a bf16-native CPU: bf16 only for UNets at least this large


def pick_dtype(dtype: str, device: str, unet_params: int | None = None):
    """`--dtype` → torch dtype. auto: fp16 on CUDA; on a CPU with native bf16 (AMX / avx512_bf16) bf16 only for a
    UNet of BF16_MIN_UNET_PARAMS or more (SD 1.5's has 860M), since small models gain little from it and lose
    adherence (the shipped default, 6.7M: 3 of 5 seeds right instead of 5); else fp32."""
    import torch

    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.float16
        if device == "cpu" and (unet_params or 0) >= BF16_MIN_UNET_PARAMS and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, not '{dtype}'")
    return table[dtype]
