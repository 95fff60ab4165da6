"""Tokenizers from the checkpoint: one `Tokenizer` interface, two backends.

- SentencePiece (spm.py): tokenizer.model files, and GGUF `tokenizer.ggml.model = "llama"`.
- Byte-level BPE through `tokenizers` (bpe.py): HF tokenizer.json, and GGUF "gpt2".

`load_tokenizer(path, metadata)` picks the backend from the file and reads BOS/EOS/add_bos and
the chat template the checkpoint carries (GGUF `tokenizer.chat_template`, or the
`chat_template` of a tokenizer_config.json beside tokenizer.json / tokenizer.model);
`open_tokenizer(loaded)` does it for a `LoadedModel`. `StreamDecoder` (stream.py) streams
exact text on both backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama.tokenizer import bpe, spm
from llama.tokenizer.base import Part, Tokenizer, TokenizerError, check_text
from llama.tokenizer.stream import REPLACEMENT_CHAR, StreamDecoder
from llama.tokenizer.template import end_of_turn_id

if TYPE_CHECKING:
    from llama.checkpoints.common import LoadedModel

__all__ = [
    "REPLACEMENT_CHAR",
    "Part",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "check_text",
    "load_tokenizer",
    "open_tokenizer",
]

CONFIG_NAME = "tokenizer_config.json"


def load_tokenizer(path: str | Path, metadata: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer in `path`: a tokenizer.model, a tokenizer.json or a .gguf file (whose
    metadata is read when not given). Raises TokenizerError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    if path.suffix == ".gguf":
        tok = _from_gguf(path, metadata if metadata is not None else _gguf_metadata(path))
    else:
        config_file = path.parent / CONFIG_NAME
        config = bpe.read_json(config_file) if config_file.is_file() else {}
        if path.suffix == ".json":
            tok = bpe.from_tokenizer_json(path, config)
        else:
            tok = spm.from_file(path)
        _set_template(tok, config.get("chat_template"), f"{config_file}: chat_template")
    return tok


def open_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer of a loaded checkpoint (GGUF: its metadata; else the file beside it)."""
    if loaded.tokenizer_path is None:
        raise TokenizerError(
            f"{loaded.path}: no tokenizer found beside the checkpoint (tokenizer.model or "
            "tokenizer.json); pass one with --tokenizer"
        )
    return load_tokenizer(loaded.tokenizer_path, getattr(loaded, "metadata", None))


def _from_gguf(path: Path, meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens: missing (no vocabulary in the file)")
    if kind == "llama":
        tok: Tokenizer = spm.from_gguf(path, meta)
    elif kind == "gpt2":
        tok = bpe.from_gguf(path, meta)
    else:
        raise TokenizerError(
            f"{path}: tokenizer.ggml.model: expected 'llama' (SentencePiece) or 'gpt2' "
            f"(byte-level BPE), found {kind!r}"
        )
    _set_template(tok, meta.get("tokenizer.chat_template"), f"{path}: tokenizer.chat_template")
    return tok


def _set_template(tok: Tokenizer, template: Any, source: str) -> None:
    if template is None:
        return
    if isinstance(template, list):  # HF: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise TokenizerError(
            f"{source}: expected a Jinja template string, found {template!r}"[:300]
        )
    tok.chat_template, tok.chat_template_source = template, source
    eot = end_of_turn_id(tok)
    if eot is not None:
        tok.add_stop_id(eot)


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from llama.checkpoints.gguf import read_metadata

    return read_metadata(path)
