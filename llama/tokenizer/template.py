"""Chat templates that come with a checkpoint (GGUF `tokenizer.chat_template`, HF
tokenizer_config.json `chat_template`), rendered as transformers' apply_chat_template does.

Rendering: jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the
loopcontrols extension; the template sees `messages`, `add_generation_prompt`, the special
tokens' text (`bos_token`, `eos_token`, `pad_token`), `raise_exception(msg)` and
`strftime_now(fmt)`. llama/chat.py tokenises the rendered text (encode_with_template).

A template is code from a file, so it is bounded: rendering stops with TemplateError after
RENDER_SECONDS (checked on every line the compiled template runs, so a loop that writes
nothing is stopped too) or when its output passes RENDER_MAX_CHARS; `*` and `**` results are
bounded too; the sandbox refuses attribute access outside it. Every error names the template
source (file and key).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.tokenizer.base import Tokenizer

RENDER_SECONDS = 2.0
RENDER_MAX_CHARS = 2_000_000
MARK = "\ue000"  # a private-use character: placeholders for messages are built with it


class TemplateError(ValueError):
    """A chat template that cannot be rendered, refused the dialog, or broke a bound (names
    the template's source)."""


class _Bounded(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja's sandbox answers an unsafe attribute with an Undefined that prints as "";
        # an escape attempt is refused loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r}")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateError(f"exponent {right} is too large")
        if operator == "*":
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            sized = isinstance(n, int) and isinstance(seq, (str, list, tuple))
            if sized and n * len(seq) > RENDER_MAX_CHARS:
                raise TemplateError(f"repetition of {n} x {len(seq)} items is too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the template refused the dialog: {message}")


def _environment() -> jinja2.Environment:
    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


def render(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    template: str | None = None,
) -> str:
    """The template's text for `messages` (template: default the tokenizer's own)."""
    template = template if template is not None else tok.chat_template
    source = tok.chat_template_source or "chat template"
    if template is None:
        raise TemplateError(f"{tok.path}: the checkpoint has no chat template")
    try:
        compiled = _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"{source}: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    context = dict(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **_special_tokens(tok),
    )
    return _bounded_render(compiled, context, source)


def _special_tokens(tok: Tokenizer) -> dict[str, str]:
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    return {k: tok.piece(i) if 0 <= i < tok.vocab_size else "" for k, i in names.items()}


def _bounded_render(compiled: jinja2.Template, context: dict[str, Any], source: str) -> str:
    deadline = time.perf_counter() + RENDER_SECONDS

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.perf_counter() > deadline:
            raise TemplateError(
                f"{source}: rendering took more than {RENDER_SECONDS:g} s (a loop?)"
            )
        return tracer

    chunks, size = [], 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > RENDER_MAX_CHARS:
                raise TemplateError(
                    f"{source}: the rendered prompt passed {RENDER_MAX_CHARS:,} characters"
                )
            chunks.append(chunk)
    except TemplateError as exc:
        if str(exc).startswith(source):
            raise
        raise TemplateError(f"{source}: {exc}") from None
    except SecurityError as exc:
        raise TemplateError(
            f"{source}: the template tried something the sandbox forbids ({exc})"
        ) from None
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        AttributeError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise TemplateError(
            f"{source}: rendering failed ({exc.__class__.__name__}: {exc})"[:400]
        ) from None
    finally:
        sys.settrace(previous)
    return "".join(chunks)


def end_of_turn_id(tok: Tokenizer) -> int | None:
    """The control token the template writes right after a reply ("<|im_end|>"), or None."""
    reply = f"{MARK}reply{MARK}"
    try:
        text = render(
            tok,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
            add_generation_prompt=False,
        )
    except TemplateError:
        return None
    after = text.partition(reply)[2].lstrip()  # Llama-2 style: " </s>"
    hits = [s for s in tok.special_texts if after.startswith(s)]
    return tok.token_id(max(hits, key=len)) if hits else None


def describe(tok: Tokenizer) -> str:
    """A short name of the template kind for labels: "ChatML", "Llama-2", "Zephyr" or "Jinja"."""
    t = tok.chat_template or ""
    if "<|im_start|>" in t:
        return "ChatML"
    if "[INST]" in t:
        return "Llama-2"
    if "<|user|>" in t:
        return "Zephyr"
    return "Jinja"
