"""Driving the playground in Debian's chromium with Playwright: shared by tests/test_browser.py
and bench/browser_latency.py (no pytest here, so the bench can import it).

LATENCY_RECORDER notes, inside the page and with the page's own clock, the moment Enter (or a
click on Send/Stop) happens, every change of the last reply's visible text and of the status
line, and the reply's text at the click on Stop, so what a person sees is measured where they
see it, not inferred from the server.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
FIGURES = ("attention", "probs", "rope", "kv")
VIEW_NAMES = ("Attention", "Token probabilities", "RoPE", "KV cache")


def open_app(pg: Any, url: str, figures: bool = True) -> None:
    """Load the page and wait until it is usable (and, with figures, plotly has drawn)."""
    pg.goto(url)
    pg.wait_for_selector("#message textarea")
    if figures:
        for key in FIGURES:  # the placeholders are drawn: plotly.js is loaded and compiled
            pg.wait_for_selector(f"#plot-{key} .js-plotly-plot")


def status(pg: Any) -> str:
    """The status line's own text (not the queue/progress overlay gradio draws over it)."""
    return pg.evaluate("document.querySelector('#status [data-testid=markdown]').innerText")


def bot_texts(pg: Any) -> list[str]:
    return pg.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 240) -> Any:
    """Poll `check` until it returns something true; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return value


def set_number(pg: Any, elem_id: str, value: float) -> None:
    """Type a value into a slider's number box (what a user does to set it exactly)."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    wait_for(
        lambda: float(pg.locator(f"#{elem_id} input[type=range]").input_value()) == float(value),
        f"{elem_id} = {value}",
    )


def send(pg: Any, text: str) -> None:
    pg.fill("#message textarea", text)
    pg.press("#message textarea", "Enter")


def set_views(pg: Any, on: bool) -> None:
    for label in VIEW_NAMES:
        box = pg.locator("#views").get_by_label(label, exact=True)
        box.check() if on else box.uncheck()


LATENCY_RECORDER = """() => {
    const nBots = document.querySelectorAll('#chatbot [data-testid="bot"]').length;
    window.__lat = {enter: null, stop: null, texts: [], finished: null, seen: '',
                    bots: nBots, running: false, stopText: null, statuses: [], status: ''};
    if (window.__latInstalled) return;
    window.__latInstalled = true;
    // Listeners on the document, not on elements: gradio may re-create an element on update.
    document.addEventListener('keydown', (e) => {
        const inBox = e.target.closest && e.target.closest('#message');
        if (inBox && e.key === 'Enter' && !e.shiftKey) window.__lat.enter = performance.now();
    }, true);
    document.addEventListener('click', (e) => {
        const L = window.__lat;
        if (e.target.closest && e.target.closest('#stop') && L.stop === null) {
            L.stop = performance.now();
            const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
            L.stopText = bots.length > L.bots ? bots[bots.length - 1].innerText : '';
        }
    }, true);
    new MutationObserver(() => {
        const L = window.__lat;
        if (L.enter === null) return;
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        // only a reply newer than those on the page when the recorder was armed
        const text = bots.length > L.bots ? bots[bots.length - 1].innerText : '';
        if (text !== L.seen && text.length > 0) {
            L.seen = text;
            L.texts.push([performance.now(), text.length]);
        }
        // the status line as shown (Stop's frozen copy comes first: ui/stop_freeze.js)
        const md = document.querySelector('#status [data-testid=markdown]');
        if (md && md.innerText !== L.status) {
            L.status = md.innerText;
            L.statuses.push([performance.now(), L.status.split('\\n')[0]]);
        }
        if (L.finished !== null || !md) return;
        // "finished" counts only once the status showed this reply running
        if (!md.innerText.includes('finished:')) L.running = true;
        else if (L.running) L.finished = performance.now();
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def clear_chat(pg: Any) -> None:
    """Clear and wait until the clear has landed (it also empties the message box, so a
    message typed before it lands would be wiped)."""
    pg.fill("#message textarea", "(clearing)")
    pg.click("#clear")
    wait_for(
        lambda: not bot_texts(pg) and pg.input_value("#message textarea") == "",
        "the chat to clear",
    )
    settle(pg)


def settle(pg: Any, timeout_ms: int = 30_000) -> None:
    """Wait until the page's main thread is idle (e.g. plotly finished redrawing the cleared
    plots): on a loaded machine a busy renderer delays the next reply's text by seconds."""
    pg.evaluate(
        "(t) => new Promise(r => requestAnimationFrame(() => requestIdleCallback(r, "
        "{timeout: t})))",
        timeout_ms,
    )


# Clicks Stop from inside the page the moment the next message of `role` ("bot": the reply's
# first text; "user": the sent message, i.e. the server took it) is rendered: no round trip
# through Playwright, whose own click first waits for the page to be "stable".
STOP_ON_FIRST = """(role) => {
    window.__stoppedAt = null;
    const chat = document.querySelector('#chatbot');
    const sel = `[data-testid="${role}"]`;
    const before = chat.querySelectorAll(sel).length;
    const obs = new MutationObserver(() => {
        const found = chat.querySelectorAll(sel);
        if (found.length > before && found[found.length - 1].innerText) {
            obs.disconnect();
            window.__stoppedAt = performance.now();
            document.querySelector('#stop').click();
        }
    });
    obs.observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def arm_recorder(pg: Any) -> None:
    """(Re)start LATENCY_RECORDER: call before each measured reply."""
    pg.evaluate(LATENCY_RECORDER)


def recorded(pg: Any) -> dict[str, Any]:
    return pg.evaluate("window.__lat")
