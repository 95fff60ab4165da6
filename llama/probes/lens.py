"""The logit lens (nostalgebraist 2020): what the model would say if it stopped after layer l.

For every block's output h_l (the residual stream) the model's own final RMSNorm and output
projection give logits_l = output(norm(h_l)); the last layer's lens is exactly the model's
logits. Read at the position being decoded, the per-layer top token shows where the answer
forms, and the chosen token's rank per layer shows which layer decided it.

`LensRecorder` is the capture side (a residual observer, llama/model.py; under tensor
parallelism `model.share_lens` gathers the split output projection on rank 0). Each
column keeps a few numbers per layer, never a vocabulary-sized tensor, except the newest
column while its token is not yet sampled.

Cost: the lens runs the output projection (dim x vocab, often the largest product of a decode
step) once per lens layer per token, so it is applied to chosen layers only: by default
`lens_layers(n_layers)`, every k-th layer and the last (the model's own answer, whose
projection in a decode step is the forward's own: llama/model.py computes it once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llama.model import ResidualCapture

DEFAULT_LENS_ROWS = 4  # lensed layers by default (lens_layers)


@dataclass(frozen=True)
class LensColumn:
    """The lens at input position `position` (it predicts the token at position + 1).

    layers: the L layers lensed, ascending (the last is the model's last layer); the
    tensors below hold one value per entry of `layers`.
    top_ids/top_probs (L,): each layer's most likely next token and its probability.
    token: the token that really came next (None while unknown); token_rank (L,): its rank
    per layer (0 = the layer's top token); token_prob (L,): its probability per layer.
    """

    position: int
    layers: tuple[int, ...]
    top_ids: Tensor
    top_probs: Tensor
    token: int | None = None
    token_rank: Tensor | None = None
    token_prob: Tensor | None = None


def lens_layers(n_layers: int, every: int | None = None) -> tuple[int, ...]:
    """Layers 0, every, 2*every, ... and the last. every=None: about four layers spread over
    the depth (DEFAULT_LENS_ROWS), enough to see where the answer forms at a fraction of the
    cost of all of them; every=1: all layers."""
    if every is None:
        every = default_lens_every(n_layers)
    if every < 1:
        raise ValueError(f"lens every: expected a positive number of layers, found {every}")
    return tuple(sorted({*range(0, n_layers, every), n_layers - 1}))


def default_lens_every(n_layers: int) -> int:
    """The step that lenses about DEFAULT_LENS_ROWS layers (plus the last)."""
    return max(1, math.ceil(n_layers / DEFAULT_LENS_ROWS))


def lens_column(
    position: int, logits: Tensor, token: int | None, layers: Sequence[int]
) -> LensColumn:
    """One column from the lens logits (L, vocab) of `layers` at one position."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)  # (L, V)
    top_lp, top_ids = log_probs.max(dim=-1)  # (L,)
    layers = tuple(layers)
    if token is None:
        return LensColumn(position, layers, top_ids.cpu(), top_lp.exp().cpu())
    chosen = logits[:, token : token + 1]  # (L, 1)
    rank = (logits > chosen).sum(-1)  # (L,) ties share the better rank
    prob = log_probs[:, token].exp()
    return LensColumn(
        position, layers, top_ids.cpu(), top_lp.exp().cpu(), int(token), rank.cpu(), prob.cpu()
    )


class LensRecorder:
    """Builds LensColumns from the residual observer's captures (batch row 0).

    rows: positions of a prefill given columns (the newest `rows`); decode steps give one
    each. Only captures that carry a lens count (the model's lens layers; the last layer's
    capture completes a forward). Columns of positions whose next token is already known (the
    prompt) are final at once; the newest waits in `pending` for `token_chosen` (the sampled token).
    """

    def __init__(self, n_layers: int, rows: int) -> None:
        self.n_layers, self.rows = n_layers, rows
        self.columns: dict[int, LensColumn] = {}
        self._layers: list[Tensor] = []  # lens (rows, V) of each lensed layer of this forward
        self._numbers: list[int] = []  # ...and those layers' numbers
        # (position, (L, V) logits, their layers)
        self.pending: tuple[int, Tensor, tuple[int, ...]] | None = None
        self.prompt: list[int] = []

    def observe(self, cap: ResidualCapture) -> None:
        if cap.lens is None:
            return
        if self._numbers and cap.layer <= self._numbers[-1]:  # a new forward began
            self._layers, self._numbers = [], []
        self._layers.append(cap.lens[0])  # (rows, V)
        self._numbers.append(cap.layer)
        if cap.layer == self.n_layers - 1:
            positions = cap.positions[-cap.lens.shape[1] :].tolist()
            self._columns(positions, torch.stack(self._layers))  # (L, rows, V)
            self._layers, self._numbers = [], []

    def _columns(self, positions: list[int], lens: Tensor) -> None:
        for i, pos in enumerate(positions):
            nxt = pos + 1
            if nxt < len(self.prompt):
                self.columns[pos] = lens_column(pos, lens[:, i], self.prompt[nxt], self._numbers)
            else:  # the token comes from sampling: keep the logits until then
                self.pending = (pos, lens[:, i].float().clone(), tuple(self._numbers))

    def token_chosen(self, position: int, token: int) -> None:
        """The token sampled for `position` (a Step's): finish the column before it."""
        if self.pending is not None and self.pending[0] == position - 1:
            pos, logits, layers = self.pending
            self.columns[pos] = lens_column(pos, logits, token, layers)
            self.pending = None

    def forget_before(self, lowest: int) -> None:
        for pos in [p for p in self.columns if p < lowest]:
            del self.columns[pos]


def lens_grid(columns: list[LensColumn]) -> tuple[Tensor, Tensor]:
    """(L, C) top ids and top probs of columns in order: the heatmap's cells."""
    ids = torch.stack([c.top_ids for c in columns], dim=1)
    probs = torch.stack([c.top_probs for c in columns], dim=1)
    return ids, probs


def decided_at(column: LensColumn) -> int | None:
    """The first lensed layer from which the chosen token stays the top token to the end
    (None: not even the last layer ranks it first, e.g. a sampled second choice)."""
    if column.token_rank is None:
        return None
    top = (column.token_rank == 0).tolist()
    if not top[-1]:
        return None
    i = len(top) - 1
    while i > 0 and top[i - 1]:
        i -= 1
    return column.layers[i]
