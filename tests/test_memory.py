"""The memory estimate (issue 16 item 7, issue 15 item 7): weights + KV cache + RoPE tables +
workspace against the device's free memory, checked before anything is allocated, with a
message that says what fits; the app shortens its context to what fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama import memory
from llama.assets import shipped_model_dir
from llama.checkpoints import CheckpointError, load
from llama.checkpoints.writers import random_transformer
from llama.config import ModelArgs
from ui.runtime import load_runtime

GIB = 2**30


# 7 (and issue 15 item 7): memory estimate before allocating ---------------------------------
LLAMA_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)
LLAMA_13B = ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256)


def test_estimate_matches_the_known_sizes() -> None:
    need = memory.estimate(LLAMA_7B, torch.bfloat16)
    assert need.weights == 6_738_415_616 * 2  # 12.55 GiB
    assert need.cache == 2 * GIB  # 4096 positions, MHA, bf16
    assert memory.estimate(LLAMA_13B, torch.bfloat16).cache == 3.125 * GIB
    eight = memory.estimate(LLAMA_7B, torch.float16, load_in_8bit=True)
    assert 6.4 * GIB < eight.weights < 6.6 * GIB  # 6.48 B block weights at 1 byte + scales
    assert memory.estimate(LLAMA_7B, torch.bfloat16, world_size=2).weights == need.weights // 2


def test_what_fits_is_said_for_13b_8bit_on_a_16gb_gpu() -> None:
    free = 15 * GIB
    with pytest.raises(memory.MemoryBudgetError) as err:
        memory.check_fits(LLAMA_13B, torch.float16, torch.device("cuda"), True, free)
    text = str(err.value)
    assert "needs about 16.12 GiB on cuda but 15.00 GiB is free" in text
    assert "KV cache 3.12 GiB for 4096 positions" in text
    assert "--max-seq-len 2048" in text and "--nproc-per-node 2" in text
    with pytest.raises(memory.MemoryBudgetError, match="--load-in-8bit --max-seq-len 2048"):
        memory.check_fits(LLAMA_13B, torch.float16, torch.device("cuda"), False, free)
    with pytest.raises(memory.MemoryBudgetError, match=r"What fits: --load-in-8bit \(weights"):
        memory.check_fits(LLAMA_7B, torch.float16, torch.device("cpu"), False, 10 * GIB)
    assert memory.check_fits(LLAMA_7B, torch.float16, torch.device("cuda"), False, 16 * GIB)


def test_free_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert memory.free_bytes(torch.device("cpu"), info) == 1000 * 1024
    assert memory.free_bytes(torch.device("meta")) is None


def test_load_refuses_a_context_that_cannot_fit_before_allocating() -> None:
    """Issue 15: 2^31 positions once asked for 17 GB (CLI) / 824 GB (app) before failing."""
    with pytest.raises(CheckpointError) as err:
        load(shipped_model_dir(), device="cpu", max_seq_len=2**31, progress=False)
    text = str(err.value)
    assert "tinychat" in text and f"KV cache {2**31 * 6 * 2 * 2 * 24 * 4 / GIB:.2f} GiB" in text
    assert "What fits: --max-seq-len " in text


def test_a_huge_cache_is_refused_before_allocating(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args.replace(max_seq_len=2**31))
    with pytest.raises(memory.MemoryBudgetError, match=r"max_seq_len: a KV cache of 2147483648"):
        model.setup_caches(1)
    assert model.caches() == []


def test_the_app_shortens_the_context_to_what_fits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped model's 512 positions with memory for 256 (and not 512): the app loads
    with 256, says so, and the cache holds 256."""
    args = ModelArgs.from_params_json(shipped_model_dir() / "params.json")
    small = memory.estimate(args.replace(max_seq_len=256), torch.float32).total
    monkeypatch.setattr(memory, "free_bytes", lambda device: small + 1024)
    runtime = load_runtime(shipped_model_dir(), device="cpu", progress=False)
    assert runtime.max_seq_len == 256 and runtime.model.caches()[0].capacity == 256
    assert "context shortened from 512 to 256 positions" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="What fits: --max-seq-len 256"):
        load(shipped_model_dir(), device="cpu", max_seq_len=512, progress=False)
