"""Attention sinks (Xiao et al. 2023, "Efficient streaming language models with attention
sinks"): heads that park most of their attention on the first token(s), whatever they say.

That first-token mass is the bright first column of every LLaMA attention heatmap; it says
little about the first token's meaning. These are the pure sums behind the "sink heads" view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SINK_THRESHOLD = 0.5  # a head is flagged when at least this share of its attention is a sink


def sink_mass(probs: Tensor, n_sink: int = 1) -> Tensor:
    """Attention mass on keys 0..n_sink-1: probs (H, T_q, T_kv) -> (H, T_q).

    probs rows are softmax rows over every cached key (llama.probes.views.causal_probs), so
    the result is the share of each query's attention, in [0, 1].
    """
    if n_sink < 1:
        raise ValueError(f"n_sink: expected at least 1 key, found {n_sink}")
    return probs[..., :n_sink].sum(-1)


def sink_heads(mass: Tensor, threshold: float = SINK_THRESHOLD) -> list[list[int]]:
    """The flagged heads of each layer: mass (L, H) -> per layer, heads with mass >= threshold."""
    return [torch.nonzero(row >= threshold).flatten().tolist() for row in mass]


@dataclass(frozen=True)
class SinkView:
    """Sink mass per layer and head at each recorded query position.

    positions (S,): query positions, oldest first; mass (S, L, H): share of attention on the
    first n_sink keys. `latest` is the newest query's (L, H); `mean` the average over S.
    """

    positions: list[int]
    mass: Tensor
    n_sink: int
    threshold: float = SINK_THRESHOLD

    @property
    def latest(self) -> Tensor:
        return self.mass[-1]

    @property
    def mean(self) -> Tensor:
        return self.mass.mean(0)

    def flagged(self) -> list[list[int]]:
        """Sink heads per layer at the newest position."""
        return sink_heads(self.latest, self.threshold)
