"""The denoising UNet eps_theta(z_t, t, y) of latent diffusion (Rombach et al., arXiv 2112.10752, Sec. 3.2-3.3).

Mirrors `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock, AttentionBlock,
QKVAttention[Legacy], Downsample, Upsample, TimestepEmbedSequential; itself from Dhariwal & Nichol,
arXiv 2105.05233) and `ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock,
CrossAttention, FeedForward, GEGLU). Module names and Sequential positions copy the original
checkpoints, so `model.diffusion_model.*` loads with `strict=True` once the prefix is removed.
Every attention goes through `F.scaled_dot_product_attention`.

Conditioning: cross-attention context (paper Eq. 3), class labels (`num_classes`) added to the time
embedding (the SD 2 x4 upscaler feeds its noise level this way), or SDXL's "vector" (`num_classes="sequential"`,
`adm_in_channels` wide: pooled text embedding + size embeddings) through an MLP `label_emb` (sgm's openaimodel).
SDXL also sets `transformer_depth` per level (sgm's list form; `transformer_depth_middle` defaults to the last).
Latents of any size run: where a level halves an odd side, the upsampler interpolates to the skip's size
(as diffusers' UNet2DConditionModel, `forward_upsample_size`); sides divisible by 2^(levels-1) take the plain x2.
`disable_self_attentions` turns a level's self-attention into a second cross-attention (stablediffusion's
`disable_self_attn`). Concat conditioning (inpainting, super-resolution) is the caller's job: it concatenates
channels to x, and `in_channels` says how many there are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import CheckpointError, ConfigError, HeadCountError, InputError

__all__ = [
    "AttentionBlock",
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "GEGLU",
    "GroupNorm32",
    "ResBlock",
    "SpatialTransformer",
    "TimestepEmbedSequential",
    "UNetConfig",
    "UNetModel",
    "Upsample",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------------------------
# configuration

# keys of an original `unet_config.params` that do not change the computation here
_IGNORED_LDM_KEYS = {"use_checkpoint", "use_fp16", "use_bf16", "spatial_transformer_attn_type"}


@dataclass
class UNetConfig:
    """Hyper-parameters of `UNetModel`, named as the original `unet_config.params`.

    `attention_resolutions` holds downsampling rates (1, 2, 4, ...) at which a level has attention.
    Heads: `num_head_channels` (per-head width) wins over `num_heads` when both are set, as the original.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = -1
    num_head_channels: int = -1
    use_spatial_transformer: bool = False
    transformer_depth: int | tuple[int, ...] = 1  # one for all levels, or one per level (SDXL)
    transformer_depth_middle: int | None = None  # None: transformer_depth (its last entry when per level)
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    num_classes: int | str | None = None  # "sequential": label_emb is an MLP on an adm_in_channels vector (SDXL)
    adm_in_channels: int | None = None
    disable_self_attentions: tuple[bool, ...] | None = None  # per level: attn1 attends to the context too
    disable_middle_self_attn: bool = False
    legacy: bool = False
    dropout: float = 0.0
    conv_resample: bool = True
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    use_new_attention_order: bool = False
    image_size: int | None = None  # informative: the latent size it was trained at

    def __post_init__(self) -> None:
        self.attention_resolutions = tuple(sorted(int(r) for r in self.attention_resolutions))
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.disable_self_attentions is not None:
            self.disable_self_attentions = tuple(bool(d) for d in self.disable_self_attentions)
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ConfigError(
                    f"UNet config: disable_self_attentions has {len(self.disable_self_attentions)} "
                    f"entries but channel_mult has {len(self.channel_mult)} levels; give one per level"
                )
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("UNet config needs num_heads or num_head_channels (got neither)")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ConfigError("UNet config: use_spatial_transformer needs context_dim (cross-attention width)")
        if isinstance(self.context_dim, (list, tuple)):  # sgm: one per level (the SDXL refiner); all equal
            if len(set(self.context_dim)) != 1:
                raise ConfigError(f"UNet config: context_dim {list(self.context_dim)} differs between levels")
            self.context_dim = int(self.context_dim[0])
        if isinstance(self.transformer_depth, (list, tuple)):
            self.transformer_depth = tuple(int(d) for d in self.transformer_depth)
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ConfigError(
                    f"UNet config: transformer_depth has {len(self.transformer_depth)} entries but channel_mult "
                    f"has {len(self.channel_mult)} levels; give one per level or a single int"
                )
        if self.num_classes == "sequential":
            if not self.adm_in_channels:
                raise ConfigError("UNet config: num_classes 'sequential' needs adm_in_channels (the vector's width)")
        elif self.num_classes is not None and not isinstance(self.num_classes, int):
            raise ConfigError(
                f"UNet config: num_classes={self.num_classes!r} is not supported; use an int, 'sequential' or null"
            )

    def depth(self, level: int | None) -> int:
        """Transformer blocks per SpatialTransformer at a level (None: the middle block)."""
        d = self.transformer_depth
        if level is None:
            if self.transformer_depth_middle is not None:
                return self.transformer_depth_middle
            return d[-1] if isinstance(d, tuple) else d
        return d[level] if isinstance(d, tuple) else d

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention layer on `channels` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        if isinstance(self.transformer_depth, tuple):
            d["transformer_depth"] = list(self.transformer_depth)
        if self.disable_self_attentions is not None:
            d["disable_self_attentions"] = list(self.disable_self_attentions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"UNet config has unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_ldm_params(cls, params: dict) -> UNetConfig:
        """From `unet_config.params` of an original YAML (openaimodel.UNetModel arguments)."""
        params = dict(params)
        if params.pop("dims", 2) != 2:
            raise ConfigError("unet_config.params.dims must be 2 (only 2-D UNets are supported)")
        upsample_heads = params.pop("num_heads_upsample", -1)
        if upsample_heads not in (-1, params.get("num_heads", -1)):
            raise ConfigError("unet_config.params.num_heads_upsample differs from num_heads; not supported")
        for key in _IGNORED_LDM_KEYS:
            params.pop(key, None)
        if params.get("transformer_depth") is None:
            params.pop("transformer_depth", None)
        if "use_spatial_transformer" not in params and params.get("context_dim") is not None:
            params["use_spatial_transformer"] = True  # sgm's UNetModel (SDXL) always builds SpatialTransformers
        return cls.from_dict(params)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], family_hint: str | None = None) -> UNetConfig:
        """Infer the config from keys and shapes (keys without `model.diffusion_model.`).

        Heads cannot be seen in weights; conventions fill them in and an explicit config overrides:
        conv proj_in (SD 1.x) -> num_heads=8; linear proj_in (SD 2.x, SDXL: an MLP label_emb) ->
        num_head_channels=64, except the
        SD 2 x4 upscaler (class labels, 3 channels more in than out) -> num_heads=8; legacy AttentionBlock
        (CompVis LDM unconditional / super-resolution) -> num_head_channels=32.
        A level whose self-attention keys take the context's width is a `disable_self_attentions` level
        (undetectable when the level is as wide as the context: read as not disabled).
        `family_hint` ("sd1", "sd2", "sdxl", "upscaler", "ldm") picks the convention explicitly. `conv_resample=True`,
        `legacy=False` and `use_new_attention_order=False` are assumed.
        """
        try:
            return cls(**_infer_unet(sd, family_hint))
        except KeyError as err:
            raise CheckpointError(
                f"UNet weights lack key {err.args[0]!r}; is this an original openaimodel.UNetModel?"
            ) from None


