"""A session's gradio state stays the same size turn after turn (issue 15, item 8).

gradio 6.31 kept a new copy of every output a streaming event skipped and later filled (plots,
text boxes), under a new id with its value: ~9 components and ~1.5 MB per turn with the live
figures on, for the session's life. Runs the app in this process (to read the server's
per-session state) and talks to it through gradio_client like any API user.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import gradio as gr
import pytest
from gradio_client import Client

from tests.app_server import free_port, model_path, model_template
from tests.test_gradio_client import message, respond_args, seed
from ui.layout import build_demo, launch_kwargs
from ui.outputs import VIEW_LABELS
from ui.runtime import load_runtime

TURNS = 3


@pytest.fixture(scope="module")
def demo() -> Iterator[gr.Blocks]:
    rt = load_runtime(model_path(), progress=False)
    app = build_demo(rt)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **launch_kwargs(),
    )
    try:
        yield app
    finally:
        app.close()


def test_session_config_does_not_grow_with_turns(demo: gr.Blocks) -> None:
    client = Client(demo.local_url, verbose=False)
    template = model_template()
    try:
        for t in range(TURNS):
            client.predict(message(0, t), api_name="/add_message")
            args = respond_args(template, seed(0, t), views=list(VIEW_LABELS), every=4)
            out = client.submit(*args, api_name="/respond").result(timeout=600)
            assert "finished:" in out[5]
        session = demo.state_holder.session_data[client.session_hash]
        declared = set(demo.default_config.blocks)
        stray = set(session.blocks_config.blocks) - declared
        assert not stray, f"{len(stray)} component copies kept after {TURNS} turns"
        assert set(session.config_values) <= declared
    finally:
        client.close()


def test_malloc_arenas_capped_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import app

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux-only")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert app.limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert app.limit_malloc_arenas() is False  # the user's own setting wins
