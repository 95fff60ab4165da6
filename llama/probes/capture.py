"""Opt-in capture of the model's insides while it decodes: attention, RoPE and the KV cache.

A `Probe` is handed to `generate()`, which calls `begin(model, prompt_ids)` before prefill,
`on_step(step)` after every Step and `end(model)` in a finally block. The probe attaches itself
to the traced layers with `model.set_observer`; with no probe the model's SDPA fast path runs
untouched. For the traced layers only, the attention probabilities softmax(q k^T / sqrt(D)) are
recomputed (Vaswani et al. 2017, eq. 1) with the causal rule: one row per query head per
decode step. A decode step only keeps references to its query (and, for RoPE, q/k before and
after rotation); the rows are computed in one batch at the next snapshot(), at end() or every
`window` steps, reading keys from the KV cache, which no one rewrites before end().
bench/probe_overhead.py measures the cost.

Everything stored is a small CPU fp32 tensor keyed by absolute position, and only the last
`window` positions are kept (rows are cut to their last `window` keys), so memory stays
bounded in long chats: about n_layers_traced * H * window^2 * 4 bytes for attention.
`snapshot()` assembles an immutable `Trace` (llama/probes/views.py) for ui/figures.py.
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
from llama.probes.views import (
    KVTrace,
    LayerAttention,
    RopeTrace,
    Trace,
    causal_probs,
    counterfactual_kv_heads,
    group_reduce,
    kv_bytes,
    layer_view,
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
    "causal_probs",
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
    q, pos = capture.q[batch], capture.input_pos  # (H, T, D), (T,)
    if rows is not None and rows < q.shape[1]:
        q, pos = q[:, -rows:], pos[-rows:]
    return causal_probs(q, capture.keys[batch], pos)


@dataclass
class _Pending:
    """Decode steps of one layer not yet turned into rows: their positions, what each step
    captured (references, no copies) and the latest keys view, which covers every position.
    Rows are computed in one batch at the next snapshot, at end() or after `window` steps:
    the cache positions they read are not rewritten before end() (one generation at a time)."""

    positions: list[int] = field(default_factory=list)
    captured: list[tuple[Tensor, ...]] = field(default_factory=list)
    keys: Tensor | None = None  # (B, H_kv, T_kv, D)

    def add(self, position: int, keys: Tensor, *captured: Tensor) -> int:
        self.positions.append(position)
        self.captured.append(captured)
        self.keys = keys
        return len(self.positions)

    def take(self) -> tuple[list[int], list[tuple[Tensor, ...]], Tensor | None]:
        out = (self.positions, self.captured, self.keys)
        self.positions, self.captured, self.keys = [], [], None
        return out


@dataclass
class _RopeState:
    keys: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # pos -> (k_raw, k_rot)
    current: tuple[int, Tensor, Tensor] | None = None  # (pos, q_raw, q_rot)
    pending: _Pending = field(default_factory=_Pending)


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
        with self._lock:
            self._flush()  # before another generation may rewrite the cache
        model.set_observer(None)
        self._model = None

    # Capture -----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._model: Transformer | None = None
        self._tokens: dict[int, int] = {}
        self._rows: dict[int, dict[int, Tensor]] = {layer: {} for layer in self.layers}
        self._pending: dict[int, _Pending] = {layer: _Pending() for layer in self.layers}
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
        """Decode steps are only noted (a few references); prefills are computed at once."""
        newest = int(cap.input_pos[-1])
        self._filled = max(self._filled, newest + 1)
        decode = cap.q.shape[2] == 1
        if self.want_attention and cap.layer in self._rows:
            self._capture_rows(cap, newest, decode)
        if self.want_rope and cap.layer == self.rope_layer:
            self._capture_rope(cap, newest, decode)

    def _capture_rows(self, cap: AttentionCapture, newest: int, decode: bool) -> None:
        if not decode:
            self._flush_rows(cap.layer)
            self._store_rows(cap.layer, cap.q[0], cap.keys[0], cap.input_pos)
        elif self._pending[cap.layer].add(newest, cap.keys, cap.q[0, :, 0]) >= self.window:
            self._flush_rows(cap.layer)

    def _capture_rope(self, cap: AttentionCapture, newest: int, decode: bool) -> None:
        h, g = self.rope_head, self.rope_head // self.args.n_rep
        q_raw, q_rot = cap.q_raw[0, -1, h], cap.q[0, h, -1]  # (D,) the newest query
        if not decode:
            self._flush_rope()
            positions = cap.input_pos.tolist()
            self._store_rope(positions, cap.k_raw[0, :, g], cap.keys, q_raw, q_rot)
        elif self._rope.pending.add(newest, cap.keys, q_raw, q_rot, cap.k_raw[0, 0, g]) >= (
            self.window
        ):
            self._flush_rope()

    def _flush(self) -> None:
        for layer in self._pending:
            self._flush_rows(layer)
        self._flush_rope()

    def _flush_rows(self, layer: int) -> None:
        positions, captured, keys = self._pending[layer].take()
        if positions:
            q = torch.stack([c[0] for c in captured], 1)  # (H, P, D)
            self._store_rows(layer, q, keys[0], torch.tensor(positions))

    def _store_rows(self, layer: int, q: Tensor, keys: Tensor, input_pos: Tensor) -> None:
        """Rows of the last `window` queries q (H, T, D) against keys (H_kv, T_kv, D)."""
        rows = self._rows[layer]
        t_keep = min(q.shape[1], self.window)
        positions = input_pos[-t_keep:].tolist()
        probs = causal_probs(q[:, -t_keep:], keys, input_pos[-t_keep:].to(keys.device))
        for t, pos in enumerate(positions):
            lo = max(0, pos - self.window + 1)
            rows[pos] = probs[:, t, lo : pos + 1].clone()  # (H, <= window)
        self._forget_before(positions[-1] - self.window + 1, rows)

    def _flush_rope(self) -> None:
        positions, captured, keys = self._rope.pending.take()
        if positions:
            q_raw, q_rot, _ = captured[-1]
            k_raw = torch.stack([c[2] for c in captured])  # (P, D)
            self._store_rope(positions, k_raw, keys, q_raw, q_rot)

    def _store_rope(
        self, positions: list[int], k_raw: Tensor, keys: Tensor, q_raw: Tensor, q_rot: Tensor
    ) -> None:
        """Keep k before RoPE (k_raw (T, D) at `positions`) and after (read from keys
        (B, H_kv, T_kv, D)) for the last `window` positions, and the newest q (D,) both ways."""
        g = self.rope_head // self.args.n_rep
        t_keep = min(len(positions), self.window)
        positions = positions[-t_keep:]  # consecutive
        k_raws = _copy(k_raw[-t_keep:])  # (T_keep, D)
        k_rots = _copy(keys[0, g, positions[0] : positions[-1] + 1])  # (T_keep, D)
        for t, pos in enumerate(positions):
            self._rope.keys[pos] = (k_raws[t], k_rots[t])
        self._forget_before(positions[-1] - self.window + 1, self._rope.keys)
        self._rope.current = (positions[-1], _copy(q_raw), _copy(q_rot))

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
        self._flush()
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
            if (view := layer_view(layer, self._rows[layer], positions, self.window, self.args))
            is not None
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
        return KVTrace.from_samples(list(self._kv), *self._kv_shape, self.args)


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
