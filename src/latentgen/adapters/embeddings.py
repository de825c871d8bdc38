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


def load_embeddings(paths, width: int, encoder: str = "clip_l") -> dict[str, tuple[torch.Tensor, Path]]:
    """{stem: (vectors [n, width], file)} of every embedding under ``paths``; a wrong width is an error."""
    from latentgen.loading.safetensors import read_safetensors

    out = {}
    for path in paths:
        for f in embedding_files(path):
            vectors = embedding_vectors(read_safetensors(f)[0], str(f), encoder)
            if vectors.shape[-1] != width:
                raise CheckpointError(
                    f"{f}: its vectors are {vectors.shape[-1]} wide but the text encoder's are {width}: the "
                    "embedding was made for another model family"
                )
            out[f.stem] = (vectors, f)
    return out
