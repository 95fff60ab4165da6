"""Stop as a person sees it, in chromium with every view on (the default): from the click on,
the reply's visible text never grows, the status line says stopped at once, and the reply the
chat keeps (history, token inspector, the next turn) is exactly the text shown at the click.

Stop is clicked by the page itself the moment the reply's first text is rendered
(tests/browser_kit.py STOP_ON_FIRST), on a seeded reply of 337 tokens: the model is always far
ahead of the page then. Everything is waited on by condition; nothing depends on the
machine's speed.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests import browser_kit as kit
from tests.test_browser import (  # noqa: F401 (fixtures)
    LONG_PROMPT,
    LONG_SEED,
    browser,
    last_reply,
    page,
    server,
    token_spans,
    wait_until,
)

pytestmark = pytest.mark.browser


def stopped_at_first_text(pg: Any) -> dict[str, Any]:
    """Send LONG_PROMPT, Stop on its first rendered text; what the page recorded, once the
    server's final update has landed."""
    kit.clear_chat(pg)
    kit.arm_recorder(pg)
    pg.evaluate(kit.STOP_ON_FIRST, "bot")
    kit.send(pg, LONG_PROMPT)
    wait_until(lambda: pg.evaluate("window.__stoppedAt") is not None, "Stop to be clicked")
    wait_until(lambda: "finished:" in kit.status(pg), "the server's last update")
    return kit.recorded(pg)


def test_stop_freezes_the_text_and_keeps_it_as_shown(page: Any) -> None:  # noqa: F811
    pg = page
    kit.set_number(pg, "max-new-tokens", 1024)
    pg.fill("#seed textarea, #seed input", LONG_SEED)
    lat = stopped_at_first_text(pg)
    at_click = lat["stopText"]
    assert at_click  # the page showed some of the reply when Stop was clicked

    # Nothing grows after the click, and the status never shows the reply running again.
    after = [n for t, n in lat["texts"] if t > lat["stop"]]
    assert all(n <= len(at_click) for n in after), (len(at_click), after)
    statuses = [s for t, s in lat["statuses"] if t >= lat["stop"]]
    assert statuses and "Stopped" in statuses[0], statuses
    assert all("Stopped" in s or "finished: cancelled" in s for s in statuses), statuses

    # What the chat keeps is what was shown: the reply, the inspector's tokens, the status.
    kept = last_reply(pg)
    assert kept == at_click
    final = kit.status(pg)
    match = re.search(r"finished: cancelled · kept as shown at Stop: (\d+) tokens?", final)
    assert match, final
    wait_until(lambda: token_spans(pg).count() == int(match[1]), "the kept tokens")

    # The chat goes on from the reply as kept; the page is not stuck.
    kit.arm_recorder(pg)
    kit.send(pg, "Thank you!")
    wait_until(lambda: kit.recorded(pg)["finished"], "the next reply")
    assert kit.bot_texts(pg)[0] == kept and len(kit.bot_texts(pg)) == 2
