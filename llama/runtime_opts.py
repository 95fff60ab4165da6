"""Runtime speed settings: CPU threads and the compiled decode step.

- `physical_cores()` / `recommended_threads(...)` / `configure_threads(...)` /
  `apply_threads(...)`: torch's intra-op
  threads. One thread per physical core for models whose decode reads enough weights to
  need the memory bandwidth of every core; at most two for tiny models, whose decode is a
  chain of small kernels (bench/decode.py --threads measures any count; see
  bench/RESULTS.md).
- `compile_decode(model)`: torch.compile of `Transformer.static_decode` (static shapes: the
  step attends over the whole preallocated cache with a mask, positions stay on the device,
  no host reads), installed as `model.compiled_decode` so that `model(tokens, input_pos)`
  with one token per sequence uses it. On CUDA the default mode "reduce-overhead" also
  captures the step in a CUDA graph. `uncompile_decode(model)` goes back to eager.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

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
    return configure_threads(requested if requested is not None else
                             recommended_threads(n_params, device))


def compile_decode(
    model: Transformer, mode: str | None = None, warmup: bool = True, backend: str = "inductor"
) -> None:
    """Install a torch.compile'd decode step on `model` (see the module docstring).

    mode: torch.compile's mode; default "reduce-overhead" on CUDA (CUDA graphs), "default"
    elsewhere (ignored unless backend is "inductor"). Sets up KV caches for batch 1 if there
    are none. warmup: compile now with steps at position 0 (the next prefill overwrites it)
    instead of on the first token. Compiling takes seconds to minutes (inductor builds C++
    or Triton kernels); the eager path stays in use while an observer is set.
    """
    if not model.caches():
        model.setup_caches(1)
    device = model.tok_embeddings.weight.device
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if backend != "inductor":
        mode = None
    model._rope_table(device, complex_=False)  # built eagerly: not traced into the graph
    step = torch.compile(model.static_decode, mode=mode, dynamic=False, backend=backend)
    graphs = mode == "reduce-overhead" and device.type == "cuda"

    def compiled(tokens: Tensor, input_pos: Tensor) -> Tensor:
        logits = step(tokens, input_pos)
        # A CUDA graph replay overwrites its output buffer: hand out a copy.
        return logits.clone() if graphs else logits

    model.compiled_decode = compiled
    if warmup:
        batch = model.caches()[0].kv.shape[0]
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.inference_mode():
            for _ in range(3 if graphs else 1):
                model(tokens, torch.zeros(1, dtype=torch.long))


def uncompile_decode(model: Transformer) -> None:
    """Back to the eager decode step."""
    model.compiled_decode = None
