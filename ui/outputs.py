"""What the playground's callbacks share: the view keys, the outputs of a turn in layout order,
the Chatbot's value for a history and the Views from the widgets."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui import inspector
from ui.turn import FIGURE_KEYS, Message, Views

VIEW_LABELS = {
    "attention": "Attention",
    "probs": "Token probabilities",
    "rope": "RoPE",
    "kv": "KV cache",
}
ALL_HEADS = -1

# What respond, clear and the token inspector's branch write, in this order (ui/layout.py
# wires the components of the same names); `outputs` fills the ones not given with skip.
OUTPUT_KEYS = (
    "chatbot",
    "history",
    *(f"plot_{k}" for k in FIGURE_KEYS),
    "status",
    "prompt_text",
    "prompt_ids",
    "seed_used",
    "last",
    "message",
    *inspector.OUTPUT_KEYS,
)


def outputs(**values: Any) -> tuple[Any, ...]:
    """A tuple in OUTPUT_KEYS order; keys not given stay as they are on the page."""
    unknown = set(values) - set(OUTPUT_KEYS)
    if unknown:
        raise KeyError(f"not an output: {sorted(unknown)}")
    return tuple(values.get(k, gr.skip()) for k in OUTPUT_KEYS)


def display(history: list[Message]) -> list[dict[str, Any]]:
    """The Chatbot's value for a history. Text goes in as content parts, which gradio shows
    as they are (a plain string would be passed through inspect.cleandoc, which strips
    leading newlines and indentation from what the model wrote)."""
    return [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in history
    ]


def views_from(shown: list[str] | None, layer: Any, head: Any, mode: str, every: Any) -> Views:
    """Views from the widgets: shown holds keys of VIEW_LABELS; head -1 (or None) = all."""
    keys = frozenset(k for k in (shown or []) if k in VIEW_LABELS)
    head_i = None if head in (None, "", ALL_HEADS) else int(head)
    return Views(keys, int(layer or 0), head_i, mode or "heads", max(1, int(every or 1)))
