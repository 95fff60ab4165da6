"""What only a CUDA GPU can show: 16-bit logits against fp32, 8-bit, the compiled decode
(CUDA graphs) against eager greedy ids, cache, probes, host syncs and the allocator after
fusion. Every test is marked `cuda` and skips, saying so, where there is no CUDA device;
bench/gpu_check.sh runs them (with throughput figures) on a machine that has one."""

from __future__ import annotations

import warnings

import pytest
import torch

from llama.assets import shipped_model_dir
from llama.checkpoints import default_dtype, load, save
from llama.checkpoints.writers import random_transformer
from llama.generate import generate
from llama.model import Transformer
from llama.probes import Probe
from llama.runtime_opts import compile_decode, uncompile_decode
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer, open_tokenizer
from tests.conftest import TINY_CONFIGS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]
CUDA = torch.device("cuda")
ARGS = TINY_CONFIGS["gqa"].replace(max_seq_len=600)  # two compiled spans: 256 and 600


def greedy(model: Transformer, tok: Tokenizer, prompt: list[int], n: int = 48) -> list[int]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return [s.token_id for s in generate(model, tok, prompt, params, n_top=0)]


@pytest.fixture(scope="module")
def shipped() -> tuple[Transformer, Tokenizer, list[int]]:
    loaded = load(shipped_model_dir(), device=CUDA, dtype=torch.float32, progress=False)
    assert loaded.tokenizer_path is not None
    tok = open_tokenizer(loaded)
    return loaded.model, tok, tok.encode("Once upon a time, a little dog", bos=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_logits_follow_fp32(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    reference = random_transformer(ARGS, seed=2).to(CUDA)
    half = random_transformer(ARGS, seed=2).to(CUDA, dtype)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 40), device=CUDA)
    with torch.no_grad():
        want, got = reference(tokens), half(tokens)
    assert got.dtype == torch.float32
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < (2e-2 if dtype == torch.float16 else 6e-2), err
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_default_dtype_is_native() -> None:
    want = torch.bfloat16 if torch.cuda.is_bf16_supported(False) else torch.float16
    assert default_dtype(CUDA) == want
    assert default_dtype(CUDA, load_in_8bit=True) == torch.float16


def test_8bit_on_cuda_follows_fp32(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    path = save(random_transformer(ARGS, seed=4), tmp_path)
    reference = load(path, device=CUDA, dtype=torch.float32, progress=False).model
    eight = load(path, device=CUDA, load_in_8bit=True, progress=False)
    assert eight.dtype == torch.float16
    tokens = torch.randint(0, ARGS.vocab_size, (1, 32), device=CUDA)
    with torch.no_grad():
        want, got = reference(tokens), eight.model(tokens)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < 0.1, err


def test_cached_decode_equals_full_forward() -> None:
    model = random_transformer(ARGS, seed=5).to(CUDA, default_dtype(CUDA))
    model.setup_caches(1)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), device=CUDA)
    with torch.inference_mode():
        full = model(tokens)
        parts = [model(tokens[:, :16], torch.arange(16))]
        parts += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=3e-2, rtol=0)


def test_compiled_decode_equals_eager_with_one_graph_per_span(
    shipped: tuple[Transformer, Tokenizer, list[int]],
) -> None:
    """inductor + CUDA graphs ("reduce-overhead"), as the app runs it; a reply that crosses
    the first span (256) compiles nothing new."""
    from torch._dynamo.utils import counters

    model, tok, prompt = shipped
    long_prompt = (prompt * 40)[:240]
    eager = [greedy(model, tok, prompt), greedy(model, tok, long_prompt, 40)]
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_decode(model)
    try:
        warm = counters["stats"]["unique_graphs"]
        assert warm == len(compiled.spans) == 2
        got = [greedy(model, tok, prompt), greedy(model, tok, long_prompt, 40)]
        assert got == eager
        assert counters["stats"]["unique_graphs"] == warm
    finally:
        uncompile_decode(model)
        torch._dynamo.reset()


def test_one_device_sync_per_token(shipped: tuple[Transformer, Tokenizer, list[int]]) -> None:
    """torch's sync debug mode warns on every synchronising call: one per decode step (the
    pick's single transfer), with a probe on every layer too."""
    model, tok, prompt = shipped
    probe = Probe(model.args, layers=set(range(model.args.n_layers)))
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    for watch in (None, probe):
        steps = generate(model, tok, prompt, params, watch, None, 0)
        next(steps)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(8):
                    next(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        assert len(syncs) == 8, [str(w.message) for w in syncs]
        steps.close()


def test_probes_on_cuda_equal_cpu(shipped: tuple[Transformer, Tokenizer, list[int]]) -> None:
    model, tok, prompt = shipped
    cpu = load(shipped_model_dir(), device="cpu", dtype=torch.float32, progress=False).model
    traces = []
    for m in (model, cpu):
        probe = Probe(m.args, layers={0, 3})
        params = SamplingParams(temperature=0.0, max_new_tokens=6)
        list(generate(m, tok, prompt, params, probe, None, 0))
        traces.append(probe.snapshot())
    gpu, host = traces
    assert gpu.positions == host.positions and gpu.attention.keys() == {0, 3}
    for layer, view in gpu.attention.items():
        assert view.probs.device.type == "cpu"
        torch.testing.assert_close(view.probs, host.attention[layer].probs, atol=1e-3, rtol=0)


def test_fusion_leaves_no_reserved_originals(tmp_path) -> None:
    """Loading fuses on the host: what the allocator reserves stays near what is allocated."""
    path = save(random_transformer(ARGS.replace(dim=512, n_heads=8, n_kv_heads=8)), tmp_path)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    model = load(path, device=CUDA, dtype=torch.float16, progress=False).model
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.memory_reserved() - before < held * 1.25 + 8 * 2**20
