"""What a model needs in memory, checked against what the device has before anything is
allocated (a context of 2^31 positions once asked the allocator for 824 GB).

`estimate(args, dtype, load_in_8bit)` -> `MemoryNeed` (weights, KV cache, RoPE tables,
workspace, in bytes); `free_bytes(device)` reads what is free (CUDA: torch.cuda.mem_get_info;
CPU: MemAvailable from /proc/meminfo, or psutil where installed; elsewhere unknown);
`check_fits` raises MemoryBudgetError with what would fit: a shorter context, 8-bit weights,
more GPUs. `fitting_context` is the longest context that fits (the app sizes its cache so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llama.config import ModelArgs

GiB = 2**30
MIN_CONTEXT = 256  # shortest context suggested or chosen: a few chat turns
# Activations of a prefill (besides the weights and cache): a few (T, dim) and (T, hidden)
# fp32 tensors for a long prompt, attention scores where no fused kernel runs, the logits,
# the allocator's rounding. A floor, not a measurement of every kernel's scratch.
MIN_WORKSPACE = 256 * 2**20
WORKSPACE_POSITIONS = 1024  # prefill chunk the workspace is sized for


def kv_bytes(args: ModelArgs, positions: int, itemsize: int, batch: int = 1) -> int:
    """llama.probes.views.kv_bytes (imported here on use: llama.probes imports the model,
    which imports this module)."""
    from llama.probes.views import kv_bytes as cache_bytes

    return cache_bytes(args, positions, itemsize, batch=batch)


class MemoryBudgetError(ValueError):
    """The model would not fit in the memory the device has free (the message says what
    would)."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a loaded model needs for one sequence of max_seq_len positions."""

    weights: int
    cache: int
    rope: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.rope + self.workspace


def weight_bytes(args: ModelArgs, dtype: torch.dtype, load_in_8bit: bool = False) -> int:
    """Bytes of the weights in `dtype`; 8-bit: block linears at one byte per weight plus an
    fp32 scale per output row (llama/quant.py), the rest in `dtype`."""
    size = dtype.itemsize
    if not load_in_8bit:
        return args.n_params() * size
    d, h, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    linear = 2 * d * d + 2 * d * kv + 3 * d * h
    rows = 2 * d + 2 * kv + 2 * h + d
    rest = args.n_params() - args.n_layers * linear
    return args.n_layers * (linear + 4 * rows) + rest * size


def estimate(
    args: ModelArgs, dtype: torch.dtype, load_in_8bit: bool = False, world_size: int = 1
) -> MemoryNeed:
    """What one device of `world_size` (tensor parallelism splits weights and cache) needs."""
    positions = args.max_seq_len
    cache = kv_bytes(args, positions, dtype.itemsize)
    # Complex and real (cos, sin) fp32 tables, each (S, D/2) x 8 bytes; host positions.
    rope = 2 * positions * args.head_dim // 2 * 8 + 8 * positions
    chunk = min(positions, WORKSPACE_POSITIONS)
    acts = chunk * (6 * args.dim + 3 * args.ffn_hidden_dim) * 4 + chunk * args.vocab_size * 4
    scores = args.n_heads * chunk * chunk * 4
    workspace = max(MIN_WORKSPACE, acts + scores)
    weights = weight_bytes(args, dtype, load_in_8bit)
    return MemoryNeed(
        weights // world_size, math.ceil(cache / world_size), rope, workspace // world_size
    )


def free_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory free for a model on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def fitting_context(args: ModelArgs, dtype: torch.dtype, load_in_8bit: bool, free: int) -> int:
    """The longest power-of-two context (MIN_CONTEXT at least, at most args.max_seq_len)
    whose model fits in `free` bytes; 0 when not even MIN_CONTEXT does."""
    best, n = 0, MIN_CONTEXT
    while n < args.max_seq_len * 2:
        n_ctx = min(n, args.max_seq_len)
        if estimate(args.replace(max_seq_len=n_ctx), dtype, load_in_8bit).total > free:
            break
        best, n = n_ctx, n * 2
    return best


def check_fits(
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    load_in_8bit: bool = False,
    free: int | None = None,
) -> MemoryNeed:
    """The estimate, or MemoryBudgetError when it exceeds the free memory (default
    `free_bytes(device)`; unknown free memory passes)."""
    need = estimate(args, dtype, load_in_8bit)
    free = free_bytes(device) if free is None else free
    if free is None or need.total <= free:
        return need
    raise MemoryBudgetError(_shortfall(args, dtype, device, load_in_8bit, need, free))


def gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f} GiB"


def _shortfall(
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    load_in_8bit: bool,
    need: MemoryNeed,
    free: int,
) -> str:
    kind = "8-bit" if load_in_8bit else str(dtype).removeprefix("torch.")
    lines = [
        f"the model needs about {gib(need.total)} on {device} but {gib(free)} is free "
        f"(weights {gib(need.weights)} {kind}, KV cache {gib(need.cache)} for "
        f"{args.max_seq_len} positions, RoPE tables {gib(need.rope)}, workspace "
        f"{gib(need.workspace)})."
    ]
    fits = []
    context = fitting_context(args, dtype, load_in_8bit, free)
    if context:
        cache = kv_bytes(args, context, dtype.itemsize)
        fits.append(f"--max-seq-len {context} (KV cache {gib(cache)})")
    if not load_in_8bit and device.type in ("cuda", "cpu"):
        eight = estimate(args, dtype, True)
        longer = fitting_context(args, dtype, True, free)
        if eight.total <= free:
            fits.append(f"--load-in-8bit (weights {gib(eight.weights)})")
        elif longer > context:  # 8-bit buys context only where the weights weigh
            fits.append(f"--load-in-8bit --max-seq-len {longer}")
    if device.type == "cuda":
        gpus = next(
            (n for n in (2, 4, 8) if estimate(args, dtype, load_in_8bit, n).total <= free), None
        )
        if gpus is not None:
            fits.append(
                f"tensor parallelism over {gpus} such GPUs (torchrun --nproc-per-node {gpus})"
            )
    if fits:
        lines.append("What fits: " + "; or ".join(fits) + ".")
    else:
        lines.append("Nothing smaller fits here: free memory or use a larger device.")
    return " ".join(lines)


def check_cache(
    args: ModelArgs, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
) -> None:
    """MemoryBudgetError when a KV cache of `capacity` positions (plus the RoPE tables for
    args.max_seq_len) would not fit in what `device` has free; call before allocating."""
    free = free_bytes(device)
    cache = kv_bytes(args, capacity, dtype.itemsize, batch=batch)
    need = cache + estimate(args, dtype).rope
    if free is None or need <= free:
        return
    per_position = kv_bytes(args, 1, dtype.itemsize, batch=batch)
    raise MemoryBudgetError(
        f"max_seq_len: a KV cache of {capacity} positions (batch {batch}) needs {gib(cache)} "
        f"on {device} but {gib(free)} is free; at most about {free // per_position // 2} "
        "positions fit (pass a smaller max_seq_len)"
    )
