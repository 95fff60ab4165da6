"""8-bit loading (bitsandbytes Linear8bitLt on CPU): close to fp32, ~1/4 of the weight memory,
and a clear error when bitsandbytes is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llama.checkpoints import CheckpointError, load, save
from llama.checkpoints.writers import random_transformer
from llama.quant import QuantisationUnavailableError, quantise_model, weight_bytes
from tests.conftest import TINY_CONFIGS

bnb = pytest.importorskip("bitsandbytes")


def block_linear_bytes(model: nn.Module) -> int:
    return sum(weight_bytes(m) for m in model.layers.modules()
               if isinstance(m, nn.Linear | bnb.nn.Linear8bitLt))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save(random_transformer(TINY_CONFIGS["gqa"], seed=3), tmp_path)


def test_8bit_logits_stay_close_to_fp32(tiny_args, tmp_path: Path) -> None:
    saved = save(random_transformer(tiny_args, seed=3), tmp_path)
    fp32 = load(saved, device="cpu", progress=False)
    int8 = load(saved, device="cpu", load_in_8bit=True, progress=False)
    assert int8.load_in_8bit
    tokens = torch.randint(0, 97, (4, 16))
    with torch.no_grad():
        ref, got = fp32.model(tokens), int8.model(tokens)
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{int8.model.args.attention_kind}: 8-bit max |logit err| {err:.4f} "
          f"(max |logit| {scale:.2f}), top-1 agreement {agree:.1%}")
    assert err <= 0.05 * scale
    assert agree >= 0.9


def test_block_linears_are_int8_and_a_quarter_of_fp32(saved: Path) -> None:
    fp32 = load(saved, device="cpu", progress=False).model
    int8 = load(saved, device="cpu", load_in_8bit=True, progress=False).model
    for block in int8.layers:
        for lin in (*[getattr(block.attention, n) for n in ("wq", "wk", "wv", "wo")],
                    *[getattr(block.feed_forward, n) for n in ("w1", "w2", "w3")]):
            assert isinstance(lin, bnb.nn.Linear8bitLt) and lin.weight.dtype == torch.int8
    assert int8.tok_embeddings.weight.dtype == torch.float32
    assert type(int8.output) is nn.Linear
    ratio = block_linear_bytes(int8) / block_linear_bytes(fp32)
    total = weight_bytes(int8) / weight_bytes(fp32)
    print(f"block Linear bytes 8-bit/fp32 = {ratio:.3f}, whole model {total:.3f}")
    # int8 weights plus one fp32 scale per output row: 1/4 + 1/in_features.
    assert 0.25 <= ratio <= 0.25 + 4 / 64 / 4 + 1e-6


def test_8bit_cached_decode_matches_its_full_forward(saved: Path) -> None:
    model = load(saved, device="cpu", load_in_8bit=True, progress=False).model
    model.setup_caches(1)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :6], torch.arange(6))]
        steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(6, 10)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 0.05 * full.abs().max()


def test_quantise_model_after_loading_equals_load_in_8bit(saved: Path) -> None:
    direct = load(saved, device="cpu", load_in_8bit=True, progress=False).model
    later = quantise_model(load(saved, device="cpu", progress=False, fuse=False).model)
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(direct(tokens), later(tokens))


def test_missing_bitsandbytes_says_how_to_install(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import` raise
    with pytest.raises(QuantisationUnavailableError, match="pip install bitsandbytes"):
        load(saved, device="cpu", load_in_8bit=True, progress=False)
    assert load(saved, device="cpu", progress=False).model is not None  # fp32 still fine


def test_saving_an_8bit_model_is_refused(saved: Path, tmp_path: Path) -> None:
    model = load(saved, device="cpu", load_in_8bit=True, progress=False).model
    with pytest.raises(CheckpointError, match="8-bit"):
        save(model, tmp_path / "again")
