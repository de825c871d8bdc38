"""Conditioning encoders τθ and their offline tokenizers (LDM, Rombach et al. arXiv 2112.10752, Sec. 3.3).

τθ maps a prompt (or a class label) to the context y the UNet's cross-attention attends to. Four kinds:

- ``clip``      SD 1.x ``FrozenCLIPEmbedder``: the CLIP text transformer (transformers ``CLIPTextModel``, written
                out here with its module names; quick_gelu), output = last hidden state after
                ``final_layer_norm``. Tokens padded with ``<|endoftext|>`` (49407).
- ``open_clip`` SD 2.x ``FrozenOpenCLIPEmbedder``: the OpenCLIP text tower converted to the same layout (exact gelu);
                with ``layer="penultimate"`` the output is ``ln_final`` applied to the output of the
                second-to-last block. Tokens padded with 0.
- ``bert``      CompVis latent-diffusion ``BERTEmbedder``: an x-transformers encoder written out here with the
                checkpoint's module names (pre-norm, no mask, exact-GELU feed-forward), output = final norm.
- ``class``     ``ClassEmbedder``: ``nn.Embedding(n_classes, embed_dim)``, context ``[B, 1, D]``.
- ``none``      unconditional models: ``encode`` returns ``None``.

Weights are held in the layout of the original single-file checkpoints without the ``cond_stage_model.`` prefix
(``transformer.text_model.*`` for both CLIP kinds, x-transformers names for BERT, ``embedding.weight`` for classes),
so ``original_state_dict()`` is what our own checkpoints store.

References: CompVis/stable-diffusion and CompVis/latent-diffusion ``ldm/modules/encoders/modules.py`` and
``ldm/modules/x_transformer.py``; Stability-AI/stablediffusion ``FrozenOpenCLIPEmbedder``; open_clip
``SimpleTokenizer`` (vocabulary construction); transformers ``CLIPTextModel`` / ``CLIPTokenizer`` / ``BertTokenizer``,
whose tokenizer pipelines are rebuilt here with ``tokenizers``. latentgen does not import transformers at run time
(its import costs 1.5-4 s per process); the tests compare against it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import CheckpointError, ConfigError, InputError

KINDS = ("clip", "open_clip", "bert", "class", "none")
CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
BERT_CLS, BERT_SEP, BERT_PAD = 101, 102, 0
BERT_VOCAB_SIZE = 30522
HEAD_DIM = 64  # SD1 CLIP ViT-L/14, OpenCLIP ViT-H/14 and x-transformers' default dim_head all use 64
OPENCLIP_VIT_H_WIDTH = 1024

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


class TruncationWarning(UserWarning):
    """A prompt was longer than the encoder's context and was cut (the CLI prints it on stderr)."""


# ----------------------------------------------------------------------------------------------- config


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


def _clip_prefix(sd: Mapping) -> str | None:
    """Where a transformers-layout CLIP text model sits: SD1 files, diffusers folders (transformers <5 / >=5)."""
    for prefix in ("transformer.text_model.", "text_model.", "transformer.", ""):
        if prefix + "embeddings.token_embedding.weight" in sd:
            return prefix
    return None


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


# ------------------------------------------------------------------------------------------- tokenizers


