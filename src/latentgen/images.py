"""Image, mask and file I/O: atomic writes, PNG metadata, loading images as tensors."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputError
from .validation import MAX_IMAGE_PIXELS, MAX_SIDE

FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary path beside `path`; on success rename it into place, on error remove it.

    A kill at any moment leaves either the old file or the complete new one, never half a file.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory: give an output file name (e.g. {path / 'image.png'})")
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
    except OSError as e:
        fatal = e.errno in FATAL_ERRNOS
        raise OutputError(f"cannot write {path}: {e.strerror or e}", fatal=fatal) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def open_image(path: str | Path):
    """Open an image (header only) → PIL.Image; one InputError for a missing, unreadable or too large file.
    The size is checked against MAX_IMAGE_PIXELS before any pixel is decoded (decompression bombs)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own check warns or raises without the size; ours follows
    try:
        im = Image.open(path)
    except PermissionError as e:
        raise InputError(f"{path}: cannot read the image (permission denied)") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: not a readable image ({e.__class__.__name__})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise InputError(
            f"{path}: image too large: {w}x{h}, the limit is {MAX_IMAGE_PIXELS} pixels ({MAX_SIDE}x{MAX_SIDE})"
        )
    return im


def is_16_bit_grey(im) -> bool:
    """Pillow opens 16-bit grey as I;16* (or I, for PNG); its convert() to 8 bits clips at 255 instead of scaling."""
    return im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")


def grey_16_to_8(im):
    """16-bit grey → 8-bit L, round(v / 257) = round(v · 255 / 65535). (16-bit RGB(A) PNGs already arrive as 8 bits,
    their high bytes.)"""
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")


def load_image(path: str | Path, mode: str = "RGB"):
    """Read an image with Pillow → PIL.Image in `mode`: EXIF orientation applied (as viewers and A1111 show it),
    16-bit scaled to 8 bits, transparency over white; one clear error for a missing, unreadable or too large file."""
    from PIL import Image, ImageOps

    path = Path(path)
    im = open_image(path)
    try:
        with im:
            im.load()
            sixteen = is_16_bit_grey(im)
            im = ImageOps.exif_transpose(im)
            if sixteen:
                im = grey_16_to_8(im)
            if mode == "RGB" and im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:
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

    x = x.detach().float().cpu().nan_to_num(0.0)  # NaN pixels black (pipelines warns once, naming the cause)
    a = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
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
    im = open_image(path)
    try:
        with im:
            return dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: not a readable image ({e.__class__.__name__})") from e


def slugify(text: str, max_len: int = 60) -> str:
    import re

    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "untitled"


def file_hash(path: str | Path) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 (a folder: of its weight files)."""
    return file_sha256(path)[:10]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (a folder: of its weight files, in name order), cached by (path, size, mtime) in
    ~/.cache/latentgen/hashes.json so big files are read once."""
    import hashlib
    import json
    import os

    p = Path(path)
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    key = "sha256|" + "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
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
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = digest
        with atomic_path(cache, overwrite=True) as tmp:
            tmp.write_text(json.dumps(known))
    except (OSError, InputError):
        pass
    return digest
