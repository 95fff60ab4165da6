"""`WhyProbe`: the capture behind the "Why" views (logit lens, attention sinks, attribution).

A generate() probe like `Probe` (begin / on_step / end). While attached it is the residual
observer (lens, llama/probes/lens.py) and the attention observer of every layer (sinks and
attention x value attribution): for the newest query of each forward it computes one
softmax row per head from the cached keys (views.causal_probs), sums its first n_sink keys
(sinks.sink_mass) and weighs it by the cached values' norms (attribution.attention_value_rows).
With every part off it attaches nothing; detached, the model runs its fast route untouched.

Under tensor parallelism rank 0's observers see every rank's heads gathered and the lens over
the whole vocabulary (llama/parallel/model.py). `ProbeGroup` runs it beside a `Probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llama.config import ModelArgs
from llama.model import AttentionCapture, Transformer
from llama.probes.attribution import attention_value_rows, value_norms
from llama.probes.lens import LensColumn, LensRecorder, lens_layers
from llama.probes.sinks import SinkView, sink_mass
from llama.probes.views import causal_probs, token_label


@dataclass(frozen=True)
class WhyTrace:
    """An immutable snapshot for ui/why_figs.py.

    ids: every token id so far (prompt then reply); prompt_len: how many are the prompt;
    labels: a visible text per id; pieces: id -> visible text for every id in ids or among
    the lens's top tokens. lens: columns in position order (the last `window`).
    sinks: None when off. attribution: query position -> (L, T_kv) per-layer attribution of
    the token at query position + 1 over keys 0..query position.
    """

    args: ModelArgs
    ids: list[int]
    prompt_len: int
    labels: list[str]
    lens: list[LensColumn]
    sinks: SinkView | None
    attribution: dict[int, Tensor]
    pieces: dict[int, str]


class WhyProbe:
    """Records the Why views for one generation (batch row 0).

    window: newest positions kept (lens columns, sink rows, attribution rows). n_sink: keys
    counted as the sink. token_pieces: id -> text for labels. lens_every: the lens runs at
    layers 0, k, 2k, ... and the last (lens.lens_layers; None: about four layers).
    """

    def __init__(
        self,
        args: ModelArgs,
        lens: bool = True,
        sinks: bool = True,
        attribution: bool = True,
        window: int = 64,
        n_sink: int = 1,
        token_pieces: Callable[[int], str] | None = None,
        lens_every: int | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window: expected a positive number of positions, found {window}")
        self.args, self.window, self.n_sink = args, window, n_sink
        self.lens_layers = lens_layers(args.n_layers, lens_every)
        self.want_lens, self.want_sinks, self.want_attr = lens, sinks, attribution
        self.token_pieces = token_pieces or str
        self._begin([])

    @property
    def observed_layers(self) -> frozenset[int]:
        """Layers whose attention calls this probe reads (all, for sinks or attribution)."""
        if self.want_sinks or self.want_attr:
            return frozenset(range(self.args.n_layers))
        return frozenset()

    # generate() contract ---------------------------------------------------------------
    def begin(self, model: Transformer, prompt_ids: Iterable[int]) -> None:
        self._begin(list(prompt_ids))
        self.attach(model)

    def _begin(self, prompt: list[int]) -> None:
        self.ids, self.prompt_len = list(prompt), len(prompt)
        self.lens = LensRecorder(self.args.n_layers, self.window)
        self.lens.prompt = self.ids
        self._sinks: dict[int, Tensor] = {}  # query position -> (L, H)
        self._attr: dict[int, Tensor] = {}  # query position -> (L, T_kv)
        self._norms: list[Tensor | None] = [None] * self.args.n_layers

    def attach(self, model: Transformer) -> None:
        if self.observed_layers:
            model.set_observer(self.observe, set(self.observed_layers))
        if self.want_lens:
            model.set_residual_observer(
                self.lens.observe, lens_rows=self.window, lens_layers=self.lens_layers
            )

    def on_step(self, step: Any) -> None:
        token, position = int(step.token_id), int(step.position)
        if token < 0:  # a cancelled generation's last step carries no token
            return
        self.ids.append(token)
        self.lens.token_chosen(position, token)
        lowest = position - self.window
        self.lens.forget_before(lowest)
        for store in (self._sinks, self._attr):
            for pos in [p for p in store if p < lowest]:
                del store[pos]

    def end(self, model: Transformer) -> None:
        if self.observed_layers:
            model.set_observer(None)
        if self.want_lens:
            model.set_residual_observer(None)

    # Capture -----------------------------------------------------------------------------
    def observe(self, cap: AttentionCapture) -> None:
        """The newest query's softmax rows (H, T_kv) -> sink mass and attribution."""
        pos = cap.input_pos[-1:]  # (1,)
        newest = int(pos[0])
        probs = causal_probs(cap.q[0, :, -1:], cap.keys[0], pos)[:, 0]  # (H, T_kv)
        n_layers = self.args.n_layers
        if self.want_sinks:
            row = self._sinks.setdefault(newest, torch.zeros(n_layers, probs.shape[0]))
            row[cap.layer] = sink_mass(probs, self.n_sink)
        if self.want_attr:
            norms = self._value_norms(cap.layer, cap.values[0])  # (H_kv, T_kv)
            rows = self._attr.setdefault(newest, torch.zeros(n_layers, probs.shape[1]))
            rows[cap.layer] = attention_value_rows(probs, norms[:, : probs.shape[1]])

    def _value_norms(self, layer: int, values: Tensor) -> Tensor:
        """‖v‖ per KV head and position, computed once per position: cached values are
        never rewritten during a generation (begin() starts over)."""
        known = self._norms[layer]
        have = 0 if known is None else known.shape[1]
        t_kv = values.shape[1]
        if have < t_kv:
            new = value_norms(values[:, have:t_kv]).cpu()  # (H_kv, new)
            known = new if known is None else torch.cat([known, new], dim=1)
            self._norms[layer] = known
        assert known is not None
        return known

    # Snapshot ----------------------------------------------------------------------------
    def snapshot(self) -> WhyTrace:
        labels = [token_label(self.token_pieces(t)) for t in self.ids]
        columns = [self.lens.columns[p] for p in sorted(self.lens.columns)]
        sinks = None
        if self.want_sinks and self._sinks:
            positions = sorted(self._sinks)
            mass = torch.stack([self._sinks[p] for p in positions])  # (S, L, H)
            sinks = SinkView(positions, mass, self.n_sink)
        attr = {p: rows.clone() for p, rows in self._attr.items()}
        shown = set(self.ids).union(*(c.top_ids.tolist() for c in columns))
        pieces = {t: token_label(self.token_pieces(t)) for t in shown}
        return WhyTrace(
            self.args, list(self.ids), self.prompt_len, labels, columns, sinks, attr, pieces
        )


class ProbeGroup:
    """Several probes on one generate(): one attention observer that hands each capture to
    every member observing that layer (the model holds one observer at a time)."""

    def __init__(self, *probes: Any) -> None:
        self.probes = [p for p in probes if p is not None]

    def begin(self, model: Transformer, prompt_ids: Iterable[int]) -> None:
        ids = list(prompt_ids)
        for p in self.probes:
            p.begin(model, ids)
        layers = set().union(*(p.observed_layers for p in self.probes))
        if layers:
            model.set_observer(self._observe, layers)

    def _observe(self, cap: AttentionCapture) -> None:
        for p in self.probes:
            if cap.layer in p.observed_layers:
                p.observe(cap)

    def on_step(self, step: Any) -> None:
        for p in self.probes:
            p.on_step(step)

    def end(self, model: Transformer) -> None:
        for p in self.probes:
            p.end(model)
