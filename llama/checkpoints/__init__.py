"""Load LLaMA-2 checkpoints in every on-disk format people have, and save the native one.

Formats (one module each; `detect` tells them apart by the files present, never by the
directory's name):
- "meta":    params.json + consolidated.NN.pth (1..8 model-parallel shards) + tokenizer.model
- "hf":      config.json + model*.safetensors (index json when sharded) or pytorch_model*.bin
- "llama2c": one llama2.c .bin (legacy or v1 "ak42"); the path may be the file itself
- "native":  params.json + model.safetensors (+ tokenizer.model), what `save` writes
- "gguf":    one llama.cpp .gguf file (weights, shape and tokenizer in one); the path may be
             the file itself or a directory holding exactly one

`load` builds the model on the meta device, streams memory-mapped tensors into it (converting
or quantising each as it arrives), and returns a `LoadedModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llama import memory
from llama.checkpoints import gguf, hf, llama2c, meta, native
from llama.checkpoints.common import (
    TOKENIZER_NAME,
    CheckpointError,
    LoadedModel,
    Source,
    assemble,
    check_vocab,
    config_error,
    progress_bar,
    release_pages,
    require_file,
)
from llama.config import ConfigError, ModelArgs

__all__ = ["CheckpointError", "LoadedModel", "detect", "load", "save"]

save = native.save

FORMATS = ("meta", "hf", "llama2c", "native", "gguf")


def detect(path: str | Path) -> str:
    """Name the checkpoint format at `path` (a directory, a .gguf or a llama2.c .bin file).

    Raises CheckpointError when nothing matches or when one directory holds two formats.
    """
    path = Path(path)
    if path.is_file():
        # A .gguf file without GGUF's magic is a damaged GGUF: gguf.open_source says so.
        if gguf.is_gguf(path) or path.suffix == gguf.SUFFIX:
            return "gguf"
        try:
            llama2c.read_header(path)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc} (only GGUF and llama2.c checkpoints load from a single file; for Meta, "
                "Hugging Face and native checkpoints pass their directory)"
            ) from None
        return "llama2c"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    found = _formats_in(path)
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds more than one checkpoint format ({', '.join(found)}); "
            "keep one per directory"
        )
    if not found:
        raise CheckpointError(f"{path}: {_why_nothing(path)}")
    return found[0]


def _formats_in(d: Path) -> list[str]:
    params, config = (d / "params.json").is_file(), (d / "config.json").is_file()
    found = []
    if params and meta.shard_files(d):
        found.append("meta")
    if config and hf.weight_files_present(d):
        found.append("hf")
    if llama2c_files(d):
        found.append("llama2c")
    if params and (d / native.WEIGHTS_NAME).is_file():
        found.append("native")
    if gguf.gguf_files(d):
        found.append("gguf")
    return found


def _why_nothing(d: Path) -> str:
    if meta.shard_files(d):
        return "missing params.json beside the consolidated.*.pth shards"
    if (d / native.WEIGHTS_NAME).is_file() or hf.weight_files_present(d):
        return "missing config.json (Hugging Face) or params.json (native) beside the weights"
    if (d / "params.json").is_file() or (d / "config.json").is_file():
        return "a config file but no weights (consolidated.*.pth, *.safetensors, *.bin)"
    return ("no checkpoint found: expected params.json + consolidated.*.pth (Meta), "
            "config.json + *.safetensors (Hugging Face), params.json + model.safetensors "
            "(native), a .gguf file or a llama2.c .bin")


def llama2c_files(d: Path) -> list[Path]:
    """The .bin files in `d` whose header and size match a llama2.c checkpoint."""
    return [p for p in sorted(d.glob("*.bin")) if llama2c.looks_like_llama2c(p)]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, load_in_8bit: bool = False) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow on AVX2 CPUs); fp16 on MPS; on CUDA bf16 where the
    GPU computes it natively (Ampere and later), else fp16 (T4, V100: bf16 there is emulated;
    Meta's reference runs in fp16). 8-bit on CUDA: fp16, the dtype LLM.int8 computes in
    (bitsandbytes casts any other activation dtype at every int8 product)."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 and not load_in_8bit else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
    max_seq_len: int | None = None,
    tokenizer_path: str | Path | None = None,
    progress: bool = True,
    fuse: bool = True,
    weights: str | None = None,
    fit_context: bool = False,
) -> LoadedModel:
    """Load the checkpoint at `path` (any format `detect` knows) ready for inference.

    device: default cuda when available, else cpu. dtype: default `default_dtype`.
    load_in_8bit: the block Linears become bitsandbytes Linear8bitLt, quantised one by one
    while loading. max_seq_len: overrides the config's (it sizes RoPE tables and KV caches).
    tokenizer_path: default tokenizer.model, else tokenizer.json, beside the weights (llama2.c:
    also the single *.model file there; GGUF: the .gguf file itself, whose metadata holds the
    tokenizer).
    The model's vocab_size must equal the tokenizer's.
    fuse: `Transformer.prepare_for_decode` (fused projections, output layout), dropping the
    mapped pages of the weights it replaces; False leaves the modules as the file has them.
    weights: "fp32", "bf16" or "fp16" (the same as that dtype), or "int8": every Linear
    weight (blocks, output) becomes llama.int8.Int8Linear, quantised while loading (a tied
    output: an int8 copy of the embedding); the rest stays in `dtype`.
    Before reading any weights, weights + KV cache + RoPE tables + workspace are checked
    against the device's free memory (llama/memory.py): CheckpointError saying what fits.
    fit_context: instead, when max_seq_len is not given, shorten the context to the longest
    that fits (LoadedModel.notice says so).
    """
    path = Path(path)
    fmt = detect(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = _weights_dtype(weights, dtype, load_in_8bit) or default_dtype(device, load_in_8bit)
    tokenizer = _tokenizer(path, fmt, tokenizer_path)
    source = _open(fmt, path, tokenizer)
    if max_seq_len is not None:
        source.args = _with_seq_len(source.args, max_seq_len, path)
    if tokenizer != source.origin:  # a GGUF file's own vocabulary was checked on opening
        check_vocab(source.args, tokenizer, path)
    eight_bit = load_in_8bit or weights == "int8"  # one byte per Linear weight either way
    source.args, notice = _fit_memory(source.args, dtype, device, eight_bit, path,
                                      fit_context and max_seq_len is None)
    quantise = None
    if load_in_8bit:
        from llama.quant import make_quantiser

        quantise = make_quantiser(device)
    elif weights == "int8":
        from llama.int8 import make_quantiser as int8_quantiser

        quantise = int8_quantiser(device)
    stream = progress_bar(source.tensors, source.count, f"loading {path.name}", progress)
    model = assemble(source.args, stream, source.origin or path, device, dtype,
                     tie_allowed=source.tie_allowed, quantise=quantise, fuse=fuse)
    if weights == "int8":
        from llama.int8 import quantise_tied_output

        quantise_tied_output(model)
    if fuse:
        model.prepare_for_decode(release=release_pages)
    return LoadedModel(model, tokenizer, fmt, path, dtype, device, load_in_8bit, notice,
                       metadata=source.metadata)


WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


def _weights_dtype(
    weights: str | None, dtype: torch.dtype | None, load_in_8bit: bool
) -> torch.dtype | None:
    """The dtype `weights` implies (None: `dtype` as given); ValueError on a conflict."""
    if weights is None:
        return dtype
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {', '.join(WEIGHTS)}, found {weights!r}")
    if weights == "int8" and load_in_8bit:
        raise ValueError("weights='int8' and load_in_8bit=True: choose one 8-bit mode")
    implied = WEIGHTS[weights]
    if implied is None:
        return dtype
    if dtype is not None and dtype != implied:
        raise ValueError(f"weights={weights!r} means dtype {implied}, but dtype={dtype} was given")
    return implied
def _fit_memory(
    args: ModelArgs, dtype: torch.dtype, device: torch.device, load_in_8bit: bool, path: Path,
    shorten: bool,
) -> tuple[ModelArgs, str | None]:
    """args as they fit the device's free memory (shortened context when `shorten`)."""
    free = memory.free_bytes(device)
    try:
        memory.check_fits(args, dtype, device, load_in_8bit, free)
        return args, None
    except memory.MemoryBudgetError as exc:
        assert free is not None
        n = memory.fitting_context(args, dtype, load_in_8bit, free) if shorten else 0
        if not n:
            raise CheckpointError(f"{path}: {exc}") from None
    note = (f"context shortened from {args.max_seq_len} to {n} positions to fit the "
            f"{memory.gib(free)} free on {device} (--max-seq-len sets it)")
    return args.replace(max_seq_len=n), note


