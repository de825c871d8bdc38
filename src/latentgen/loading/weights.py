"""How weights are held while a model runs: upcast on use (fp16/bf16 storage, fp32 compute, one layer at a
time), 8-bit weights (int8 storage with a scale per output channel, dequantised one layer at a time) and
convolution weights prepacked once into oneDNN's blocked layout for CPU fp32 generation."""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn


class _Upcast(nn.Module):
    """Parametrization: a weight kept in its stored precision, used in the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.dtype)

    def into(self, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """forward(w), written into `out` (a buffer of the compute dtype and w's shape)."""
        return out.copy_(w)


def upcast_on_use(module: nn.Module, dtype: torch.dtype) -> None:
    """Leave `module`'s floating weights in their stored precision and hand each to its user upcast to `dtype`
    (a torch parametrization, so direct `.weight` reads are covered too); buffers become `dtype`. fp16 / bf16
    → fp32 is exact, so outputs equal those of an upcast copy of the model. `module.compute_dtype` records `dtype`
    for the code that picks input dtypes."""
    from torch.nn.utils import parametrize

    for m in list(module.modules()):
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if name == "weight":
                    _run_stored(m)
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

    def into(self, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """forward(q), written into `out` (fp32 compute only: the values forward gives)."""
        return out.copy_(q).mul_(self.scale)


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
        _run_stored(m)
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


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b through oneDNN's matmul, `w` dense or packed. On the UNet's fp32 shapes (2-core AVX2 EPYC, 15
    alternating rounds) it took 0.82 of F.linear's time (MKL's sgemm) with a dense weight, 0.77 packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _packs(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


class _Packed:
    """Mixin for inference-only layers whose fp32 CPU weight is held once in oneDNN's layout, not reordered into it
    on every call: packed on the first fp32 CPU no-grad call, when the dense parameter gives way to the packed copy
    (`self.packed`); other calls (grad, other dtypes or devices) use the dense weight. `.weight` and `state_dict()`
    give a dense copy. Putting a dense `weight` parameter back (a LoRA merge does) packs it again on the next call.
    Made by :func:`prepack`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _packs(x):
            return self._dense(x, self.weight)
        if "weight" in self._parameters:  # first call: the dense weight gives way to the packed one
            self.packed = self._pack(self._parameters.pop("weight").detach(), x)
        return self._run(x, self.packed)

    @property
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"] if "weight" in self._parameters else self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "weight" not in self._parameters:
            destination[prefix + "weight"] = self.weight


class PackedConv2d(_Packed, nn.Conv2d):
    """Conv2d on a prepacked weight (measured at SD 1.5 size against F.conv2d, which reorders on every call: 2x
    faster 3x3 convs at 16x16 and 8x8, 10-15% at 32x32 and 64x64). Packed for the first call's input shape; other
    shapes still work."""

    def _dense(self, x, w):
        return self._conv_forward(x, w, self.bias)

    def _pack(self, w, x):
        return _pack(self, w, x.shape)

    def _run(self, x, packed):
        return _packed_conv(self, x, packed)


class PackedLinear(_Packed, nn.Linear):
    """Linear on a weight prepacked for oneDNN's matmul (0.77 of F.linear's time on the UNet's shapes)."""

    def _dense(self, x, w):
        return F.linear(x, w, self.bias)

    def _pack(self, w, x):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), max(1, x.numel() // self.in_features))

    def _run(self, x, packed):
        return _onednn_linear(x, packed, self.bias)


_scratch = threading.local()


def _dense_weight(m: nn.Module) -> torch.Tensor:
    """`m.weight` (upcast or dequantised on use) written into one scratch buffer reused by every layer of this
    thread: a fresh fp32 copy of a large weight is memory the kernel hands out and zeroes anew on every call (the
    1280-channel 3x3 convolutions' 59 MB took 35 ms to upcast fresh, 6 ms into the buffer). The result is only
    valid until the next call: the caller consumes it before returning."""
    plist = m.parametrizations.weight
    shape = plist.original.shape
    n = plist.original.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        _scratch.buf = buf = torch.empty(n)
    out = buf[:n].view(shape)
    f = plist[0] if len(plist) == 1 else None
    return f.into(plist.original, out) if hasattr(f, "into") else out.copy_(m.weight)


def free_scratch() -> None:
    """Drop this thread's scratch buffer (the UNet's grows it to its largest weight: 118 MB at SD 1.5 and SDXL
    size); the decoder's layers make a small one again."""
    _scratch.__dict__.pop("buf", None)


def _stored(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether `m` (a layer whose weight is upcast or dequantised on use) runs the fast CPU fp32 path for `x`."""
    from torch.nn.utils import parametrize

    return _packs(x) and parametrize.is_parametrized(m, "weight") and _packing_works()


class StoredLinear(nn.Linear):
    """Linear whose weight is upcast or dequantised as it runs (:func:`upcast_on_use`, :func:`int8_weights`): in
    fp32 on the CPU the dense weight goes through oneDNN's matmul (0.82 of F.linear's time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _stored(self, x):
            return _onednn_linear(x, _dense_weight(self), self.bias)
        return F.linear(x, self.weight, self.bias)


UNFOLD_MAX = 512  # output positions (batch × height × width) up to which StoredConv2d runs as one matrix product


class StoredConv2d(nn.Conv2d):
    """Conv2d whose weight is upcast or dequantised as it runs. In fp32 on the CPU the weight goes into a reused
    buffer, and a small output (at most UNFOLD_MAX positions: SD's 16x16 and 8x8 levels at batch 2) is one matrix
    product of the weight with the unfolded input. F.conv2d reorders the plain weight into oneDNN's layout on every
    call, which at those sizes costs more than the convolution: 1280-channel 3x3 at 8x8, batch 2, 87 ms against 48
    (16x16: 187 against 152; the prepacked full-weight convolution 30 and 108). Larger outputs run F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _stored(self, x) or x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        w = _dense_weight(self)
        n, _, h, wd = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.groups != 1 or n * oh * ow > UNFOLD_MAX:
            return self._conv_forward(x, w, self.bias)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [n, C·kh·kw, oh·ow]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], n * oh * ow)
        w = w.view(self.out_channels, -1)
        y = torch.mm(w, cols) if self.bias is None else torch.addmm(self.bias[:, None], w, cols)
        return y.view(self.out_channels, n, oh, ow).transpose(0, 1).contiguous()


def _run_stored(m: nn.Module) -> None:
    """Before `m`'s weight gets an upcast / int8 parametrization: plain Linear and Conv2d layers become
    StoredLinear / StoredConv2d (the same layer elsewhere; faster in fp32 on the CPU)."""
    if type(m) is nn.Linear:
        m.__class__ = StoredLinear
    elif type(m) is nn.Conv2d:
        m.__class__ = StoredConv2d


@functools.cache
def _packing_works() -> bool:
    """Whether this torch build runs oneDNN's packed-weight convolution and matmul ops."""
    try:
        conv, lin = PackedConv2d(1, 1, 1).requires_grad_(False), PackedLinear(2, 2).requires_grad_(False)
        with torch.no_grad():
            return conv(torch.ones(1, 1, 2, 2)).shape == (1, 1, 2, 2) and lin(torch.ones(3, 2)).shape == (3, 2)
    except Exception:
        return False


PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}


def prepack(module: nn.Module) -> nn.Module:
    """Turn `module`'s plain fp32 CPU Conv2d and Linear layers (not those upcast on use) into
    :class:`PackedConv2d` / :class:`PackedLinear`, for generation: never for training, and the module's weights must
    not change afterwards except through a LoRA merge's parameter swap. Packing an upcast weight on each call
    instead was measured 2.6x slower per SD 1.5 UNet step than prepacked full weights (36.6 s vs 13.9 s, 512²,
    batch 2, one process, alternating). Modules with a `cpu_channels_last` flag (UNetModel, Decoder) get it set when
    their convolutions were packed."""
    if not _packing_works():
        return module
    for m in module.modules():
        cls = PACKED.get(type(m))
        if cls is None or m.weight.dtype != torch.float32 or m.weight.device.type != "cpu":
            continue
        if cls is PackedConv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            continue
        m.__class__ = cls
    for m in module.modules():  # the UNet and the decoder then run their activations in channels_last on the CPU:
        if hasattr(m, "cpu_channels_last"):  # the same numbers on packed weights, not on F.conv2d's (their forwards)
            m.cpu_channels_last = any(isinstance(c, PackedConv2d) for c in m.modules())
    return module
