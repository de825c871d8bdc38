"""safetensors I/O: reading (whole, or converted to a dtype with plain reads), atomic writing, and the refusal
of pickled checkpoints with the command that converts them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: PyTorch pickle checkpoints are refused (unpickling runs arbitrary code); convert it once in a "
        f"trusted environment: python -c \"import torch,safetensors.torch as s; sd=torch.load('{path.name}', "
        f"weights_only=True); sd=sd.get('state_dict', sd); s.save_file({{k: v.contiguous() for k, v in sd.items() "
        f"if hasattr(v, 'contiguous')}}, '{path.stem}.safetensors')\""
    )


MAX_HEADER = 100 * 2**20  # bytes of JSON header (safetensors' own limit)


def _stat(path: Path):
    """os.stat with one CheckpointError per reason: missing, a symlink loop, no permission."""
    import errno
    import os

    try:
        return os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: a loop of symbolic links: point it at the real file") from e
        if e.errno == errno.EACCES:
            raise CheckpointError(f"{path}: permission denied: make it readable (chmod +r) or copy it") from e
        if path.is_symlink():
            raise CheckpointError(f"{path}: a broken symbolic link (its target is missing)") from e
        raise CheckpointError(f"{path}: no such file") from e


def check_header(path: Path, head: bytes, size: int) -> None:
    """The header's claims against the file: its length, and every tensor's byte range inside the file (a file
    claiming 100 GB of tensors is refused here rather than by a failing mmap)."""
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (its header claims {n} bytes; the file has {size})"
        )
    with open(path, "rb") as fh:
        fh.seek(8)
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (damaged header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    end = 0
    for k, t in header.items():
        try:
            if k != "__metadata__":
                end = max(end, int(t["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            pass  # a malformed entry: safetensors itself names it
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt: its header claims {8 + n + end} bytes, "
            f"the file has {size})"
        )


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (memory-mapped) → (tensors, metadata). Pickles are refused."""
    path = Path(path)
    st = _stat(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory without unet/ (not a diffusers model folder)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except PermissionError as e:
        raise CheckpointError(f"{path}: permission denied: make it readable (chmod +r) or copy it") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror})") from e
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):  # a zip (torch.save) or a raw pickle
        _refuse_pickle(path)
    check_header(path, head, st.st_size)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from e
    return tensors, meta


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class PlainReader:
    """Tensors of a safetensors file read one at a time with plain file reads, as stored: nothing is memory-mapped,
    so a tensor read, used and dropped leaves no pages behind. A context manager."""

    def __init__(self, path: str | Path):
        self.path = path
        self.fh = open(path, "rb")
        n = int.from_bytes(self.fh.read(8), "little")
        self.header, self.base = json.loads(self.fh.read(n)), 8 + n

    def read(self, key: str) -> torch.Tensor:
        info = self.header[key]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self.fh.seek(self.base + begin)
        if self.fh.readinto(buf.numpy()) != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading {key}")
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def __enter__(self) -> "PlainReader":
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def read_converted(path: str | Path, keys, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors `keys` of a safetensors file, read one by one with plain file reads and converted to `dtype`.
    Converting the memory-mapped tensors instead touches every page of the mapping, and those pages count
    towards the process's memory until the last tensor is gone: an SD 1.5 fp16 file loaded in fp32 peaked at
    6.3 GiB that way (2.0 file + 4.3 weights), 4.4 GiB this way."""
    with PlainReader(path) as reader:
        return {k: reader.read(k).to(dtype) for k in keys}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, overwrite=True):
    """Write atomically: a kill during the write leaves the previous file intact."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..images import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:  # an OSError inside becomes an OutputError
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # it wraps the OS error (a full disk) in its message
            import errno
            import re

            code = re.search(r"code: (\d+)", str(e))
            num = int(code.group(1)) if code else errno.EIO
            raise OSError(num, os.strerror(num) if code else str(e).splitlines()[0]) from e
