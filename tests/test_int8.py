"""Our weight-only int8 (llama/int8.py) and 16-bit weights: close to fp32, the same greedy
text on the shipped model, a quarter of the Linear bytes, exact fusion, no save, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

import llama.int8 as int8
from llama.checkpoints import CheckpointError, load, save
from llama.checkpoints.writers import random_transformer
from llama.cli import UsageError, check_model_flags, model_flags
from llama.int8 import Int8Linear, dequantise, quantise
from llama.quant import weight_bytes
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "tinychat"


@pytest.fixture
def saved(tmp_path: Path, tiny_args) -> Path:
    return save(random_transformer(tiny_args, seed=3), tmp_path)


def logits(path: Path, tokens: torch.Tensor, **kw) -> torch.Tensor:
    model = load(path, device="cpu", progress=False, **kw).model
    with torch.inference_mode():
        return model(tokens)


def test_quantise_rounds_each_row_to_half_a_step() -> None:
    w = torch.randn(8, 32) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different size
    w[3] = 0
    q, scale = quantise(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (8,)
    err = (dequantise(q, scale, torch.float32) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[3], torch.zeros(32, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 3, int8.PACK_MAX_ROWS + 1, 40])
def test_int8_linear_matches_its_dequantised_weight(rows: int) -> None:
    """Both kernels (the int8 one for few rows, dequantise + GEMM for many) compute x W^T
    of the dequantised W, up to bf16 rounding of the activations."""
    w = torch.randn(48, 64)
    layer = Int8Linear.from_weight(w)
    x = torch.randn(1, rows, 64)
    ref = x @ dequantise(layer.weight, layer.scale, torch.float32).T
    got = layer(x)
    assert got.shape == (1, rows, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_logits_stay_close_to_fp32(saved: Path, weights: str) -> None:
    tokens = torch.randint(0, 97, (2, 24))
    ref, got = logits(saved, tokens), logits(saved, tokens, weights=weights)
    err = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"{weights}: max |logit err| {err:.4f} (max |logit| {ref.abs().max():.2f}), "
        f"top-1 agreement {agree:.1%}"
    )
    assert err <= 0.05 * ref.abs().max().item()
    assert agree >= 0.9


def test_cached_int8_decode_follows_the_full_forward(saved: Path) -> None:
    model = load(saved, device="cpu", weights="int8", progress=False).model
    tokens = torch.randint(0, 97, (1, 20))
    model.setup_caches(1)
    with torch.inference_mode():
        full = model(tokens)
        steps = [model(tokens[:, :12], torch.arange(12))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(12, 20)]
    torch.testing.assert_close(
        torch.cat(steps, 1), full, rtol=0.02, atol=0.02 * full.abs().max().item()
    )


def test_every_linear_is_int8_fused_and_a_quarter_of_fp32(tmp_path: Path) -> None:
    args = TINY_CONFIGS["gqa"]
    saved = save(random_transformer(args, seed=1), tmp_path)
    fp32 = load(saved, device="cpu", progress=False).model
    model = load(saved, device="cpu", weights="int8", progress=False).model
    block = model.layers[0]
    for layer in (
        block.attention.wqkv,
        block.attention.wo,
        block.feed_forward.w13,
        block.feed_forward.w2,
        model.output,
    ):
        assert type(layer) is Int8Linear and layer.weight.dtype == torch.int8
    assert model._fast_layers() is not None, "int8 blocks must stay on the fast route"
    assert model.tok_embeddings.weight.dtype == torch.float32
    linear = [
        n
        for n, _ in fp32.named_parameters()
        if n.endswith(".weight")
        and type(fp32.get_submodule(n.removesuffix(".weight"))) is nn.Linear
    ]
    fp32_bytes = sum(fp32.get_parameter(n).numel() * 4 for n in linear)
    int8_bytes = sum(weight_bytes(m) for m in model.modules() if type(m) is Int8Linear)
    # one byte per weight plus one fp32 scale per output row
    assert int8_bytes / fp32_bytes == pytest.approx(0.25 + 1 / args.dim, rel=0.01)
    assert weight_bytes(model) < 0.5 * weight_bytes(fp32)


def test_a_tied_output_gets_an_int8_copy_and_the_embedding_stays(tmp_path: Path) -> None:
    args = TINY_CONFIGS["gqa"]
    model = random_transformer(args, seed=2)
    model.output.weight = model.tok_embeddings.weight
    saved = save(model, tmp_path)
    fp32 = load(saved, device="cpu", progress=False).model
    assert fp32.output_tied
    int8_model = load(saved, device="cpu", weights="int8", progress=False).model
    assert type(int8_model.output) is Int8Linear and not int8_model.output_tied
    assert int8_model.output.embedding_copy
    emb = int8_model.tok_embeddings.weight
    assert emb.dtype == torch.float32 and torch.equal(emb, fp32.tok_embeddings.weight)
    q, scale = int8.quantise(fp32.tok_embeddings.weight)
    assert torch.equal(int8_model.output.weight, q) and torch.equal(int8_model.output.scale, scale)
    tokens = torch.randint(0, args.vocab_size, (1, 10))
    with torch.inference_mode():
        full, ours = fp32(tokens), int8_model(tokens)
    torch.testing.assert_close(ours, full, rtol=0.02, atol=0.02 * full.abs().max().item())


def test_fusing_int8_is_exact() -> None:
    parts = [Int8Linear.from_weight(torch.randn(n, 64)) for n in (16, 8, 8)]
    holder = nn.Module()
    holder.wq, holder.wk, holder.wv = parts
    x = torch.randn(1, 1, 64)
    separate = torch.cat([p(x) for p in parts], -1)
    assert int8.fuse_int8(holder, ("wq", "wk", "wv"), "wqkv")
    assert not hasattr(holder, "wq")
    torch.testing.assert_close(holder.wqkv(x), separate, rtol=0, atol=0)


def test_bf16_prefill_upcasts_on_a_cpu_without_hardware_bf16(saved: Path, monkeypatch) -> None:
    tokens = torch.randint(0, 97, (1, 24))
    native = logits(saved, tokens, weights="bf16")
    monkeypatch.setattr(int8, "cpu_has_fast_bf16", lambda: False)
    assert int8.gemm_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    upcast = logits(saved, tokens, weights="bf16")
    ref = logits(saved, tokens)
    # fp32 products of bf16 weights: at least as close to fp32 as bf16 products
    assert (upcast - ref).abs().max() <= (native - ref).abs().max() + 1e-3


def test_shipped_model_greedy_text_is_the_same_in_int8_and_bf16() -> None:
    if not SHIPPED.is_dir():
        pytest.skip(f"{SHIPPED} is absent")
    from llama.generate import generate_text
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(SHIPPED / "tokenizer.model")
    prompt = tok.encode("Once upon a time", bos=True)
    out = {}
    for weights in ("fp32", "int8", "bf16"):
        model = load(SHIPPED, device="cpu", weights=weights, progress=False).model
        out[weights], _ = generate_text(model, tok, prompt, temperature=0.0, max_new_tokens=24)
    print(out)
    assert out["int8"] == out["fp32"]
    assert out["bf16"][:40] == out["fp32"][:40]


def test_an_int8_model_cannot_be_saved(saved: Path, tmp_path: Path) -> None:
    model = load(saved, device="cpu", weights="int8", progress=False).model
    with pytest.raises(CheckpointError, match="not floating point"):
        save(model, tmp_path / "out")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"weights": "int4"}, "weights: expected one of fp32, bf16, fp16, int8, found 'int4'"),
        ({"weights": "int8", "load_in_8bit": True}, "choose one 8-bit mode"),
        ({"weights": "bf16", "dtype": torch.float32}, "means dtype torch.bfloat16"),
    ],
)
def test_bad_weights_are_named(saved: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(saved, device="cpu", progress=False, **kw)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--weights", "int8", "--load-in-8bit"], "two 8-bit modes"),
        (["--weights", "bf16", "--dtype", "float32"], "means --dtype bfloat16"),
    ],
)
def test_cli_refuses_conflicting_weight_flags(argv: list[str], match: str) -> None:
    p = argparse.ArgumentParser()
    model_flags(p)
    with pytest.raises(UsageError, match=match):
        check_model_flags(p.parse_args(argv))


def test_cli_weights_bf16_sets_the_dtype() -> None:
    p = argparse.ArgumentParser()
    model_flags(p)
    ns = p.parse_args(["--weights", "bf16"])
    check_model_flags(ns)
    assert ns.dtype == "bfloat16"
