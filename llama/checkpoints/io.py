"""Memory-mapped tensor readers shared by the formats: safetensors files and torch .pth/.bin.

Both return tensors backed by a private (copy-on-write) file mapping: reading costs no copy,
and pages are only resident once touched. Every failure becomes a CheckpointError naming the
file.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from llama.checkpoints.common import CheckpointError


@contextmanager
def open_safetensors(path: Path) -> Iterator[object]:
    """safe_open(path) with errors (truncated header, bad JSON, ...) named by file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def safetensors_keys(path: Path) -> list[str]:
    with open_safetensors(path) as handle:
        return list(handle.keys())


def read_safetensor(handle: object, path: Path, key: str) -> Tensor:
    """One tensor from an open safetensors handle (zero-copy, memory-mapped)."""
    try:
        return handle.get_tensor(key)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc})") from None


def check_safetensors_size(path: Path) -> None:
    """safetensors only checks offsets lazily; a file cut short must fail before loading.

    The header is checked here too (a JSON object of name -> {"data_offsets": [start, end],
    ...}), so a malformed one is refused naming the entry instead of failing deep inside.
    """
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({len(prefix)} bytes)")
        n = int.from_bytes(prefix, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: expected a JSON object of tensor name -> "
            f"entry, found a JSON {type(header).__name__}"
        )
    ends = [_data_end(path, k, v) for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    found = path.stat().st_size
    if found < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file: expected {expected} bytes, found {found}"
        )


def _data_end(path: Path, key: str, entry: object) -> int:
    """End offset of one header entry, which must hold "data_offsets": [start, end]."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    valid = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    )
    if not valid:
        found = json.dumps(entry)[:80]
        raise CheckpointError(
            f'{path}: corrupt safetensors header: entry {key!r} needs "data_offsets": '
            f"[start, end] (integers, start <= end), found {found}"
        )
    return offsets[1]


def load_pth(path: Path) -> dict[str, Tensor]:
    """torch.load(mmap=True, weights_only=True): tensors are mapped, pickled code is refused.

    weights_only's unpickler only rebuilds tensors and plain containers, so a pickle whose
    __reduce__ names a callable (os.system, ...) raises instead of running it.
    """
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors and plain "
            f"containers ({_culprit(str(exc))}); it was not executed"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated torch file ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a dict of name -> tensor, found {type(state).__name__}"
        )
    return state


def _culprit(message: str) -> str:
    """The line of torch's weights_only refusal that names the offending global."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in message.splitlines()]
    named = [ln for ln in lines if "global" in ln.lower()]
    line = (named or [ln for ln in lines if ln] or ["unsupported pickle content"])[0]
    return line.split(". Please")[0]
