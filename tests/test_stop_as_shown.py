"""Stop keeps the reply as the page showed it at the click (ui/handlers.py `stop` with the
Chatbot's value; the page freezes the text there: ui/stop_freeze.js).

The model is held after its fifth token until Stop has been pressed, so the page's view (an
earlier update) is always behind what was generated: no timing luck.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import ui.turn
from tests.test_handlers import AT, h, is_skip, reply_of, rt, widgets  # noqa: F401 (fixtures)
from ui.handlers import Handlers, shown_chat
from ui.turn import SessionControl

HELD_AT = 5  # tokens generated before the model waits for Stop


@pytest.fixture()
def held(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(go on, waiting): generation waits after its first token until `go on` is set (the
    test has read the first update), then after HELD_AT tokens sets `waiting` and waits
    until its cancel event is set."""
    go_on, waiting = threading.Event(), threading.Event()
    real = ui.turn.generate

    def generate(*args: Any, cancel: threading.Event | None = None, **kw: Any) -> Iterator[Any]:
        for i, step in enumerate(real(*args, cancel=cancel, **kw)):
            yield step
            if i == 0:
                assert go_on.wait(60), "the first update was never read"
            if i + 1 == HELD_AT and cancel is not None:
                waiting.set()
                assert cancel.wait(60), "Stop was never pressed"

    monkeypatch.setattr(ui.turn, "generate", generate)
    return go_on, waiting


Started = tuple[SessionControl, Iterator[tuple[Any, ...]], tuple[Any, ...]]


def start(handlers: Handlers, held: tuple[threading.Event, threading.Event]) -> Started:
    """A long reply, its first update (one token), and the model run on to HELD_AT tokens."""
    control = SessionControl()
    _, history, _ = handlers.add_message("Once upon a time", [], control)
    stream = handlers.respond(history, control, *widgets(handlers.rt, max_new_tokens=200))
    first = next(stream)
    go_on, waiting = held
    go_on.set()
    assert waiting.wait(60), f"the model did not reach {HELD_AT} tokens"
    return control, stream, first


def test_stop_keeps_the_reply_the_page_showed(h: Handlers, held: Any) -> None:  # noqa: F811
    control, stream, first = start(h, held)
    page = first[AT["chatbot"]]  # the page shows the first token; the model is further on
    shown = page[-1]["content"][0]["text"]
    assert shown and all(is_skip(v) for v in h.stop(first[1], control, page))
    rest = list(stream)
    texts = [o[0][-1]["content"][0]["text"] for o in rest if not is_skip(o[0])]
    assert texts and set(texts) == {shown}  # nothing longer went out after Stop
    final = rest[-1]
    assert reply_of(final) == shown  # kept in the history as shown
    assert "finished: cancelled · kept as shown at Stop: 1 token" in final[AT["status"]]
    tokens = [o[AT["tokens"]] for o in rest if not is_skip(o[AT["tokens"]])][-1]
    assert len(tokens) == 1  # the token inspector holds the same token
    assert not control.running and control.shown == shown_chat(page)
    # the session goes on from the reply as kept
    _, history, _ = h.add_message("The dog", final[1], control)
    assert control.shown is None and history[1]["content"] == shown


def test_stop_before_the_page_showed_any_reply_takes_the_message_back(
    h: Handlers,  # noqa: F811
    held: Any,
) -> None:
    control, stream, first = start(h, held)
    page = [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]
    h.stop(first[1], control, page)
    final = list(stream)[-1]
    assert final[1] == [] and final[AT["message"]] == "Once upon a time"
    assert "Stopped before the first token" in final[AT["status"]]


@pytest.mark.parametrize(
    "page",
    [None, [], [{"role": "user", "content": "another chat"}], {"not": "a chat"}],
)
def test_stop_without_the_page_s_view_keeps_what_was_generated(
    h: Handlers,  # noqa: F811
    held: Any,
    page: Any,
) -> None:
    """Through the API (no Chatbot value) or with a view of another chat: nothing is cut."""
    control, stream, first = start(h, held)
    h.stop(first[1], control, page)
    final = list(stream)[-1]
    status = final[AT["status"]]
    assert "finished: cancelled" in status and "kept as shown" not in status
    assert len(reply_of(final)) > len(first[0][-1]["content"][0]["text"])
