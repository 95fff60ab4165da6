"""The playground in a real browser: Playwright's python package driving Debian's chromium.

One app server (tests/app_server.py) and one browser serve the whole file. The main test walks
through what a user does: type a message and watch the reply stream in while every figure
appears and changes, press Stop mid-reply, change temperature and seed and regenerate (the same
seed gives the same reply), switch layer and head, export the chat and import it back. A second
test closes a tab mid-reply and checks the model is free for the next user. Screenshots go to
test-artifacts/ (the README's come from there, copied to assets/screenshots/).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import browser_kit as kit
from tests.app_server import AppServer, start_app
from tests.browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FIGURES,
    STOP_ON_FIRST,
    bot_texts,
    clear_chat,
    send,
    set_number,
    set_views,
    status,
)
from tests.conftest import REPO

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 240_000  # a busy 2-core machine is slow to compile plotly.js


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    srv = start_app(tmp_path_factory.mktemp("browser-app"))
    yield srv
    srv.stop()


@pytest.fixture()
def page(browser: Any, server: AppServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    PAGES.append(pg)
    open_app(pg, server.url)
    yield pg
    PAGES.remove(pg)
    context.close()


def open_app(pg: Any, url: str) -> None:
    kit.open_app(pg, url)
    pg.evaluate(RECORDER)


def shot(pg: Any, name: str, full_page: bool = False, top: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"app_{name}.png"
    if top:
        pg.evaluate("window.scrollTo(0, 0)")
    pg.screenshot(path=str(path), full_page=full_page)
    return path


# Reading the page ----------------------------------------------------------------------------
def last_reply(pg: Any) -> str:
    """The last reply's text once the page has stopped changing it (markdown renders late)."""
    previous = None
    for _ in range(50):
        current = (bot_texts(pg) or [""])[-1]
        if current == previous:
            return current
        previous = current
        time.sleep(0.3)
    return previous or ""


def figure_state(pg: Any, key: str) -> str | None:
    """What a plot currently shows (title + data), or None before plotly drew it."""
    return pg.evaluate(
        """(key) => {
            const gd = document.querySelector(`#plot-${key} .js-plotly-plot`);
            if (!gd || !gd.data) return null;
            const title = (gd.layout && gd.layout.title && gd.layout.title.text) || '';
            const data = gd.data.map(d => [d.x, d.y, d.z && d.z.length, d.r, d.theta]);
            return title + '|' + JSON.stringify(data);
        }""",
        key,
    )


PAGES: list[Any] = []  # open pages, screenshotted when a wait times out


