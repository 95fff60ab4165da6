"""Shared machinery of the checkpoint loaders: errors, the result type, and model assembly.

Every format module turns its files into a `ModelArgs` plus a stream of `(meta_name, tensor)`
pairs (tensors usually memory-mapped). `assemble` checks the stream against a Transformer
built on the meta device (names, shapes), converts each tensor to the target dtype/device as
it arrives (or quantises it to 8-bit, see llama/quant.py), then binds everything with
`load_state_dict(assign=True, strict=True)`. Nothing is ever materialised twice, so peak RAM
stays near the size of the loaded model.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llama.config import ConfigError, ModelArgs
from llama.fusion import StreamFuser
from llama.model import Transformer
from llama.rope import rope_tables

# Keys some checkpoints carry that the model recomputes: dropped by name, never by pattern.
IGNORABLE_KEYS = frozenset({"rope.freqs"})
TOKENIZER_NAME = "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or inconsistent. The message names the file, the
    key or field, what was expected and what was found."""


@dataclass
class LoadedModel:
    """A ready model and where it came from. `model` is in eval mode on `device`; its KV
    caches are not set up (call `model.setup_caches(batch_size)`)."""

    model: Transformer
    tokenizer_path: Path | None
    format: str
    path: Path
    dtype: torch.dtype
    device: torch.device
    load_in_8bit: bool
    notice: str | None = None  # e.g. the context was shortened to fit the device's memory
    metadata: dict[str, Any] | None = None  # a GGUF file's metadata (gguf.read_metadata)


TensorStream = Iterable[tuple[str, Tensor]]


def config_error(exc: ConfigError) -> CheckpointError:
    """Re-raise a ModelArgs problem in the checkpoint error family (its text names the file)."""
    return CheckpointError(str(exc))


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what} (expected a file here, found none)")
    return path


def tokenizer_vocab_size(path: Path) -> int:
    """Vocabulary size of a SentencePiece model file or a Hugging Face tokenizer.json (added
    tokens included), or CheckpointError if unreadable."""
    require_file(path, "tokenizer")
    if path.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({exc})") from None
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size())
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({exc})") from None


def check_vocab(args: ModelArgs, tokenizer: Path | None, source: Path) -> None:
    """The model's vocab_size must equal the tokenizer's (ids beyond either would be garbage)."""
    if tokenizer is None:
        return
    n = tokenizer_vocab_size(tokenizer)
    if n != args.vocab_size:
        raise CheckpointError(
            f"{source}: vocab_size is {args.vocab_size} but the tokenizer {tokenizer} has "
            f"{n} pieces; they must agree"
        )


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def build_on_meta(args: ModelArgs) -> Transformer:
    """The model's skeleton: parameters on the meta device, no memory allocated."""
    with torch.device("meta"):
        return Transformer(args)


