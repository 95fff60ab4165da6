"""Meta's original release: params.json + consolidated.NN.pth + tokenizer.model.

13B and 70B come as 2 and 8 model-parallel shards. Each shard holds a slice of every matrix:
column-parallel layers (wq, wk, wv, w1, w3, output) are split along dim 0 (their outputs),
row-parallel ones (wo, w2) and the embedding along dim 1; norms are replicated. params.json
says vocab_size -1: the tokenizer's vocabulary size is used. `rope.freqs` is ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from llama.checkpoints.common import (
    IGNORABLE_KEYS,
    CheckpointError,
    Source,
    TensorStream,
    build_on_meta,
    expected_shapes,
    release_pages,
    tokenizer_vocab_size,
)
from llama.checkpoints.io import load_pth
from llama.checkpoints.native import read_args
from llama.config import ModelArgs
from llama.rope import rope_frequencies

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_DIM1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def shard_files(directory: Path) -> list[Path]:
    """consolidated.NN.pth files in shard order."""
    found = [p for p in directory.glob("consolidated.*.pth") if _SHARD.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_SHARD.fullmatch(p.name).group(1)))


def merge_axis(name: str) -> int | None:
    """Concatenation axis of a sharded tensor; None for replicated ones (norms)."""
    if name.endswith("norm.weight"):
        return None
    return 1 if name.endswith(_DIM1) else 0


def open_source(directory: Path, tokenizer: Path | None) -> Source:
    files = shard_files(directory)
    numbers = [int(_SHARD.fullmatch(p.name).group(1)) for p in files]
    if numbers != list(range(len(files))):
        raise CheckpointError(
            f"{directory}: shard files must be numbered 00..{len(files) - 1:02d}, found "
            f"{', '.join(p.name for p in files)}"
        )
    if len(files) > 8:
        raise CheckpointError(f"{directory}: expected 1 to 8 shards, found {len(files)}")
    args = _args(directory, tokenizer)
    shards = [load_pth(p) for p in files]
    _check_shards(directory, files, shards, args)
    check_rope_freqs(files[0], shards[0].get("rope.freqs"), args)
    count = len([k for k in shards[0] if k not in IGNORABLE_KEYS])
    origin = files[0] if len(files) == 1 else None
    return Source(args, _stream(shards), count, tie_allowed=False, origin=origin)


def _args(directory: Path, tokenizer: Path | None) -> ModelArgs:
    vocab = tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    if vocab is None and _params_vocab_unset(directory):
        raise CheckpointError(
            f"{directory}: missing tokenizer.model; params.json has vocab_size -1, so the "
            "vocabulary size must come from the tokenizer"
        )
    return read_args(directory, vocab)


def _params_vocab_unset(directory: Path) -> bool:
    try:
        raw = json.loads((directory / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read_args reports the real problem
    return isinstance(raw, dict) and raw.get("vocab_size", -1) in (-1, None)


def _check_shards(
    directory: Path, files: list[Path], shards: list[dict[str, Tensor]], args: ModelArgs
) -> None:
    """Same keys in every shard, and slices that add up to the model's shapes."""
    keys = set(shards[0])
    for path, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:5]
            raise CheckpointError(f"{path}: keys differ from {files[0].name}: {diff}")
    shapes = expected_shapes(build_on_meta(args))
    for name in shards[0]:
        if name in shapes:
            _check_slices(name, [tuple(s[name].shape) for s in shards], shapes[name], files)


def check_rope_freqs(path: Path, freqs: Tensor | None, args: ModelArgs) -> None:
    """Meta's rope.freqs records the frequencies the model was trained with: they must be the
    ones params.json's rope_theta gives (a params.json without the 1e6 of a CodeLlama, or
    frequencies rescaled as Llama 3.1 does, would otherwise load silently)."""
    if freqs is None:
        return
    expected = rope_frequencies(args.head_dim, args.rope_theta)
    found = freqs.float()
    # rtol: Meta stores the table in bf16 (3 significant digits).
    if found.shape == expected.shape and torch.allclose(found, expected, rtol=1e-2, atol=0):
        return
    implied = ""
    if found.dim() == 1 and len(found) > 1 and 0 < found[1].item() < 1:
        implied = (
            f" (the file's table implies rope_theta ~{found[1].item() ** (-args.head_dim / 2):.3g})"
        )
    raise CheckpointError(
        f"{path}: tensor 'rope.freqs' does not match params.json's rope_theta "
        f"{args.rope_theta:g} for head_dim {args.head_dim}{implied}; set rope_theta in "
        "params.json (scaled RoPE is not implemented)"
    )


def _check_slices(
    name: str, slices: list[tuple[int, ...]], expected: tuple[int, ...], files: list[Path]
) -> None:
    """The shards' slices of `name` must concatenate (or, replicated, equal) `expected`."""
    axis = merge_axis(name)
    if len(slices) == 1 or axis is None or len(expected) != 2:
        found = slices[0] if all(s == slices[0] for s in slices) else slices
    elif any(len(s) != 2 or s[1 - axis] != slices[0][1 - axis] for s in slices):
        found = slices
    else:
        found = tuple(sum(s[axis] for s in slices) if d == axis else slices[0][d] for d in range(2))
    if found != expected:
        raise CheckpointError(
            f"{files[0].parent}: tensor {name!r}: {len(files)} shard(s) with slices "
            f"{slices} give {found}, expected {expected} (wrong number of shards, or a "
            "params.json for another model?)"
        )


def _stream(shards: list[dict[str, Tensor]]) -> TensorStream:
    for name in list(shards[0]):
        if name in IGNORABLE_KEYS:
            continue
        parts = [s.pop(name) for s in shards]
        axis = merge_axis(name)
        if len(parts) == 1 or axis is None or parts[0].dim() != 2:
            yield name, parts[0]
        else:
            yield name, torch.cat(parts, dim=axis)
        for p in parts:
            release_pages(p)
