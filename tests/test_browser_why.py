"""The Why tab in a real browser: the app (shipped model), every Why view on, one reply, then
each figure drawn in the page, gradient x input, a replay and a sampler comparison
(bench/why_screenshots.py drives it; the PNGs land in a temporary folder)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.app_server import start_app
from tests.browser_kit import CHROMIUM_ARGS, open_app, send, set_number, status, wait_for
from tests.conftest import REPO

NAMES = ("lens", "lens_token", "sinks", "attribution", "what_if", "samplers")


def test_why_tab_draws_every_view_and_replays(tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import why_screenshots
    finally:
        sys.path.remove(str(REPO / "bench"))
    why_screenshots.run(tmp_path, [])  # raises, naming the figure, if one is never drawn
    for name in NAMES:
        png = tmp_path / f"why_{name}.png"
        assert png.is_file() and png.stat().st_size > 5_000, png


def test_a_token_clicked_in_the_inspector_is_picked_in_the_why_tab(tmp_path: Path) -> None:
    """The Playground's token inspector drives the Why tab's token: lens line and attribution."""
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    server = start_app(tmp_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
            )
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(240_000)
            open_app(pg, server.url)
            pg.get_by_role("tab", name="Why").click()
            for label in ("Logit lens", "What drove it"):
                pg.locator("#why-views").get_by_label(label, exact=True).check()
            pg.get_by_role("tab", name="Playground").click()
            set_number(pg, "max-new-tokens", 12)
            pg.fill("#seed textarea, #seed input", "2")
            send(pg, "Tell me a story about a cat.")
            wait_for(lambda: "finished:" in status(pg), "the reply")
            tokens = pg.locator("#tokens .token")
            wait_for(lambda: tokens.count() >= 6, "the reply as tokens")
            tokens.nth(4).click()
            pg.get_by_role("tab", name="Why").click()
            picked = pg.locator("#why-token input")
            wait_for(lambda: picked.input_value().startswith("4: "), "the Why tab's token 4")
            line = "() => document.querySelector('#why-line .js-plotly-plot')?.layout?.title?.text"
            wait_for(lambda: "through the layers" in (pg.evaluate(line) or ""), "the lens line")
            browser.close()
    finally:
        server.stop()
