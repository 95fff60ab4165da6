"""The GPU paths, checked on the CPU where they can be: the compiled decode as generate()
runs it (graph count, spans), host syncs per token, the CUDA dtype choice, the 8-bit path,
fusion before the device copy, MPS (no float64, real RoPE), the NCCL hang diagnosis and the GPU
check's dry run (the memory estimate: tests/test_memory.py). What needs a real GPU is in
tests/test_cuda.py (and bench/gpu_check.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

import llama.generate as generate_mod
from llama.assets import shipped_model_dir
from llama.checkpoints import default_dtype, load, save
from llama.checkpoints.writers import random_transformer
from llama.config import ModelArgs
from llama.generate import generate
from llama.model import Transformer
from llama.runtime_opts import compile_decode, decode_spans, span_for, uncompile_decode
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer, open_tokenizer
from tests.conftest import TINY_CONFIGS

TINY = TINY_CONFIGS["gqa"]
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
    return loaded.model, open_tokenizer(loaded)


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


# 2: the CUDA dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("native_bf16", "eight_bit", "want"),
    [
        (True, False, torch.bfloat16),
        (False, False, torch.float16),  # T4, V100: bf16 only emulated
        (True, True, torch.float16),  # LLM.int8 computes in fp16
    ],
)
def test_cuda_dtype_follows_the_gpu(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, eight_bit: bool, want: torch.dtype
) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert default_dtype(torch.device("cuda"), eight_bit) == want
    assert asked == [False]
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("mps")) == torch.float16


# 6: the 8-bit path -------------------------------------------------------------------------
def test_8bit_quantises_directly_from_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 weights and scales bitsandbytes' own route gives (Int8Params moved from the
    CPU casts to fp16 first), from one fp16 copy: no fp32 upcast of a 16-bit weight."""
    bnb = pytest.importorskip("bitsandbytes")
    from llama.checkpoints.common import build_on_meta
    from llama.quant import make_quantiser

    model = build_on_meta(TINY)
    weight = (torch.randn(TINY.dim, TINY.dim) * 0.05).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    real = bnb.functional.int8_vectorwise_quant

    def spy(t: Tensor, *a: object, **kw: object) -> object:
        seen.append(t.dtype)
        return real(t, *a, **kw)

    reference = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
    reference = reference.to("cpu")
    monkeypatch.setattr(bnb.functional, "int8_vectorwise_quant", spy)
    upcasts: list[torch.dtype] = []
    to = torch.Tensor.to

    def watch_to(t: Tensor, *a: object, **kw: object) -> Tensor:
        out = to(t, *a, **kw)
        if out.dtype == torch.float32 and t.dtype != torch.float32:
            upcasts.append(t.dtype)
        return out

    monkeypatch.setattr(torch.Tensor, "to", watch_to)
    assert make_quantiser(torch.device("cpu"))(model, "layers.0.attention.wq.weight", weight)
    monkeypatch.undo()
    layer = model.layers[0].attention.wq
    assert seen == [torch.float16] and upcasts == []
    assert torch.equal(layer.weight.data, reference.data)
    assert torch.equal(layer.weight.SCB, reference.SCB)


