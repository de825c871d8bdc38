"""First stage of a latent diffusion model: the autoencoder E / D (Rombach et al., arXiv 2112.10752, Sec. 3.1).

Mirrors CompVis `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample), `ldm/models/autoencoder.py` (AutoencoderKL, VQModel / VQModelInterface),
`ldm/modules/distributions/distributions.py` (DiagonalGaussianDistribution) and
`taming/modules/vqvae/quantize.py` (VectorQuantizer2). Attribute names copy the original checkpoints,
so `first_stage_model.*` of an original single-file checkpoint loads with `strict=True` once the
prefix is removed.

Two regularisations (paper Sec. 3.1): KL (a diagonal Gaussian posterior, "KL-reg") and VQ (a
vector-quantisation layer absorbed into the decoder, "VQ-reg", van den Oord et al. arXiv 1711.00937).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import CheckpointError, ConfigError

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "AttnBlock",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VQModel",
    "VectorQuantizer",
    "build_autoencoder",
]


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of a first stage, named as the original `ddconfig` + `embed_dim` / `n_embed`.

    `attn_resolutions` lists feature-map sizes (in units of `resolution`) at which a level has
    self-attention, exactly as the original: level i works at `resolution // 2**i`.
    """

    kind: str  # "kl" | "vq"
    embed_dim: int
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    double_z: bool = True
    n_embed: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups (original: 32; diffusers: norm_num_groups)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"autoencoder kind {self.kind!r} is unknown; use 'kl' or 'vq'")
        if self.kind == "kl" and not self.double_z:
            raise ConfigError("a KL autoencoder needs ddconfig.double_z=true (mean and log-variance)")
        if self.kind == "vq" and not self.n_embed:
            raise ConfigError("a VQ autoencoder needs n_embed (the codebook size)")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f of the latent space."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"autoencoder config has unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_ldm_params(cls, params: dict) -> AutoencoderConfig:
        """From `first_stage_config.params` of an original YAML (`embed_dim`, `ddconfig`, `n_embed`)."""
        if "ddconfig" not in params or "embed_dim" not in params:
            raise ConfigError("first_stage_config.params needs 'ddconfig' and 'embed_dim'")
        dd = params["ddconfig"]
        try:
            return cls(
                kind="vq" if params.get("n_embed") else "kl",
                embed_dim=int(params["embed_dim"]),
                z_channels=int(dd["z_channels"]),
                ch=int(dd["ch"]),
                ch_mult=tuple(dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(dd.get("attn_resolutions", ())),
                in_channels=int(dd.get("in_channels", 3)),
                out_ch=int(dd.get("out_ch", 3)),
                resolution=int(dd.get("resolution", 256)),
                double_z=bool(dd.get("double_z", True)),
                n_embed=int(params["n_embed"]) if params.get("n_embed") else None,
                dropout=float(dd.get("dropout", 0.0)),
            )
        except KeyError as err:
            raise ConfigError(f"first_stage_config.params.ddconfig lacks key {err.args[0]!r}") from None

    def to_ldm_params(self) -> dict:
        """Inverse of `from_ldm_params`: the `first_stage_config.params` dict of an original YAML."""
        d = self.to_dict()
        params = {"embed_dim": d.pop("embed_dim"), "ddconfig": d}
        if d.pop("kind") == "vq":
            params["n_embed"] = d.pop("n_embed")
        else:
            d.pop("n_embed")
        return params

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], resolution: int = 256) -> AutoencoderConfig:
        """Infer the whole config from keys and shapes (keys without the `first_stage_model.` prefix).

        `resolution` only fixes the unit in which `attn_resolutions` is expressed (level i has size
        `resolution // 2**i`); any choice builds the same network.
        """
        try:
            ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
            levels = 0
            while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
                levels += 1
            num_res_blocks = 0
            while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in sd:
                num_res_blocks += 1
            ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
            attn = tuple(resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
            z_channels = sd["decoder.conv_in.weight"].shape[1]
            out_ch = sd["decoder.conv_out.weight"].shape[0]
            double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels
            embed_dim = sd["post_quant_conv.weight"].shape[1]
        except KeyError as err:
            raise CheckpointError(
                f"first-stage weights lack key {err.args[0]!r}; is this an original CompVis/SD autoencoder?"
            ) from None
        codebook = sd.get("quantize.embedding.weight")
        return cls(
            kind="kl" if codebook is None else "vq",
            embed_dim=int(embed_dim),
            z_channels=int(z_channels),
            ch=int(ch),
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn,
            in_channels=int(in_channels),
            out_ch=int(out_ch),
            resolution=resolution,
            double_z=bool(double_z),
            n_embed=None if codebook is None else int(codebook.shape[0]),
        )


# ----------------------------------------------------------------------------------------------
# building blocks (ldm/modules/diffusionmodules/model.py)


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """The original `Normalize`: GroupNorm with 32 groups (diffusers' norm_num_groups) and eps 1e-6."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding (`temb_channels=0` in the first stage)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections ("vanilla" attention)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # contiguous [b, 1, hw, c]: with a strided last dim SDPA falls back to its slow math path on CPU (3x here)
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right/bottom by one), as the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks) and an optional resampler.

    The original builds these as bare `nn.Module()` objects; the attribute names are what matters.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """`mid.block_1`, `mid.attn_1`, `mid.block_2`."""

    def __init__(self, channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image -> `z_channels` (or 2 x `z_channels` when `double_z`) channels at 1/f resolution."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        curr_res, block_in = cfg.resolution, ch
        for i, m in enumerate(mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m, cfg.dropout, cfg.norm_groups))
                block_in = ch * m
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg.norm_groups))
            level = _Level(blocks, attns)
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm_groups)
        self.norm_out = normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`z_channels` latent -> image. `up` is indexed by level (0 = full resolution) as the original,
    and run from the last level down."""

    cpu_channels_last = False  # see forward

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        block_in = ch * mult[-1]
        curr_res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm_groups)
        levels = []
        for i in reversed(range(len(mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i], cfg.dropout, cfg.norm_groups))
                block_in = ch * mult[i]
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg.norm_groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """With `cpu_channels_last` (set by `loading.weights.prepack`) the activations run in channels_last on the
        CPU: the prepacked convolutions give the same numbers and skip reordering them (SD 1.5's decoder at 512²,
        fp32, 2 cores, 0.94 of the time); the image comes back plain NCHW."""
        if self.cpu_channels_last and z.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


