"""Image, mask and file I/O: atomic writes, PNG metadata, loading images as tensors."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary path beside `path`; on success rename it into place, on error remove it.

    A kill at any moment leaves either the old file or the complete new one, never half a file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists: pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create output directory {parent}: {e.strerror}") from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise InputError(f"cannot write to {parent}: {e.strerror}") from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any new file
    try:
        yield Path(tmp)
        if not overwrite and path.exists():
            raise InputError(f"{path} appeared while writing: pass --overwrite to replace it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def load_image(path: str | Path, mode: str = "RGB"):
    """Read an image with Pillow → PIL.Image in `mode`; one clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGB" and im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e.__class__.__name__})") from e


def to_tensor(im):
    """PIL image → float tensor [1, C, H, W] in [0, 1]."""
    import numpy as np
    import torch

    a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None]


def to_pil(x):
    """Tensor [3, H, W] in [0, 1] → PIL RGB, rounded as diffusers does ((x * 255).round())."""
    import numpy as np
    from PIL import Image

    a = (x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(a)


def save_png(im, path: str | Path, *, text: dict[str, str] | None = None, overwrite: bool = False) -> None:
    """Write a PNG atomically with tEXt/iTXt chunks (A1111 `parameters`, latentgen recipe JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(k, v)
    with atomic_path(path, overwrite=overwrite) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)


def read_png_text(path: str | Path) -> dict[str, str]:
    from PIL import Image

    if not Path(path).is_file():
        raise InputError(f"{path}: no such image file")

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e.__class__.__name__})") from e


def slugify(text: str, max_len: int = 60) -> str:
    import re

    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "untitled"


def file_hash(path: str | Path) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 (a folder: of its weight files).
    Cached by (path, size, mtime) in ~/.cache/latentgen/hashes.json so big files are read once."""
    import hashlib
    import json
    import os

    p = Path(path)
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentgen" / "hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:10]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = digest
        with atomic_path(cache, overwrite=True) as tmp:
            tmp.write_text(json.dumps(known))
    except (OSError, InputError):
        pass
    return digest
