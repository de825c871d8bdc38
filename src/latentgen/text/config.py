"""CondConfig: which conditioning stage a model has and its hyper-parameters, taken from an original config or
inferred from the cond-stage weights; `build_conditioner` makes the module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from latentgen.errors import CheckpointError, ConfigError

from .bert import BERTEmbedder
from .clip import OPENCLIP_VIT_H_WIDTH, CLIPEmbedder, _clip_prefix
from .conditioner import ClassEmbedder, NoConditioner, _Conditioner
from .tokenizers import BERT_VOCAB_SIZE, CLIP_EOS

KINDS = ("clip", "open_clip", "bert", "class", "none")


HEAD_DIM = 64  # SD1 CLIP ViT-L/14, OpenCLIP ViT-H/14 and x-transformers' default dim_head all use 64


# Fields that describe each kind; `to_dict` writes only these.
_CLIP_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer",
    "pad_token_id",
    "layer_norm_eps",
)


_FIELDS_BY_KIND = {
    "clip": _CLIP_FIELDS,
    "open_clip": _CLIP_FIELDS,
    "bert": ("vocab_size", "n_embed", "n_layer", "max_seq_len", "heads", "dim_head", "ff_mult"),
    "class": ("n_classes", "embed_dim", "key", "null_label"),
    "none": (),
}


_LDM_TARGETS = {
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "clip",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "open_clip",
    "ldm.modules.encoders.modules.BERTEmbedder": "bert",
    "ldm.modules.encoders.modules.ClassEmbedder": "class",
    "__is_unconditional__": "none",
}


# Real-size defaults of the two CLIP towers, used when a config names the kind without sizes.
_CLIP_DEFAULTS = {
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        layer="last",
        pad_token_id=CLIP_EOS,
    ),
    "open_clip": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="gelu",
        layer="penultimate",
        pad_token_id=0,
    ),
}


@dataclass
class CondConfig:
    """Hyper-parameters of the conditioning stage, with the names of the original classes' arguments.

    ``vocab_size`` defaults to 49408 for the CLIP kinds and 30522 for BERT. Heads are not visible in the weights:
    ``num_attention_heads`` / ``heads`` default to the real models' head width of 64.
    """

    kind: str = "clip"
    # clip / open_clip (transformers CLIPTextConfig names)
    vocab_size: int | None = None
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer: str = "last"
    pad_token_id: int = CLIP_EOS
    layer_norm_eps: float = 1e-5
    # bert (BERTEmbedder / x-transformers names)
    n_embed: int = 1280
    n_layer: int = 32
    max_seq_len: int = 77
    heads: int = 8
    dim_head: int = HEAD_DIM
    ff_mult: int = 4
    # class (ClassEmbedder names)
    n_classes: int = 1000
    embed_dim: int = 512
    key: str = "class"
    null_label: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"conditioning kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.vocab_size is None and self.kind in ("clip", "open_clip", "bert"):
            self.vocab_size = BERT_VOCAB_SIZE if self.kind == "bert" else 49408
        if self.kind in ("clip", "open_clip"):
            self._check_clip()
        if self.kind == "class" and self.null_label is not None and not 0 <= self.null_label < self.n_classes:
            raise ConfigError(f"conditioning null_label {self.null_label} is outside 0..{self.n_classes - 1}")

    def _check_clip(self) -> None:
        if self.layer not in ("last", "penultimate"):
            raise ConfigError(f"conditioning layer {self.layer!r} is unknown; use 'last' or 'penultimate'")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"conditioning hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set num_attention_heads to a divisor"
            )
        if self.layer == "penultimate" and self.num_hidden_layers < 2:
            raise ConfigError("conditioning layer 'penultimate' needs num_hidden_layers >= 2; use layer 'last'")

    @property
    def context_dim(self) -> int | None:
        """Width of the context the UNet's cross-attention receives (``context_dim`` in the UNet config)."""
        return {
            "clip": self.hidden_size,
            "open_clip": self.hidden_size,
            "bert": self.n_embed,
            "class": self.embed_dim,
            "none": None,
        }[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{name: getattr(self, name) for name in _FIELDS_BY_KIND[self.kind]}}

    @classmethod
    def from_dict(cls, d: Mapping) -> CondConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"conditioning config has unknown key(s) {', '.join(unknown)}; remove them")
        return cls(**d)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> CondConfig:
        """Infer the config from the keys and shapes of a cond stage (keys without ``cond_stage_model.``).

        ``overrides`` set what weights cannot show, e.g. ``num_attention_heads=4`` or ``heads=2``.
        """
        cfg = _infer_config(sd)
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_ldm(
        cls, cond_stage_config: Mapping, sd: Mapping[str, torch.Tensor] | None = None, **overrides
    ) -> CondConfig:
        """Build from an original YAML/JSON ``cond_stage_config`` (``target`` + ``params``), sizes from ``sd``."""
        target = cond_stage_config.get("target")
        if target not in _LDM_TARGETS:
            raise ConfigError(
                f"cond_stage_config target {target!r} is not supported; use one of {', '.join(_LDM_TARGETS)}"
            )
        kind = _LDM_TARGETS[target]
        params = dict(cond_stage_config.get("params") or {})
        if sd is None:
            base = {"kind": kind, **_CLIP_DEFAULTS.get(kind, {})}
        else:
            base = _infer_config(sd).to_dict()
        if base["kind"] != kind:
            if not (kind == "open_clip" and base["kind"] == "clip"):  # OpenCLIP already in transformers layout
                raise CheckpointError(
                    f"cond_stage_model weights look like a {base['kind']!r} encoder but cond_stage_config "
                    f"target is {target}; use the config that belongs to this checkpoint"
                )
            base.update(kind=kind, hidden_act="gelu", pad_token_id=0)
        return cls.from_dict({**base, **dict(_ldm_params(kind, params)), **overrides})


