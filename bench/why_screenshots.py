"""Screenshots of the Why tab for the README, from the running app in headless chromium.

    python bench/why_screenshots.py [--out assets/screenshots] [app.py flags, e.g. --model X]

Starts app.py (tests/app_server.py), switches every Why view on, sends one message, waits for
the reply to finish, then captures each Why figure as it is drawn in the page: the logit
lens, the chosen token through the layers, the sink heads, what drove the token (with
gradient x input), a what-if replay with one GQA group zeroed, and a sampler comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.app_server import start_app

CHROMIUM = "/usr/bin/chromium"
MESSAGE = "Tell me a story about a cat."
TIMEOUT_S = 300
MAX_NEW_TOKENS = 60  # within the Why probe's window: every reply token can be picked
SEED = 2
TOKEN_INDEX = 6  # the reply token the per-token views and the replay start from


def wait_until(
    check: Callable[[], bool], what: str, state: Callable[[], str] | None = None
) -> None:
    """Poll `check`; on timeout the error says `what` and, when given, `state()` (what the
    page showed), so a failure in CI can be read without a rerun."""
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            seen = f"; the page showed: {state()}" if state is not None else ""
            raise TimeoutError(f"timed out waiting for {what}{seen}")
        time.sleep(0.3)


def title_of(pg: object, elem_id: str) -> str:
    return pg.evaluate(  # type: ignore[attr-defined]
        f"""() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');
        return gd && gd.layout && gd.layout.title ? gd.layout.title.text || '' : ''; }}"""
    )


def choose(pg: object, elem_id: str, text: str) -> None:
    """Type into a dropdown's filter and take its first match, again until the dropdown
    shows it (an update landing while typing can drop the keystrokes)."""
    box = f"#{elem_id} input"

    def taken() -> bool:
        if pg.input_value(box).startswith(text):  # type: ignore[attr-defined]
            return True
        pg.fill(box, text)  # type: ignore[attr-defined]
        pg.press(box, "Enter")  # type: ignore[attr-defined]
        return pg.input_value(box).startswith(text)  # type: ignore[attr-defined]

    wait_until(taken, f"#{elem_id} to take {text!r}", lambda: repr(pg.input_value(box)))


def widths(pg: object, elem_id: str) -> list:
    return pg.evaluate(  # type: ignore[attr-defined]
        f"""() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');
        const box = document.querySelector('#{elem_id}');
        return [gd && gd._fullLayout && gd._fullLayout.width, gd && gd.clientWidth,
                box.clientWidth]; }}"""
    )


def fits(pg: object, elem_id: str) -> bool:
    """Whether the figure was drawn at its container's width (not while its tab was hidden)."""
    return pg.evaluate(  # type: ignore[attr-defined]
        f"""() => {{ const gd = document.querySelector('#{elem_id} .js-plotly-plot');
        return !!gd && !!gd._fullLayout && gd._fullLayout.width >= 0.9 * gd.clientWidth
            && gd.clientWidth > 0; }}"""
    )


def capture(pg: object, elem_id: str, out: Path, name: str, before: str = "") -> None:
    """Wait until the figure's title is set and differs from `before`; save its element."""

    def drawn() -> bool:
        if title_of(pg, elem_id) in ("", before):
            return False
        if fits(pg, elem_id):
            return True
        # drawn while hidden, at plotly's default width: a resize lets it fit its column
        pg.evaluate("window.dispatchEvent(new Event('resize'))")  # type: ignore[attr-defined]
        return False

    def state() -> str:
        pg.screenshot(path=str(out / f"why_timeout_{name}.png"))  # type: ignore[attr-defined]
        token = pg.input_value("#why-token input")  # type: ignore[attr-defined]
        return (
            f"title {title_of(pg, elem_id)!r} (before {before!r}), widths "
            f"{widths(pg, elem_id)}, token {token!r}; screenshot why_timeout_{name}.png"
        )

    wait_until(drawn, f"#{elem_id} to draw", state)
    loc = pg.locator(f"#{elem_id}")  # type: ignore[attr-defined]
    loc.scroll_into_view_if_needed()
    time.sleep(0.5)  # plotly's transition after the title is set
    loc.screenshot(path=str(out / f"why_{name}.png"))
    print(f"why_{name}.png: {title_of(pg, elem_id)}")


def run(out: Path, flags: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    server = start_app(Path(tempfile.mkdtemp()), *flags)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(60_000)
            pg.goto(server.url)
            pg.wait_for_selector("#message textarea")
            pg.get_by_role("tab", name="Why").click()
            for label in ("Logit lens", "Attention sinks", "What drove it"):
                pg.locator("#why-views").get_by_label(label, exact=True).check()
            pg.get_by_role("tab", name="Playground").click()
            box = pg.locator("#max-new-tokens input[type=number]")
            box.fill(str(MAX_NEW_TOKENS))
            box.press("Enter")
            pg.fill("#seed textarea, #seed input", str(SEED))  # the README's text describes it
            pg.fill("#message textarea", MESSAGE)
            pg.press("#message textarea", "Enter")
            status = "#status [data-testid=markdown]"
            wait_until(lambda: "finished:" in pg.locator(status).inner_text(), "the reply")
            pg.get_by_role("tab", name="Why").click()
            # The record of the whole reply has been drawn: a token picked earlier could be
            # one the final record lacks (the picker follows the record while the reply runs).
            token_box = pg.locator("#why-token")
            wait_until(lambda: "of the finished reply" in token_box.inner_text(), "the last record")
            capture(pg, "why-lens", out, "lens")
            before = title_of(pg, "why-line")
            # an early reply token, so that a replay from it has room to diverge
            choose(pg, "why-token", f"{TOKEN_INDEX}: ")  # the first match: that reply token
            choose(pg, "why-layer", "layer 2")
            choose(pg, "why-target", "GQA group 1")
            capture(pg, "why-line", out, "lens_token", before)
            capture(pg, "why-sinks", out, "sinks")
            before = title_of(pg, "why-attribution")
            pg.click("#why-grad")
            capture(pg, "why-attribution", out, "attribution", before)
            pg.click("#why-replay")
            capture(pg, "why-replay-plot", out, "what_if", "")
            pg.click("#why-compare")
            capture(pg, "why-compare-plot", out, "samplers", "")
            browser.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/screenshots"))
    args, flags = parser.parse_known_args()
    run(args.out, flags)


if __name__ == "__main__":
    main()
