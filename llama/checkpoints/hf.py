"""Hugging Face LlamaForCausalLM checkpoints: config.json + safetensors (single, or sharded
with model.safetensors.index.json) or pytorch_model*.bin.

HF's conversion script permutes wq and wk so that RoPE can rotate the two halves of each
head (rotate_half) instead of interleaved pairs. We undo it per head: wq with n_heads, wk
with n_kv_heads (using n_heads for wk is a known bug of several ports; it only shows on
GQA/MQA models).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor

from llama.checkpoints.common import (
    CheckpointError,
    Source,
    TensorStream,
    build_on_meta,
    config_error,
    expected_shapes,
    release_pages,
    require_file,
)
from llama.checkpoints.io import (
    check_safetensors_size,
    load_pth,
    open_safetensors,
    read_safetensor,
    safetensors_keys,
)
from llama.config import ConfigError, ModelArgs
from llama.hf_config import load_hf_config

_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files_present(d: Path) -> bool:
    return (
        any(d.glob("*.safetensors"))
        or any(d.glob("pytorch_model*.bin"))
        or (d / ST_INDEX).is_file()
        or (d / BIN_INDEX).is_file()
    )


def meta_name(hf_name: str) -> str | None:
    """HF parameter name -> Meta name; None for names we do not know."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER_KEY.fullmatch(hf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's per-head permutation of wq/wk rows: (n_heads * D, dim) -> same shape.

    HF stores, per head, the rows of the even pair members then the odd ones; Meta interleaves
    them: row 2i <- i, row 2i+1 <- D/2 + i.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, dim)


def permute(w: Tensor, n_heads: int) -> Tensor:
    """Meta -> HF layout of wq/wk (the inverse of `unpermute`)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, dim)


def read_config(directory: Path) -> tuple[ModelArgs, bool]:
    """config.json -> (args, tie_word_embeddings); fields we cannot honour are refused."""
    path = require_file(directory / "config.json", "config.json")
    try:
        return load_hf_config(path)
    except ConfigError as exc:
        raise config_error(exc) from None


def open_source(directory: Path, tokenizer: Path | None) -> Source:
    args, tied = read_config(directory)
    files = _weight_files(directory)
    shapes = expected_shapes(build_on_meta(args))
    if files[0].suffix == ".safetensors":
        keys = {f: _safetensors_keys(f) for f in files}
    else:
        keys = {f: list(load_pth(f)) for f in files}
    count = sum(len(k) for k in keys.values())
    origin = files[0] if len(files) == 1 else None
    return Source(
        args, _stream(files, keys, args, shapes, tied), count, tie_allowed=tied, origin=origin
    )


def _safetensors_keys(path: Path) -> list[str]:
    check_safetensors_size(path)
    return safetensors_keys(path)


def _weight_files(d: Path) -> list[Path]:
    for index, single in ((ST_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (d / index).is_file():
            return _indexed_files(d / index)
        if (d / single).is_file():
            return [d / single]
    shards = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if len(shards) == 1:
        return shards
    raise CheckpointError(
        f"{d}: found {len(shards)} weight files but no {ST_INDEX} / {BIN_INDEX} saying which "
        "tensor lives where"
    )


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{index}: expected JSON with a 'weight_map' object ({exc})"
        ) from None
    files = [index.parent / n for n in names]
    for f in files:
        require_file(f, f"shard listed in {index.name}")
    return files


def _stream(
    files: list[Path],
    keys: dict[Path, list[str]],
    args: ModelArgs,
    shapes: dict[str, tuple[int, ...]],
    tied: bool,
) -> TensorStream:
    for path in files:
        if path.suffix == ".safetensors":
            with open_safetensors(path) as handle:
                for key in keys[path]:
                    yield from _convert(
                        path, key, read_safetensor(handle, path, key), args, shapes, tied
                    )
        else:
            for key, t in load_pth(path).items():
                yield from _convert(path, key, t, args, shapes, tied)


def _convert(
    path: Path,
    key: str,
    t: Tensor,
    args: ModelArgs,
    shapes: dict[str, tuple[int, ...]],
    tied: bool,
) -> TensorStream:
    """Rename one HF tensor and un-permute it when it is wq/wk; nothing for ignored ones."""
    if _INV_FREQ.fullmatch(key) or (tied and key == "lm_head.weight"):
        return
    name = meta_name(key)
    if name is None:
        raise CheckpointError(f"{path}: unexpected key {key!r} (not a LlamaForCausalLM weight)")
    if name in shapes and tuple(t.shape) != shapes[name]:
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {shapes[name]}"
        )
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        heads = args.n_heads if name.endswith("wq.weight") else args.kv_heads
        yield name, unpermute(t, heads)
    else:
        yield name, t
    release_pages(t)
