"""SDXL's conditioner (Podell et al., *SDXL*, arXiv 2307.01952, Sec. 2.1-2.2): two text encoders, a pooled
vector and Fourier-embedded size conditioning.

Mirrors sgm's `GeneralConditioner` with the embedders of `configs/inference/sd_xl_base.yaml` /
`sd_xl_refiner.yaml`, under their checkpoint names (`conditioner.embedders.{i}.*`, prefix removed):

- base `embedders.0`: CLIP ViT-L/14 (`FrozenCLIPEmbedder`, `layer: hidden`, `layer_idx` = the penultimate
  layer), keys `transformer.text_model.*`; its hidden states WITHOUT `final_layer_norm`.
- base `embedders.1` / refiner `embedders.0`: OpenCLIP ViT-bigG/14 (`FrozenOpenCLIPEmbedder2`, `penultimate`,
  `always_return_pooled`, `legacy: False`), keys `model.*`: the output of the second-to-last resblock (no
  `ln_final`), and pooled = `ln_final(last resblock)[argmax ids] @ text_projection`.
- the size embedders (`ConcatTimestepEmbedderND(256)`): sinusoidal embeddings of `original_size` (h, w),
  `crop_coords_top_left` (top, left) and `target_size` (h, w) for the base, `aesthetic_score` instead of the
  target size for the refiner.

Cross-attention context = cat(CLIP-L hidden, bigG penultimate) on the channel axis (the refiner: bigG alone);
vector `y` = cat(pooled, size embeddings).

Prompts are read as AUTOMATIC1111 reads them on SDXL (`FrozenCLIPEmbedderForSDXLWithCustomWords`,
`FrozenOpenCLIPEmbedder2WithCustomWords`): each encoder on its own runs text/prompts.py's parse → 75-token chunks
(comma backtrack, BREAK, textual inversion: `clip_l` vectors for CLIP-L, `clip_g` for bigG) → encode → emphasis, and
the context is cat(CLIP-L, bigG) per chunk, the chunks along the sequence axis. The pooled vector is bigG's of the
first chunk, unweighted (A1111 `zs[0].pooled`). Clip skip does not apply: both encoders already take the
penultimate layer (A1111's default, `sdxl_clip_l_skip` off).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from latentgen.errors import CheckpointError, ConfigError, InputError
from latentgen.text.clip import CLIPEmbedder, clip_to_openclip
from latentgen.text.config import CondConfig
from latentgen.text.prompts import clip_vocabulary, empty_chunk, encode_chunks, prompt_chunks
from latentgen.text.tokenizers import CLIP_EOS, tokenize_clip
from latentgen.unet import timestep_embedding

SIZE_EMBED_DIM = 256  # ConcatTimestepEmbedderND(outdim=256)
DEFAULT_AESTHETIC, DEFAULT_NEGATIVE_AESTHETIC = 6.0, 2.5  # sgm demo / diffusers' refiner defaults


@dataclass
class SDXLCondConfig:
    """The conditioner's encoders (None: absent, as CLIP-L in the refiner) and which size ids it embeds."""

    clip_l: CondConfig | None
    bigg: CondConfig
    projection_dim: int  # text_projection [W, E]: E
    refiner: bool = False  # time ids (orig h, orig w, crop top, crop left, aesthetic) instead of target h, w

    @property
    def kind(self) -> str:
        return "sdxl"

    @property
    def context_dim(self) -> int:
        return (self.clip_l.hidden_size if self.clip_l else 0) + self.bigg.hidden_size

    @property
    def adm_in_channels(self) -> int:
        return self.projection_dim + SIZE_EMBED_DIM * (5 if self.refiner else 6)

    def to_dict(self) -> dict:
        return {
            "kind": "sdxl",
            "clip_l": self.clip_l.to_dict() if self.clip_l else None,
            "bigg": self.bigg.to_dict(),
            "projection_dim": self.projection_dim,
            "refiner": self.refiner,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SDXLCondConfig:
        d = dict(d)
        d.pop("kind", None)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"SDXL conditioning config has unknown key(s) {', '.join(unknown)}; remove them")
        clip_l = CondConfig.from_dict(d.pop("clip_l")) if d.get("clip_l") else None
        d.pop("clip_l", None)
        return cls(clip_l=clip_l, bigg=CondConfig.from_dict(d.pop("bigg")), **d)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> SDXLCondConfig:
        """From `conditioner.*` keys (prefix removed): a base has CLIP-L at embedders.0 and bigG at .1, a refiner
        bigG alone at .0. Heads: the real head width 64 (ViT-L 12, bigG 20)."""
        emb = _split_embedders(sd)
        bigg_at = [i for i, part in emb.items() if "model.token_embedding.weight" in part]
        clip_at = [i for i, part in emb.items() if "transformer.text_model.embeddings.token_embedding.weight" in part]
        if len(bigg_at) != 1 or len(clip_at) > 1:
            raise CheckpointError(
                "conditioner.embedders.* hold no single OpenCLIP (model.*) text tower; is this an SDXL checkpoint?"
            )
        g = emb[bigg_at[0]]
        if "model.text_projection" not in g:
            raise CheckpointError(f"conditioner.embedders.{bigg_at[0]}.model.text_projection is missing (SDXL pools)")
        bigg = CondConfig.from_state_dict(g)
        clip_l = CondConfig.from_state_dict(emb[clip_at[0]]) if clip_at else None
        return cls(
            clip_l=clip_l, bigg=bigg, projection_dim=int(g["model.text_projection"].shape[1]), refiner=not clip_at
        )


