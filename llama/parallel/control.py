"""Rank 0's commands to the workers: a fixed int64 header, then an optional int64 payload.

Every rank must run the same sequence of forwards (their collectives pair up), so rank 0
announces each model call before making it; the workers replay it. Header (HEADER ints):
[op, seq, payload_len, a, b, c, d, e]. Both broadcasts go over the gloo `control` group.

Ops: FORWARD (a=B, b=T, c=has input_pos, d=last_only; payload = tokens (B*T) then input_pos
(T)), the sampled token reaching the workers this way; OBSERVE (a=on; payload = observed layer
indices, or -1 for all); CALL (payload = pickled (method name, args, kwargs): setup_caches and
any post-load pass); STOP (the worker loop returns).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from llama.parallel.comm import TPContext

HEADER = 8


class Op(IntEnum):
    FORWARD = 1
    OBSERVE = 2
    CALL = 3
    STOP = 4


@dataclass(frozen=True)
class Command:
    op: Op
    seq: int
    ints: tuple[int, ...]  # a..e
    payload: Tensor  # int64 (n,), CPU; empty when the op carries none

    def call(self) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """(method name, args, kwargs) of a CALL (pickled by rank 0 of the same job)."""
        return pickle.loads(self.payload.to(torch.uint8).numpy().tobytes())


class Channel:
    """Sends (rank 0) or receives (workers) commands, numbering them."""

    def __init__(self, ctx: TPContext) -> None:
        self.ctx = ctx
        self.seq = 0

    def send(self, op: Op, ints: tuple[int, ...] = (), payload: Tensor | None = None) -> int:
        """Rank 0: announce one command; returns its sequence number."""
        self.seq += 1
        data = torch.empty(0, dtype=torch.int64) if payload is None else payload.reshape(-1)
        values = [int(op), self.seq, data.numel(), *ints]
        header = torch.tensor(values + [0] * (HEADER - len(values)), dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.control)
        if data.numel():
            dist.broadcast(data.to("cpu", torch.int64).contiguous(), src=0,
                           group=self.ctx.control)
        return self.seq

    def receive(self) -> Command:
        """A worker: block until rank 0's next command."""
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.control)
        op, seq, n, *ints = header.tolist()
        payload = torch.empty(n, dtype=torch.int64)
        if n:
            dist.broadcast(payload, src=0, group=self.ctx.control)
        self.seq = seq
        return Command(Op(op), seq, tuple(ints[: HEADER - 3]), payload)


def pickled(obj: object) -> Tensor:
    """`obj` as an int64 payload (one byte per element: payloads here are tiny)."""
    raw = bytearray(pickle.dumps(obj))
    return torch.frombuffer(raw, dtype=torch.uint8).to(torch.int64)
