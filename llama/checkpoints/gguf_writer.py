"""Write a model as a GGUF file with the `gguf` package's GGUFWriter (tests and benches).

The layout is what llama.cpp's converter writes for the LLaMA architecture: `llama.*` shape
metadata, tensors under llama.cpp's names with wq/wk in Meta's interleaved order (the order
`gguf.py` reads unchanged), and optionally a SentencePiece-kind tokenizer
(`tokenizer.ggml.model = "llama"`: tokens, scores and token types read from a
tokenizer.model). Weights are stored as F32, F16, BF16 or quantised with gguf's own
quantiser (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); `blocks` writes ready-made bytes of any type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import Tensor

from llama.checkpoints.gguf import _LAYER, _TOP, ARCH, meta_name
from llama.config import ModelArgs

_TO_GGUF = {v: k for k, v in _TOP.items()} | {v: k for k, v in _LAYER.items()}


def gguf_name(meta: str) -> str:
    """Meta parameter name -> llama.cpp's (the inverse of gguf.meta_name)."""
    stem = meta[: -len(".weight")]
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        name = f"blk.{i}.{_TO_GGUF[rest]}.weight"
    else:
        name = f"{_TO_GGUF[stem]}.weight"
    assert meta_name(name) == meta
    return name


def gguf_metadata(args: ModelArgs, tokenizer: Path | None = None) -> dict[str, Any]:
    """The metadata llama.cpp's converter writes for `args` (and a SentencePiece tokenizer)."""
    out: dict[str, Any] = {
        "general.architecture": ARCH,
        f"{ARCH}.block_count": args.n_layers,
        f"{ARCH}.context_length": args.max_seq_len,
        f"{ARCH}.embedding_length": args.dim,
        f"{ARCH}.feed_forward_length": args.ffn_hidden_dim,
        f"{ARCH}.attention.head_count": args.n_heads,
        f"{ARCH}.attention.head_count_kv": args.kv_heads,
        f"{ARCH}.rope.freq_base": float(args.rope_theta),
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(args.norm_eps),
        f"{ARCH}.rope.dimension_count": args.head_dim,
        f"{ARCH}.vocab_size": args.vocab_size,
    }
    if tokenizer is not None:
        out |= sentencepiece_metadata(tokenizer)
    return out


def sentencepiece_metadata(path: Path) -> dict[str, Any]:
    """tokenizer.ggml.* for a SentencePiece model: tokens, scores and types as llama.cpp's
    converter writes them, plus the BOS/EOS/unknown ids and add_bos_token."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    ids = range(sp.vocab_size())
    out = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in ids],
        "tokenizer.ggml.token_type": [_token_type(sp, i) for i in ids],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id())):
        if value >= 0:
            out[f"tokenizer.ggml.{key}_token_id"] = value
    return out


def _token_type(sp: Any, i: int) -> int:
    """GGUF's token type as llama.cpp's converter assigns it: 2 unknown, 3 control, 5 unused,
    6 byte, else 1 normal (user-defined pieces too: the converter does not tell them apart)."""
    kinds = ((sp.is_unknown, 2), (sp.is_control, 3), (sp.is_unused, 5), (sp.is_byte, 6))
    return next((kind for test, kind in kinds if test(i)), 1)


def write_gguf(
    state: dict[str, Tensor],
    args: ModelArgs,
    path: str | Path,
    qtype: str = "F32",
    tokenizer: Path | None = None,
    tied: bool = False,
    metadata: dict[str, Any] | None = None,
    blocks: dict[str, tuple[np.ndarray, str]] | None = None,
) -> Path:
    """One GGUF file. qtype: the type of the 2-D weights (norms stay F32). tied: no
    output.weight. metadata: replaces `gguf_metadata(args, tokenizer)` (tests edit it).
    blocks: Meta name -> (uint8 bytes as (rows, bytes per row), type name), written as is
    in place of that tensor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = gguf_metadata(args, tokenizer) if metadata is None else metadata
    writer = gguf.GGUFWriter(path, str(meta.get("general.architecture", ARCH)))
    for key, value in meta.items():
        if key != "general.architecture":
            _add_value(writer, key, value)
    for name, t in state.items():
        if tied and name == "output.weight":
            continue
        if blocks and name in blocks:
            raw, kind = blocks[name]
            writer.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            _add_tensor(writer, gguf_name(name), t, qtype if t.dim() == 2 else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def _add_tensor(writer: gguf.GGUFWriter, name: str, t: Tensor, qtype: str) -> None:
    data = t.detach().float().cpu().numpy()
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        writer.add_tensor(name, data)
    elif qtype == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
