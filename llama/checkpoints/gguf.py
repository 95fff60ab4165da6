"""GGUF checkpoints (llama.cpp's single-file format) of the LLaMA architecture.

The file holds the model's shape and tokenizer as metadata (`llama.*`, `tokenizer.*` keys)
and every tensor under llama.cpp's names (token_embd, blk.N.attn_q, ...), each in its own
type (F32, F16, BF16 or a ggml block quantisation). We parse the container ourselves
(`gguf_file`), map the file, and dequantise tensor by tensor (`gguf_quants`) so peak RAM
stays near the size of the dequantised model.

Q/K layout: llama.cpp's converter permutes Hugging Face's wq/wk rows back to Meta's
interleaved-pair order, so GGUF tensors need no permutation here. Tested, not assumed: we load
them unchanged and match transformers, which un-permutes GGUF q/k for its half-rotation RoPE
(tests/test_gguf_parity.py: random MHA/GQA/MQA files and SmolLM2), and llama.cpp's own greedy
ids on files its converter wrote (tests/test_gguf.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama.checkpoints.common import (
    CheckpointError,
    Source,
    TensorStream,
    build_on_meta,
    expected_shapes,
    release_pages,
)
from llama.checkpoints.gguf_file import MAGIC, GGUFFile, TensorInfo, parse
from llama.checkpoints.gguf_quants import TYPES, dequantize, nbytes, type_name
from llama.config import ConfigError, ModelArgs

ARCH = "llama"
SUFFIX = ".gguf"
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
          "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
          "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
          "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}  # fmt: skip
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Rope variants we do not implement, named so a file that needs them is refused, not misread.
_SCALING_KEYS = ("rope.scaling.type", "rope.scaling.factor", "rope.scale_linear")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All of the file's metadata as plain Python values, keyed as in the file.

    Strings are str, integers int, floats float, booleans bool, arrays lists of those (e.g.
    `tokenizer.ggml.tokens` list[str], `tokenizer.ggml.scores` list[float],
    `tokenizer.ggml.token_type` list[int]). Raises CheckpointError naming the file (and the
    key being read) on a truncated file, a wrong magic or an unsupported version.
    """
    return parse(Path(path), with_tensors=False).metadata


def model_args(path: str | Path) -> ModelArgs:
    """The ModelArgs a GGUF file describes, without reading its tensors."""
    f = parse(Path(path))
    return read_args(f, {t.name: t for t in f.tensors})


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.glob("*.gguf")) if p.is_file()]


def meta_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> Meta name; None for names we do not know."""
    if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in _TOP:
        return _TOP[gguf_name[: -len(".weight")]] + ".weight"
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def open_source(path: Path) -> Source:
    """A GGUF file as a Source: args from its metadata, tensors dequantised as they stream."""
    f = parse(path)
    by_name = {t.name: t for t in f.tensors}
    args = read_args(f, by_name)
    expected = expected_shapes(build_on_meta(args))
    for t in f.tensors:
        _check_tensor(f, t, expected)
    tied = "output.weight" not in by_name
    stream = _stream(path, f.tensors)
    return Source(args, stream, len(f.tensors), tie_allowed=tied, origin=path,
                  metadata=f.metadata)  # fmt: skip


def read_args(f: GGUFFile, by_name: dict[str, TensorInfo]) -> ModelArgs:
    """ModelArgs from the `llama.*` metadata; vocab_size from token_embd's rows."""
    _check_architecture(f)
    _refuse_rope_scaling(f)
    get = _getter(f)
    n_heads = get("attention.head_count")
    kwargs = dict(
        dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads), hidden_dim=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=get("rope.freq_base", 10000.0, kind=float),
        max_seq_len=get("context_length"), vocab_size=_vocab_size(f, by_name),
    )  # fmt: skip
    try:
        args = ModelArgs(**kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{f.path}: llama.* metadata: {exc}") from None
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, args.head_dim) != args.head_dim:
            raise CheckpointError(
                f"{f.path}: {ARCH}.{key} is {get(key)}, expected the head size "
                f"{args.head_dim} (embedding_length / head_count); partial rotary and "
                "other head sizes are not supported"
            )
    return args


