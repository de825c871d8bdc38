"""How weights are held while a model runs: upcast on use (fp16/bf16 storage, fp32 compute, one layer at a
time), 8-bit weights (int8 storage with a scale per output channel, dequantised one layer at a time) and
convolution weights prepacked once into oneDNN's blocked layout for CPU fp32 generation."""

from __future__ import annotations

import functools

import torch
from torch import nn


class _Upcast(nn.Module):
    """Parametrization: a weight kept in its stored precision, used in the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.dtype)


def upcast_on_use(module: nn.Module, dtype: torch.dtype) -> None:
    """Leave `module`'s floating weights in their stored precision and hand each to its user upcast to `dtype`
    (a torch parametrization, so direct `.weight` reads are covered too); buffers become `dtype`. fp16 / bf16
    → fp32 is exact, so outputs equal those of an upcast copy of the model. `module.compute_dtype` records `dtype`
    for the code that picks input dtypes."""
    from torch.nn.utils import parametrize

    for m in list(module.modules()):
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                parametrize.register_parametrization(m, name, _Upcast(dtype), unsafe=True)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)
    module.compute_dtype = dtype


WEIGHT_STORAGE = ("int8",)  # what --weights accepts; omitted: as stored (or upcast at load, see bundle_from_raw)


def check_weight_storage(weights: str | None) -> str | None:
    if weights not in (None, *WEIGHT_STORAGE):
        from ..errors import ConfigError

        raise ConfigError(f"--weights must be {' or '.join(WEIGHT_STORAGE)} (or omitted), not '{weights}'")
    return weights


INT8_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _Int8(nn.Module):
    """Parametrization: an int8 weight q and its per-output-channel scale s (fp32, shaped to broadcast over q),
    used as q·s in the compute dtype."""

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        w = q.to(torch.float32).mul_(self.scale)  # 2x faster than q * scale (its int8 × fp32 promotion), same values
        return w if w.dtype == self.dtype else w.to(self.dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight-only quantisation, one scale per output channel (dim 0): s = max|w| / 127 over the other
    dims, q = round(w / s) in [-127, 127]; an all-zero channel gets s = 1 (q = 0). Returns (q int8, s fp32)."""
    w = w.detach().to(torch.float32, copy=True)  # a copy: rounded in place below
    dims = tuple(range(1, w.ndim))
    amax = torch.maximum(w.amax(dim=dims, keepdim=True), -w.amin(dim=dims, keepdim=True))  # max |w|, no |w| copy
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return w.div_(scale).round_().clamp_(-127, 127).to(torch.int8), scale


def int8_weights(module: nn.Module, dtype: torch.dtype, source=None) -> nn.Module:
    """Hold the weight of each of `module`'s Linear / Conv1d / Conv2d layers as int8 with a per-output-channel
    scale (:func:`quantize_int8`), dequantised to `dtype` when the layer runs (a torch parametrization, like
    :func:`upcast_on_use`): a quarter of the fp32 bytes, one layer's dense weight alive at a time. Biases, norms
    and embeddings are untouched. `source(w)`, when given, returns the values of weight `w` to quantise (e.g.
    read from the file without touching its memory map). For generation only; `module.compute_dtype` records
    `dtype`."""
    from torch.nn.utils import parametrize

    for m in list(module.modules()):
        w = m._parameters.get("weight") if isinstance(m, INT8_LAYERS) else None
        if w is None or not w.is_floating_point() or parametrize.is_parametrized(m, "weight"):
            continue
        q, scale = quantize_int8(source(w) if source is not None else w)
        m._parameters["weight"] = nn.Parameter(q.to(w.device), requires_grad=False)
        parametrize.register_parametrization(m, "weight", _Int8(scale.to(w.device), dtype), unsafe=True)
    module.compute_dtype = dtype
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, as stored (int8, fp16, ...)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _pack(conv: nn.Conv2d, w: torch.Tensor, shape) -> torch.Tensor:
    """`conv`'s weight `w` (fp32, or fp16 / bf16 converted exactly to fp32 on the way) reordered into oneDNN's
    blocked layout for inputs of `shape`."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        w.contiguous().to_mkldnn(torch.float32),
        list(conv.padding),
        list(conv.stride),
        list(conv.dilation),
        conv.groups,
        list(shape),
    )


def _packed_conv(conv: nn.Conv2d, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "none", [], ""
    )


def _packs(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


class PackedConv2d(nn.Conv2d):
    """Inference-only Conv2d for fp32 on CPU: the weight is held once, in oneDNN's blocked layout, instead of being
    reordered into it on every call (F.conv2d does that; measured at SD 1.5 size: 2x faster 3x3 convs at 16x16
    and 8x8, 10-15% at 32x32 and 64x64). Packed on the first call, for that call's input shape; other shapes
    still work. `.weight` and `state_dict()` give a dense copy. Made by :func:`prepack_convs`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _packs(x):
            return self._conv_forward(x, self.weight, self.bias)
        if "weight" in self._parameters:  # first call: the dense weight gives way to the packed one
            self.packed = _pack(self, self._parameters.pop("weight").detach(), x.shape)
        return _packed_conv(self, x, self.packed)

    @property
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"] if "weight" in self._parameters else self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "weight" not in self._parameters:
            destination[prefix + "weight"] = self.weight


@functools.cache
def _packing_works() -> bool:
    """Whether this torch build runs PackedConv2d (oneDNN's packed-weight ops)."""
    try:
        conv = PackedConv2d(1, 1, 1).requires_grad_(False)
        with torch.no_grad():
            return bool(conv(torch.ones(1, 1, 2, 2)).shape == (1, 1, 2, 2))
    except Exception:
        return False


def prepack_convs(module: nn.Module) -> nn.Module:
    """Turn `module`'s plain fp32 CPU Conv2d layers (not those upcast on use) into :class:`PackedConv2d`, for
    generation: never for training, and the module's weights must not change afterwards. Packing an upcast weight
    on each call instead was measured 2.6x slower per SD 1.5 UNet step than prepacked full weights (36.6 s vs
    13.9 s, 512², batch 2, one process, alternating); F.conv2d on the upcast weight costs about 8%."""
    if not _packing_works():
        return module
    for m in module.modules():
        if (
            type(m) is nn.Conv2d
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"
        ):
            m.__class__ = PackedConv2d
    return module
