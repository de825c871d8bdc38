"""CompVis latent-diffusion `BERTEmbedder`: the x-transformers encoder (pre-norm, no mask, exact-GELU
feed-forward) with the checkpoint's module names; output = final norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .conditioner import _Conditioner
from .tokenizers import tokenize_bert

if TYPE_CHECKING:
    from .config import CondConfig


class Residual(nn.Module):
    """x-transformers ``Residual`` (parameter-free third entry of every layer)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class Attention(nn.Module):
    """x-transformers ``Attention``: bias-free q, k, v; softmax(q kᵀ / √d) v (Vaswani et al. 2017, Eq. 1)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: padding tokens are attended, as the original
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """x-transformers ``FeedForward``: ``net = [Sequential(Linear, GELU), Dropout, Linear]`` (exact GELU)."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """x-transformers ``Encoder`` (pre-norm AttentionLayers): ``layers.{2i}`` attention, ``layers.{2i+1}`` FF,
    each ``[LayerNorm, block, Residual]``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), Attention(dim, heads, dim_head), Residual()]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, ff_mult), Residual()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block, residual in self.layers:
            x = residual(block(norm(x)), x)
        return x


class AbsolutePositionalEmbedding(nn.Module):
    """x-transformers learned absolute positions (``pos_emb.emb``)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class TransformerWrapper(nn.Module):
    """x-transformers ``TransformerWrapper`` (``return_embeddings=True`` path); ``to_logits`` is kept for loading."""

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        self.pos_emb = AbsolutePositionalEmbedding(cfg.n_embed, cfg.max_seq_len)
        self.attn_layers = Encoder(cfg.n_embed, cfg.n_layer, cfg.heads, cfg.dim_head, cfg.ff_mult)
        self.norm = nn.LayerNorm(cfg.n_embed)
        self.to_logits = nn.Linear(cfg.n_embed, cfg.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(ids)
        x = x + self.pos_emb(x)
        return self.norm(self.attn_layers(x))


class BERTEmbedder(_Conditioner):
    """CompVis latent-diffusion ``BERTEmbedder`` (LDM paper Sec. 4.3.1): BERT tokens → transformer → [B, 77, D]."""

    def __init__(self, cfg: CondConfig):
        super().__init__(cfg)
        self.transformer = TransformerWrapper(cfg)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return tokenize_bert(prompts, self.cfg.max_seq_len)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)

    def unused_in_forward(self) -> list[nn.Parameter]:
        return list(self.transformer.to_logits.parameters())