def wait_until(check: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            for i, pg in enumerate(PAGES):
                if not pg.is_closed():
                    shot(pg, f"failure_{i}", full_page=True)
            pytest.fail(f"timed out waiting for {what} (screenshots in {ARTIFACTS})")
        time.sleep(0.2)


def wait_finished(pg: Any) -> str:
    wait_until(lambda: "finished:" in status(pg), "the reply to finish")
    return status(pg)


RECORDER = """() => {
    // Notes, inside the page and as they happen, every change of the last reply's text and
    // every redraw of each plot, with whether the status line already said "finished".
    window.__log = [];
    const finished = () =>
        document.querySelector('#status [data-testid=markdown]').innerText.includes('finished:');
    const chat = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        window.__log.push({kind: 'text', len: text.length, finished: finished()});
    }).observe(chat, {subtree: true, childList: true, characterData: true});
    const box = document.querySelector('#status');
    new MutationObserver((records) => {
        const md = box.querySelector('[data-testid=markdown]');
        if (md && records.some(r => md.contains(r.target))) {
            window.__log.push({kind: 'status', finished: finished()});
        }
    }).observe(box, {subtree: true, childList: true, characterData: true});
    // gradio may replace a plot's graph div on a later update: each new one is bound as it
    // appears, or a later reply's redraws would go unnoted.
    const bind = (key) => {
        const gd = document.querySelector(`#plot-${key} .js-plotly-plot`);
        if (!gd || gd.__recorded) return;
        gd.__recorded = true;
        gd.on('plotly_afterplot', () => {
            const title = (gd.layout.title && gd.layout.title.text) || '';
            const data = JSON.stringify(gd.data.map(d => [d.x, d.y, d.z && d.z.length, d.r]));
            window.__log.push({kind: key, state: title + '|' + data, finished: finished()});
        });
    };
    for (const key of KEYS) {
        bind(key);
        new MutationObserver(() => bind(key)).observe(
            document.querySelector(`#plot-${key}`), {subtree: true, childList: true});
    }
}""".replace("KEYS", json.dumps(FIGURES))


def act_and_wait_reply(
    pg: Any, action: Callable[[], None], screenshot: str | None = None
) -> list[dict[str, Any]]:
    """Do `action` (which starts a reply) and wait until the status line, changed since,
    says the reply finished; with `screenshot`, take one while the reply streams. Returns what
    RECORDER noted meanwhile."""
    pg.evaluate("window.__log = []")
    action()
    if screenshot:
        running = "window.__log.some(e => e.kind === 'status' && !e.finished)"
        wait_until(lambda: pg.evaluate(running), "the reply to start")
        shot(pg, screenshot)
    wait_until(
        lambda: pg.evaluate("window.__log.some(e => e.kind === 'status' && e.finished)"),
        "the reply to finish",
    )
    time.sleep(0.5)  # plotly draws the last update asynchronously
    return pg.evaluate("window.__log")


def watch_reply(
    pg: Any, text: str, screenshot: str | None = None
) -> tuple[set[int], dict[str, list[str]], dict[str, str]]:
    """Send `text` and wait for the reply. Returns the reply's text lengths and each figure's
    states seen while it was still running, and each figure's final state."""
    log = act_and_wait_reply(pg, lambda: send(pg, text), screenshot)
    lengths = {e["len"] for e in log if e["kind"] == "text" and not e["finished"] and e["len"]}
    during = {k: [e["state"] for e in log if e["kind"] == k and not e["finished"]] for k in FIGURES}
    return lengths, during, {k: figure_state(pg, k) for k in FIGURES}


# Acting on the page ----------------------------------------------------------------------------
def pick(pg: Any, elem_id: str, option: str) -> None:
    pg.click(f"#{elem_id} input")
    pg.get_by_role("option", name=option, exact=True).click()


def open_accordion(pg: Any, title: str) -> None:
    pg.get_by_role("button", name=title).click()


# The tests -------------------------------------------------------------------------------------
def test_chat_stream_figures_regenerate_pickers_export_import(page: Any) -> None:
    pg = page
    shot(pg, "start", full_page=True)
    placeholders = {k: figure_state(pg, k) for k in FIGURES}
    set_number(pg, "max-new-tokens", 600)
    set_number(pg, "every", 1)

    # 1. The reply streams in, and every figure appears and then changes during the reply:
    #    each shows a drawn state while the reply is still running, and a different one at
    #    the end. (A reply can be short; then we ask again.)
    seen = []
    for _ in range(4):
        lengths, during, final = watch_reply(
            pg, "Write a story about a dog named Max.", screenshot="streaming"
        )
        drawn = {k: [s for s in during[k] if s != placeholders[k]] for k in FIGURES}
        seen.append((len(lengths), {k: len(v) for k, v in drawn.items()}))
        changed = all(any(state != final[k] for state in drawn[k]) for k in FIGURES)
        if len(lengths) >= 2 and changed:
            break
    else:
        pytest.fail(f"no streaming seen: (text lengths, figure states) per try: {seen}")
    shot(pg, "reply")

    # 3. Temperature and seed changed, then Regenerate: the same seed gives the same reply.
    set_views(pg, on=True)
    set_number(pg, "max-new-tokens", 40)
    set_number(pg, "temperature", 1.3)
    pg.fill("#seed textarea, #seed input", "42")
    act_and_wait_reply(pg, lambda: pg.click("#regenerate"))
    assert "seed 42" in status(pg)
    first = last_reply(pg)
    n_turns = len(bot_texts(pg))
    assert first
    act_and_wait_reply(pg, lambda: pg.click("#regenerate"))
    assert last_reply(pg) == first and len(bot_texts(pg)) == n_turns
    assert "42" in pg.input_value("#seed-used textarea, #seed-used input")

    # 4. Switching layer and head redraws attention from the recorded trace.
    before = figure_state(pg, "attention")
    pick(pg, "layer", "layer 2")
    wait_until(lambda: figure_state(pg, "attention") != before, "layer 2 drawn")
    at_layer = figure_state(pg, "attention")
    pick(pg, "head", "head 1 (group 0)")
    wait_until(lambda: figure_state(pg, "attention") != at_layer, "head 1 drawn")
    pg.locator("#plot-attention").scroll_into_view_if_needed()
    shot(pg, "attention", top=False)

    # 5. Export the chat, clear it, import it back.
    open_accordion(pg, "Export / import chat")
    pg.click("#export")
    link = pg.locator("#export-file a").first
    link.wait_for()
    with pg.expect_download() as download:
        link.click()
    exported = ARTIFACTS / "exported_chat.json"
    download.value.save_as(str(exported))
    saved = json.loads(exported.read_text(encoding="utf-8"))
    assert len(saved["messages"]) == 2 * n_turns and saved["messages"][-1]["content"] == first
    assert saved["sampling"]["temperature"] == 1.3 and saved["sampling"]["seed"] == 42

    pg.click("#clear")
    wait_until(lambda: bot_texts(pg) == [], "the chat to clear")
    set_number(pg, "temperature", 0.6)
    pg.locator("input[type=file]").set_input_files(str(exported))
    wait_until(
        lambda: len(bot_texts(pg)) == n_turns and bot_texts(pg)[-1] == first, "the imported chat"
    )
    wait_until(
        lambda: pg.locator("#temperature input[type=number]").input_value() == "1.3",
        "the imported temperature",
    )
    shot(pg, "imported", full_page=True)

    # 6. The RoPE lab tab draws its static figures.
    pg.get_by_role("tab", name="RoPE lab").click()
    pg.locator(".rope-lab-figure .js-plotly-plot").first.wait_for()
    assert pg.locator(".rope-lab-figure .js-plotly-plot").count() >= 3
    shot(pg, "rope_lab", full_page=True)


LONG_PROMPT = "Tell me a long story about a dog named Max."
LONG_SEED = "0"  # the shipped model answers LONG_PROMPT with 337 tokens (ends by itself)


def token_spans(pg: Any) -> Any:
    return pg.locator("#tokens .token")


def test_inspector_branching_and_stop(page: Any) -> None:
    """A whole reply, then: click a token and see its step; continue from there with another
    candidate (both versions stay reachable); then the same reply again, stopped early: what
    the page shows is a strict prefix of the whole reply and nothing arrives after the status
    says cancelled. No timing luck: the seed fixes a reply far longer than Stop needs."""
    pg = page
    set_number(pg, "max-new-tokens", 1024)
    pg.fill("#seed textarea, #seed input", LONG_SEED)
    act_and_wait_reply(pg, lambda: send(pg, LONG_PROMPT))
    full = last_reply(pg)
    assert "finished: eos" in status(pg) and len(full) > 300

    # 1. The reply as tokens; a click shows that step (candidates, views at that step).
    wait_until(lambda: token_spans(pg).count() > 50, "the reply as tokens")
    n_tokens = token_spans(pg).count()
    before = figure_state(pg, "probs")
    token_spans(pg).nth(4).click()
    info = pg.locator("#inspect-info")
    wait_until(lambda: f"Token 5 of {n_tokens}" in info.inner_text(), "token 5's step")
    assert "before samplers" in info.inner_text()
    wait_until(lambda: figure_state(pg, "probs") != before, "the probabilities at token 5")
    position = int(info.inner_text().split("at position ")[1].split(":")[0])
    assert f"position {position}" in figure_state(pg, "probs")
    assert f"position {position - 1}" in figure_state(pg, "rope")  # what the model had read
    pg.locator("#inspector").scroll_into_view_if_needed()
    shot(pg, "inspector", top=False)

    # 2. Continue from token 5 with another candidate: a new version; the old one stays.
    candidate = pg.locator("#candidate input").input_value()
    assert candidate  # the first other candidate is preselected
    act_and_wait_reply(pg, lambda: pg.click("#branch"))
    branched = last_reply(pg)
    assert branched != full and len(bot_texts(pg)) == 1
    versions = pg.locator("#versions")
    wait_until(versions.is_visible, "the versions picker")
    versions.get_by_label("version 1", exact=True).check()
    wait_until(lambda: bot_texts(pg)[-1] == full, "the first version back")
    shot(pg, "branches", top=False)

    # 3. The same reply, stopped. No timing luck: this 337-token reply decodes in ~1 s, faster
    #    than a loaded browser shows its first text, so Stop is clicked by the page as soon as
    #    the server took the message (the user's message is rendered). Either the reply had
    #    not started (the message comes back to the box) or it is cut: a strict prefix of
    #    `full` and nothing after the status. It never runs to its end. Views off: on a loaded
    #    2-core machine the renderer drawing four plots adds seconds of lag.
    set_views(pg, on=False)
    clear_chat(pg)
    pg.evaluate("window.__log = []")
    pg.evaluate(STOP_ON_FIRST, "user")
    send(pg, LONG_PROMPT)
    wait_until(lambda: pg.evaluate("window.__stoppedAt") is not None, "Stop to be clicked")
    ended = ("finished:", "Stopped before the first token")
    wait_until(lambda: any(e in status(pg) for e in ended), "the reply to end")
    final = status(pg)
    if "Stopped before the first token" in final:
        wait_until(lambda: pg.input_value("#message textarea") == LONG_PROMPT, "the message back")
        assert bot_texts(pg) == []
        return
    assert "finished: cancelled" in final
    stopped = last_reply(pg)
    assert full.startswith(stopped.rstrip()) and len(stopped) < len(full)
    log = pg.evaluate("window.__log")
    done_at = next(i for i, e in enumerate(log) if e["kind"] == "status" and e["finished"])
    assert not [e for e in log[done_at:] if e["kind"] == "text" and e["len"] != len(stopped)]


def test_out_of_range_slider_value_and_failed_import_are_shown(page: Any) -> None:
    """A typed value outside a slider's range: gradio clamps it silently, the page says so
    under the slider. A refused import leaves the chat readable (no "Error" veil over it) with
    the reason in the status line under it."""
    pg = page
    box = pg.locator("#temperature input[type=number]")
    box.fill("5")
    box.press("Enter")
    box.blur()
    note = pg.locator("#temperature .range-note")
    note.wait_for()
    assert note.inner_text() == "5 is above the maximum 2: the slider uses 2."
    assert pg.locator("#temperature input[type=range]").input_value() == "2"
    ARTIFACTS.mkdir(exist_ok=True)
    pg.locator("#temperature").screenshot(path=str(ARTIFACTS / "app_slider_clamped.png"))
    set_number(pg, "temperature", 0.6)
    assert note.count() == 0  # a value in range: the note goes
    set_number(pg, "max-new-tokens", 8)
    send(pg, "Hello")
    wait_finished(pg)
    last_reply(pg)  # the reply's markdown has settled
    before = bot_texts(pg)
    bad = ARTIFACTS / "bad_chat.json"
    bad.write_text(json.dumps({"format": "llama-playground-chat", "version": 1, "messages": 3}))
    open_accordion(pg, "Export / import chat")
    pg.locator("input[type=file]").set_input_files(str(bad))
    wait_until(lambda: "Cannot import" in status(pg), "the import's refusal in the status")
    assert "bad_chat.json: messages: expected a list" in status(pg)
    assert bot_texts(pg) == before
    assert pg.locator("#chatbot").get_by_text("Error", exact=True).count() == 0
    shot(pg, "import_refused")


def test_closing_a_tab_mid_reply_frees_the_model(browser: Any, server: AppServer) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    leaving, staying = context.new_page(), context.new_page()
    open_app(leaving, server.url)
    open_app(staying, server.url)
    set_number(leaving, "max-new-tokens", 1024)
    send(leaving, "Once upon a time")
    wait_until(lambda: len((bot_texts(leaving) or [""])[-1]) > 0, "the reply to start")
    leaving.close()
    set_number(staying, "max-new-tokens", 8)
    send(staying, "The little dog")
    start = time.monotonic()
    final = wait_finished(staying)
    assert "finished:" in final and bot_texts(staying)[-1]
    assert time.monotonic() - start < 120
    context.close()
