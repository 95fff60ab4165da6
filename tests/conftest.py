"""Shared fixtures: where ../shared/data is, and tiny random configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llama.config import ModelArgs

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test saying why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared/data is provided beside the repo in CI")
    return path


TINY_CONFIGS = {
    "mha": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64
    ),
    "gqa": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64
    ),
    "mqa": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=97, multiple_of=16, max_seq_len=64
    ),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_args(request: pytest.FixtureRequest) -> ModelArgs:
    return TINY_CONFIGS[request.param]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one torch thread, since a second only contends on a shared 2-core machine
    (~20x slower seen here). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOLLM2_GGUF = ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol_tok():  # -> llama.tokenizer.Tokenizer
    from llama.tokenizer import load_tokenizer

    return load_tokenizer(shared_file(*SMOLLM2_GGUF))


@pytest.fixture(scope="session")
def hf_smol_tok():  # -> transformers' tokenizer built from the same GGUF: the reference
    transformers = pytest.importorskip("transformers")
    path = shared_file(*SMOLLM2_GGUF)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