# ----------------------------------------------------------------------------------------------
# KL autoencoder


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) from the encoder's moments (paper Sec. 3.1, KL-reg).

    `logvar` is clamped to [-30, 20] as the original DiagonalGaussianDistribution.
    """

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn on the generator's device (CPU for reproducibility), as diffusers."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class _FirstStage(nn.Module):
    """What both autoencoders answer from their config: latent channels and downsampling factor."""

    config: AutoencoderConfig

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def factor(self) -> int:
        return self.config.factor


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder (ldm.models.autoencoder.AutoencoderKL)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.kind != "kl":
            raise ConfigError(f"AutoencoderKL needs kind='kl', got {cfg.kind!r}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, for training."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latent(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Unscaled latent of an image in [-1, 1]: the posterior mode, or a sample when `sample`."""
        posterior = self.encode(x)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Image in (about) [-1, 1] from an unscaled latent; not clamped."""
        return self.decode(z)


# ----------------------------------------------------------------------------------------------
# VQ autoencoder


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation (taming VectorQuantizer2; van den Oord et al. 1711.00937 Eq. 3).

    `legacy=True` keeps the original's weighting: loss = ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [b, h, w] of the nearest codebook entry to each latent vector of z [b, c, h, w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codebook = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as the original computes it
        d = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return d.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices [b, h, w] as a latent [b, c, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q with straight-through gradient, codebook + commitment loss, indices [b, h, w])."""
        indices = self.lookup(z)
        z_q = self.embed(indices)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices


class VQModel(_FirstStage):
    """VQ-regularised autoencoder (ldm.models.autoencoder.VQModel / VQModelInterface).

    `encode` returns the pre-quantisation latent (what LDM diffuses); `decode` quantises first unless
    `force_not_quantize`, as LDM's decode_first_stage and diffusers' VQModel.decode do.
    """

    def __init__(self, cfg: AutoencoderConfig, beta: float = 0.25):
        super().__init__()
        if cfg.kind != "vq":
            raise ConfigError(f"VQModel needs kind='vq', got {cfg.kind!r}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, quantisation loss, indices), for training."""
        quant, loss, indices = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(quant)), loss, indices

    def encode_latent(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Pre-quantisation latent h (deterministic; `generator` and `sample` are ignored)."""
        return self.encode(x)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Image in (about) [-1, 1]: quantise, then decode; not clamped."""
        return self.decode(z)


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return AutoencoderKL(cfg) if cfg.kind == "kl" else VQModel(cfg)
