"""The process groups one tensor-parallel run uses, and the collectives the model needs.

Two groups over the same ranks:
- `data`: the default group (NCCL on CUDA, gloo on CPU), for the all-reduces and gathers inside
  a forward. Its timeout bounds how long a rank waits for a peer that died or hangs mid-step.
- `control`: always gloo (CPU), with a long timeout, for rank 0's commands. Workers block
  here between requests (a user may read for an hour); rank 0's death closes its sockets, so
  waiting workers still learn of it at once.

With world_size 1 there are no groups and every collective is the identity, so the same model
code runs in a single process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class TPContext:
    """Rank, world size, groups and device of this process in a tensor-parallel run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data: Any = None  # ProcessGroup for forward collectives (None when world_size == 1)
    control: Any = None  # gloo ProcessGroup for commands (None when world_size == 1)
    health: Any = None  # llama.parallel.health.Health (None when world_size == 1)

    @property
    def is_leader(self) -> bool:
        """Rank 0: owns sampling, the UI and the commands every rank follows."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = TPContext()


def _entered(ctx: TPContext) -> None:
    """Count data-group collectives (health.py compares counts to find a rank that hangs)."""
    if ctx.health is not None:
        ctx.health.collectives += 1


def all_reduce_(ctx: TPContext, t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (row-parallel outputs) and return it; out of place, with
    a backward, when `t` needs a gradient (gradient x input, llama/probes/attribution.py)."""
    if ctx.distributed and t.requires_grad:
        return _Sum.apply(ctx, t)
    if ctx.distributed:
        _entered(ctx)
        dist.all_reduce(t, group=ctx.data)
    return t


def all_gather_last(ctx: TPContext, t: Tensor) -> Tensor:
    """Concatenate every rank's `t` along the last dimension (equal shapes on all ranks)."""
    if not ctx.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    _entered(ctx)
    dist.all_gather(parts, t.contiguous(), group=ctx.data)
    return torch.cat(parts, dim=-1)


def gather_last_to_leader(ctx: TPContext, t: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's `t` along the last dimension on rank 0.

    sizes[r]: the last-dimension size on rank r (they may differ by one: uneven vocabularies).
    Other ranks get their own `t` back. Slices are padded to the largest size because the
    backends gather equal shapes only.
    """
    if not ctx.distributed:
        return t
    if t.requires_grad:
        return _GatherToLeader.apply(ctx, t, sizes)
    return _gather_last_to_leader(ctx, t, sizes)


def _gather_last_to_leader(ctx: TPContext, t: Tensor, sizes: list[int]) -> Tensor:
    width = max(sizes)
    padded = t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    padded = padded.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes] if ctx.is_leader else None
    _entered(ctx)
    dist.gather(padded, parts, dst=0, group=ctx.data)
    if not ctx.is_leader:
        return t
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def gather_to_leader(ctx: TPContext, t: Tensor) -> list[Tensor] | None:
    """Every rank's `t` (equal shapes) as a list on rank 0; None on other ranks."""
    if not ctx.distributed:
        return [t]
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)] if ctx.is_leader else None
    _entered(ctx)
    dist.gather(t, parts, dst=0, group=ctx.data)
    return parts


def copy_to_ranks(ctx: TPContext, t: Tensor) -> Tensor:
    """`t` (the same on every rank) as the input of a column-parallel product: the identity
    forward; backward, each rank's partial gradient (from its own slice) summed over ranks."""
    return _Copy.apply(ctx, t) if ctx.distributed and t.requires_grad else t


# Backward passes under tensor parallelism (Megatron's f and g, Shoeybi et al. 2019): every
# rank runs the same backward, so these collectives pair up as the forward's did.
class _Sum(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the identity (the gradient of the sum is the
    same on every rank, and each rank's summand receives all of it)."""

    @staticmethod
    def forward(ctx: Any, tp: TPContext, t: Tensor) -> Tensor:
        out = t.clone()
        _entered(tp)
        dist.all_reduce(out, group=tp.data)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class _Copy(torch.autograd.Function):
    """Forward: the identity. Backward: the sum over ranks of the partial gradients."""

    @staticmethod
    def forward(ctx: Any, tp: TPContext, t: Tensor) -> Tensor:
        ctx.tp = tp
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, all_reduce_(ctx.tp, grad.contiguous().clone())


class _GatherToLeader(torch.autograd.Function):
    """Forward: gather_last_to_leader. Backward: rank 0 sends each rank the gradient of its
    slice (the loss lives on rank 0; the other ranks' incoming gradient is ignored)."""

    @staticmethod
    def forward(ctx: Any, tp: TPContext, t: Tensor, sizes: list[int]) -> Tensor:
        ctx.tp, ctx.sizes, ctx.shape = tp, sizes, t.shape
        out = _gather_last_to_leader(tp, t, sizes)
        return out.view_as(out) if out is t else out  # a worker's own slice, as a new output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        tp, sizes = ctx.tp, ctx.sizes
        width = max(sizes)
        out = grad.new_empty((*ctx.shape[:-1], width))
        parts = None
        if tp.is_leader:
            pieces = grad.split(sizes, dim=-1)
            parts = [
                torch.nn.functional.pad(p, (0, width - p.shape[-1])).contiguous() for p in pieces
            ]
        _entered(tp)
        dist.scatter(out, parts, src=0, group=tp.data)
        return None, out[..., : ctx.shape[-1]], None
