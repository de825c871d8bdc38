"""PNG files written byte by byte (zlib + struct, as the PNG specification lays them out), so image-reading tests
do not depend on the writer of the library they check: 16-bit samples, and headers that lie about the size."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | Path, a: np.ndarray, bit_depth: int = 16) -> Path:
    """Write a [H, W] (grey) or [H, W, 3] (RGB) array of unsigned samples as a PNG of `bit_depth` bits."""
    a = np.asarray(a)
    colour = 0 if a.ndim == 2 else 2
    h, w = a.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + a[y].astype(dtype).tobytes() for y in range(h))  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)


def write_png_header(path: str | Path, width: int, height: int) -> Path:
    """A PNG whose header declares width × height 8-bit RGB pixels, followed by one tiny IDAT (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)