def release_pages(t: Tensor) -> None:
    """Drop the resident pages of a memory-mapped CPU tensor we no longer need.

    Pages of a read-only private file mapping stay counted in RSS after being read; telling
    the kernel MADV_DONTNEED frees them (a later read would fault them back in from the file).
    Only pages entirely inside the tensor are dropped. Callers pass only tensors read from a
    private file mapping (never heap memory, whose contents this would zero). A tensor still
    in use stays correct: its pages fault back in from the file. No-op off Linux.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = (start + page - 1) // page * page
    length = (end // page * page) - first
    if length > 0:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), 4)  # MADV_DONTNEED


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def progress_bar(items: Iterable, total: int, desc: str, enabled: bool) -> Iterator:
    """tqdm over `items` when enabled, else the items unchanged."""
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit="tensor", leave=False))


Quantiser = Callable[[nn.Module, str, Tensor], bool]


def assemble(
    args: ModelArgs,
    tensors: TensorStream,
    source: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tie_allowed: bool,
    quantise: Quantiser | None = None,
    fuse: bool = False,
) -> Transformer:
    """Bind a stream of (Meta name, tensor) to a fresh model; see the module docstring.

    tie_allowed: a missing output.weight means the output shares tok_embeddings' weight.
    quantise(model, name, tensor as read) -> True when it consumed the tensor (8-bit mode).
    Streams drop the resident pages of their file-mapped tensors once each is consumed.
    fuse: join wq|wk|wv and w1|w3 on the host as they arrive (fusion.StreamFuser), so only
    the fused weights reach the device.
    """
    model = build_on_meta(args)
    shapes = expected_shapes(model)
    state: dict[str, Tensor] = {}
    seen: set[str] = set()
    fuser = StreamFuser() if fuse and quantise is None else None
    try:
        for name, raw in tensors:
            if name in IGNORABLE_KEYS:
                continue
            _check_entry(name, raw, shapes, seen, source)
            seen.add(name)
            if quantise is not None and quantise(model, name, raw):
                check_finite(raw, name, source)
                continue
            consumed, fused = (False, None)
            if fuser is not None:  # each part checked as read, so errors name its Meta key
                consumed, fused = fuser.add(name, check_finite(raw, name, source))
            if fused is not None:
                joined, read = fused
                state[joined] = check_finite(read.to(device=device, dtype=dtype), joined,
                                             source, read)
            if not consumed:
                state[name] = check_finite(raw.to(device=device, dtype=dtype), name, source, raw)
    finally:
        # A refusal mid-stream: close the stream now (its files, and a progress bar that
        # would otherwise stay on screen in front of the one-line error).
        close = getattr(tensors, "close", None)
        if close is not None:
            close()
    _tie_or_fail(state, seen, shapes, source, tie_allowed)
    if fuser is not None:
        model.fuse_projections()  # the skeleton (meta tensors) takes the fused names
    _bind(model, state, strict=quantise is None, source=source)
    return finish(model, device)


def _check_entry(
    name: str, t: Tensor, shapes: dict[str, tuple[int, ...]], seen: set[str], source: Path
) -> None:
    if name not in shapes:
        raise CheckpointError(f"{source}: unexpected key {name!r} (not a LLaMA-2 parameter)")
    if tuple(t.shape) != shapes[name]:
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shapes[name]}"
        )
    if not t.is_floating_point():
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected floats")
    if name in seen:
        raise CheckpointError(f"{source}: key {name!r} appears twice")


def check_finite(t: Tensor, name: str, source: Path, read: Tensor | None = None) -> Tensor:
    """`t` itself, or CheckpointError when it holds NaN or infinity (corrupt weights would
    otherwise load and only show as garbage text or a sampling error).

    One reduction per tensor, no temporary: a sum is finite whenever every element is (it
    runs at memory speed, ~50x cheaper than isfinite().all() on this CPU); only a non-finite
    sum pays for the exact count. `read`: the tensor as read from the file, to tell a corrupt
    file from values beyond the range of the dtype `t` was converted to.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return t
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return t  # the sum overflowed on finite values
    if read is not None and read is not t and bool(torch.isfinite(read).all()):
        raise CheckpointError(
            f"{source}: tensor {name!r}: {n_bad} value(s) overflow {t.dtype} (largest "
            f"|value| {read.abs().max().item():.3g}); load it in a wider dtype"
        )
    n_nan = int(torch.isnan(t).sum())
    raise CheckpointError(
        f"{source}: tensor {name!r} holds {n_nan} NaN and {n_bad - n_nan} infinite value(s) "
        f"out of {t.numel()}: the weights are corrupt"
    )


def _tie_or_fail(
    state: dict[str, Tensor],
    seen: set[str],
    shapes: dict[str, tuple[int, ...]],
    source: Path,
    tie_allowed: bool,
) -> None:
    missing = [n for n in shapes if n not in seen]
    if missing == ["output.weight"] and tie_allowed:
        state["output.weight"] = state["tok_embeddings.weight"]
        missing = []
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {shown}")


def _bind(model: Transformer, state: dict[str, Tensor], strict: bool, source: Path) -> None:
    tied = state.get("output.weight") is state.get("tok_embeddings.weight")
    result = model.load_state_dict(state, strict=strict, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{source}: unexpected keys {result.unexpected_keys}")
    if tied:
        model.output.weight = model.tok_embeddings.weight
        model.invalidate_routes()


def finish(model: Transformer, device: torch.device) -> Transformer:
    """Eval mode, and real RoPE tables where the model keeps them as buffers: built on the
    meta device those are meta tensors (a model that builds its tables lazily needs nothing).
    """
    buffers = dict(model.named_buffers(recurse=False))
    if "rope_cos" in buffers and "rope_sin" in buffers:
        a = model.args
        cos, sin = rope_tables(a.max_seq_len, a.head_dim, a.rope_theta)
        model.rope_cos = cos.to(device)
        model.rope_sin = sin.to(device)
    return model.eval()


@dataclass
class Source:
    """What a format module hands to `load`: the shape, the tensors, and how to bind them."""

    args: ModelArgs
    tensors: TensorStream
    count: int
    tie_allowed: bool
    origin: Path | None = None  # the file named in errors, when there is a single one
    metadata: dict[str, Any] | None = None  # GGUF: the file's metadata, for LoadedModel
