"""SentencePiece backend (Kudo & Richardson 2018): tokenizer.model files, and GGUF files of
the "llama" tokenizer kind rebuilt from their tokens, scores and token types.

A GGUF stores no model proto, only the vocabulary; the proto is rebuilt here (BPE model,
identity normaliser, byte fallback when the vocabulary has byte pieces), which tokenises as
llama.cpp's SentencePiece tokenizer does: tested against llama.cpp's own ids.

Literal text: SentencePiece never matches control pieces ("<s>") in text, but it does match
user-defined pieces ("[INST]" in the shipped model's vocabulary). A user-defined piece found
inside a literal part is re-spelled with a second processor in which user-defined pieces are
unused and no dummy-prefix space is added, so the text decodes the same and the tag is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sentencepiece as spm

from llama.tokenizer import protowire as pw
from llama.tokenizer.base import Part, Tokenizer, TokenizerError, inside, literal_spans

# SentencePiece piece types (sentencepiece_model.proto), the same numbers GGUF uses.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3  # ModelProto fields


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model given as serialized ModelProto bytes (see module docstring)."""

    kind = "sentencepiece"

    def __init__(self, proto: bytes, path: Path, add_bos: bool = True) -> None:
        self.path = path
        self._sp = _processor(proto, path)
        self._proto = proto
        self._types = _piece_types(proto, path)
        self._literal_sp: spm.SentencePieceProcessor | None = None  # built on first need
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = self._sp.pad_id()
        if not 0 <= self.eos_id < self.vocab_size:
            raise TokenizerError(f"{path}: the model defines no eos piece")
        self.add_bos = add_bos and self.bos_id >= 0
        self._user_defined = {
            self._sp.id_to_piece(i) for i, t in enumerate(self._types) if t == USER_DEFINED
        }
        self._controls = {
            self._sp.id_to_piece(i): i for i, t in enumerate(self._types) if t == CONTROL
        }
        self.guard_id = self._find_guard()

    @property
    def special_texts(self) -> frozenset[str]:
        return frozenset(self._user_defined | set(self._controls))

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._checked_ids([token_id])[0])

    def is_byte(self, token_id: int) -> bool:
        return bool(self._sp.is_byte(token_id))

    def is_control(self, token_id: int) -> bool:
        sp = self._sp
        return bool(sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id))

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _token_id(self, text: str) -> int | None:
        i = self._sp.piece_to_id(text)
        return i if self._sp.id_to_piece(i) == text else None

    def _encode_parts(self, parts: list[Part]) -> list[int]:
        ids: list[int] = []
        for chunk in self._split_controls(parts):
            if isinstance(chunk, int):
                ids.append(chunk)
            else:
                ids += self._encode_chunk(chunk)
        return ids

    def _literal(self) -> spm.SentencePieceProcessor:
        if self._literal_sp is None:
            self._literal_sp = _processor(_literal_proto(self._proto), self.path)
        return self._literal_sp

    def _split_controls(self, parts: list[Part]) -> list[int | list[Part]]:
        """Control pieces spelled in template parts become their ids; SentencePiece itself
        never matches them. Each run of text between them is one chunk."""
        out: list[int | list[Part]] = [[]]
        for text, is_template in parts:
            if not is_template:
                out[-1].append((text, False))
                continue
            for seg, control in _cut(text, self._controls):
                if control is not None:
                    out += [control, []]
                elif seg:
                    out[-1].append((seg, True))
        return [c for c in out if isinstance(c, int) or c]

    def _encode_chunk(self, parts: list[Part]) -> list[int]:
        text = "".join(t for t, _ in parts)
        if not any(
            u in t for t, is_template in parts if not is_template for u in self._user_defined
        ):
            return self._sp.encode(text)
        spans = literal_spans(parts, unit="byte")
        ids: list[int] = []
        for token_id, surface, begin in _pieces_with_offsets(self._sp, text):
            if self._types[token_id] == USER_DEFINED and inside(spans, begin):
                ids += self._literal().encode(surface)
            else:
                ids.append(token_id)
        return ids


def _cut(text: str, controls: dict[str, int]) -> list[tuple[str, int | None]]:
    """Split `text` at the control pieces spelled in it (longest match first)."""
    out: list[tuple[str, int | None]] = []
    names = sorted(controls, key=len, reverse=True)
    start = i = 0
    while i < len(text):
        hit = next((n for n in names if text.startswith(n, i)), None) if text[i] == "<" else None
        if hit is None:
            i += 1
            continue
        out += [(text[start:i], None), ("", controls[hit])]
        i = start = i + len(hit)
    out.append((text[start:], None))
    return out