def _open(fmt: str, path: Path, tokenizer: Path | None) -> Source:
    if fmt == "llama2c":
        file = path if path.is_file() else _single_llama2c(path)
        return llama2c.open_source(file)
    if fmt == "gguf":
        return gguf.open_source(_gguf_file(path))
    return {"meta": meta.open_source, "hf": hf.open_source,
            "native": native.open_source}[fmt](path, tokenizer)


def _single_llama2c(d: Path) -> Path:
    files = llama2c_files(d)
    if len(files) != 1:
        names = ", ".join(p.name for p in files)
        raise CheckpointError(f"{d}: expected one llama2.c .bin file, found {len(files)}: {names}")
    return files[0]


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = gguf.gguf_files(path)
    if len(files) != 1:
        names = ", ".join(p.name for p in files)
        raise CheckpointError(f"{path}: expected one .gguf file, found {len(files)}: {names}")
    return files[0]


def _tokenizer(path: Path, fmt: str, explicit: str | Path | None) -> Path | None:
    if explicit is not None:
        return require_file(Path(explicit), "tokenizer")
    if fmt == "gguf":
        return _gguf_file(path)
    root = path.parent if path.is_file() else path
    for name in (TOKENIZER_NAME, "tokenizer.json"):  # SentencePiece first, as Meta ships it
        if (root / name).is_file():
            return root / name
    if fmt == "llama2c":
        models = sorted(root.glob("*.model"))
        if len(models) == 1:
            return models[0]
    return None


def _with_seq_len(args: Any, max_seq_len: int, path: Path) -> Any:
    try:
        return args.replace(max_seq_len=max_seq_len)
    except ConfigError as exc:
        raise config_error(ConfigError(f"{path}: max_seq_len: {exc}")) from None
