"""Textual-inversion embeddings (Gal et al. 2022, arXiv 2208.01618): learned token vectors named by their file.

Formats: A1111 safetensors (``emb_params`` [n, D], or one ``string_to_param.*`` tensor), SDXL files (``clip_l`` for
the CLIP ViT-L encoder, ``clip_g`` for OpenCLIP bigG) and diffusers' ``learned_embeds`` (one tensor under the
token's name, [D] or [n, D]). The name a prompt uses is the file's stem; text/prompts.py puts the vectors in
place of the name's tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from latentgen.errors import CheckpointError

SDXL_KEYS = ("clip_l", "clip_g")


def embedding_vectors(sd: Mapping[str, torch.Tensor], source: str, encoder: str = "clip_l") -> torch.Tensor:
    """The [n, D] vectors of one embedding file for one encoder (``clip_l`` is the only one of SD 1.x / 2.x)."""
    if any(k in sd for k in SDXL_KEYS):
        if encoder not in sd:
            raise CheckpointError(f"{source}: an SDXL embedding without {encoder} vectors")
        v = sd[encoder]
    elif "emb_params" in sd:
        v = sd["emb_params"]
    else:
        params = [k for k in sd if k.startswith("string_to_param.")] or list(sd)
        if len(params) != 1:
            raise CheckpointError(
                f"{source}: not a textual-inversion embedding (expected emb_params, string_to_param.* or clip_l/"
                f"clip_g; found {', '.join(sorted(sd)[:4])})"
            )
        v = sd[params[0]]
    v = v.detach().float()
    return v[None] if v.ndim == 1 else v.reshape(-1, v.shape[-1])


def embedding_files(path: str | Path) -> list[Path]:
    """An embedding file, or every ``*.safetensors`` in a folder (pickled .pt/.bin are refused when read)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: no .safetensors embeddings in this folder")
        return files
    if not p.exists():
        raise CheckpointError(f"--embedding {p}: no such file or folder")
    return [p]


def _files(paths):
    """(file, state dict) of every embedding under ``paths``."""
    from latentgen.loading.safetensors import read_safetensors

    for path in paths:
        for f in embedding_files(path):
            yield f, read_safetensors(f)[0]


def _check_width(vectors: torch.Tensor, width: int, f: Path, what: str = "text encoder's") -> None:
    if vectors.shape[-1] != width:
        raise CheckpointError(
            f"{f}: its vectors are {vectors.shape[-1]} wide but the {what} are {width}: the embedding was made for "
            "another model family"
        )


def load_embeddings(paths, width: int, encoder: str = "clip_l") -> dict[str, tuple[torch.Tensor, Path]]:
    """{stem: (vectors [n, width], file)} of every embedding under ``paths``; a wrong width is an error."""
    out = {}
    for f, sd in _files(paths):
        vectors = embedding_vectors(sd, str(f), encoder)
        _check_width(vectors, width, f)
        out[f.stem] = (vectors, f)
    return out


def load_sdxl_embeddings(paths, widths: Mapping[str, int]) -> dict[str, tuple[dict[str, torch.Tensor], Path]]:
    """{stem: ({encoder: vectors [n, width]}, file)} for SDXL: ``widths`` maps ``clip_l`` / ``clip_g`` to each
    encoder's width (the refiner: ``clip_g`` alone). Only SDXL files (``clip_l`` + ``clip_g``, one count n) fit:
    an SD 1.x / 2.x embedding is refused, even where its width happens to match CLIP-L's."""
    out = {}
    for f, sd in _files(paths):
        missing = [k for k in SDXL_KEYS if k not in sd]
        if missing:
            raise CheckpointError(
                f"{f}: not an SDXL embedding (no {' / '.join(missing)} vectors; made for SD 1.x / 2.x?); use one "
                "made for SDXL"
            )
        vectors = {k: embedding_vectors(sd, str(f), k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise CheckpointError(
                f"{f}: {vectors['clip_l'].shape[0]} clip_l vectors but {vectors['clip_g'].shape[0]} clip_g ones; "
                "an SDXL embedding has as many of each"
            )
        for k, width in widths.items():
            _check_width(vectors[k], width, f, f"{k} encoder's")
        out[f.stem] = ({k: vectors[k] for k in widths}, f)
    return out