def _ldm_params(kind: str, params: dict):
    """Translate the original constructor arguments into CondConfig fields."""
    if kind == "clip":
        layer = params.get("layer", "last")
        if layer != "last":
            raise ConfigError(f"FrozenCLIPEmbedder layer {layer!r} is not supported; use layer 'last'")
    elif kind == "open_clip":
        yield "layer", params.get("layer", "last")
    elif kind == "bert":
        for name in ("n_embed", "n_layer", "vocab_size", "max_seq_len"):
            if name in params:
                yield name, params[name]
    elif kind == "class":
        for name in ("n_classes", "embed_dim", "key"):
            if name in params:
                yield name, params[name]


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"cond stage key {key} is missing; the checkpoint's conditioning weights are incomplete")
    return tuple(sd[key].shape)


def _count_blocks(sd: Mapping, prefix: str) -> int:
    """Number of numbered children ``{prefix}{i}.`` present in ``sd``."""
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _infer_config(sd: Mapping) -> CondConfig:
    if not sd:
        return CondConfig(kind="none")
    if "model.token_embedding.weight" in sd:
        return _infer_open_clip(sd)
    prefix = _clip_prefix(sd)
    if prefix is not None:
        return _infer_hf_clip(sd, prefix)
    if "transformer.token_emb.weight" in sd:
        return _infer_bert(sd)
    if "embedding.weight" in sd:
        n_classes, embed_dim = _shape(sd, "embedding.weight")
        return CondConfig(
            kind="class", n_classes=n_classes, embed_dim=embed_dim, null_label=1000 if n_classes == 1001 else None
        )  # ImageNet + unconditional class
    raise CheckpointError(
        f"cond stage keys ({sorted(sd)[0]}, ...) match no known encoder; expected transformer.text_model.*, "
        "model.token_embedding.weight, transformer.token_emb.weight or embedding.weight"
    )


def _infer_open_clip(sd: Mapping) -> CondConfig:
    vocab, width = _shape(sd, "model.token_embedding.weight")
    return CondConfig(
        kind="open_clip",
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(sd, "model.transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=_count_blocks(sd, "model.transformer.resblocks."),
        num_attention_heads=max(width // HEAD_DIM, 1),
        max_position_embeddings=_shape(sd, "model.positional_embedding")[0],
        hidden_act="gelu",
        layer="penultimate",
        pad_token_id=0,
    )


def _infer_hf_clip(sd: Mapping, prefix: str) -> CondConfig:
    """transformers layout. Width 1024 is OpenCLIP ViT-H (SD 2.x): diffusers keeps 23 of its 24 blocks."""
    vocab, width = _shape(sd, prefix + "embeddings.token_embedding.weight")
    layers = _count_blocks(sd, prefix + "encoder.layers.")
    common = dict(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        intermediate_size=_shape(sd, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=max(width // HEAD_DIM, 1),
        max_position_embeddings=_shape(sd, prefix + "embeddings.position_embedding.weight")[0],
    )
    if width == OPENCLIP_VIT_H_WIDTH:
        layer = "penultimate" if layers == 24 else "last"
        return CondConfig(kind="open_clip", hidden_act="gelu", layer=layer, pad_token_id=0, **common)
    return CondConfig(kind="clip", hidden_act="quick_gelu", layer="last", pad_token_id=CLIP_EOS, **common)


def _infer_bert(sd: Mapping) -> CondConfig:
    vocab, n_embed = _shape(sd, "transformer.token_emb.weight")
    inner = _shape(sd, "transformer.attn_layers.layers.0.1.to_q.weight")[0]
    ff_inner = _shape(sd, "transformer.attn_layers.layers.1.1.net.0.0.weight")[0]
    return CondConfig(
        kind="bert",
        vocab_size=vocab,
        n_embed=n_embed,
        n_layer=_count_blocks(sd, "transformer.attn_layers.layers.") // 2,
        max_seq_len=_shape(sd, "transformer.pos_emb.emb.weight")[0],
        heads=max(inner // HEAD_DIM, 1),
        dim_head=min(inner, HEAD_DIM),
        ff_mult=ff_inner // n_embed,
    )


def build_conditioner(cfg: CondConfig) -> _Conditioner:
    """The τθ module for ``cfg`` (random weights; load with ``load_original_state_dict``)."""
    builders = {
        "clip": CLIPEmbedder,
        "open_clip": CLIPEmbedder,
        "bert": BERTEmbedder,
        "class": ClassEmbedder,
        "none": NoConditioner,
    }
    return builders[cfg.kind](cfg)
