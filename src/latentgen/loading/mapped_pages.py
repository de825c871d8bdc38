"""A memory-mapped checkpoint's pages handed back to the page cache when the weights on them are not needed for a
while (the text encoder's after the prompts are encoded, the UNet's before the image is decoded): whole-process
peak RSS then counts only the weights of the network that runs. A page is only unmapped, not evicted: its next
use maps it again from the page cache, and its contents cannot change, because only pages that still hold the
file's bytes are dropped (a page written to — copy-on-write, e.g. a LoRA merged in place — is kept). Linux only;
elsewhere, and for weights not memory-mapped, a no-op."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MADV_DONTNEED = 4
PRESENT, FILE_OR_SHARED = 1 << 63, 1 << 61  # /proc/self/pagemap entry flags (Documentation/admin-guide/mm/pagemap)


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's mappings of `path` (a file, or every file under a folder)."""
    target = os.path.realpath(path)
    folder = Path(target).is_dir()
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                name = parts[5].strip()
                if name == target or (folder and name.startswith(target + os.sep)):
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        pass
    return out


def _clean_runs(start: int, end: int, page: int) -> list[tuple[int, int]]:
    """[start, end) split into runs of pages that hold the file's bytes or are not present (the pages written to,
    now private anonymous copies, left out); the whole range when pagemap cannot be read."""
    import numpy as np

    n = (end - start) // page
    try:
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(start // page * 8)
            flags = np.frombuffer(fh.read(n * 8), dtype=np.uint64)
    except OSError:
        return [(start, end)]
    if len(flags) != n:
        return [(start, end)]
    present, from_file = (flags & np.uint64(PRESENT)) != 0, (flags & np.uint64(FILE_OR_SHARED)) != 0
    dirty = np.flatnonzero(present & ~from_file)
    runs, at = [], 0
    for i in (*dirty.tolist(), n):
        if i > at:
            runs.append((start + at * page, start + i * page))
        at = i + 1
    return runs


def drop_mapped_pages(path: str | os.PathLike | None) -> int:
    """Unmap the resident pages of this process's mappings of checkpoint `path` that still hold the file's bytes
    (madvise MADV_DONTNEED on a private file mapping: the next read maps the page cache's copy again). Returns
    the bytes of address range advised (0 where nothing was done)."""
    if path is None or not os.path.exists(path):
        return 0
    return _drop_clean(file_mappings(path))


def _drop_clean(ranges) -> int:
    """madvise(MADV_DONTNEED) on the pages of address `ranges` (inside file mappings) that still hold the file's
    bytes; the bytes advised."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    done = 0
    for start, end in ranges:
        for a, b in _clean_runs(start, end, page):
            if madvise(a, b - a, MADV_DONTNEED) == 0:
                done += b - a
    return done


def _spans(module) -> list[tuple[int, int]]:
    """Page-aligned, merged address ranges of `module`'s parameters and buffers."""
    page = os.sysconf("SC_PAGE_SIZE")
    raw = sorted(
        (t.data_ptr() // page * page, -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page)
        for t in (*module.parameters(), *module.buffers())
        if t.numel() and t.device.type == "cpu"
    )
    out: list[tuple[int, int]] = []
    for a, b in raw:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def drop_module_pages(module, path: str | os.PathLike) -> int:
    """:func:`drop_mapped_pages` for the weights of one module only: the pages of its parameters and buffers that lie in
    this process's mappings of `path` and still hold the file's bytes. Returns the bytes advised."""
    maps = file_mappings(path)
    spans = _spans(module)
    return _drop_clean((max(a, m0), min(b, m1)) for a, b in spans for m0, m1 in maps if max(a, m0) < min(b, m1))


def release_after_each(blocks, path: str | os.PathLike | None) -> None:
    """After each of `blocks` runs (a forward hook), hand back the pages of its memory-mapped weights: while a
    network whose weights stay memory-mapped runs block by block (the UNet with weights kept as stored), its
    resident weights are those of the block that runs, not the whole network's. The next call maps them again from
    the page cache (minor faults, no disk read while the file stays cached). Linux only; a no-op for weights not
    memory-mapped from `path`."""
    if path is None or not os.path.isfile(path) or not os.path.exists("/proc/self/pagemap"):
        return

    def hand_back(block, args, out) -> None:
        drop_module_pages(block, path)

    for block in blocks:
        block.register_forward_hook(hand_back)
