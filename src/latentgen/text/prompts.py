"""Prompts as the community writes them: AUTOMATIC1111's attention syntax, 75-token chunks, BREAK, emphasis.

One prompt becomes context for ONE encoder in three steps, so that each of SDXL's two encoders can run them on its
own (as A1111 does); the CompVis LDM BERT encoder (and the shipped default model) runs them too, with its WordPiece
vocabulary and chunks of its context (``max_seq_len``) minus 2 tokens (:func:`encode_bert_prompts`):

1. :func:`parse_attention` splits the text into (fragment, weight) pieces: ``(text)`` ×1.1, ``[text]`` ÷1.1,
   ``(text:w)`` ×w, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, unbalanced brackets are
   closed at the end (never an error), ``BREAK`` (upper case, a word of its own) ends a chunk.
2. :func:`make_chunks` tokenizes the pieces (each on its own, without start/end tokens) and fills chunks of 75
   tokens, each wrapped as ``[BOS] tokens [EOS] pad...`` (77). When a chunk fills up, the text after its last
   comma moves to the next chunk if that comma is at most 20 tokens back. A textual-inversion name is replaced by
   its vectors, which never straddle a chunk boundary.
3. :func:`encode_chunks` runs an encoder callable on every chunk (SD 1.x / 2.x: :func:`encode_prompts`, which may
   stop ``clip_skip - 1`` blocks early; SDXL: text/sdxl.py, each encoder on its own, bigG with its pooled output),
   applies the emphasis and concatenates the chunks along the sequence axis: [n_chunks * 77, D] per prompt (the
   UNet's cross-attention takes a context of any length).

Emphasis (A1111's ``emphasis`` setting): ``original`` (default) multiplies each token's output by its weight and
then rescales the chunk so its mean is the unweighted one; ``no-norm`` multiplies without the rescale; ``none``
parses the syntax (brackets stripped, BREAK honoured) but weights nothing (A1111's "Ignore"); ``literal`` reads the
prompt as plain text (A1111's "None").

The algorithm is AUTOMATIC1111's (``modules/prompt_parser.py`` ``parse_prompt_attention``,
``modules/sd_hijack_clip.py`` ``tokenize_line`` / ``process_tokens``, ``modules/sd_emphasis.py``), written anew
here. One deliberate difference: when a comma backtrack moves tokens into the next chunk, the textual-inversion
vectors among them move too (A1111 leaves them behind, writing them over the previous chunk's padding).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from latentgen.errors import ConfigError, InputError
from latentgen.text.tokenizers import (
    BERT_CLS,
    BERT_PAD,
    BERT_SEP,
    CLIP_BOS,
    CLIP_EOS,
    bert_tokenizer,
    clip_bpe_vocab,
    clip_tokenizer,
)

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS (CLIP's context of 77)
COMMA_BACKTRACK = 20  # A1111's default ``comma_padding_backtrack``
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
EMPHASES = ("original", "no-norm", "none", "literal")

# One lexical unit of the attention syntax: an escaped character, a lone backslash, an opening bracket, a weight
# closing a round bracket, a closing bracket, a run of plain text, or a lone colon.
_UNIT = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(fragment, weight) pieces of an A1111 prompt; ``(BREAK, -1.0)`` marks a chunk break.

    Weights multiply in the order the brackets close (unclosed round brackets, then unclosed square ones, at the
    end), and neighbouring pieces of equal weight merge, exactly as A1111's parser does, quirks included: a BREAK
    inside brackets gets a weight and is read as text.
    """
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _UNIT.finditer(text):
        unit, weight = m.group(0), m.group(1)
        if unit.startswith("\\"):
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), _weight(weight, text))
        elif unit == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif unit == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(unit)):
                if i:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InputError(f"prompt weight ':{number}' in {text[:60]!r} is not a number; write e.g. (word:1.2)") from None


def check_options(clip_skip: int = 1, emphasis: str = "original") -> None:
    """ConfigError naming the option when clip skip or emphasis has no meaning."""
    if clip_skip < 1:
        raise ConfigError(f"--clip-skip must be at least 1 (1 = the last layer), not {clip_skip}")
    if emphasis not in EMPHASES:
        raise ConfigError(f"--emphasis {emphasis!r} is unknown; use one of {', '.join(EMPHASES)}")


def pieces_for(text: str, emphasis: str = "original") -> list[tuple[str, float]]:
    """The pieces one emphasis mode reads: ``literal`` takes the whole text as it is, the others parse it."""
    check_options(emphasis=emphasis)
    return [(text, 1.0)] if emphasis == "literal" else parse_attention(text)


