"""Runtime speed settings: CPU threads and the compiled decode step.

- `physical_cores()` / `recommended_threads(...)` / `configure_threads(...)` /
  `apply_threads(...)`: torch's intra-op
  threads. One thread per physical core for models whose decode reads enough weights to
  need the memory bandwidth of every core; at most two for tiny models, whose decode is a
  chain of small kernels (bench/decode.py --threads measures any count; see
  bench/RESULTS.md).
- `compile_decode(model)`: torch.compile of `Transformer.static_decode` (static shapes: the
  step attends over a span of the preallocated cache with a mask, one graph per span of
  `decode_spans`; no host reads), installed as `model.compiled_decode` so that
  `model(tokens, input_pos)` with one token per sequence uses it. On CUDA the default mode
  "reduce-overhead" also captures each span's step in a CUDA graph. `uncompile_decode(model)`
  goes back to eager.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama.functional import onednn_fp32
from llama.model import Transformer

# Below this many parameters a CPU decode step is a chain of small kernels: on a quiet 2-core
# machine two threads still beat one (bench/decode.py, the shipped 3.9M model: 269 vs 238
# tokens/s eager, 338 vs 282 compiled), but what more threads would buy is unmeasured, and
# waking and joining each costs time on every small kernel: SMALL_MODEL_MAX_THREADS caps
# them. (On a machine already busy with another job, one thread did best: --threads 1.)
# Above it decode streams weights and wants every core's bandwidth (stories15M, 24M:
# 159 tokens/s on two threads vs 104 on one).
SMALL_MODEL_PARAMS = 10_000_000
SMALL_MODEL_MAX_THREADS = 2


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = allowed or os.cpu_count() or 1
    try:
        text = cpuinfo.read_text()
    except OSError:
        return logical
    cores, siblings = set(), 0
    physical = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif key == "processor":
            siblings += 1
        if physical is not None and core is not None:
            cores.add((physical, core))
            physical = core = None
    if not cores or siblings == 0:
        return logical
    return max(1, min(logical, logical * len(cores) // siblings))


def recommended_threads(n_params: int, device: torch.device | str = "cpu") -> int:
    """Intra-op threads for decoding a model of n_params on `device`: physical cores, at most
    SMALL_MODEL_MAX_THREADS for tiny CPU models."""
    if torch.device(device).type == "cpu" and n_params < SMALL_MODEL_PARAMS:
        return min(SMALL_MODEL_MAX_THREADS, physical_cores())
    return physical_cores()


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to n (default: physical cores); returns the value set."""
    n = physical_cores() if n is None else n
    if n < 1:
        raise ValueError(f"threads: expected a positive integer, found {n}")
    torch.set_num_threads(n)
    return n


def apply_threads(requested: int | None, n_params: int, device: torch.device | str) -> int:
    """Set torch's threads for serving a model of n_params on `device`: `requested` (a
    --threads flag) when given, else `recommended_threads`. Returns the value set."""
    return configure_threads(
        requested if requested is not None else recommended_threads(n_params, device)
    )


# The compiled decode attends over a bucket of the cache, not all of it: the smallest span
# below, times SPAN_GROWTH until the capacity. A 7B cache of 4096 positions gets spans 256,
# 1024 and 4096: a short chat reads 256 cached positions per layer (with the full span it
# read all 4096: +2 GiB per token, 16% over the weights), and only three graphs are built.
FIRST_SPAN = 256
SPAN_GROWTH = 4


def decode_spans(capacity: int) -> list[int]:
    """The cache spans a compiled decode step is built for (ascending; the last is capacity)."""
    spans, span = [], FIRST_SPAN
    while span < capacity:
        spans.append(span)
        span *= SPAN_GROWTH
    return [*spans, capacity]


def span_for(spans: list[int], kv_len: int) -> int:
    """The smallest span holding kv_len positions."""
    return next(s for s in spans if s >= kv_len)


class CompiledDecode:
    """The compiled step as `Transformer.compiled_decode` calls it: (tokens (B, 1), input_pos
    (1,), kv_len) -> logits.

    Every call copies its inputs into buffers this object owns and runs under inference
    mode, so dynamo sees tensors of one kind whatever the caller made (a tensor made in or
    outside inference mode carries a different dispatch key set, which dynamo guards on: a
    warm-up whose inputs differ from generate()'s compiled a second graph on the first
    real token). Each span of `spans` is one graph.
    """

    def __init__(self, model: Transformer, step: Callable[..., Tensor], graphs: bool) -> None:
        cache = model.caches()[0]
        self.device = cache.kv.device
        self.first = model.layers[0].attention  # its cache tells the current capacity
        self.step, self.graphs = step, graphs
        self._spans: tuple[int, list[int]] = (0, [])  # (capacity, its spans)
        with torch.inference_mode():
            batch = cache.kv.shape[0]
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self.input_pos = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def spans(self) -> list[int]:
        """decode_spans of the current cache (setup_caches may have replaced it)."""
        capacity = self.first.cache.capacity
        if self._spans[0] != capacity:
            self._spans = (capacity, decode_spans(capacity))
        return self._spans[1]

    def __call__(self, tokens: Tensor, input_pos: Tensor, kv_len: int) -> Tensor:
        with torch.inference_mode():
            # A CPU input_pos (pinned where it matters) is copied without a device sync.
            self.tokens[: tokens.shape[0]].copy_(tokens, non_blocking=True)
            self.input_pos.copy_(input_pos, non_blocking=True)
            logits = self.step(self.tokens, self.input_pos, span_for(self.spans, kv_len))
            logits = logits[: tokens.shape[0]]
            # A CUDA graph replay overwrites its output buffer: hand out a copy.
            return logits.clone() if self.graphs else logits

    def warm_up(self, model: Transformer) -> None:
        """Build every span's graph now (positions 0, which the next prefill overwrites),
        through `model.forward` as generate() calls it."""
        runs = 3 if self.graphs else 1  # CUDA graphs: warm-up runs, then the recording
        with torch.inference_mode():
            tokens = torch.zeros(self.tokens.shape, dtype=torch.long, device=self.device)
            for span in self.spans:
                pos = torch.tensor([span - 1])  # kv_len == span: this span's graph
                for _ in range(runs):
                    model(tokens, pos)


def compile_decode(
    model: Transformer, mode: str | None = None, warmup: bool = True, backend: Any = "inductor"
) -> CompiledDecode:
    """Install a torch.compile'd decode step on `model` (see the module docstring).

    mode: torch.compile's mode; default "reduce-overhead" on CUDA (CUDA graphs), "default"
    elsewhere (ignored unless backend is "inductor"). Sets up KV caches for batch 1 if there
    are none. warmup: compile every span's graph now instead of on the first token that
    needs it. Compiling takes seconds to minutes per span (inductor builds C++ or Triton
    kernels); the eager path stays in use while an observer is set.
    """
    if not model.caches():
        model.setup_caches(1)
    device = model.tok_embeddings.weight.device
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if backend != "inductor":
        mode = None
    model._rope_table(device, complex_=False)  # built eagerly: not traced into the graph
    onednn_fp32()  # probed eagerly too: the step's fp32 products call it (functional.linear)
    step = torch.compile(model.static_decode, mode=mode, dynamic=False, backend=backend)
    compiled = CompiledDecode(
        model, step, graphs=mode == "reduce-overhead" and device.type == "cuda"
    )
    model.compiled_decode = compiled
    if warmup:
        compiled.warm_up(model)
    return compiled


def uncompile_decode(model: Transformer) -> None:
    """Back to the eager decode step."""
    model.compiled_decode = None
