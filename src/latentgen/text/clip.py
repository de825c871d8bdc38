"""The CLIP text transformer (SD 1.x `FrozenCLIPEmbedder`, quick_gelu) and the OpenCLIP text tower (SD 2.x
`FrozenOpenCLIPEmbedder`, gelu, penultimate layer) in one layout, with the conversions between the two."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import ConfigError

from .conditioner import _Conditioner, check_state_dict
from .tokenizers import tokenize_clip

if TYPE_CHECKING:
    from .config import CondConfig

OPENCLIP_VIT_H_WIDTH = 1024


def openclip_to_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (``model.*``) → SD1 layout (``transformer.text_model.*``).

    nn.MultiheadAttention's packed ``in_proj`` is split into q, k, v; ``text_projection`` and ``logit_scale``
    (unused by SD) must be dropped by the caller.
    """
    out = {
        "transformer.text_model.embeddings.token_embedding.weight": sd["model.token_embedding.weight"],
        "transformer.text_model.embeddings.position_embedding.weight": sd["model.positional_embedding"],
        "transformer.text_model.final_layer_norm.weight": sd["model.ln_final.weight"],
        "transformer.text_model.final_layer_norm.bias": sd["model.ln_final.bias"],
    }
    renames = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for key, value in sd.items():
        if not key.startswith("model.transformer.resblocks."):
            continue
        i, rest = key[len("model.transformer.resblocks.") :].split(".", 1)
        dst = f"transformer.text_model.encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{suffix}"] = part
            continue
        module, param = rest.rsplit(".", 1)
        out[f"{dst}{renames.get(module, module)}.{param}"] = value
    return out


def clip_to_openclip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_to_clip` (without ``text_projection`` / ``logit_scale``)."""
    out = {
        "model.token_embedding.weight": sd["transformer.text_model.embeddings.token_embedding.weight"],
        "model.positional_embedding": sd["transformer.text_model.embeddings.position_embedding.weight"],
        "model.ln_final.weight": sd["transformer.text_model.final_layer_norm.weight"],
        "model.ln_final.bias": sd["transformer.text_model.final_layer_norm.bias"],
    }
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    prefix = "transformer.text_model.encoder.layers."
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        i, rest = key[len(prefix) :].split(".", 1)
        module, param = rest.rsplit(".", 1)
        dst = f"model.transformer.resblocks.{i}."
        if module == "self_attn.q_proj":
            packed = [sd[f"{prefix}{i}.self_attn.{n}.{param}"] for n in ("q_proj", "k_proj", "v_proj")]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(packed, dim=0)
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            out[f"{dst}{renames[module]}.{param}"] = value
    return out


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q, k, v and output projections (CLIP text tower)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            f(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
            for f in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``token_embeds`` replaces the token-embedding lookup (textual-inversion vectors spliced in)."""
        tokens = self.token_embedding(ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """transformers ``CLIPTextTransformer`` (Radford et al. 2021): token + learned position embeddings, causal
    pre-norm blocks, final LayerNorm; the module names of SD 1.x files under ``transformer.text_model.``."""

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, skip: int = 0, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``final_layer_norm`` of the last block's output, or of the block ``skip`` blocks before it."""
        x = self.embeddings(ids, token_embeds)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip]:
            x = layer(x)
        return self.final_layer_norm(x)


class _TextModelNest(nn.Module):
    """The nesting ``CLIPTextModel.text_model`` that SD 1.x files store."""

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class CLIPEmbedder(_Conditioner):
    """SD 1.x FrozenCLIPEmbedder / SD 2.x FrozenOpenCLIPEmbedder as one CLIP text transformer.

    Keys ``transformer.text_model.*``. Causal self-attention, no padding mask (as the originals).
    """

    def __init__(self, cfg: CondConfig):
        super().__init__(cfg)
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"conditioning hidden_act {cfg.hidden_act!r} is unknown; use quick_gelu or gelu")
        self.transformer = _TextModelNest(cfg)

    @property
    def text_model(self) -> nn.Module:
        return self.transformer.text_model

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return tokenize_clip(prompts, self.cfg.pad_token_id, self.cfg.max_position_embeddings)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Context [B, 77, D]: ``final_layer_norm`` of the last block, or of the penultimate one (SD 2.x).

        ``clip_skip`` N > 1 (A1111's "Clip skip") takes the hidden state N-1 blocks before the last, then the final
        layer norm; a penultimate-layer encoder (SD 2.x) ignores it, as A1111 does.
        """
        skip = 1 if self.cfg.layer == "penultimate" else clip_skip - 1
        return self.text_model(ids, skip=skip, token_embeds=token_embeds)

    def load_original_state_dict(self, sd: Mapping[str, torch.Tensor], name_prefix: str = "cond_stage_model."):
        """Accepts SD1 (``transformer.text_model.*``), OpenCLIP (``model.*``) and transformers layouts.

        Ignored by name: the legacy ``embeddings.position_ids`` buffer, OpenCLIP's ``text_projection`` and
        ``logit_scale``.
        """
        ours = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if "model.token_embedding.weight" in sd:
            sd = {k: v for k, v in sd.items() if k not in ("model.text_projection", "model.logit_scale")}
            meta = {k: torch.empty(s, device="meta") for k, s in ours.items()}
            check_state_dict({k: v.shape for k, v in clip_to_openclip(meta).items()}, sd, self.kind, name_prefix)
            sd = openclip_to_clip(sd)
        else:
            prefix = _clip_prefix(sd)
            prefix = "transformer.text_model." if prefix is None else prefix
            theirs = {prefix + k[len("transformer.text_model.") :]: s for k, s in ours.items()}
            sd = {k: v for k, v in sd.items() if k != prefix + "embeddings.position_ids"}
            check_state_dict(theirs, sd, self.kind, name_prefix)
            sd = {"transformer.text_model." + k[len(prefix) :]: v for k, v in sd.items()}
        self.load_state_dict(sd, strict=True, assign=True)


def _clip_prefix(sd: Mapping) -> str | None:
    """Where a transformers-layout CLIP text model sits: SD1 files, diffusers folders (transformers <5 / >=5)."""
    for prefix in ("transformer.text_model.", "text_model.", "transformer.", ""):
        if prefix + "embeddings.token_embedding.weight" in sd:
            return prefix
    return None