def _check_architecture(f: GGUFFile) -> None:
    arch = f.metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{f.path}: missing metadata key 'general.architecture'")
    if arch != ARCH:
        raise CheckpointError(
            f"{f.path}: general.architecture is {arch!r}; only {ARCH!r} (the LLaMA "
            "architecture) is supported"
        )


def _refuse_rope_scaling(f: GGUFFile) -> None:
    for key in _SCALING_KEYS:
        value = f.metadata.get(f"{ARCH}.{key}")
        if value not in (None, "none", 0.0, 1.0):
            raise CheckpointError(
                f"{f.path}: {ARCH}.{key} is {value!r}: RoPE scaling is not supported "
                "(LLaMA-2 has none)"
            )
    if any(t.name == "rope_freqs.weight" for t in f.tensors):
        raise CheckpointError(
            f"{f.path}: tensor 'rope_freqs.weight' (Llama-3.1-style RoPE frequency "
            "scaling) is not supported"
        )


_MISSING = object()


def _getter(f: GGUFFile):  # -> (key, default=_MISSING, kind=int) -> value
    def get(key: str, default: Any = _MISSING, kind: type = int) -> Any:
        full = f"{ARCH}.{key}"
        value = f.metadata.get(full, default)
        if value is _MISSING:
            raise CheckpointError(f"{f.path}: missing metadata key {full!r}")
        ok = isinstance(value, (int, float) if kind is float else int)
        if not ok or isinstance(value, bool):
            what = "a number" if kind is float else "an integer"
            raise CheckpointError(
                f"{f.path}: metadata key {full!r}: expected {what}, found {value!r}"
            )
        return kind(value)

    return get


def _vocab_size(f: GGUFFile, by_name: dict[str, TensorInfo]) -> int:
    """Rows of token_embd; the tokenizer's list and llama.vocab_size must agree with it."""
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    rows = embd.shape[0]
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != rows:
        raise CheckpointError(
            f"{f.path}: tokenizer.ggml.tokens has {len(tokens)} tokens but "
            f"'token_embd.weight' has {rows} rows; they must agree"
        )
    declared = f.metadata.get(f"{ARCH}.vocab_size", rows)
    if declared != rows:
        raise CheckpointError(
            f"{f.path}: {ARCH}.vocab_size is {declared!r} but 'token_embd.weight' has "
            f"{rows} rows; they must agree"
        )
    return rows


def _check_tensor(f: GGUFFile, t: TensorInfo, expected: dict[str, tuple[int, ...]]) -> None:
    """Name, shape, type and byte range of one tensor, before anything is read."""
    name = meta_name(t.name)
    if name is None or name not in expected:
        raise CheckpointError(f"{f.path}: unexpected tensor {t.name!r} (not a LLaMA weight)")
    if t.shape != expected[name]:
        raise CheckpointError(
            f"{f.path}: tensor {t.name!r} has shape {t.shape}, expected {expected[name]}"
        )
    if t.ggml_type not in TYPES:
        supported = ", ".join(v[0] for v in TYPES.values())
        raise CheckpointError(
            f"{f.path}: tensor {t.name!r} has type {type_name(t.ggml_type)}, which is not "
            f"supported (supported: {supported})"
        )
    block = TYPES[t.ggml_type][1]
    if t.dims[0] % block:
        raise CheckpointError(
            f"{f.path}: tensor {t.name!r}: rows of {t.dims[0]} values are not whole "
            f"{type_name(t.ggml_type)} blocks of {block}"
        )
    end = t.offset + nbytes(t.ggml_type, int(np.prod(t.dims)))
    if end > f.size:
        raise CheckpointError(
            f"{f.path}: truncated GGUF file: tensor {t.name!r} needs bytes up to {end}, "
            f"the file has {f.size}"
        )


def _stream(path: Path, tensors: list[TensorInfo]) -> TensorStream:
    # Copy-on-write mapping: tensors without a copy, and the file is never modified.
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    for t in tensors:
        raw = data[t.offset : t.offset + nbytes(t.ggml_type, int(np.prod(t.dims)))]
        yield meta_name(t.name), dequantize(raw, t.ggml_type, t.shape)
        release_pages(raw)
