"""Every live view on a real GQA chat model (SmolLM2: 30 layers, 9 heads in 3 groups,
head_dim 64) in a real browser, and the README's screenshots of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests import test_browser
from tests.app_server import AppServer, start_app
from tests.browser_kit import clear_chat
from tests.conftest import SMOLLM2_GGUF, shared_file
from tests.test_browser import (
    ARTIFACTS,
    FIGURES,
    figure_state,
    last_reply,
    open_accordion,
    pick,
    set_number,
    shot,
    status,
    wait_until,
    watch_reply,
)

pytestmark = pytest.mark.browser
# test_browser's chromium and page fixtures; the page opens this module's server
browser, page = test_browser.browser, test_browser.page


@pytest.fixture(scope="module")
def server(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    gguf = shared_file(*SMOLLM2_GGUF)
    srv = start_app(
        tmp_path_factory.mktemp("smol-app"), "--model", str(gguf), "--max-seq-len", "1024"
    )
    yield srv
    srv.stop()


def test_smollm2_chat_and_every_view(page: Any) -> None:
    pg = page
    open_accordion(pg, "Template and system prompt")
    assert "The model's own (ChatML)" in pg.locator("#template").inner_text()
    assert "What is the capital of France?" in pg.content()  # a chat model's examples
    placeholders = {k: figure_state(pg, k) for k in FIGURES}
    set_number(pg, "temperature", 0)
    set_number(pg, "every", 1)
    # A 30-layer model traces the chosen layer only: choose the last one before asking.
    pick(pg, "layer", "layer 29")

    # Every view updates while a reply streams: a story long enough that the drawing process
    # delivers figures before it ends (the 8-token answer below can end first).
    set_number(pg, "max-new-tokens", 64)
    lengths, during, _ = watch_reply(pg, "Write a short story about a cat.")
    assert len(lengths) >= 2, "the story did not stream"
    for key in FIGURES:
        assert during[key], f"{key} not updated while the reply streamed"
    clear_chat(pg)

    _, _, final = watch_reply(pg, "What is the capital of France?", "smollm2_streaming")
    assert "Paris" in last_reply(pg)
    assert "finished: eos" in status(pg)  # stopped at <|im_end|>
    for key in FIGURES:
        assert final[key] not in (None, placeholders[key]), f"{key} never drawn"
    assert "Layer 29" in final["attention"] and "3 groups of 3" in final["attention"]
    assert "GQA" in final["kv"]
    shot(pg, "smollm2_chat")

    # The exact prompt: ChatML as rendered, and its ids (transformers' ids for this dialog).
    open_accordion(pg, "Prompt the model saw")
    wait_until(
        lambda: "<|im_start|>assistant" in pg.input_value("#prompt-text textarea"),
        "the rendered prompt",
    )
    ref = json.loads(shared_file("smollm2", "transformers_reference.json").read_text())
    assert pg.input_value("#prompt-ids textarea").split() == [
        str(i) for i in ref["chat"][0]["prompt_ids"]
    ]  # transformers' apply_chat_template ids for this dialog

    # One head of the third KV group, redrawn from the recorded trace.
    drawn = figure_state(pg, "attention")
    pick(pg, "head", "head 8 (group 2)")
    wait_until(lambda: figure_state(pg, "attention") != drawn, "head 8 drawn")
    for key in FIGURES:
        pg.locator(f"#plot-{key}").screenshot(path=str(ARTIFACTS / f"fig_smollm2_{key}.png"))

