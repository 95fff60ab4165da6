"""The GGUF container (llama.cpp's format, versions 2 and 3, little-endian): header, metadata
and tensor directory, parsed from a memory map.

Layout: magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count; the metadata
as (string key, uint32 value type, value); per tensor (string name, uint32 n_dims, uint64 dims
innermost first, uint32 ggml type, uint64 offset into the data section); the data section
starts at the next multiple of `general.alignment` (default 32). Strings are a uint64 length
and UTF-8 bytes. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

We parse it ourselves rather than with gguf.GGUFReader: the reader builds one numpy view per
array element, which takes 2.3-3.6 s on SmolLM2's 49,152 tokens and 48,900 merges here, where
this parser takes well under a second. Every failure is a CheckpointError naming the file and
the key being read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama.checkpoints.common import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> numpy dtype (8 = string and 9 = array are handled apart).
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_NUMPY |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry. `dims` are GGUF's, innermost first (numpy's reversed);
    `offset` is absolute in the file."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order (outermost first): a weight (out, in) is stored dims (in, out)."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    size: int


class _Cursor:
    """Reads little-endian values from a buffer, naming `what` when the file ends early."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.path, self.pos, self.what = buf, path, 0, "header"

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            self.truncated()
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self.truncated()
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        data = self.raw(self.unpack("<Q"))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(
                f"{self.path}: {self.what}: expected a UTF-8 string, found bytes {data[:40]!r} "
                f"({exc.reason})"
            ) from None

    def truncated(self) -> None:
        raise CheckpointError(
            f"{self.path}: truncated GGUF file: it ends at byte {len(self.buf)} while "
            f"reading {self.what}"
        )


def parse(path: Path, with_tensors: bool = True) -> GGUFFile:
    """Parse the header, metadata and (when `with_tensors`) tensor directory of `path`."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read GGUF file ({exc})") from None
    try:
        return _parse(_Cursor(buf, path), path, size, with_tensors)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _parse(cur: _Cursor, path: Path, size: int, with_tensors: bool) -> GGUFFile:
    magic = bytes(cur.raw(4)) if size >= 4 else b""
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file: expected magic b'GGUF', found {magic!r}")
    cur.what = "header (version and counts)"
    version = cur.unpack("<I")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(
            f"{path}: GGUF version: expected one of {VERSIONS}, found {version}{hint}"
        )
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = _metadata(cur, n_kv)
    if not with_tensors:
        return GGUFFile(path, version, metadata, [], 0, size)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise CheckpointError(
            f"{path}: general.alignment: expected a positive multiple of 8, found {alignment!r}"
        )
    start = -(-cur.pos // alignment) * alignment
    tensors = [TensorInfo(n, d, t, start + off) for n, d, t, off in infos]
    return GGUFFile(path, version, metadata, tensors, start, size)


def _metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(n_kv):
        cur.what = f"metadata entry {i} (after {next(reversed(out), 'the header')!r})"
        key = cur.string()
        cur.what = f"metadata key {key!r}"
        out[key] = _value(cur, cur.unpack("<I"))
    return out


def _value(cur: _Cursor, vtype: int) -> Any:
    if vtype in _NUMPY:
        return _array(cur, vtype, 1)[0]
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        return _array(cur, cur.unpack("<I"), cur.unpack("<Q"))
    raise CheckpointError(f"{cur.path}: {cur.what}: unknown GGUF value type {vtype}")


def _array(cur: _Cursor, etype: int, count: int) -> list[Any]:
    if etype in _NUMPY:
        dtype = np.dtype(_NUMPY[etype])
        data = cur.raw(count * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype).tolist()
    if etype == _STRING:
        return [cur.string() for _ in range(count)]
    if etype == _ARRAY:
        return [_array(cur, cur.unpack("<I"), cur.unpack("<Q")) for _ in range(count)]
    raise CheckpointError(f"{cur.path}: {cur.what}: unknown GGUF array element type {etype}")


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    cur.what = f"tensor directory entry {i}"
    name = cur.string()
    cur.what = f"tensor directory entry {name!r}"
    n_dims = cur.unpack("<I")
    if not 1 <= n_dims <= 4:
        raise CheckpointError(
            f"{cur.path}: tensor {name!r}: expected 1 to 4 dimensions, found {n_dims}"
        )
    dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
    return name, dims, cur.unpack("<I"), cur.unpack("<Q")
