"""The Llama-2-chat prompt format, as Meta's reference `chat_completion` builds it.

Rules (Touvron et al. 2023, Meta's llama/generation.py):
- an optional leading system message is folded into the first user message:
  "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}";
- then roles must alternate user, assistant, user, ... and end with a user message;
- every completed (user, assistant) pair is encoded as
  BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " + EOS;
- the final user message as BOS + "[INST] {user.strip()} [/INST]" without EOS.

Choices of this module, beyond Meta's code:
- What the user types now (the last user message) and the system prompt are REJECTED with
  ChatError when they contain the special tags ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
  as Meta's code refuses them (it answers with an error instead of generating). Earlier
  messages (the model's own replies, which do contain tags at times, and imported history) are
  never refused: all message text is encoded as literal text (llama/tokenizer/base.py), so a
  tag in it never becomes a tag token (the shipped vocabulary has "[INST]" as a piece); with
  Meta's vocabulary, where the tags are plain text, the ids are those of the plain text.
- Empty or whitespace-only user messages are rejected; an empty assistant message is allowed
  (a reply can be empty); a system message whose content is empty or whitespace is omitted.
- Text that is not valid Unicode (lone surrogates) is rejected, naming the message.
- With `max_tokens`, the oldest (user, assistant) pairs are dropped, the system prompt kept
  (folded into the new first user message), until the prompt fits; `Prompt.dropped_turns`
  counts the dropped pairs.

`encode_completion` is the raw mode for base models: BOS (when the checkpoint adds one) + text.
`encode_chat` picks one of TEMPLATES: the checkpoint's own Jinja template
(`encode_with_template`: rendered by llama/tokenizer/template.py, tokenised with control
tokens parsed as transformers does, so the ids equal apply_chat_template's), Llama-2-chat,
or raw completion. Message text is literal there too: when a message holds the text of a
control token ("<|im_start|>"), the template is rendered a second time with placeholders
instead of the messages, which tells exactly where each message sits in the text; those spans
are encoded as literal text, so a message can never close its turn or open another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama.tokenizer import Part, Tokenizer, TokenizerError, check_text
from llama.tokenizer.template import MARK, TemplateError, render

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")
BOS_TEXT, EOS_TEXT = "<s>", "</s>"

TEMPLATES = ("own", "chat", "completion")  # checkpoint's template, Llama-2-chat, raw text

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
    system, turns = split_dialog(messages)
    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    last = turns[-1]
    check_max_tokens(max_tokens)
    # Pairs after the first never contain the system prompt: encode them once.
    plain = [_pair_segment(tokenizer, _user_parts(None, u), a) for u, a in pairs]
    final = _final_segment(tokenizer, _user_parts(None, last))
    for dropped in range(len(pairs) + 1):
        kept = pairs[dropped:]
        if kept:
            first = _pair_segment(tokenizer, _user_parts(system, kept[0][0]), kept[0][1])
            segments = [first, *plain[dropped + 1 :], final]
        else:
            segments = [_final_segment(tokenizer, _user_parts(system, last))]
        n = sum(len(ids) for ids, _ in segments)
        if max_tokens is None or n <= max_tokens:
            ids = [t for seg, _ in segments for t in seg]
            return Prompt(ids, "".join(text for _, text in segments), dropped_turns=dropped)
    raise ChatError(
        f"the last message needs {n} tokens with the system prompt and the template, "
        f"but the prompt may hold at most {max_tokens} tokens"
    )


def encode_completion(tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> Prompt:
    """Raw mode for base models: BOS (when the checkpoint adds one, as `add_bos` says) + text.
    Empty text is allowed when there is a BOS to generate from.

    With `max_tokens`, the oldest tokens after BOS are dropped until it fits
    (`Prompt.dropped_tokens`); the shown text is then the decoded kept tokens.
    """
    if not isinstance(text, str):
        raise ChatError(f"prompt: expected str, found {type(text).__name__}")
    check_max_tokens(max_tokens)
    bos = tokenizer.add_bos
    head = tokenizer.piece(tokenizer.bos_id) if bos else ""
    ids = _encode(tokenizer, [(text, False)], bos=bos, eos=False)
    if not ids:
        raise ChatError("prompt: empty, and this model starts prompts without BOS: type some text")
    if max_tokens is None or len(ids) <= max_tokens:
        return Prompt(ids, head + text)
    dropped = len(ids) - max_tokens
    kept = [*ids[: int(bos)], *ids[int(bos) + dropped :]]
    return Prompt(kept, head + tokenizer.decode(kept[int(bos) :]), dropped_tokens=dropped)


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ChatError(f"max_tokens: expected a positive int or None, found {max_tokens!r}")


def split_dialog(
    messages: Sequence[Message], reject_tags: bool = True
) -> tuple[str | None, list[Message]]:
    """Validate; return (system content or None, the alternating user/assistant turns).

    reject_tags: refuse Llama-2 tags in the system prompt and in the last message (what the
    user types); never in earlier messages (module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatError(f"messages: expected a list of dicts, found {type(messages).__name__}")
    for i, msg in enumerate(messages):
        _check_message(i, msg)
        typed = i == len(messages) - 1 or msg["role"] == "system"
        if reject_tags and typed:
            _check_tags(i, msg)
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
    try:
        check_text(content)
    except TokenizerError as exc:
        raise ChatError(f"message {i} ({role}): {exc}") from None


def _check_tags(i: int, msg: Message) -> None:
    for tag in SPECIAL_TAGS:
        if tag in msg["content"]:
            raise ChatError(
                f"message {i} ({msg['role']}): the special tag {tag!r} is not allowed in what you "
                "type for the Llama-2-chat template (it would let text pose as the template); "
                "remove it or use the raw completion mode"
            )


def _user_parts(system: str | None, user: Message) -> list[Part]:
    """The first user message carries the system prompt (Meta: folded, then stripped)."""
    if system is None:
        return [(user["content"].strip(), False)]
    return [(B_SYS, True), (system, False), (E_SYS, True), (user["content"].rstrip(), False)]


def _pair_segment(tok: Tokenizer, user: list[Part], answer: Message) -> tuple[list[int], str]:
    parts = [
        (f"{B_INST} ", True),
        *user,
        (f" {E_INST} ", True),
        (answer["content"].strip(), False),
        (" ", True),
    ]
    return _encode(tok, parts, bos=True, eos=True), BOS_TEXT + _join(parts) + EOS_TEXT


def _final_segment(tok: Tokenizer, user: list[Part]) -> tuple[list[int], str]:
    parts = [(f"{B_INST} ", True), *user, (f" {E_INST}", True)]
    return _encode(tok, parts, bos=True, eos=False), BOS_TEXT + _join(parts)


def _join(parts: list[Part]) -> str:
    return "".join(text for text, _ in parts)


def _encode(tok: Tokenizer, parts: list[Part], bos: bool, eos: bool) -> list[int]:
    try:
        return tok.encode_parts(parts, bos=bos, eos=eos)
    except TokenizerError as exc:
        raise ChatError(f"dialog: {exc}") from None


def encode_chat(
    tok: Tokenizer, template: str, messages: Sequence[Message], max_tokens: int | None = None
) -> Prompt:
    """Encode with one of TEMPLATES; "completion" joins the messages' text (raw mode)."""
    if template == "own":
        return encode_with_template(tok, messages, max_tokens=max_tokens)
    if template == "chat":
        return encode_dialog(tok, messages, max_tokens=max_tokens)
    if template == "completion":
        text = "".join(m["content"] for m in messages if m.get("role") != "system")
        return encode_completion(tok, text, max_tokens=max_tokens)
    raise ChatError(f"template: expected one of {TEMPLATES}, found {template!r}")


def _render(tok: Tokenizer, messages: Sequence[Message]) -> str:
    try:
        return render(tok, messages)
    except TemplateError as exc:
        raise ChatError(str(exc)) from None


def encode_with_template(
    tok: Tokenizer, messages: Sequence[Message], max_tokens: int | None = None
) -> Prompt:
    """Encode a dialog (optional system, then user/assistant turns ending with user) with the
    checkpoint's template and a generation prompt; with `max_tokens`, drop the oldest
    (user, assistant) pairs, keeping the system message, until it fits."""
    check_max_tokens(max_tokens)
    _, turns = split_dialog(messages, reject_tags=False)
    head = [m for m in messages[:1] if m["role"] == "system"]
    n = 0
    for dropped in range(0, len(turns) // 2 + 1):
        kept = [*head, *turns[2 * dropped :]]
        text = _render(tok, kept)
        ids = _encode_rendered(tok, text, kept)
        n = len(ids)
        if max_tokens is None or n <= max_tokens:
            return Prompt(ids, text, dropped_turns=dropped)
    raise ChatError(
        f"the last message needs {n} tokens with the system prompt and the template, "
        f"but the prompt may hold at most {max_tokens} tokens"
    )


def _encode_rendered(tok: Tokenizer, text: str, messages: Sequence[Message]) -> list[int]:
    specials = tok.special_texts
    try:
        if not any(s in m["content"] for m in messages for s in specials):
            return tok.encode_parts([(text, True)])  # exactly apply_chat_template's ids
        return tok.encode_parts(_literal_parts(tok, text, messages))
    except TokenizerError as exc:
        raise ChatError(f"dialog: {exc}") from None


def _literal_parts(tok: Tokenizer, text: str, messages: Sequence[Message]) -> list[Part]:
    """Where each message sits in `text`, from a render with placeholders (module docstring)."""
    marks = [f"{MARK}{i}{MARK}" for i in range(len(messages))]
    shadow = _render(tok, [{**m, "content": k} for m, k in zip(messages, marks, strict=True)])
    for strip in (False, True):
        parts: list[Part] = []
        rest = shadow
        for m, k in zip(messages, marks, strict=True):
            before, found, rest = rest.partition(k)
            if not found:
                break
            parts += [(before, True), (m["content"].strip() if strip else m["content"], False)]
        parts.append((rest, True))
        if "".join(t for t, _ in parts) == text:
            return [p for p in parts if p[0]]
    raise ChatError(
        f"{tok.chat_template_source}: a message holds the text of a control token and the "
        "template changes message text, so it cannot be encoded safely; remove the token text"
    )
