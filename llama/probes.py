"""Opt-in capture of the model's insides while it decodes: attention, RoPE and the KV cache.

A `Probe` is handed to `generate()`, which calls `begin(model, prompt_ids)` before prefill,
`on_step(step)` after every Step and `end(model)` in a finally block. The probe attaches itself
to the traced layers with `model.set_observer`; with no probe the model's SDPA fast path runs
untouched. For the traced layers only, the attention probabilities softmax(q k^T / sqrt(D)) are
recomputed (Vaswani et al. 2017, eq. 1) with the causal rule; a decode step costs one row per
query head.

Everything stored is a small CPU fp32 tensor keyed by absolute position, and only the last
`window` positions are kept (rows are cut to their last `window` keys), so memory stays
bounded in long chats: about n_layers_traced * H * window^2 * 4 bytes for attention.
`snapshot()` assembles an immutable `Trace` (llama/probe_views.py) for ui/figures.py.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llama.config import ModelArgs
from llama.model import AttentionCapture, Transformer
from llama.probe_views import (
    KVTrace,
    LayerAttention,
    RopeTrace,
    Trace,
    counterfactual_kv_heads,
    group_reduce,
    kv_bytes,
    token_label,
)
from llama.rope import apply_rope, rope_angles, rope_frequencies

__all__ = [
    "KVTrace",
    "LayerAttention",
    "Probe",
    "RopeTrace",
    "Trace",
    "attention_probs",
    "counterfactual_kv_heads",
    "group_reduce",
    "kv_bytes",
    "token_label",
]

KV_HISTORY = 4096  # steps of KV-cache history kept (two small ints per layer each)


# Pure helpers ------------------------------------------------------------------------------
def attention_probs(capture: AttentionCapture, batch: int = 0, rows: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) with the causal rule, for one batch row: (H, T_rows, T_kv) fp32.

    Query head h reads KV head h // n_rep (the grouping SDPA's enable_gqa and Meta's repeat_kv
    use). Key j is visible to the query at absolute position p iff j <= p. `rows` keeps only
    the last `rows` queries (the softmax still runs over every cached key, so rows sum to 1).
    """
    q = capture.q[batch].float()  # (H, T, D)
    keys = capture.keys[batch].float()  # (H_kv, T_kv, D)
    pos = capture.input_pos
    if rows is not None and rows < q.shape[1]:
        q, pos = q[:, -rows:], pos[-rows:]
    n_heads, t_q, d = q.shape
    n_kv, t_kv = keys.shape[0], keys.shape[1]
    grouped = q.reshape(n_kv, n_heads // n_kv * t_q, d)  # (H_kv, n_rep*T, D)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(1.0 / math.sqrt(d))
    scores = scores.view(n_kv, -1, t_q, t_kv)  # (H_kv, n_rep, T, T_kv)
    if t_q > 1 or int(pos[0]) != t_kv - 1:  # a decode step at the cache's end sees every key
        visible = torch.arange(t_kv, device=pos.device)[None, :] <= pos[:, None]  # (T, T_kv)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(n_heads, t_q, t_kv).cpu()  # (H, T, T_kv)


@dataclass
class _RopeState:
    keys: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # pos -> (k_raw, k_rot)
    current: tuple[int, Tensor, Tensor] | None = None  # (pos, q_raw, q_rot)


# The probe ---------------------------------------------------------------------------------
class Probe:
    """Records attention rows, RoPE data and KV-cache fill for chosen layers during generate().

    layers: traced layer indices (None = all). rope_head: the query head whose q/k are shown,
    in rope_layer (default: the first traced layer). window: positions kept. token_pieces:
    id -> text for axis labels (default: the id). attention / rope / kv_cache switch each
    record on or off. Only batch row 0 is recorded.
    """

    def __init__(
        self,
        args: ModelArgs,
        layers: Set[int] | None = frozenset({0}),
        rope_head: int = 0,
        window: int = 256,
        token_pieces: Callable[[int], str] | None = None,
        attention: bool = True,
        rope: bool = True,
        kv_cache: bool = True,
        rope_layer: int | None = None,
    ) -> None:
        self.args = args
        self.layers = _check_layers(args, layers)
        if not 0 <= rope_head < args.n_heads:
            raise ValueError(f"rope_head: expected 0..{args.n_heads - 1}, found {rope_head}")
        if window < 1:
            raise ValueError(f"window: expected a positive number of positions, found {window}")
        self.rope_head, self.window = rope_head, window
        self.rope_layer = min(self.layers) if rope_layer is None else rope_layer
        if not 0 <= self.rope_layer < args.n_layers:
            raise ValueError(f"rope_layer: expected 0..{args.n_layers - 1}, found {rope_layer}")
        self.token_pieces = token_pieces or str
        self.want_attention, self.want_rope, self.want_kv = attention, rope, kv_cache
        # The UI may snapshot from another thread while generate() records.
        self._lock = threading.Lock()
        self._reset()

    # generate() contract ---------------------------------------------------------------
    def begin(self, model: Transformer, prompt_ids: Iterable[int]) -> None:
        """Forget the previous run, note the prompt tokens and attach to the model."""
        with self._lock:
            self._reset()
            self._model = model
            self._tokens = {i: int(t) for i, t in enumerate(prompt_ids)}
        self.attach(model)

    @property
    def observed_layers(self) -> frozenset[int]:
        """Layers whose attention calls the probe needs to see."""
        observed = set(self.layers) if self.want_attention else set()
        if self.want_rope or (self.want_kv and not observed):
            observed.add(self.rope_layer)  # kv alone: only to learn how many positions are filled
        return frozenset(observed)

    def attach(self, model: Transformer) -> None:
        """Set this probe as the observer of its layers (begin() does it; no reset here)."""
        if self.observed_layers:
            model.set_observer(self._observe, set(self.observed_layers))

    def on_step(self, step: Any) -> None:
        """Record a generate Step: its token (at step.position) and the cache fill after it."""
        with self._lock:
            self._record_step(step)

    def _record_step(self, step: Any) -> None:
        self._step, self._n_steps = step, self._n_steps + 1
        token, position = getattr(step, "token_id", None), getattr(step, "position", None)
        if token is not None and position is not None and int(token) >= 0:  # -1: no token
            self._tokens[int(position)] = int(token)
            # window + 1 kept: the newest token is sampled before the model has processed it
            self._forget_before(int(position) - self.window, self._tokens)
        if self.want_kv and self._model is not None:
            self._record_kv()

    def end(self, model: Transformer) -> None:
        """Detach from the model (the recorded data stays readable through snapshot())."""
        model.set_observer(None)
        self._model = None

    # Capture -----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._model: Transformer | None = None
        self._tokens: dict[int, int] = {}
        self._rows: dict[int, dict[int, Tensor]] = {layer: {} for layer in self.layers}
        self._rope = _RopeState()
        self._filled = 0
        self._kv: deque[tuple[int, int]] = deque(maxlen=KV_HISTORY)  # (step, positions)
        # (capacity, bytes per position of each layer, itemsize, batch), read once per run
        self._kv_shape: tuple[int, tuple[int, ...], int, int] | None = None
        self._step: Any | None = None
        self._n_steps = 0

    def _observe(self, cap: AttentionCapture) -> None:
        with self._lock:
            self._capture(cap)

    def _capture(self, cap: AttentionCapture) -> None:
        newest = int(cap.input_pos[-1])
        self._filled = max(self._filled, newest + 1)
        if self.want_attention and cap.layer in self._rows:
            self._store_rows(cap, newest)
        if self.want_rope and cap.layer == self.rope_layer:
            self._store_rope(cap)

    def _store_rows(self, cap: AttentionCapture, newest: int) -> None:
        rows = self._rows[cap.layer]
        probs = attention_probs(cap, rows=self.window)  # (H, T_rows, T_kv)
        positions = cap.input_pos[-probs.shape[1] :].tolist()
        for t, pos in enumerate(positions):
            lo = max(0, pos - self.window + 1)
            rows[pos] = probs[:, t, lo : pos + 1].clone()  # (H, <= window)
        self._forget_before(newest - self.window + 1, rows)

    def _store_rope(self, cap: AttentionCapture) -> None:
        h = self.rope_head
        g = h // self.args.n_rep
        t_keep = min(cap.k_raw.shape[1], self.window)
        positions = cap.input_pos[-t_keep:].tolist()  # consecutive
        k_raws = _copy(cap.k_raw[0, -t_keep:, g])  # (T_keep, D)
        k_rots = _copy(cap.keys[0, g, positions[0] : positions[-1] + 1])  # (T_keep, D)
        for t, pos in enumerate(positions):
            self._rope.keys[pos] = (k_raws[t], k_rots[t])
        newest = int(cap.input_pos[-1])
        self._forget_before(newest - self.window + 1, self._rope.keys)
        self._rope.current = (newest, _copy(cap.q_raw[0, -1, h]), _copy(cap.q[0, h, -1]))

    def _record_kv(self) -> None:
        if self._kv_shape is None:
            assert self._model is not None
            caches = self._model.caches()
            if not caches:
                return
            # KVCache.nbytes is linear in positions: one read per layer is enough.
            self._kv_shape = (
                caches[0].capacity,
                tuple(c.nbytes(1) for c in caches),
                caches[0].k.element_size(),
                caches[0].k.shape[0],
            )
        self._kv.append((self._n_steps - 1, self._filled))

    @staticmethod
    def _forget_before(lowest: int, store: dict[int, Any]) -> None:
        """Drop positions < lowest. Positions arrive in increasing order (begin() resets), so
        the dict's insertion order is position order and the oldest entries come first."""
        while store and (oldest := next(iter(store))) < lowest:
            del store[oldest]

    # Snapshot ----------------------------------------------------------------------------
    def snapshot(self) -> Trace:
        """An immutable Trace of the last `window` positions (new tensors; safe to keep)."""
        with self._lock:
            return self._trace()

    def _trace(self) -> Trace:
        newest = self._newest()
        lo = max(0, newest - self.window + 1)
        positions = list(range(lo, newest + 1))
        tokens = [
            token_label(self.token_pieces(self._tokens[p])) if p in self._tokens else "?"
            for p in positions
        ]
        attention = {
            layer: view
            for layer in sorted(self._rows)
            if (view := self._layer_view(layer, positions)) is not None
        }
        return Trace(
            self.args,
            positions,
            tokens,
            attention,
            self._rope_view(),
            self._kv_view(),
            self._step,
            self._n_steps,
        )

    def _newest(self) -> int:
        """The newest position the model has processed (else the newest token known)."""
        if self._filled:
            return self._filled - 1
        return max(self._tokens, default=-1)

    def _layer_view(self, layer: int, positions: list[int]) -> LayerAttention | None:
        rows = self._rows[layer]
        queries = [p for p in positions if p in rows]
        if not queries:
            return None
        lo = positions[0]
        probs = torch.zeros(self.args.n_heads, len(queries), len(positions))  # (H, T_q, T_kv)
        for i, q in enumerate(queries):
            row = rows[q]  # keys max(0, q-window+1) .. q, which covers lo .. q
            start = lo - max(0, q - self.window + 1)
            probs[:, i, : q - lo + 1] = row[:, start:]
        outside = (1.0 - probs.sum(-1)).clamp_min(0.0)  # (H, T_q)
        mean, spread = group_reduce(probs, self.args.kv_heads)
        return LayerAttention(layer, queries, positions, probs, outside, mean, spread)

    def _rope_view(self) -> RopeTrace | None:
        if self._rope.current is None:
            return None
        pos, q_raw, q_rot = self._rope.current
        d, theta = self.args.head_dim, self.args.rope_theta
        key_positions = sorted(self._rope.keys)
        k_raws = torch.stack([self._rope.keys[p][0] for p in key_positions])  # (T, D)
        k_rots = torch.stack([self._rope.keys[p][1] for p in key_positions])  # (T, D)
        path_positions = list(range(max(0, pos - self.window + 1), pos + 1))
        angles = rope_angles(torch.tensor(path_positions), d, theta)  # (P, D/2)
        q_path = apply_rope(
            q_raw.expand(1, len(path_positions), 1, d), torch.cos(angles), torch.sin(angles)
        )[0, :, 0]  # (P, D)
        k_raw, k_rot = self._rope.keys.get(pos, (k_raws[-1], k_rots[-1]))
        return RopeTrace(
            self.rope_layer,
            self.rope_head,
            self.rope_head // self.args.n_rep,
            pos,
            q_raw,
            q_rot,
            k_raw,
            k_rot,
            rope_frequencies(d, theta),
            angles[-1].clone(),
            key_positions,
            k_rots @ q_rot / math.sqrt(d),
            k_raws @ q_raw / math.sqrt(d),
            path_positions,
            q_path,
        )

    def _kv_view(self) -> KVTrace | None:
        if not self.want_kv or self._kv_shape is None or not self._kv:
            return None
        capacity, per_position, itemsize, batch = self._kv_shape
        steps, positions = (list(col) for col in zip(*self._kv, strict=True))
        per_layer = [tuple(b * n for b in per_position) for n in positions]
        return KVTrace(
            steps,
            positions,
            per_layer,
            capacity,
            tuple(b * capacity for b in per_position),
            itemsize,
            batch,
            self.args,
            counterfactual_kv_heads(self.args),
        )


def _copy(x: Tensor) -> Tensor:
    """A CPU fp32 copy: never a view of the model's activations or of its KV-cache buffers,
    which the next forward or the next generation overwrites."""
    return x.detach().to("cpu", torch.float32, copy=True)


def _check_layers(args: ModelArgs, layers: Set[int] | None) -> frozenset[int]:
    if layers is None:
        return frozenset(range(args.n_layers))
    chosen = frozenset(int(i) for i in layers)
    bad = sorted(i for i in chosen if not 0 <= i < args.n_layers)
    if not chosen or bad:
        raise ValueError(
            f"layers: expected a non-empty set within 0..{args.n_layers - 1}, found "
            f"{sorted(chosen)}"
        )
    return chosen
