"""What a Probe (llama/probes/capture.py) hands to the figures: frozen views and the pure arithmetic
behind them (GQA group reduction, KV-cache bytes and counterfactuals, token labels).

Nothing here touches a model: ui/figures.py can use it on any recorded Trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llama.config import ModelArgs


def causal_probs(q: Tensor, keys: Tensor, pos: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) over keys 0..T_kv-1, key j visible to query t iff j <= pos[t].

    q (H, T, D), keys (H_kv, T_kv, D), pos (T,) -> (H, T, T_kv) fp32 on the CPU.
    """
    q, keys = q.float(), keys.float()
    n_heads, t_q, d = q.shape
    n_kv, t_kv = keys.shape[0], keys.shape[1]
    grouped = q.reshape(n_kv, n_heads // n_kv * t_q, d)  # (H_kv, n_rep*T, D)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(1.0 / math.sqrt(d))
    scores = scores.view(n_kv, -1, t_q, t_kv)  # (H_kv, n_rep, T, T_kv)
    if t_q > 1 or int(pos[0]) != t_kv - 1:  # one query at the cache's end sees every key
        pos = pos.to(keys.device, non_blocking=True)  # positions may live on the host
        visible = torch.arange(t_kv, device=keys.device)[None, :] <= pos[:, None]  # (T, T_kv)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(n_heads, t_q, t_kv).cpu()  # (H, T, T_kv)


def group_reduce(probs: Tensor, n_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Per GQA group g (query heads g*n_rep .. g*n_rep+n_rep-1): mean and spread (max - min).

    probs (H, T_q, T_kv) -> two (H_kv, T_q, T_kv) tensors. Groups of one head have spread 0.
    """
    n_heads = probs.shape[0]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: expected a divisor of {n_heads} heads, found {n_kv_heads}")
    grouped = probs.view(n_kv_heads, n_heads // n_kv_heads, *probs.shape[1:])  # (H_kv, n_rep, ..)
    return grouped.mean(1), grouped.amax(1) - grouped.amin(1)


def kv_bytes(
    args: ModelArgs, positions: int, itemsize: int, n_kv_heads: int | None = None, batch: int = 1
) -> int:
    """K and V bytes over all layers: 2 * B * n_layers * H_kv * head_dim * positions * itemsize."""
    n_kv = args.kv_heads if n_kv_heads is None else n_kv_heads
    return 2 * batch * args.n_layers * n_kv * args.head_dim * positions * itemsize


def counterfactual_kv_heads(args: ModelArgs) -> dict[str, int]:
    """KV-head counts to compare: MHA (H), a GQA grouping, MQA (1); the model's own included.

    The GQA example is the model's own when it is GQA, else the divisor of H nearest H/8
    (LLaMA-2 70B's ratio), left out when H has no divisor strictly between 1 and H.
    """
    h = args.n_heads
    out = {f"MHA (H_kv={h})": h}
    divisors = [d for d in range(2, h) if h % d == 0]
    if args.attention_kind == "GQA":
        out[f"GQA (H_kv={args.kv_heads})"] = args.kv_heads
    elif divisors:
        g = min(divisors, key=lambda d: (abs(d - h / 8), d))
        out[f"GQA (H_kv={g})"] = g
    out["MQA (H_kv=1)"] = 1
    return out


def token_label(piece: str) -> str:
    """A token piece made visible on an axis: spaces, newlines and tabs get glyphs."""
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


# Immutable views for figures ---------------------------------------------------------------
@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention over the window. probs (H, T_q, T_kv): row i is the query at
    query_positions[i], column j the key at key_positions[j]; future keys are exactly 0.
    outside (H, T_q): probability mass on keys older than the window (0 when it fits)."""

    layer: int
    query_positions: list[int]
    key_positions: list[int]
    probs: Tensor
    outside: Tensor
    group_mean: Tensor  # (H_kv, T_q, T_kv)
    group_spread: Tensor  # (H_kv, T_q, T_kv), max - min over the group's heads


def layer_view(
    layer: int, rows: dict[int, Tensor], positions: list[int], window: int, args: ModelArgs
) -> LayerAttention | None:
    """Assemble (H, T_q, T_kv) over the window `positions` from per-query rows (H, <= window)
    covering keys max(0, q - window + 1) .. q; None when no query of the window has a row."""
    queries = [p for p in positions if p in rows]
    if not queries:
        return None
    lo = positions[0]
    probs = torch.zeros(args.n_heads, len(queries), len(positions))  # (H, T_q, T_kv)
    for i, q in enumerate(queries):
        start = lo - max(0, q - window + 1)  # the row starts at or before lo
        probs[:, i, : q - lo + 1] = rows[q][:, start:]
    outside = (1.0 - probs.sum(-1)).clamp_min(0.0)  # (H, T_q)
    mean, spread = group_reduce(probs, args.kv_heads)
    return LayerAttention(layer, queries, positions, probs, outside, mean, spread)


@dataclass(frozen=True)
class RopeTrace:
    """Query head `head` (KV head `kv_head`) of `layer` at the newest position.

    q_raw/q_rot, k_raw/k_rot: (D,) before/after rotation; angles (D/2,) = position * freqs.
    key_positions (T,), scores_rope/scores_plain (T,): q.k / sqrt(D) against the window's keys
    with and without RoPE. path_positions (P,), q_path (P, D): q_raw rotated as if it sat at
    each of those positions (how a pair turns as position advances).
    """

    layer: int
    head: int
    kv_head: int
    position: int
    q_raw: Tensor
    q_rot: Tensor
    k_raw: Tensor
    k_rot: Tensor
    freqs: Tensor
    angles: Tensor
    key_positions: list[int]
    scores_rope: Tensor
    scores_plain: Tensor
    path_positions: list[int]
    q_path: Tensor


@dataclass(frozen=True)
class KVTrace:
    """KV-cache fill after each step. bytes_per_layer[s][l]: bytes of layer l after step s."""

    steps: list[int]
    positions: list[int]
    bytes_per_layer: list[tuple[int, ...]]
    capacity_positions: int
    capacity_bytes_per_layer: tuple[int, ...]
    itemsize: int
    batch: int
    args: ModelArgs
    counterfactual: dict[str, int]  # label -> n_kv_heads

    @classmethod
    def from_samples(
        cls,
        samples: list[tuple[int, int]],
        capacity: int,
        per_position: tuple[int, ...],
        itemsize: int,
        batch: int,
        args: ModelArgs,
    ) -> KVTrace:
        """samples: (step, positions filled); per_position: bytes per position of each layer
        (a KVCache's nbytes is linear in positions)."""
        steps, positions = (list(col) for col in zip(*samples, strict=True))
        return cls(
            steps,
            positions,
            [tuple(b * n for b in per_position) for n in positions],
            capacity,
            tuple(b * capacity for b in per_position),
            itemsize,
            batch,
            args,
            counterfactual_kv_heads(args),
        )

    def bytes_for(self, n_kv_heads: int, positions: int) -> int:
        """All-layer bytes if the same model kept n_kv_heads KV heads."""
        return kv_bytes(self.args, positions, self.itemsize, n_kv_heads, self.batch)


@dataclass(frozen=True)
class Trace:
    """What the probe has seen, frozen for drawing. tokens[i] labels positions[i]; positions
    are consecutive (the window)."""

    args: ModelArgs
    positions: list[int]
    tokens: list[str]
    attention: dict[int, LayerAttention]
    rope: RopeTrace | None
    kv: KVTrace | None
    step: Any | None
    n_steps: int

    def label(self, position: int) -> str:
        """The token label of an absolute position ('?' when not seen)."""
        i = position - self.positions[0] if self.positions else -1
        return self.tokens[i] if 0 <= i < len(self.tokens) else "?"
