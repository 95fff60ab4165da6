"""The Llama-2-chat prompt format, as Meta's reference `chat_completion` builds it.

Rules (Touvron et al. 2023, Meta's llama/generation.py):
- an optional leading system message is folded into the first user message:
  "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}";
- then roles must alternate user, assistant, user, ... and end with a user message;
- every completed (user, assistant) pair is encoded as
  BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " + EOS;
- the final user message as BOS + "[INST] {user.strip()} [/INST]" without EOS.

Choices of this module, beyond Meta's code:
- Messages containing the special tags ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>") are
  REJECTED with ChatError, whatever their role, as Meta's code refuses them (it answers with an
  error instead of generating). They are not escaped: an escaped tag would still read as a
  tag to the model.
- Empty or whitespace-only user messages are rejected; an empty assistant message is allowed
  (a reply can be empty); a system message whose content is empty or whitespace is omitted.
- Text that is not valid Unicode (lone surrogates) is rejected, naming the message.
- With `max_tokens`, the oldest (user, assistant) pairs are dropped, the system prompt kept
  (folded into the new first user message), until the prompt fits; `Prompt.dropped_turns`
  counts the dropped pairs.

`encode_completion` is the raw mode for base models: BOS + text, no template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama.tokenizer import Tokenizer, TokenizerError, check_text

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")
BOS_TEXT, EOS_TEXT = "<s>", "</s>"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class ChatError(ValueError):
    """A dialog that the Llama-2-chat format cannot encode (names the message and the rule)."""


@dataclass
class Prompt:
    """Token ids for the model and the exact text they encode.

    `text` shows BOS/EOS as "<s>"/"</s>" around the strings that were tokenized (SentencePiece
    adds its own leading space to each). `dropped_turns` counts (user, assistant) pairs removed
    to fit `max_tokens`; `dropped_tokens` counts tokens removed in raw completion mode.
    """

    ids: list[int]
    text: str
    dropped_turns: int = 0
    dropped_tokens: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def encode_dialog(
    tokenizer: Tokenizer, messages: Sequence[Message], max_tokens: int | None = None
) -> Prompt:
    """Encode a dialog for a Llama-2-chat model (rules in the module docstring).

    Raises ChatError for a malformed dialog, a rejected message, or when even the system
    prompt plus the last user message do not fit in `max_tokens`.
    """
    system, turns = _split_dialog(messages)
    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    last = turns[-1]
    _check_max_tokens(max_tokens)
    # Pairs after the first never contain the system prompt: encode them once.
    plain = [_pair_segment(tokenizer, u, a) for u, a in pairs]
    final = _final_segment(tokenizer, last)
    for dropped in range(len(pairs) + 1):
        kept = pairs[dropped:]
        if kept:
            first = _pair_segment(tokenizer, _with_system(system, kept[0][0]), kept[0][1])
            segments = [first, *plain[dropped + 1 :], final]
        else:
            segments = [_final_segment(tokenizer, _with_system(system, last))]
        n = sum(len(ids) for ids, _ in segments)
        if max_tokens is None or n <= max_tokens:
            ids = [t for seg, _ in segments for t in seg]
            return Prompt(ids, "".join(text for _, text in segments), dropped_turns=dropped)
    raise ChatError(
        f"the last message needs {n} tokens with the system prompt and the template, "
        f"but the prompt may hold at most {max_tokens} tokens"
    )


def encode_completion(tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> Prompt:
    """Raw mode for base models: BOS + text. Empty text is allowed (generate from BOS).

    With `max_tokens`, the oldest tokens after BOS are dropped until it fits
    (`Prompt.dropped_tokens`); the shown text is then the decoded kept tokens.
    """
    if not isinstance(text, str):
        raise ChatError(f"prompt: expected str, found {type(text).__name__}")
    _check_max_tokens(max_tokens)
    ids = _encode(tokenizer, text, "prompt", bos=True, eos=False)
    if max_tokens is None or len(ids) <= max_tokens:
        return Prompt(ids, BOS_TEXT + text)
    dropped = len(ids) - max_tokens
    kept = [ids[0], *ids[1 + dropped :]]
    return Prompt(kept, BOS_TEXT + tokenizer.decode(kept[1:]), dropped_tokens=dropped)


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ChatError(f"max_tokens: expected a positive int or None, found {max_tokens!r}")


def _split_dialog(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """Validate; return (system content or None, the alternating user/assistant turns)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatError(f"messages: expected a list of dicts, found {type(messages).__name__}")
    for i, msg in enumerate(messages):
        _check_message(i, msg)
    system = None
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        content = turns.pop(0)["content"]
        system = content if content.strip() else None
    if not turns:
        raise ChatError("messages: a dialog needs at least one user message")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            index = i + len(messages) - len(turns)
            raise ChatError(
                f"message {index}: expected role {expected!r}, found {msg['role']!r} "
                "(roles go: optional 'system', then 'user' and 'assistant' alternating, "
                "ending with 'user')"
            )
    if len(turns) % 2 == 0:
        raise ChatError("messages: the last message must come from 'user', found 'assistant'")
    for i in range(0, len(turns), 2):
        if not turns[i]["content"].strip():
            index = i + len(messages) - len(turns)
            raise ChatError(f"message {index} (user): the message is empty")
    return system, turns


def _check_message(i: int, msg: Any) -> None:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise ChatError(
            f"message {i}: expected a dict with 'role' and 'content', found {msg!r}"[:200]
        )
    role, content = msg["role"], msg["content"]
    if role not in ROLES:
        raise ChatError(f"message {i}: role must be one of {ROLES}, found {role!r}")
    if not isinstance(content, str):
        raise ChatError(
            f"message {i} ({role}): content must be str, found {type(content).__name__}"
        )
    if role == "system" and i != 0:
        raise ChatError(f"message {i}: a 'system' message may only come first")
    for tag in SPECIAL_TAGS:
        if tag in content:
            raise ChatError(
                f"message {i} ({role}): the special tag {tag!r} is not allowed in a message "
                "(Meta's chat format rejects it: it would let text pose as the template)"
            )
    try:
        check_text(content)
    except TokenizerError as exc:
        raise ChatError(f"message {i} ({role}): {exc}") from None


def _with_system(system: str | None, user: Message) -> Message:
    if system is None:
        return user
    return {"role": "user", "content": B_SYS + system + E_SYS + user["content"]}


def _pair_segment(tok: Tokenizer, user: Message, answer: Message) -> tuple[list[int], str]:
    text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
    return _encode(tok, text, "dialog", bos=True, eos=True), BOS_TEXT + text + EOS_TEXT


def _final_segment(tok: Tokenizer, user: Message) -> tuple[list[int], str]:
    text = f"{B_INST} {user['content'].strip()} {E_INST}"
    return _encode(tok, text, "dialog", bos=True, eos=False), BOS_TEXT + text


def _encode(tok: Tokenizer, text: str, what: str, bos: bool, eos: bool) -> list[int]:
    try:
        return tok.encode(text, bos=bos, eos=eos)
    except TokenizerError as exc:
        raise ChatError(f"{what}: {exc}") from None
