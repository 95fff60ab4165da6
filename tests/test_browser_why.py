"""The Why tab in a real browser: the app (shipped model), every Why view on, one reply, then
each figure drawn in the page, gradient x input, a replay and a sampler comparison
(bench/why_screenshots.py drives it; the PNGs land in a temporary folder)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

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