def _asset_bytes(name: str) -> bytes:
    return resources.files("latentgen").joinpath("assets", name).read_bytes()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (open_clip ``simple_tokenizer.bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the CLIP BPE built as open_clip's SimpleTokenizer does: 49408 tokens."""
    lines = gzip.decompress(_asset_bytes("bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    return {token: i for i, token in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP BPE on the shipped vocabulary: the pipeline transformers' ``CLIPTokenizer`` builds (NFC, whitespace
    runs → one space, lower case; CLIP's split pattern, byte-level; BPE with ``</w>`` word ends;
    ``<|startoftext|> $A <|endoftext|>``), made with ``tokenizers`` directly. Padding is applied by
    :func:`tokenize_clip` (SD 1.x pads with ``<|endoftext|>``, SD 2.x with 0: registering '!' as a pad token, as
    diffusers' SD 2 tokenizer does, would split every '!' in a prompt, which open_clip does not do)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab, merges = clip_bpe_vocab()
    tok = Tokenizer(
        models.BPE(
            vocab=dict(vocab),
            merges=list(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=CLIP_EOT,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOT, CLIP_EOS), (CLIP_SOT, CLIP_BOS), trim_offsets=False, add_prefix_space=False
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (CLIP_SOT, CLIP_EOT)])
    return tok


@functools.lru_cache(maxsize=1)
def bert_tokenizer():
    """bert-base-uncased WordPiece (lower-case) on the shipped vocabulary, as CompVis ``BERTTokenizer``: the
    pipeline transformers' ``BertTokenizer`` builds (BERT normaliser and pre-tokeniser, WordPiece,
    ``[CLS] $A [SEP]``), made with ``tokenizers`` directly: importing transformers for it costs 1.5 s."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokens = _asset_bytes("bert_vocab.txt").decode("utf-8").split("\n")
    vocab = {token: i for i, token in enumerate(tokens[:BERT_VOCAB_SIZE])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", BERT_CLS), ("[SEP]", BERT_SEP)]
    )
    if tok.get_vocab_size() != BERT_VOCAB_SIZE or (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")) != (
        BERT_CLS,
        BERT_SEP,
    ):
        raise ConfigError(
            f"assets/bert_vocab.txt built a {tok.get_vocab_size()}-token vocabulary, not "
            f"{BERT_VOCAB_SIZE}; reinstall latentgen"
        )
    return tok


def _pad_and_truncate(tok, prompts: Sequence[str], max_length: int, pad_id: int) -> torch.Tensor:
    """Ids ``[B, max_length]`` with start/end tokens, padded with ``pad_id``; over-long prompts are cut, the end
    token kept, with a :class:`TruncationWarning`."""
    prompts = _as_prompts(prompts)
    out = torch.full((len(prompts), max_length), pad_id, dtype=torch.long)
    for i, enc in enumerate(tok.encode_batch(prompts)):
        ids = enc.ids
        if len(ids) > max_length:
            warnings.warn(
                f"prompt {i + 1} ({prompts[i][:40]!r}...) is {len(ids)} tokens; truncated to the "
                f"encoder's {max_length}",
                TruncationWarning,
                stacklevel=3,
            )
            ids = ids[: max_length - 1] + ids[-1:]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be text; got a non-string prompt")
    return prompts


def tokenize_clip(prompts: Sequence[str], pad_token_id: int = CLIP_EOS, max_length: int = 77) -> torch.Tensor:
    """CLIP ids ``[bos, ..., eos, pad...]`` of length ``max_length`` (= FrozenCLIPEmbedder / open_clip.tokenize)."""
    if not 0 <= pad_token_id <= CLIP_EOS:
        raise ConfigError(f"conditioning pad_token_id {pad_token_id} is not in the CLIP vocabulary (0..{CLIP_EOS})")
    return _pad_and_truncate(clip_tokenizer(), prompts, max_length, pad_token_id)


def tokenize_bert(prompts: Sequence[str], max_length: int = 77) -> torch.Tensor:
    """BERT ids ``[101, ..., 102, 0...]`` of length ``max_length`` (= CompVis BERTTokenizer)."""
    return _pad_and_truncate(bert_tokenizer(), prompts, max_length, BERT_PAD)


# ----------------------------------------------------------------------------------- state-dict loading


def _describe(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(
    expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor], what: str, name_prefix: str = "cond_stage_model."
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys (one line)."""
    problems = []
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    misshaped = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing:
        problems.append("missing " + _describe(name_prefix + k for k in missing))
    if unexpected:
        problems.append("unexpected " + _describe(name_prefix + k for k in unexpected))
    if misshaped:
        problems.append(
            "mis-shaped "
            + ", ".join(
                f"{name_prefix}{k} {list(sd[k].shape)} (model wants {list(expected[k])})" for k in misshaped[:4]
            )
        )
    if problems:
        raise CheckpointError(
            f"cond stage weights do not fit the {what} encoder: {'; '.join(problems)}; "
            "use the checkpoint's own config or a matching checkpoint"
        )


class _Conditioner(nn.Module):
    """Uniform API of every τθ: ``tokenize`` → ``forward`` = ``encode``; original-layout state dicts."""

    kind: str

    def __init__(self, cfg: CondConfig):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind

    @property
    def context_dim(self) -> int | None:
        return self.cfg.context_dim

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, prompts) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts_or_labels) -> torch.Tensor | None:
        """Context ``[B, L, D]`` for a list of prompts (or class labels)."""
        return self(self.tokenize(prompts_or_labels).to(self._device()))

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as our checkpoints store them under ``cond_stage_model.``."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_original_state_dict(self, sd: Mapping[str, torch.Tensor], name_prefix: str = "cond_stage_model."):
        """Strict load of a cond stage (keys without the prefix); ``name_prefix`` only labels error messages."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_state_dict(expected, sd, self.kind, name_prefix)
        self.load_state_dict(dict(sd), strict=True, assign=True)


# ------------------------------------------------------------------------------------------ CLIP kinds


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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


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

    def forward(self, ids: torch.Tensor, skip_last: bool = False) -> torch.Tensor:
        """``final_layer_norm`` of the last block's output, or of the second-to-last block's (``skip_last``)."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip_last]:
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Context [B, 77, D]: ``final_layer_norm`` of the last block, or of the penultimate one (SD 2.x)."""
        return self.text_model(ids, skip_last=self.cfg.layer == "penultimate")

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


# ------------------------------------------------------------------------------------------------- BERT


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


# ------------------------------------------------------------------------------------- class and none


class ClassEmbedder(_Conditioner):
    """CompVis ``ClassEmbedder``: label → ``embedding(label)[:, None]``, context [B, 1, D].

    ``null_label`` is the extra "unconditional" class used for classifier-free guidance (CompVis cin256-v2:
    label 1000 of 1001), or None when the model was trained without one.
    """

    def __init__(self, cfg: CondConfig):
        super().__init__(cfg)
        self.embedding = nn.Embedding(cfg.n_classes, cfg.embed_dim)

    @property
    def null_label(self) -> int | None:
        return self.cfg.null_label

    def tokenize(self, labels) -> torch.Tensor:
        """Class labels (ints, digit strings or a tensor) → LongTensor [B], range-checked."""
        try:
            ids = torch.as_tensor([int(x) for x in (labels.tolist() if torch.is_tensor(labels) else labels)])
        except (TypeError, ValueError):
            raise InputError(f"class labels must be integers 0..{self.cfg.n_classes - 1}; got {labels!r}") from None
        bad = [int(i) for i in ids if not 0 <= i < self.cfg.n_classes]
        if bad:
            raise InputError(f"class label {bad[0]} is outside 0..{self.cfg.n_classes - 1}; use a valid class index")
        return ids.long()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]


class NoConditioner(_Conditioner):
    """Unconditional models (``__is_unconditional__``): no weights, no context."""

    def tokenize(self, prompts) -> None:
        return None

    def forward(self, ids=None) -> None:
        return None

    def encode(self, prompts_or_labels=None) -> None:
        return None


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