# 5: fusion before the device copy ---------------------------------------------------------------
def test_load_copies_only_fused_weights_to_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor the loader converts for the device (here: to float64, a move `to` makes
    visible on the CPU) has the fused shape: wq|wk|wv and w1|w3 are joined on the host first,
    so no unfused original is ever allocated on the device."""
    saved = save(random_transformer(TINY, seed=1), tmp_path)
    moved: list[tuple[int, ...]] = []
    to = torch.Tensor.to

    def watch_to(t: Tensor, *a: object, **kw: object) -> Tensor:
        out = to(t, *a, **kw)
        if out.dtype == torch.float64 and t.dtype != torch.float64:
            moved.append(tuple(t.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", watch_to)
    loaded = load(saved, device="cpu", dtype=torch.float64, progress=False)
    monkeypatch.undo()
    a, kv = TINY, TINY.kv_heads * TINY.head_dim
    qkv, w13 = (a.dim + 2 * kv, a.dim), (2 * a.ffn_hidden_dim, a.dim)
    assert moved.count(qkv) == moved.count(w13) == a.n_layers
    assert moved.count((a.dim, a.dim)) == a.n_layers  # wo only; never wq
    assert (kv, a.dim) not in moved and (a.ffn_hidden_dim, a.dim) not in moved
    reference = random_transformer(TINY, seed=1).double()
    tokens = torch.randint(0, a.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), reference(tokens))


# 9: a rank hung inside a collective, named without the collective raising (NCCL) ------------
def test_rank0_names_a_rank_missing_from_a_collective_that_never_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NCCL collectives never raise on the host: rank 0's health thread itself notices that
    it has been busy with no new collective for collective_timeout_s, blames the rank that
    entered fewer collectives, and exits after the grace period (here recorded, not done)."""
    import os
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from llama.parallel.health import Health

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    worker = dist.PrefixStore("t/", dist.TCPStore("127.0.0.1", master.port, is_master=False))
    worker.set("info/1", f"{socket.gethostname()} {os.getpid()}")  # alive: this process
    exits: list[str] = []
    health = Health(
        0,
        2,
        "127.0.0.1",
        master.port,
        prefix="t/",
        interval_s=0.05,
        grace_s=0.2,
        collective_timeout_s=0.5,
    )
    monkeypatch.setattr(health, "_exit", exits.append)
    health.start()
    try:
        with health.busy("forward #7"):
            health.collectives = 12  # rank 0 entered 12; rank 1 stopped at 11 and hangs
            beats = 0
            deadline = time.monotonic() + 60
            while not exits and time.monotonic() < deadline:
                beats += 1  # its heartbeat thread still runs
                worker.set("hb/1", f"{beats}|forward #7|11")
                time.sleep(0.05)
    finally:
        health.stop()
    assert health.failure is not None and health.failure.rank == 1
    assert "it hangs during forward #7" in str(health.failure)
    assert exits and "rank 0: exiting" in exits[0]


# The one-shot GPU check, dry-run -----------------------------------------------------------------
def test_gpu_check_says_there_is_no_gpu_and_measures_nothing(tmp_path: Path) -> None:
    """Without a GPU (hidden here even on a machine that has one) both entry points say so
    and exit 0: no install, no table, no figures."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    env = os.environ | {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
    }
    for cmd in (["bash", "bench/gpu_check.sh"], [sys.executable, "bench/gpu_check.py"]):
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("gpu_check: no CUDA GPU on this machine"), res.stdout
        assert "Nothing was" in res.stdout and "|" not in res.stdout
        assert "installing" not in res.stdout + res.stderr


# 8: MPS: no float64 anywhere in a generation, and the real RoPE form ----------------------------
def test_generation_makes_no_float64_tensor(shipped: tuple[Transformer, Tokenizer]) -> None:
    """MPS has no float64: neither path of the pick (n_top 0 or 5) may create one."""
    from torch.overrides import TorchFunctionMode

    seen: list[str] = []

    class NoDouble(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, Tensor) and out.dtype == torch.float64:
                seen.append(getattr(func, "__name__", str(func)))
            return out

    model, tok = shipped
    prompt = tok.encode("Once upon a time", bos=True)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=6, seed=1)
    with NoDouble():
        for n_top in (0, 5):
            list(generate(model, tok, prompt, params, n_top=n_top))
    assert seen == []


def test_real_rope_form_gives_the_complex_forms_logits(
    tiny_args: ModelArgs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What MPS runs (llama.rope.complex_rope is False there) against the CPU's complex form."""
    import llama.model as model_mod
    from llama.rope import complex_rope

    assert not complex_rope(torch.device("mps")) and complex_rope(torch.device("cpu"))
    model = random_transformer(tiny_args)
    model.setup_caches(1)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 12))
    with torch.inference_mode():
        want = [model(tokens[:, :8], torch.arange(8))]
        want += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(8, 12)]
        monkeypatch.setattr(model_mod, "complex_rope", lambda device: False)
        got = [model(tokens[:, :8], torch.arange(8))]
        got += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-5, rtol=0)
