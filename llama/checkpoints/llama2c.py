"""llama2.c checkpoints (Karpathy's llama2.c): one .bin file of little-endian fp32.

Legacy (v0): a 7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len), vocab_size negative when the classifier is separate; then, each stacked over layers:
tok_embeddings, attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, the final norm, the
RoPE cos/sin tables (seq_len x head_dim/2 each: we recompute them, after checking that they
are the ones theta 10000 gives, as llama2.c's header has no theta), and output.weight when
not shared.

Versioned v1: uint32 magic 0x616b3432 ("ak42"), int32 version, the same 7 ints, a uint8
"classifier shared" flag, zero padding to 256 bytes; then attention_norm (all layers),
ffn_norm, norm, tok_embeddings, wq, wk, wv, wo, w1, w2, w3 (all layers each) and
output.weight when not shared. Every matrix is stored as torch's (out, in) weight.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llama.checkpoints.common import (
    CheckpointError,
    Source,
    TensorStream,
    config_error,
    release_pages,
)
from llama.config import ConfigError, ModelArgs
from llama.rope import rope_tables

MAGIC = 0x616B3432
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 28
_PER_LAYER = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def read_header(path: Path) -> tuple[ModelArgs, bool, int, int]:
    """-> (args, shared_classifier, version (0 = legacy), byte offset of the first weight)."""
    try:
        with path.open("rb") as f:
            head = f.read(V1_HEADER_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read llama2.c checkpoint ({exc})") from None
    if len(head) < LEGACY_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: truncated llama2.c header: expected at least {LEGACY_HEADER_BYTES} "
            f"bytes, found {len(head)}"
        )
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        return _v1_header(path, head)
    values = struct.unpack("<7i", head[:LEGACY_HEADER_BYTES])
    return _args(path, values), values[5] > 0, 0, LEGACY_HEADER_BYTES


def _v1_header(path: Path, head: bytes) -> tuple[ModelArgs, bool, int, int]:
    if len(head) < V1_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: truncated llama2.c v1 header: expected {V1_HEADER_BYTES} bytes, "
            f"found {len(head)}"
        )
    version = struct.unpack("<i", head[4:8])[0]
    if version != 1:
        raise CheckpointError(
            f"{path}: llama2.c export version {version} is not supported (expected 1, fp32; "
            "re-export with --version 1 and pass load_in_8bit=True to quantise on load)"
        )
    values = struct.unpack("<7i", head[8:36])
    return _args(path, values), head[36] == 1, 1, V1_HEADER_BYTES


def _args(path: Path, values: tuple[int, ...]) -> ModelArgs:
    if any(v <= 0 for i, v in enumerate(values) if i != 5) or values[5] == 0:
        raise CheckpointError(
            f"{path}: not a llama2.c checkpoint: header (dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, seq_len) = {values} holds non-positive sizes"
        )
    try:
        return ModelArgs.from_llama2c_header(values, source=str(path))
    except ConfigError as exc:
        raise config_error(exc) from None


def tensor_layout(args: ModelArgs, shared: bool, version: int) -> list[tuple[str, tuple]]:
    """(name, shape) of every stored tensor in file order; name "" marks skipped RoPE tables."""
    L, d = args.n_layers, args.dim
    kv, hd, hid = args.kv_heads * args.head_dim, args.head_dim, args.ffn_hidden_dim
    shapes = {
        "attention.wq": (d, d),
        "attention.wk": (kv, d),
        "attention.wv": (kv, d),
        "attention.wo": (d, d),
        "feed_forward.w1": (hid, d),
        "feed_forward.w2": (d, hid),
        "feed_forward.w3": (hid, d),
    }

    def stacked(key: str, shape: tuple) -> list[tuple[str, tuple]]:
        return [(f"layers.{i}.{key}.weight", shape) for i in range(L)]

    emb = [("tok_embeddings.weight", (args.vocab_size, d))]
    if version == 0:
        out = emb + stacked("attention_norm", (d,))
        out += [e for key in _PER_LAYER[:4] for e in stacked(key, shapes[key])]
        out += stacked("ffn_norm", (d,))
        out += [e for key in _PER_LAYER[4:] for e in stacked(key, shapes[key])]
        out += [
            ("norm.weight", (d,)),
            ("", (args.max_seq_len, hd // 2)),
            ("", (args.max_seq_len, hd // 2)),
        ]
    else:
        out = stacked("attention_norm", (d,)) + stacked("ffn_norm", (d,))
        out += [("norm.weight", (d,)), *emb]
        out += [e for key in _PER_LAYER for e in stacked(key, shapes[key])]
    if not shared:
        out.append(("output.weight", (args.vocab_size, d)))
    return out


def read(path: Path) -> tuple[ModelArgs, TensorStream, int, bool]:
    """Parse and size-check a llama2.c file -> (args, stream of memory-mapped fp32 tensors,
    number of tensors, whether the classifier is shared with the embedding)."""
    args, shared, version, offset = read_header(path)
    layout = tensor_layout(args, shared, version)
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    expected = offset + 4 * n_floats
    found = path.stat().st_size
    if found != expected:
        kind = "truncated" if found < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: llama2.c file {kind}: its header (dim {args.dim}, {args.n_layers} "
            f"layers, vocab {args.vocab_size}, seq_len {args.max_seq_len}, "
            f"{'shared' if shared else 'separate'} classifier) needs {expected} bytes, "
            f"found {found}"
        )
    # Copy-on-write mapping: writable tensors without copying, the file is never modified.
    data = np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=(n_floats,))
    named = [(n, s) for n, s in layout if n]
    flat = torch.from_numpy(data)
    _check_rope_tables(path, flat, layout, args)
    return args, _stream(flat, layout), len(named), shared


def _check_rope_tables(
    path: Path, flat: Tensor, layout: list[tuple[str, tuple]], args: ModelArgs
) -> None:
    """A legacy file's cos/sin tables must be theta 10000's (a model exported with another
    base would otherwise load silently with the wrong rotation). Tolerance: fp32 angles of
    positions up to seq_len differ by ~1e-4 between implementations; other bases by ~0.1+."""
    start, found = 0, []
    for name, shape in layout:
        n = int(np.prod(shape))
        if not name:
            found.append(flat[start : start + n].view(shape))
        start += n
    if not found:
        return  # v1 files carry no tables
    cos, sin = rope_tables(args.max_seq_len, args.head_dim, args.rope_theta)
    worst = max((t - ref).abs().max().item() for t, ref in zip(found, (cos, sin), strict=True))
    if not worst <= 1e-2:  # NaN fails too
        raise CheckpointError(
            f"{path}: the RoPE cos/sin tables stored after the final norm differ from "
            f"rope_theta {args.rope_theta:g}'s by up to {worst:.3g}: the model was trained "
            "with another RoPE base or scaling, which a llama2.c header cannot state"
        )


def _stream(flat: Tensor, layout: list[tuple[str, tuple]]) -> TensorStream:
    start = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if name:
            t = flat[start : start + n].view(shape)
            yield name, t
            release_pages(t)
        start += n


def looks_like_llama2c(path: Path) -> bool:
    """Whether `path` is a file whose header and size match a llama2.c checkpoint."""
    try:
        args, shared, version, offset = read_header(path)
        layout = tensor_layout(args, shared, version)
    except (CheckpointError, OSError):
        return False
    size = offset + 4 * sum(int(np.prod(s)) for _, s in layout)
    return path.stat().st_size == size


def open_source(path: Path) -> Source:
    """A llama2.c file as a Source; a shared classifier ties output to tok_embeddings."""
    args, tensors, count, shared = read(path)
    return Source(args, tensors, count, tie_allowed=shared, origin=path)