# ----------------------------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    """77 token ids ``[BOS] content [EOS] pad...``, one weight per id, and the textual-inversion vectors to put
    in place of ids: ``fixes`` = [(index in ids, embedding name)]."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Vocabulary:
    """What chunking needs to know about one encoder's tokenizer: the special ids, how text becomes ids (without
    start/end tokens) and how many tokens a chunk holds between them (CLIP 75; BERT its context minus 2)."""

    tokenize: Callable[[str], list[int]]
    bos: int
    eos: int
    pad: int
    comma: int | None
    length: int = CHUNK_TOKENS


def _finish(content: list[int], weights: list[float], fixes: list, voc: Vocabulary) -> Chunk:
    n = voc.length - len(content)
    ids = [voc.bos, *content, *[voc.eos] * max(n, 0), voc.eos]
    w = [1.0, *weights, *[1.0] * max(n, 0), 1.0]
    if voc.pad != voc.eos:  # SD 2.x: everything after the first end token is padding (A1111 process_tokens)
        first = ids.index(voc.eos)
        ids[first + 1 :] = [voc.pad] * (len(ids) - first - 1)
    return Chunk(ids, w, [(i + 1, name) for i, name in fixes])


def empty_chunk(voc: Vocabulary) -> Chunk:
    """The chunk of an empty prompt (A1111 fills a batch's shorter prompts with it)."""
    return _finish([], [], [], voc)


