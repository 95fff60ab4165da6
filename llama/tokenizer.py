"""SentencePiece tokenizer (Kudo & Richardson 2018) as LLaMA-2 uses it, and exact streaming.

`Tokenizer` wraps a `tokenizer.model` file (Meta's Llama-2 tokenizer, llama2.c's tok512, or
one trained here). `StreamDecoder` turns token ids, one at a time, into text deltas whose
concatenation always equals `Tokenizer.decode(all ids)`:

- SentencePiece drops the "▁" (space) of the first piece of a decoded text; decoding a window
  of the ids would drop it again in the middle of the text. The decoder therefore decodes its
  window behind a fixed "guard" piece once any text has been produced.
- Byte-fallback pieces (<0xE2><0x82><0xAC>) only become a character together; while the window
  decodes to a trailing U+FFFD the delta is held back, so a character is never split.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable, or an id/text cannot be tokenized."""


class Tokenizer:
    """Encode text to token ids and back with a SentencePiece model.

    Attributes: bos_id, eos_id (beginning/end of sequence), pad_id (-1 when the model defines
    no pad piece, which is the case for Llama-2 and tok512, as in Meta's reference Tokenizer),
    vocab_size (number of pieces; valid ids are 0 .. vocab_size - 1).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"{self.path}: not a SentencePiece model ({exc.__class__.__name__}: {exc})"
            ) from None
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        for name, value in (("bos", self.bos_id), ("eos", self.eos_id)):
            if not 0 <= value < self.vocab_size:
                raise TokenizerError(f"{self.path}: the model defines no {name} piece")
        self.guard_id: int = self._find_guard()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first and/or EOS last when asked.

        Raises TokenizerError for non-str input and for text that is not valid Unicode
        (lone surrogates such as "\\ud800"), naming the offending position.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected str, found {type(text).__name__}")
        check_text(text)
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (BOS/EOS) decode to nothing, as in SentencePiece."""
        ids = self._checked_ids(ids)
        return self._sp.decode(ids)

    def piece(self, token_id: int) -> str:
        """The SentencePiece piece of one id, for display: "▁the", "<0x0A>", "<s>"."""
        return self._sp.id_to_piece(self._checked_ids([token_id])[0])

    def is_byte(self, token_id: int) -> bool:
        """True for byte-fallback pieces (<0x00> .. <0xFF>)."""
        return bool(self._sp.is_byte(token_id))

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
        """A plain piece without "▁" that decodes to non-empty text (see StreamDecoder)."""
        sp = self._sp
        for i in range(self.vocab_size):
            plain = not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
            if plain and "▁" not in sp.id_to_piece(i) and sp.decode([i]):
                return i
        raise TokenizerError(f"{self.path}: no plain piece in the vocabulary")


def check_text(text: str) -> None:
    """Raise TokenizerError if `text` cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise TokenizerError(
            f"text is not valid Unicode: lone surrogate U+{ord(bad):04X} at character {exc.start}"
        ) from None


class StreamDecoder:
    """Token ids in, text deltas out; "".join(deltas) + flush() == tokenizer.decode(ids).

    Keeps a window ids[start:] of the ids not yet fully released. Each push decodes the window
    with and without the new id and returns the difference, unless the text ends in U+FFFD
    (a byte-fallback character still incomplete), in which case it returns "" and waits.
    Cost per push is proportional to the window, which shrinks back to one id after each
    release, so streaming is linear in the number of tokens.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # first id of the window
        self._read = 0  # ids[start:read] are already released
        self._started = False  # some text was released: decode behind the guard piece

    def push(self, token_id: int) -> str:
        """Add one id; return the newly complete text (may be "")."""
        self.ids.append(self.tokenizer._checked_ids([token_id])[0])
        before, after = self._window_texts()
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            return self._release(before, after)
        return ""

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character decodes to U+FFFD)."""
        before, after = self._window_texts()
        return self._release(before, after) if len(after) > len(before) else ""

    def text(self) -> str:
        """decode(all ids pushed so far), for checks and for callers that want the total."""
        return self.tokenizer.decode(self.ids)

    def _window_texts(self) -> tuple[str, str]:
        guard = [self.tokenizer.guard_id] if self._started else []
        decode = self.tokenizer._sp.decode  # ids were checked by push
        before = decode(guard + self.ids[self._start : self._read])
        after = decode(guard + self.ids[self._start :])
        return before, after

    def _release(self, before: str, after: str) -> str:
        self._start, self._read = self._read, len(self.ids)
        self._started = True
        return after[len(before) :]
