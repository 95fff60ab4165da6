"""The GPU paths, checked on the CPU where they can be: the compiled decode as generate()
runs it (graph count, spans), host syncs per token, the CUDA dtype choice, the 8-bit path,
fusion before the device copy, the memory estimate and MPS's RoPE form. What needs a real
GPU is in tests/test_cuda.py (and bench/gpu_check.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import llama.generate as generate_mod
from llama.assets import shipped_model_dir
from llama.checkpoints import load
from llama.checkpoints.writers import random_transformer
from llama.config import ModelArgs
from llama.generate import generate
from llama.model import Transformer
from llama.runtime_opts import compile_decode, decode_spans, span_for, uncompile_decode
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)


class GraphCounter:
    """A torch.compile backend that runs dynamo's graphs as they are and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, _inputs: list[Tensor]) -> Callable:
        self.graphs += 1
        return gm.forward


@pytest.fixture(scope="module")
def shipped() -> tuple[Transformer, Tokenizer]:
    loaded = load(shipped_model_dir(), device="cpu", progress=False)
    assert loaded.tokenizer_path is not None
    loaded.model.setup_caches(1)
    return loaded.model, Tokenizer(loaded.tokenizer_path)


def greedy_ids(model: Transformer, tok: Tokenizer, prompt: list[int], n: int = 40) -> list[int]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return [s.token_id for s in generate(model, tok, prompt, params, n_top=0)]


# 1 and 3: the compiled decode as generate() runs it -----------------------------------------
def test_decode_spans_cover_the_cache_in_few_steps() -> None:
    assert decode_spans(4096) == [256, 1024, 4096]
    assert decode_spans(512) == [256, 512]
    assert decode_spans(100) == [100]
    assert [span_for([256, 1024, 4096], n) for n in (1, 256, 257, 4096)] == [256, 256, 1024, 4096]


def test_compiled_decode_keeps_its_warm_up_graphs_through_generate(
    shipped: tuple[Transformer, Tokenizer],
) -> None:
    """One graph per span at warm-up, none more after replies that cross a span: the
    warm-up's inputs must look to dynamo exactly like generate()'s (dispatch keys, device,
    dtype, grad mode), and greedy ids equal the eager ones."""
    model, tok = shipped
    prompt = tok.encode("Once upon a time", bos=True)
    eager = greedy_ids(model, tok, prompt)
    torch._dynamo.reset()
    counter = GraphCounter()
    try:
        compiled = compile_decode(model, backend=counter)
        spans = compiled.spans
        assert spans == [256, 512] and counter.graphs == len(spans)
        assert greedy_ids(model, tok, prompt) == eager
        long_prompt = prompt + tok.encode(" and the sun was warm." * 40, bos=False)[:250]
        n = 20
        assert len(long_prompt) < spans[0] < len(long_prompt) + n  # the reply crosses a span
        want = greedy_ids(model, tok, long_prompt, n)
        uncompile_decode(model)
        assert greedy_ids(model, tok, long_prompt, n) == want
        model.compiled_decode = compiled
        greedy_ids(model, tok, prompt)
        assert counter.graphs == len(spans), "a reply compiled a new graph"
    finally:
        uncompile_decode(model)
        torch._dynamo.reset()


def test_compiled_step_reads_only_its_span_of_the_cache(tiny_args: ModelArgs) -> None:
    """Positions past the span never enter the step: garbage there changes nothing."""
    model = random_transformer(tiny_args.replace(max_seq_len=600))
    model.setup_caches(1)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 8))
    with torch.inference_mode():
        model(tokens, torch.arange(8))
        want = model.static_decode(tokens[:, :1], torch.tensor([8]), 256)
        for cache in model.caches():
            cache.kv[:, :, 256:] = float("nan")
        got = model.static_decode(tokens[:, :1], torch.tensor([8]), 256)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# 4: host syncs per token ----------------------------------------------------------------------
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch, host: Tensor) -> list[str]:
    """Record every Tensor -> Python value read, except of `host` (the decoder's positions,
    which live on the host: reading them never waits for a device)."""
    reads: list[str] = []
    base = host.untyped_storage().data_ptr()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(t: Tensor, *a: object, _orig: Callable = original, _name: str = name) -> object:
            if t.device.type == "meta" or t.untyped_storage().data_ptr() != base:
                reads.append(_name)
            return _orig(t, *a)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@pytest.mark.parametrize("n_top", [0, 5])
@pytest.mark.parametrize("probe_on", [False, True])
def test_one_host_read_per_token(
    shipped: tuple[Transformer, Tokenizer],
    monkeypatch: pytest.MonkeyPatch,
    n_top: int,
    probe_on: bool,
) -> None:
    """Every value a decode step brings to Python, other than the host positions, comes in
    one transfer (the sampled id with its probability and top-k): on a GPU that is one sync.
    With a probe watching every layer, the per-layer captures read host positions only."""
    from llama.probes import Probe as AttentionProbe

    model, tok = shipped
    positions: list[Tensor] = []
    real = generate_mod.host_positions

    def keep(n: int, device: torch.device) -> Tensor:
        positions.append(real(n, device))
        return positions[-1]

    monkeypatch.setattr(generate_mod, "host_positions", keep)
    probe = AttentionProbe(model.args, layers=set(range(model.args.n_layers))) if probe_on else None
    steps = generate(
        model, tok, tok.encode("Once upon a time", bos=True), GREEDY, probe, None, n_top
    )
    next(steps)  # prefill and the first pick
    reads = count_host_reads(monkeypatch, positions[0])
    for i in range(10):
        before = len(reads)
        next(steps)
        assert reads[before:] == ["tolist"], f"decode step {i}: {reads[before:]}"
    monkeypatch.undo()
    steps.close()