def make_chunks(
    pieces: Sequence[tuple[str, float]],
    voc: Vocabulary,
    embeddings: Mapping[str, int] | None = None,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """Chunks of one prompt's pieces (A1111 ``tokenize_line``). ``embeddings``: textual-inversion name → number
    of vectors; a name is found as its token sequence (longest match first) and takes that many positions."""
    found = sorted(
        ((tuple(voc.tokenize(name)), name, n) for name, n in (embeddings or {}).items()),
        key=lambda e: -len(e[0]),
    )
    for _ids, name, n in found:
        if n > voc.length:
            raise InputError(f"embedding {name} has {n} vectors; at most {voc.length} fit in a prompt chunk")
    chunks: list[Chunk] = []
    content: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal content, weights, fixes, last_comma
        chunks.append(_finish(content, weights, fixes, voc))
        content, weights, fixes, last_comma = [], [], [], -1

    for text, weight in pieces:
        if text == BREAK and weight == -1:
            close()
            continue
        tokens = voc.tokenize(text)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == voc.comma:
                last_comma = len(content)
            elif (
                backtrack
                and len(content) == voc.length
                and last_comma != -1
                and (len(content) - last_comma <= backtrack)
            ):
                cut = last_comma + 1
                moved = (content[cut:], weights[cut:], [(i - cut, name) for i, name in fixes if i >= cut])
                content, weights, fixes = content[:cut], weights[:cut], [f for f in fixes if f[0] < cut]
                close()
                content, weights, fixes = [*moved[0]], [*moved[1]], [*moved[2]]
            if len(content) == voc.length:
                close()
            match = next((e for e in found if e[0] and tuple(tokens[pos : pos + len(e[0])]) == e[0]), None)
            if match is None:
                content.append(token)
                weights.append(weight)
                pos += 1
                continue
            ids, name, n = match
            if len(content) + n > voc.length:
                close()
            fixes.append((len(content), name))
            content += [0] * n
            weights += [weight] * n
            pos += len(ids)
    if content or not chunks:
        close()
    return chunks


# --------------------------------------------------------------------------------------------- encoding


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """z [n, 77, D] of n chunks, weights [n, 77]. ``original``: z·w rescaled per chunk to z's mean."""
    if emphasis in ("none", "literal") or bool((weights == 1).all()):
        return z
    weighted = z * weights[..., None].to(z.dtype)
    if emphasis == "no-norm":
        return weighted
    mean = z.float().mean(dim=(1, 2), keepdim=True)
    return weighted * (mean / weighted.float().mean(dim=(1, 2), keepdim=True)).to(z.dtype)


def encode_chunks(
    encode: Callable,
    table: torch.nn.Embedding,
    prompts: Sequence[list[Chunk]],
    vectors: Mapping[str, torch.Tensor] | None = None,
    *,
    emphasis: str = "original",
    empty: Chunk | None = None,
    pooled: bool = False,
):
    """Context [B, n * 77, D] for B prompts' chunks, all chunks through the encoder in one batch. Prompts with
    fewer chunks than the longest get ``empty`` chunks (as A1111 pads a batch).

    ``encode(ids [N, 77], token_embeds [N, 77, D] | None)`` runs one CLIP-like or BERT encoder (``token_embeds``, when
    given, holds the token embeddings with the textual-inversion vectors in place); ``table`` is its token
    embedding. With ``pooled``, ``encode`` returns (hidden, pooled [N, E]) and so does this function: the pooled
    output of each prompt's FIRST chunk, untouched by the emphasis (A1111 ``forward``: ``zs[0].pooled``)."""
    n = max(len(p) for p in prompts)
    if any(len(p) < n for p in prompts) and empty is None:
        raise ValueError("prompts with different chunk counts need the encoder's empty chunk")
    flat = [c for p in prompts for c in [*p, *[empty] * (n - len(p))]]
    device = table.weight.device
    ids = torch.tensor([c.ids for c in flat], dtype=torch.long, device=device)
    token_embeds = None
    with torch.no_grad():
        if any(c.fixes for c in flat):
            token_embeds = table(ids).clone()
            for row, c in enumerate(flat):
                for index, name in c.fixes:
                    vec = vectors[name].to(token_embeds)
                    token_embeds[row, index : index + vec.shape[0]] = vec
        out = encode(ids, token_embeds)
        z, pool = out if pooled else (out, None)
        weights = torch.tensor([c.weights for c in flat], dtype=torch.float32, device=device)
        z = apply_emphasis(z, weights, emphasis)
    b, length, d = len(prompts), z.shape[1], z.shape[2]
    z = z.reshape(b, n * length, d)
    return (z, pool.reshape(b, n, -1)[:, 0]) if pooled else z


def prompt_chunks(
    texts: Sequence[str], voc: Vocabulary, emphasis: str = "original", embeddings: Mapping[str, int] | None = None
) -> list[list[Chunk]]:
    """Every prompt's chunks for one encoder's vocabulary; ``embeddings``: name → number of vectors."""
    return [make_chunks(pieces_for(t, emphasis), voc, embeddings) for t in texts]


@functools.lru_cache(maxsize=4)
def clip_vocabulary(pad: int) -> Vocabulary:
    """The CLIP BPE (SD 1.x pads with EOS 49407, SD 2.x with 0)."""
    tok = clip_tokenizer()

    def tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return Vocabulary(tokenize, CLIP_BOS, CLIP_EOS, pad, clip_bpe_vocab()[0][",</w>"])


def encode_prompts(
    embedder,
    texts: Sequence[str],
    *,
    clip_skip: int = 1,
    emphasis: str = "original",
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Context [B, n * 77, D] of B prompts for an SD 1.x / 2.x CLIP-like encoder (``text.clip.CLIPEmbedder``)."""
    voc = clip_vocabulary(embedder.cfg.pad_token_id)
    counts = {name: v.shape[0] for name, v in (embeddings or {}).items()}

    def encode(ids, token_embeds):
        return embedder(ids, clip_skip=clip_skip, token_embeds=token_embeds)

    table = embedder.text_model.embeddings.token_embedding
    chunks = prompt_chunks(texts, voc, emphasis, counts)
    return encode_chunks(encode, table, chunks, embeddings, emphasis=emphasis, empty=empty_chunk(voc))


@functools.lru_cache(maxsize=4)
def bert_vocabulary(max_seq_len: int) -> Vocabulary:
    """The bert-base-uncased WordPiece of CompVis ``BERTEmbedder``: chunks ``[CLS] tokens [SEP] [PAD]...`` of the
    encoder's ``max_seq_len`` (its positional table), comma ``,`` 1010."""
    tok = bert_tokenizer()

    def tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return Vocabulary(tokenize, BERT_CLS, BERT_SEP, BERT_PAD, tok.token_to_id(","), max_seq_len - 2)


def encode_bert_prompts(embedder, texts: Sequence[str], *, emphasis: str = "original") -> torch.Tensor:
    """Context [B, n * max_seq_len, D] of B prompts for the CompVis LDM BERT encoder (``text.bert.BERTEmbedder``):
    the same syntax, chunks and emphasis as CLIP, each chunk within the encoder's positional table."""
    voc = bert_vocabulary(embedder.cfg.max_seq_len)
    table = embedder.transformer.token_emb
    chunks = prompt_chunks(texts, voc, emphasis)
    return encode_chunks(lambda ids, _: embedder(ids), table, chunks, emphasis=emphasis, empty=empty_chunk(voc))


# ------------------------------------------------------------------------------------- LoRA tags in prompts

_NETWORK_TAG = re.compile(r"<(lora|lyco):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    """``<lora:NAME:TE:UNET>`` / ``<lora:NAME:te=1.2:unet=0.4>``: the text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:...>`` / ``<lyco:...>`` tags, and the tags (A1111's extra-network syntax:
    TE defaults to 1, UNET to TE; positional or ``te=`` / ``unet=`` keywords)."""
    tags = []
    for m in _NETWORK_TAG.finditer(text):
        args = [a.strip() for a in m.group(2).split(":")]
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        positional = [args[0], *(a for a in args[1:] if "=" not in a)]
        unknown = set(named) - {"te", "unet", "dyn"}
        if unknown or not positional[0]:
            raise InputError(f"LoRA tag {m.group(0)!r}: write <lora:NAME:WEIGHT> or <lora:NAME:te=W:unet=W>")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise InputError(f"LoRA tag {m.group(0)!r}: the weights must be numbers") from None
        tags.append(LoraTag(positional[0], te, unet))
    return _NETWORK_TAG.sub("", text), tags
