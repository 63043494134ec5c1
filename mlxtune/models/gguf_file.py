"""A small reader for the GGUF container: metadata, tensor directory, memory-mapped data.

gguf-py's GGUFReader builds a numpy view per metadata string, which takes ~5 s for
SmolLM2's 49k-token vocabulary (more for 150k-token ones); this parses the same layout
(GGUF v2/v3, little-endian) with `struct` in a fraction of that. gguf-py is still the
source of the tensor type table and the dequantizers.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxtune.errors import ModelError

# GGUF metadata value types -> struct format (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # rows first (PyTorch / MLX order): GGML's ne reversed
    type: object            # gguf.GGMLQuantizationType
    offset: int             # absolute offset of the data in the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    _map: mmap.mmap

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes (a read-only view of the mapped file)."""
        return np.frombuffer(self._map, np.uint8, count=t.n_bytes, offset=t.offset)


def printable(text: str) -> str:
    """`text` safe for a one-line message (a corrupt file can hold any bytes)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _Corrupt(Exception):
    pass


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise _Corrupt(f"reading {n} bytes at offset {start} runs past the end")
        self.pos += n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool = True):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise _Corrupt(f"unknown metadata value type {kind}")
        item, n = self.scalar("<I"), self.scalar("<Q")
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            start = self.take(n * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, n, start).tolist() if keep else None
        values = [self.value(item, keep) for _ in range(n)]
        return values if keep else None


def read(path: str | Path, skip: tuple[str, ...] = ()) -> GGUFFile:
    """Parse a GGUF file's header. Metadata keys in `skip` are stepped over, not decoded.
    Every failure is a one-line ModelError naming the file."""
    import gguf

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: GGUF file not found")
    if not p.is_file():
        raise ModelError(f"{p}: not a file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: the file is empty, not a GGUF file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{p}: not a GGUF file (no GGUF magic at the start)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf)
    cur.take(4)
    try:
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{p}: GGUF version {version} is not supported (2 and 3 are; "
                             "a big-endian file also shows up here)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = printable(cur.string())
            kind = cur.scalar("<I")
            metadata[key] = cur.value(kind, keep=key not in skip)
        infos = [_tensor_info(cur) for _ in range(n_tensors)]
    except (_Corrupt, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ModelError(f"{p}: cannot read the GGUF header (truncated or corrupt file?): "
                         f"{e}") from None
    align = max(1, int(metadata.get("general.alignment", 32)))
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, shape, type_id, offset in infos:
        try:
            kind = gguf.GGMLQuantizationType(type_id)
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise ModelError(f"{p}: tensor {name} has unknown GGML type id {type_id}") from None
        n = int(np.prod(shape, dtype=np.int64))
        t = TensorInfo(name, shape, kind, data_start + offset, n // block * block_bytes)
        if n % block or t.offset + t.n_bytes > size:
            raise ModelError(f"{p}: tensor {name} extends past the end of the file "
                             "(truncated download?)" if n % block == 0 else
                             f"{p}: tensor {name} has a shape that does not fit its type")
        tensors.append(t)
    return GGUFFile(p, version, metadata, tensors, buf)


def _tensor_info(cur: _Cursor):
    name = printable(cur.string())
    n_dims = cur.scalar("<I")
    if n_dims > 8:
        raise _Corrupt(f"tensor {name} claims {n_dims} dimensions")
    ne = [cur.scalar("<Q") for _ in range(n_dims)]
    type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
    return name, tuple(int(d) for d in reversed(ne)), type_id, offset
