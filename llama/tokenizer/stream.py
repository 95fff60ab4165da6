"""Exact streaming: token ids in, text deltas out, on every tokenizer backend.

`StreamDecoder` turns token ids, one at a time, into text deltas whose concatenation always
equals `Tokenizer.decode(all ids)`:

- SentencePiece (and tokenizer.json files with a Metaspace decoder) drop the "▁" (space) of
  the first piece of a decoded text; decoding a window of the ids would drop it again in the
  middle of the text. The decoder therefore decodes its window behind a fixed "guard" token
  once any text has been produced.
- A character split over several tokens (byte-fallback pieces <0xE2><0x82><0xAC>, or
  byte-level BPE tokens holding part of an emoji) only becomes a character together; while
  the window decodes to a trailing U+FFFD the delta is held back, so a character is never
  split.
"""

from __future__ import annotations

from llama.tokenizer.base import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


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
        decode = self.tokenizer._decode  # ids were checked by push
        before = decode(guard + self.ids[self._start : self._read])
        after = decode(guard + self.ids[self._start :])
        return before, after

    def _release(self, before: str, after: str) -> str:
        self._start, self._read = self._read, len(self.ids)
        self._started = True
        return after[len(before) :]
