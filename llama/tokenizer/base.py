"""The one interface every tokenizer backend offers (SentencePiece, byte-level BPE).

Text comes in two kinds, and the difference is the security boundary of the chat:
- *literal* text (what a user typed, what a model wrote, an imported chat): it never becomes a
  control token, whatever it contains ("<|im_start|>", "</s>", "[INST]"); a control or
  user-defined token spelled inside it is encoded as the plain text it is;
- *template* text (what a chat template wrote around the messages): control tokens spelled in
  it ("<|im_start|>", "<s>") become their ids, as transformers' apply_chat_template and
  llama.cpp tokenise a rendered template.
`encode_parts` takes both kinds in order and tokenises them as one text, so that ids at the
seams are exactly those of the whole string; only tokens matched inside literal parts are
re-spelled.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

Part = tuple[str, bool]  # (text, is_template)


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable, or an id/text cannot be tokenized."""


class Tokenizer(ABC):
    """Encode text to token ids and back.

    Attributes: path (the file read: tokenizer.model, tokenizer.json or a .gguf), kind
    ("sentencepiece" or "bpe"), vocab_size (valid ids are 0 .. vocab_size - 1), bos_id and
    eos_id (bos_id is -1 when the vocabulary has none), pad_id (-1 when none), add_bos
    (whether the checkpoint says prompts start with BOS), stop_ids (ids that end a reply:
    EOS and the chat template's end-of-turn token), chat_template (the checkpoint's Jinja
    template or None) and chat_template_source (where it was read, for error messages).
    """

    path: Path
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int = -1
    add_bos: bool = True
    chat_template: str | None = None
    chat_template_source: str = ""
    guard_id: int

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"

    _extra_stops: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id, *self._extra_stops})

    def add_stop_id(self, token_id: int) -> None:
        """Also end replies at `token_id` (a chat template's end-of-turn token)."""
        self._extra_stops = (*self._extra_stops, self._checked_ids([token_id])[0])

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of literal `text` (never a control token), with BOS/EOS when asked.

        Raises TokenizerError for non-str input and for text that is not valid Unicode
        (lone surrogates such as "\\ud800"), naming the offending position.
        """
        return self.encode_parts([(text, False)], bos=bos, eos=eos)

    def encode_parts(
        self, parts: Sequence[Part], bos: bool = False, eos: bool = False
    ) -> list[int]:
        """Token ids of the concatenated parts (module docstring: literal and template text)."""
        for text, _ in parts:
            if not isinstance(text, str):
                raise TokenizerError(f"encode: expected str, found {type(text).__name__}")
            check_text(text)
        ids = self._encode_parts(list(parts))
        if bos:
            if self.bos_id < 0:
                raise TokenizerError(f"{self.path}: the vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS/EOS, <|im_end|>) decode to nothing."""
        return self._decode(self._checked_ids(ids))

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` (e.g. "<|im_end|>"), or None."""
        return self._token_id(text)

    @property
    @abstractmethod
    def special_texts(self) -> frozenset[str]:
        """The text of every token that literal text must not produce ("<|im_start|>")."""

    @abstractmethod
    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, for display: "▁the", "Ġthe", "<0x0A>", "<s>"."""

    @abstractmethod
    def is_byte(self, token_id: int) -> bool:
        """True for byte-fallback pieces (<0x00> .. <0xFF>)."""

    @abstractmethod
    def is_control(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, <|im_start|>): never produced from literal text."""

    @abstractmethod
    def _encode_parts(self, parts: list[Part]) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """decode without checking the ids (StreamDecoder checks them once, on push)."""

    @abstractmethod
    def _token_id(self, text: str) -> int | None: ...

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        for i, t in enumerate(ids):
            try:
                t = operator.index(t)  # ints, numpy and 0-d torch integers; not floats
            except TypeError:
                t = None
            if t is None or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise TokenizerError(
                    f"token id at index {i}: expected an int in [0, {self.vocab_size}), "
                    f"found {ids[i]!r}"
                )
            out.append(t)
        return out

    def _find_guard(self) -> int:
        """A plain token of ASCII letters with no leading space (see StreamDecoder)."""
        for i in range(self.vocab_size):
            if self.is_control(i) or self.is_byte(i):
                continue
            text = self._decode([i])
            if text.isascii() and text.isalpha():
                return i
        raise TokenizerError(f"{self.path}: no plain token in the vocabulary")


def check_text(text: str) -> None:
    """Raise TokenizerError if `text` cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise TokenizerError(
            f"text is not valid Unicode: lone surrogate U+{ord(bad):04X} at character {exc.start}"
        ) from None


def literal_spans(parts: Sequence[Part], unit: str = "char") -> list[tuple[int, int]]:
    """[start, end) of each literal part in the joined text, in characters or UTF-8 bytes."""
    spans, pos = [], 0
    for text, is_template in parts:
        size = len(text.encode("utf-8")) if unit == "byte" else len(text)
        if not is_template:
            spans.append((pos, pos + size))
        pos += size
    return spans


def inside(spans: Sequence[tuple[int, int]], start: int) -> bool:
    return any(a <= start < b for a, b in spans)
