"""GGUF checkpoints (llama.cpp's single-file format): metadata, ModelArgs and tensors.

The file is parsed by `gguf_file` (a memory map); tensors are dequantised one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama.checkpoints.gguf_file import parse

SUFFIX = ".gguf"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All of the file's metadata as plain Python values, keyed as in the file.

    Strings are str, integers int, floats float, booleans bool, arrays lists of those (e.g.
    `tokenizer.ggml.tokens` list[str], `tokenizer.ggml.scores` list[float],
    `tokenizer.ggml.token_type` list[int]). Raises CheckpointError naming the file (and the
    key being read) on a truncated file, a wrong magic or an unsupported version.
    """
    return parse(Path(path), with_tensors=False).metadata
