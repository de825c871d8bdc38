"""Offline tokenizers built with `tokenizers`: CLIP's byte-level BPE (open_clip's vocabulary construction) and
BERT's WordPiece (bert-base-uncased), padded and truncated as the original code does."""

from __future__ import annotations

import functools
import gzip
import warnings
from collections.abc import Sequence
from importlib import resources

import torch

from latentgen.errors import ConfigError, InputError

CLIP_BOS, CLIP_EOS = 49406, 49407


CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"


BERT_CLS, BERT_SEP, BERT_PAD = 101, 102, 0


BERT_VOCAB_SIZE = 30522


class TruncationWarning(UserWarning):
    """A prompt was longer than the encoder's context and was cut (the CLI prints it on stderr)."""


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