def _count(sd: dict, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n)) for k in sd):
        n += 1
    return n


def _infer_unet(sd: dict[str, torch.Tensor], family_hint: str | None) -> dict:
    """Keyword arguments of UNetConfig read off an original UNet state dict."""
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    n_out = _count(sd, "output_blocks.{}.")
    # the upsampler is the last sub-module (index >= 1) of the last output block of each level but the last
    ups = [
        i
        for i in range(n_out)
        for j in (1, 2)
        if f"output_blocks.{i}.{j}.conv.weight" in sd or f"output_blocks.{i}.{j}.in_layers.0.weight" in sd
    ]
    num_res_blocks = ups[0] if ups else n_out - 1
    levels = n_out // (num_res_blocks + 1)
    first = [1 + lvl * (num_res_blocks + 1) for lvl in range(levels)]  # first ResBlock of each level
    channel_mult = tuple(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // model_channels for i in first)
    attention_resolutions = tuple(
        2**lvl for lvl, i in enumerate(first) if any(k.startswith(f"input_blocks.{i}.1.") for k in sd)
    )
    spatial = "middle_block.1.proj_in.weight" in sd
    linear = spatial and sd["middle_block.1.proj_in.weight"].ndim == 2
    res0 = f"input_blocks.{first[0]}.0"
    out0 = sd[f"{res0}.in_layers.2.weight"].shape[0]
    kw = dict(
        in_channels=int(in_channels),
        out_channels=int(sd["out.2.weight"].shape[0]),
        model_channels=int(model_channels),
        attention_resolutions=attention_resolutions,
        num_res_blocks=num_res_blocks,
        channel_mult=channel_mult,
        use_spatial_transformer=spatial,
        use_linear_in_transformer=linear,
        resblock_updown=levels > 1 and f"input_blocks.{num_res_blocks + 1}.0.in_layers.0.weight" in sd,
        use_scale_shift_norm=sd[f"{res0}.emb_layers.1.weight"].shape[0] == 2 * out0,
    )
    if spatial:
        middle = _count(sd, "middle_block.1.transformer_blocks.{}.")
        per_level = [_count(sd, f"input_blocks.{i}.1.transformer_blocks.{{}}.") for i in first]
        attended = {d for d in per_level if d}
        if attended == {middle}:
            kw["transformer_depth"] = middle
        else:  # SDXL: a depth per level (0 where a level has no attention), the middle as the last level
            kw["transformer_depth"] = tuple(per_level)
            kw["transformer_depth_middle"] = None if middle == per_level[-1] else middle
        kw["context_dim"] = int(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        kw.update(_disabled_self_attentions(sd, first, channel_mult, int(model_channels), kw["context_dim"]))
    if "label_emb.weight" in sd:
        kw["num_classes"] = int(sd["label_emb.weight"].shape[0])
    elif "label_emb.0.0.weight" in sd:
        kw["num_classes"] = "sequential"
        kw["adm_in_channels"] = int(sd["label_emb.0.0.weight"].shape[1])
    elif any(k.startswith("label_emb.") for k in sd):
        raise CheckpointError("UNet weights have a label_emb of unknown layout (neither Embedding nor MLP)")
    upscaler = "label_emb.weight" in sd and kw["in_channels"] == kw["out_channels"] + 3
    sdxl = kw.get("num_classes") == "sequential" and linear
    family = family_hint or (
        "ldm" if not spatial else ("upscaler" if upscaler else "sdxl" if sdxl else "sd2") if linear else "sd1"
    )
    if family not in ("sd1", "sd2", "sdxl", "upscaler", "ldm"):
        raise ConfigError(f"UNet family hint {family_hint!r} is unknown; use 'sd1', 'sd2', 'sdxl', 'upscaler' or 'ldm'")
    if family in ("sd2", "sdxl"):
        kw["num_head_channels"] = 64
    elif family == "ldm" and not spatial:
        kw["num_head_channels"] = 32
    else:
        kw["num_heads"] = 8
    return kw


def _disabled_self_attentions(sd: dict, first: list[int], channel_mult: tuple, mc: int, context_dim: int) -> dict:
    """`disable_self_attentions` / `disable_middle_self_attn` from the width attn1's keys project from."""

    def disabled(prefix: str, channels: int) -> bool:
        key = f"{prefix}.transformer_blocks.0.attn1.to_k.weight"
        return key in sd and sd[key].shape[1] != channels and sd[key].shape[1] == context_dim

    levels = tuple(disabled(f"input_blocks.{i}.1", mult * mc) for i, mult in zip(first, channel_mult))
    middle = disabled("middle_block.1", channel_mult[-1] * mc)
    return {"disable_self_attentions": levels if any(levels) else None, "disable_middle_self_attn": middle}


# ----------------------------------------------------------------------------------------------
# building blocks (openaimodel.py)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / half), half = dim // 2.

    Vaswani et al. arXiv 1706.03762 Sec. 3.5, in the cos-first order of the original; float32; t may
    be fractional.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5) computed in float32 whatever the input dtype, as the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`), or 2x2 average pooling without `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (`conv`) when `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`size`: the skip connection's (h, w) when it is not twice x's (a level halved an odd side)."""
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block with timestep embedding; optional scale-shift norm (FiLM, arXiv 2105.05233
    Sec. 3) and up/down-sampling inside the block (`resblock_updown`)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.updown:
            resize = (lambda m, t: m(t, size)) if isinstance(self.h_upd, Upsample) else (lambda m, t: m(t))
            h = self.in_layers[2](resize(self.h_upd, self.in_layers[1](self.in_layers[0](x))))
            x = resize(self.x_upd, x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, heads * d] -> [b, heads, n, d]."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Legacy spatial self-attention with a packed 1-D-conv qkv (CompVis LDMs without SpatialTransformer).

    The head split follows QKVAttentionLegacy (qkv laid out per head as [q_h, k_h, v_h]) or, with
    `use_new_attention_order`, QKVAttention ([q_1..q_H, k_1..k_H, v_1..v_H]).
    """

    def __init__(self, channels: int, num_heads: int, use_new_attention_order: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        layout = (
            (b, 3, self.num_heads, c // self.num_heads, -1)
            if self.new_order
            else (b, self.num_heads, 3, c // self.num_heads, -1)
        )
        qkv = qkv.reshape(layout)
        q, k, v = qkv.unbind(1 if self.new_order else 2)  # each [b, heads, d, t]
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, -1))
        return (x + h).reshape(b, c, *spatial)


# ----------------------------------------------------------------------------------------------
# transformer (attention.py)


class CrossAttention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V with Q from x and K, V from the context
    (paper Eq. 3); self-attention when no context is given."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (_heads_first(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """x W * GELU(x V) (Shazeer, arXiv 2002.05202 Eq. 5), both halves from one projection `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        return torch.mul(x, torch._C._nn.gelu_(gate))  # inference: the gate in place; a contiguous result


FF_CHUNK_BYTES = 2**23  # inference: the GEGLU projection's output per row chunk (fp32: 819 rows of SD 1.5's 2560)


class FeedForward(nn.Module):
    """`net` = [GEGLU, Dropout, Linear], inner width 4 x dim (the original's gated_ff=True).

    Inference on the CPU runs it over chunks of rows (each row is independent; the result is the same): the projection's
    8x-wide output stays a few MiB, in the cache, instead of 84 MB of fresh pages per call at SD 1.5's 64x64
    level (168 MB at SDXL's). Measured on SD 1.5's 4096-token shape, fp32, 2 cores: 183 ms against 246 ms."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, FF_CHUNK_BYTES // (self.net[0].proj.out_features * x.element_size()))
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() // x.shape[-1] <= rows:
            return self.net(x)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.net[2].out_features)
        for i in range(0, flat.shape[0], rows):
            out[i : i + rows] = self.net(flat[i : i + rows])
        return out.view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual.
    With `disable_self_attn` the first attention attends to the context as well (no self-attention)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-shaped transformer: GroupNorm (eps 1e-6), proj_in (1x1 conv, or Linear in SD 2.x),
    `depth` transformer blocks over the h*w tokens, proj_out, residual."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, n_heads, d_head, dropout=dropout, context_dim=context_dim, disable_self_attn=disable_self_attn
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.use_linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)  # [b, h*w, c]
        if self.use_linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context=context)
        if self.use_linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            t = self.proj_out(t)
        return t + x


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to ResBlocks, the context to SpatialTransformers and the
    output size (the next skip connection's) to upsamplers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# the UNet


class UNetModel(nn.Module):
    """openaimodel.UNetModel: input_blocks, middle_block, output_blocks with skip connections."""

    cpu_channels_last = False  # see forward

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc = cfg.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes == "sequential":  # sgm: Sequential(Sequential(Linear, SiLU, Linear))
            mlp = nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.label_emb = nn.Sequential(mlp)
        elif cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, **updown) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, **updown)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self._attention(ch, level, self._self_attn_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), self._attention(ch, None, cfg.disable_middle_self_attn), res(ch, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self._attention(ch, level, self._self_attn_disabled(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _self_attn_disabled(self, level: int) -> bool:
        return bool(self.config.disable_self_attentions and self.config.disable_self_attentions[level])

    def _attention(self, ch: int, level: int | None, disable_self_attn: bool = False) -> nn.Module:
        """The attention of a level (None: the middle block)."""
        cfg = self.config
        heads, head_dim = cfg.heads(ch)
        if heads < 1 or heads * head_dim != ch:
            raise HeadCountError(
                f"UNet config: attention on {ch} channels cannot be split by num_heads={cfg.num_heads}, "
                f"num_head_channels={cfg.num_head_channels}; set one that divides {ch}"
            )
        if cfg.use_spatial_transformer:
            return SpatialTransformer(
                ch,
                heads,
                head_dim,
                cfg.depth(level),
                cfg.dropout,
                cfg.context_dim,
                cfg.use_linear_in_transformer,
                disable_self_attn,
            )
        return AttentionBlock(ch, heads, cfg.use_new_attention_order)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Network output (eps or v) for noisy latents x [b, in_channels, h, w] at (possibly fractional)
        timesteps [b] or a scalar, with cross-attention context [b, n, context_dim] and class labels y [b]
        (or, with num_classes "sequential", the vector [b, adm_in_channels]).

        With `cpu_channels_last` (set by `loading.weights.prepack`, once the convolutions run on prepacked weights)
        the activations run in channels_last on the CPU, and the output comes back plain NCHW. The prepacked
        convolutions give the same numbers in either layout and skip reordering the activations in this one, and a
        transformer's tokens [b, h*w, c] are then a free view: with the chunked feed-forward, SD 1.5 at 512², fp32,
        2 cores, 0.93 of the time (14 rounds, alternating; single convolutions 0.65-1.0). Plain F.conv2d rounds
        differently in channels_last and was not faster (weights as stored: 1.00), so it stays off there."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].bias.dtype))  # not .weight: packed, it would unpack
        if self.config.num_classes is not None:
            if y is None:
                what = "the vector y" if self.config.num_classes == "sequential" else "class labels y"
                raise InputError(f"this UNet is class-conditional (num_classes set): pass {what}")
            if self.config.num_classes == "sequential":
                y = y.to(self.label_emb[0][0].bias.dtype)
            emb = emb + self.label_emb(y).to(emb.dtype)
        hs = []
        h = x.contiguous(memory_format=torch.channels_last) if self.cpu_channels_last and x.device.type == "cpu" else x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context, hs[-1].shape[-2:] if hs else None)
        return self.out(h).contiguous()
