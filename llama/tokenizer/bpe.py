"""Byte-level BPE backend through Hugging Face's `tokenizers` library: HF tokenizer.json
files, and GGUF vocabularies of the "gpt2" kind rebuilt from their tokens and merges.

Control tokens ("<|im_start|>") are added tokens marked special. Literal text is encoded by a
second copy of the tokenizer with `encode_special_tokens` on, which spells a special token's
text as ordinary text; a special token matched inside a literal part is replaced by those ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llama.tokenizer.base import Part, Tokenizer, TokenizerError, inside, literal_spans

CONTROL, USER_DEFINED = 3, 4  # GGUF token types
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the other 68 are moved to U+0100 onwards (a space is "Ġ", a newline "Ċ")."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_OF = _byte_alphabet()

# GGUF `tokenizer.ggml.pre` names: how the text is split before the merges apply.
_GPT2 = "gpt2"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt2": _GPT2,
    "default": _GPT2,
    "smollm": _GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
}


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the checkpoint's BOS/EOS/add_bos."""

    kind = "bpe"

    def __init__(
        self, tok: HFTokenizer, path: Path, bos: str | None, eos: str | None, add_bos: bool
    ) -> None:
        self.path = path
        self._tok = tok
        self._literal = HFTokenizer.from_str(tok.to_str())
        self._literal.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = {
            t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special
        }
        self._special_ids = set(self._special.values())
        self.bos_id = self._required(bos, "bos", optional=True)
        self.eos_id = self._required(eos, "eos", optional=False)
        self.add_bos = add_bos and self.bos_id >= 0
        self._byte_fallback = bool(getattr(tok.model, "byte_fallback", False))
        self._byte_level = "ByteLevel" in str(tok.decoder)
        self.guard_id = self._find_guard()

    def _required(self, token: str | None, what: str, optional: bool) -> int:
        token_id = self._tok.token_to_id(token) if token is not None else None
        if token_id is None and not optional:
            raise TokenizerError(f"{self.path}: {what} token {token!r} is not in the vocabulary")
        return -1 if token_id is None else token_id

    @property
    def special_texts(self) -> frozenset[str]:
        return frozenset(self._special)

    def piece(self, token_id: int) -> str:
        """Byte-level entries ("Ġcapital") are shown as SentencePiece shows its pieces:
        their bytes as text, a space as "▁", a newline or a lone byte of a longer character
        as <0x0A>, <0xF0>; control tokens as they are spelled ("<|im_end|>")."""
        token_id = self._checked_ids([token_id])[0]
        entry = self._tok.id_to_token(token_id) or ""
        if not self._byte_level or token_id in self._special_ids:
            return entry
        raw = bytes(_BYTE_OF.get(c, 0x3F) for c in entry)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(chr(b) if 0x20 <= b < 0x80 else f"<0x{b:02X}>" for b in raw)
        return "".join(f"<0x{ord(c):02X}>" if ord(c) < 0x20 else c for c in text).replace(" ", "▁")

    def is_byte(self, token_id: int) -> bool:
        piece = self._tok.id_to_token(token_id) or ""
        return self._byte_fallback and _BYTE_PIECE.fullmatch(piece) is not None

    def is_control(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def _encode_parts(self, parts: list[Part]) -> list[int]:
        text = "".join(t for t, _ in parts)
        if not any(is_template for _, is_template in parts):  # as split_special_tokens=True
            return list(self._literal.encode(text, add_special_tokens=False).ids)
        enc = self._tok.encode(text, add_special_tokens=False)
        if not any(s in t for t, is_template in parts if not is_template for s in self._special):
            return list(enc.ids)
        spans = literal_spans(parts)
        ids: list[int] = []
        for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if token_id in self._special_ids and inside(spans, start):
                ids += self._literal.encode(text[start:end], add_special_tokens=False).ids
            else:
                ids.append(token_id)
        return ids


def from_tokenizer_json(path: Path, config: dict[str, Any]) -> BPETokenizer:
    """A Hugging Face tokenizer.json; `config` is tokenizer_config.json's content (or {})."""
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({exc})") from None
    bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # no word in the config: does the post-processor add BOS?
        with_specials = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and with_specials[:1] == [tok.token_to_id(bos)]
    return BPETokenizer(tok, path, bos, eos, bool(add_bos))


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def from_gguf(path: Path, meta: dict[str, Any]) -> BPETokenizer:
    """A GGUF vocabulary of the "gpt2" kind (byte-level BPE with merges)."""
    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges")
    if not merges:
        raise TokenizerError(f"{path}: tokenizer.ggml.merges: expected the BPE merges, found none")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{path}: tokenizer.ggml.pre: pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=False)
            if k == USER_DEFINED
        ]
    )
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens: duplicate tokens in the vocabulary")
    bos, eos = (_gguf_token(path, meta, tokens, k) for k in ("bos", "eos"))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return BPETokenizer(tok, path, bos, eos, add_bos)


def _pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    if split == _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gguf_token(path: Path, meta: dict[str, Any], tokens: list[str], what: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{what}_token_id")
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise TokenizerError(
            f"{path}: tokenizer.ggml.{what}_token_id: expected an id below {len(tokens)}, found {i}"
        )
    return tokens[int(i)]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or TokenizerError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