def _pieces_with_offsets(sp: spm.SentencePieceProcessor, text: str) -> list[tuple[int, str, int]]:
    """(id, surface text, UTF-8 byte offset in `text`) of each piece, from SentencePieceText."""
    out = []
    for number, _, value in pw.parse(sp.encode(text, out_type="serialized_proto")):
        if number != 2:  # SentencePieceText.pieces
            continue
        f = {n: v for n, _, v in pw.parse(value)}
        out.append((int(f.get(2, 0)), bytes(f.get(3, b"")).decode("utf-8"), int(f.get(4, 0))))
    return out


def _processor(proto: bytes, path: Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(
            f"{path}: not a SentencePiece model ({exc.__class__.__name__}: {exc})"
        ) from None
    return sp


def _piece_types(proto: bytes, path: Path) -> list[int]:
    try:
        return [_piece_type(v) for n, _, v in pw.parse(proto) if n == _PIECES]
    except (pw.ProtoError, IndexError) as exc:
        raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from None


def _piece_type(msg: bytes) -> int:
    """The type of one SentencePiece message (piece=1, score=2, type=3, in this order in
    files that sentencepiece writes), read without parsing the whole message."""
    if msg[:1] == b"\x0a":
        size, i = pw.read_varint(msg, 1)
        i += size
        i += 5 if msg[i : i + 1] == b"\x15" else 0
        if i == len(msg):
            return NORMAL  # the default type is not written
        if msg[i : i + 1] == b"\x18" and i + 2 == len(msg):
            return msg[i + 1]
    return next((int(v) for n, _, v in pw.parse(msg) if n == 3), NORMAL)


def _literal_proto(proto: bytes) -> bytes:
    """The same model with user-defined pieces unused and no dummy-prefix space."""
    out = []
    for number, wire, value in pw.parse(proto):
        if number == _PIECES:
            fields = pw.parse(value)
            if any(n == 3 and v == USER_DEFINED for n, _, v in fields):
                fields = [f for f in fields if f[0] != 3] + [pw.varint(3, UNUSED)]
            value = pw.serialize(fields)
        elif number == _NORMALIZER:
            value = pw.serialize([f for f in pw.parse(value) if f[0] != 3] + [pw.varint(3, 0)])
        out.append((number, wire, value))
    return pw.serialize(out)


def from_file(path: Path) -> SentencePieceTokenizer:
    """A tokenizer.model file (Meta's, llama2.c's tok512, or one trained here)."""
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    return SentencePieceTokenizer(path.read_bytes(), path)


def from_gguf(path: Path, meta: dict[str, Any]) -> SentencePieceTokenizer:
    """A GGUF vocabulary of the "llama" kind; defaults as llama.cpp's (BOS 1, EOS 2, unk 0,
    add BOS, add a space prefix)."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(
            f"{path}: tokenizer.ggml.tokens, .scores and .token_type must have the same length, "
            f"found {len(tokens)}, {len(scores)} and {len(types)}"
        )
    ids = {
        k: int(meta.get(f"tokenizer.ggml.{k}_token_id", d))
        for k, d in (("bos", 1), ("eos", 2), ("unknown", 0), ("padding", -1))
    }
    pieces = [
        _piece_message(t, s, ty, i, ids)
        for i, (t, s, ty) in enumerate(zip(tokens, scores, types, strict=True))
    ]
    trainer = [pw.varint(3, 2), pw.varint(4, len(tokens)), pw.varint(35, BYTE in types)]
    trainer += [
        pw.varint(n, ids[k])
        for n, k in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding"))
    ]
    trainer += [
        pw.string(n, tokens[ids[k]])
        for n, k in ((45, "unknown"), (46, "bos"), (47, "eos"))
        if 0 <= ids[k] < len(tokens)
    ]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer = [pw.string(1, "identity"), pw.varint(3, prefix), pw.varint(4, 0), pw.varint(5, 1)]
    proto = pw.serialize(
        [*pieces, pw.message(_TRAINER, trainer), pw.message(_NORMALIZER, normalizer)]
    )
    return SentencePieceTokenizer(
        proto, path, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True))
    )


def _piece_message(token: str, score: float, kind: int, i: int, ids: dict[str, int]) -> pw.Field:
    # The special ids decide the type, as llama.cpp does, whatever token_type says.
    if i == ids["unknown"]:
        kind = UNKNOWN
    elif i in (ids["bos"], ids["eos"]):
        kind = CONTROL
    elif kind not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
        kind = NORMAL
    return pw.message(_PIECES, [pw.string(1, token), pw.float32(2, score), pw.varint(3, kind)])