def _split_embedders(sd: Mapping[str, torch.Tensor]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        idx, _, rest = rest.partition(".")
        if head != "embedders" or not idx.isdigit():
            raise CheckpointError(f"conditioner key conditioner.{key} is not under conditioner.embedders.N.")
        out.setdefault(int(idx), {})[rest] = value
    return out


def penultimate_hidden(embedder: CLIPEmbedder, ids: torch.Tensor, token_embeds: torch.Tensor | None = None):
    """Output of the second-to-last block, without the final LayerNorm (sgm `layer_idx` -2 / `penultimate`);
    `token_embeds` in place of the token-embedding lookup (textual inversion)."""
    tm = embedder.text_model
    x = tm.embeddings(ids, token_embeds)
    for layer in tm.encoder.layers[:-1]:
        x = layer(x)
    return x


class BigGEmbedder(nn.Module):
    """FrozenOpenCLIPEmbedder2: the OpenCLIP text tower (held in the CLIP layout, loaded from `model.*`) with
    its `text_projection`."""

    def __init__(self, cfg: CondConfig, projection_dim: int):
        super().__init__()
        self.tower = CLIPEmbedder(cfg)
        self.text_projection = nn.Parameter(torch.empty(cfg.hidden_size, projection_dim))

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [B, 77, W], pooled [B, E]); the pooled token is the first end token (argmax)."""
        tm = self.tower.text_model
        hidden = penultimate_hidden(self.tower, ids, token_embeds)
        last = tm.final_layer_norm(tm.encoder.layers[-1](hidden))
        pooled = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return hidden, pooled @ self.text_projection.to(pooled.dtype)

    def load_original(self, sd: Mapping[str, torch.Tensor], name_prefix: str) -> None:
        sd = dict(sd)
        if "model.text_projection" not in sd:
            raise CheckpointError(f"{name_prefix}model.text_projection is missing; the bigG tower must pool")
        proj = sd.pop("model.text_projection")
        if tuple(proj.shape) != tuple(self.text_projection.shape):
            raise CheckpointError(
                f"{name_prefix}model.text_projection is {list(proj.shape)}, the model wants "
                f"{list(self.text_projection.shape)}; use a matching checkpoint"
            )
        sd.pop("model.logit_scale", None)  # CLIP's contrastive temperature: unused for generation
        self.tower.load_original_state_dict(sd, name_prefix)
        self.text_projection = nn.Parameter(proj, requires_grad=False)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        sd = clip_to_openclip(self.tower.original_state_dict())
        return {**sd, "model.text_projection": self.text_projection.detach().contiguous()}


class SDXLConditioner(nn.Module):
    """sgm GeneralConditioner for SDXL base / refiner: `embedders` in the checkpoint's order."""

    kind = "sdxl"

    def __init__(self, cfg: SDXLCondConfig):
        super().__init__()
        self.cfg = cfg
        mods: list[nn.Module] = [CLIPEmbedder(cfg.clip_l)] if cfg.clip_l else []
        self.embedders = nn.ModuleList([*mods, BigGEmbedder(cfg.bigg, cfg.projection_dim)])

    @property
    def context_dim(self) -> int:
        return self.cfg.context_dim

    @property
    def clip_l(self) -> CLIPEmbedder | None:
        return self.embedders[0] if self.cfg.clip_l else None

    @property
    def bigg(self) -> BigGEmbedder:
        return self.embedders[-1]

    def _device(self) -> torch.device:
        return self.bigg.text_projection.device

    # the per-encoder steps -------------------------------------------------------------------------------

    def tokenize_l(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-L ids, padded with <|endoftext|> (FrozenCLIPEmbedder; diffusers' `tokenizer`)."""
        return tokenize_clip(prompts, CLIP_EOS, self.cfg.clip_l.max_position_embeddings)

    def tokenize_g(self, prompts: Sequence[str]) -> torch.Tensor:
        """bigG ids, zero-padded (open_clip.tokenize; diffusers' `tokenizer_2` pads with '!', also id 0)."""
        return tokenize_clip(prompts, 0, self.cfg.bigg.max_position_embeddings)

    def encode_l(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP-L penultimate hidden states [B, 77, 768] (no final LayerNorm)."""
        return penultimate_hidden(self.clip_l, ids.to(self._device()), token_embeds)

    def encode_g(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None):
        """bigG (penultimate hidden states [B, 77, 1280], pooled projection [B, 1280])."""
        return self.bigg(ids.to(self._device()), token_embeds)

    # the whole conditioner ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(
        self,
        prompts: Sequence[str],
        *,
        emphasis: str = "original",
        embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention context [B, n * 77, context_dim], pooled [B, E]) for prompts in A1111's syntax.

        `embeddings`: textual-inversion name → {"clip_l": [n, 768], "clip_g": [n, 1280]} (the refiner reads clip_g
        alone); both encoders chunk the text alike, with n positions for a name."""
        embeddings = embeddings or {}
        hidden_g, pooled = self._encode_one(self.encode_g, self.bigg.tower, "clip_g", 0, prompts, emphasis, embeddings)
        if self.clip_l is None:
            return hidden_g, pooled
        hidden_l = self._encode_one(self.encode_l, self.clip_l, "clip_l", CLIP_EOS, prompts, emphasis, embeddings)
        if hidden_l.shape[1] != hidden_g.shape[1]:  # the same BPE chunks the text alike unless the counts differ
            raise InputError("an SDXL embedding needs as many clip_l vectors as clip_g ones: its prompts chunk apart")
        return torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1), pooled

    def _encode_one(self, encode, tower: CLIPEmbedder, key: str, pad: int, prompts, emphasis, embeddings):
        """One encoder's chunks of the prompts (its padding id, its embedding vectors), through `encode`."""
        table = tower.text_model.embeddings.token_embedding
        vectors = {name: _vectors(v, key, name, table.embedding_dim) for name, v in embeddings.items()}
        voc = clip_vocabulary(pad)
        chunks = prompt_chunks(prompts, voc, emphasis, {name: v.shape[0] for name, v in vectors.items()})
        return encode_chunks(
            encode, table, chunks, vectors, emphasis=emphasis, empty=empty_chunk(voc), pooled=key == "clip_g"
        )

    def time_ids(self, original_size, crop, target_size=None, aesthetic_score=None) -> list[float]:
        """The size conditioning ids: (orig h, orig w, crop top, crop left) + (target h, w) | (aesthetic,)."""
        ids = [*map(float, original_size), *map(float, crop)]
        if self.cfg.refiner:
            if aesthetic_score is None:
                raise InputError("the SDXL refiner conditions on an aesthetic score: pass --aesthetic-score")
            return [*ids, float(aesthetic_score)]
        if target_size is None:
            raise InputError("the SDXL base conditions on the target size: pass --target-size")
        return [*ids, *map(float, target_size)]

    def vector(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """y = cat(pooled, sinusoidal embedding (256) of each time id) [B, adm_in_channels]."""
        b, n = time_ids.shape
        emb = timestep_embedding(time_ids.reshape(-1).to(pooled.device), SIZE_EMBED_DIM).reshape(b, n * SIZE_EMBED_DIM)
        return torch.cat([pooled.float(), emb], dim=-1)

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], time_ids, **text) -> dict[str, torch.Tensor]:
        """{"context", "y"} for the UNet; `time_ids`: one row for every prompt, or a row per prompt [B, n];
        `text`: encode_text's emphasis and embeddings."""
        context, pooled = self.encode_text(prompts, **text)
        ids = torch.as_tensor(time_ids, dtype=torch.float32)
        ids = ids.expand(len(prompts), -1) if ids.ndim == 1 else ids
        return {"context": context, "y": self.vector(pooled, ids)}

    @staticmethod
    def zeros_like_text(cond: dict[str, torch.Tensor], projection_dim: int) -> dict[str, torch.Tensor]:
        """sgm's `force_uc_zero_embeddings=['txt']`: the text parts (context, pooled) zeroed, size parts kept."""
        y = cond["y"].clone()
        y[:, :projection_dim] = 0
        return {"context": torch.zeros_like(cond["context"]), "y": y}

    @torch.no_grad()
    def guidance_pair(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str | None],
        guided: bool,
        *,
        original_size: tuple[int, int],
        crop: tuple[int, int],
        target_size: tuple[int, int],
        aesthetic_score: float = DEFAULT_AESTHETIC,
        negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC,
        **text,
    ) -> tuple[dict, dict | None]:
        """(cond, uncond) kwargs for guidance; sizes are (h, w), the crop (top, left).

        Base: an empty (or absent) negative gives zeroed text parts (sgm's `force_uc_zero_embeddings=['txt']`;
        diffusers' `negative_prompt=None` with `force_zeros_for_empty_prompt`); a given negative is encoded
        (diffusers). Refiner: the negative is always encoded (`""` by default), with the negative aesthetic score.
        `text`: encode_text's emphasis and embeddings, for the prompt and the negative alike; the two may have
        different chunk counts (the denoiser then runs them as two calls, as A1111).
        """
        ids = self.time_ids(original_size, crop, target_size, aesthetic_score)
        cond = self.condition(prompts, ids, **text)
        if not guided:
            return cond, None
        texts = [n or "" for n in negatives]
        if self.cfg.refiner:
            neg_ids = self.time_ids(original_size, crop, None, negative_aesthetic_score)
            return cond, self.condition(texts, neg_ids, **text)
        given = torch.tensor([bool(n) for n in negatives])
        if not given.any():
            return cond, self.zeros_like_text(cond, self.cfg.projection_dim)
        uncond = self.condition(texts, ids, **text)
        zeros = self.zeros_like_text(uncond, self.cfg.projection_dim)  # a zero context: the same at any length
        pick = lambda k: torch.where(given.view(-1, *[1] * (uncond[k].ndim - 1)), uncond[k], zeros[k])  # noqa: E731
        return cond, {k: pick(k) for k in uncond}

    # weights -----------------------------------------------------------------------------------------------

    def load_original_state_dict(self, sd: Mapping[str, torch.Tensor], name_prefix: str = "conditioner.") -> None:
        """Strict load of `conditioner.*` (keys without the prefix). The CLIP-L position_ids buffer and bigG's
        logit_scale are ignored by name."""
        emb = _split_embedders(sd)
        want = set(range(len(self.embedders)))
        if set(emb) != want:
            raise CheckpointError(
                f"{name_prefix}embedders.* has entries {sorted(emb)}, the SDXL "
                f"{'refiner' if self.cfg.refiner else 'base'} wants {sorted(want)}; use a matching checkpoint"
            )
        for i, mod in enumerate(self.embedders):
            prefix = f"{name_prefix}embedders.{i}."
            if isinstance(mod, BigGEmbedder):
                mod.load_original(emb[i], prefix)
            else:
                mod.load_original_state_dict(emb[i], prefix)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, mod in enumerate(self.embedders):
            out.update({f"embedders.{i}.{k}": v for k, v in mod.original_state_dict().items()})
        return out


def _vectors(v: Mapping[str, torch.Tensor], key: str, name: str, width: int | None) -> torch.Tensor:
    """One encoder's textual-inversion vectors of embedding `name`; InputError when absent or of another width."""
    if not isinstance(v, Mapping) or key not in v:
        raise InputError(f"embedding {name} has no {key} vectors; SDXL needs an SDXL embedding (clip_l and clip_g)")
    if width is not None and v[key].shape[-1] != width:
        raise InputError(f"embedding {name}: its {key} vectors are {v[key].shape[-1]} wide, the encoder's {width}")
    return v[key]


__all__ = [
    "BigGEmbedder",
    "DEFAULT_AESTHETIC",
    "DEFAULT_NEGATIVE_AESTHETIC",
    "SDXLCondConfig",
    "SDXLConditioner",
    "penultimate_hidden",
]
