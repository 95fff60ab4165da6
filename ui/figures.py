"""Plotly figures of what a Probe recorded (llama/probes/capture.py). Pure: data in, go.Figure out.

The public figure API of the playground lives here: attention_by_group (ui/attention_fig.py),
rope_rotation, kv_cache_growth, token_probabilities, rope_lab (ui/rope_lab.py) and
empty_figure. Every figure has a title, token labels on its axes and hover text with exact
values; the shared look (ui/plot_style.py) reads on light and dark pages alike, and causally
masked attention cells are left empty, so a true 0 and "cannot attend" never look alike.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from llama.probes.views import Trace, token_label
from ui.attention_fig import ATTENTION_MODES, attention_by_group
from ui.plot_style import COLOURS, GRID, HIGHLIGHT, TEXT, alpha, empty_figure, esc, fmt_bytes, style
from ui.rope_lab import rope_lab

__all__ = [
    "ATTENTION_MODES",
    "HIGHLIGHT",
    "attention_by_group",
    "empty_figure",
    "kv_cache_growth",
    "rope_lab",
    "rope_rotation",
    "token_probabilities",
]


# RoPE ---------------------------------------------------------------------------------------
def rope_rotation(trace: Trace, head: int = 0) -> go.Figure:
    """How RoPE turns the traced query head: pairs rotating with position (polar), the angle of
    every pair at the newest position, and q.k against earlier keys with and without RoPE."""
    rope = trace.rope
    if rope is None:
        return empty_figure("No RoPE data yet: generate a few tokens with the RoPE probe on.")
    if head != rope.head:
        return empty_figure(
            f"The probe traced head {rope.head}, not head {head}: "
            "change the probe's rope_head to see another head."
        )
    fig = make_subplots(
        rows=1,
        cols=3,
        specs=[[{"type": "polar"}, {}, {}]],
        column_widths=[0.3, 0.35, 0.35],
        horizontal_spacing=0.08,
        subplot_titles=[  # short: longer ones overlapped their neighbours at the app's width
            "pairs turning",
            f"angle m·θ_i at {rope.position}",
            "q·k/√D vs offset",
        ],
    )
    for n, i in enumerate(_shown_pairs(len(rope.angles))):
        for tr in _pair_traces(rope, i, COLOURS[n % len(COLOURS)]):
            fig.add_trace(tr, row=1, col=1)
    fig.add_trace(_angle_bars(rope), row=1, col=2)
    for tr in _score_traces(trace, rope):
        fig.add_trace(tr, row=1, col=3)
    fig.update_xaxes(title_text="frequency pair i", row=1, col=2)
    fig.update_yaxes(title_text="angle mod 2π (rad)", range=[0, 2 * math.pi], row=1, col=2)
    fig.update_xaxes(title_text="offset m − n (positions back)", row=1, col=3)
    fig.update_yaxes(title_text="score", row=1, col=3)
    fig.update_polars(
        bgcolor="rgba(0,0,0,0)", angularaxis={"gridcolor": GRID}, radialaxis={"gridcolor": GRID}
    )
    token = esc(trace.label(rope.position))
    title = (
        f"RoPE: layer {rope.layer}, head {rope.head} (KV head {rope.kv_head}), position "
        f"{rope.position} '{token}'<br><sup>|q| {float(rope.q_raw.norm()):.5f} before, "
        f"{float(rope.q_rot.norm()):.5f} after; |k| {float(rope.k_raw.norm()):.5f} before, "
        f"{float(rope.k_rot.norm()):.5f} after: rotation keeps lengths</sup>"
    )
    return style(fig, title, height=460)


def _shown_pairs(n_pairs: int) -> list[int]:
    """A fast, two middle and the slowest frequency pair."""
    return sorted({0, n_pairs // 8, n_pairs // 3, n_pairs - 1})


def _pair_traces(rope: Any, i: int, colour: str) -> list[go.Scatterpolar]:
    path = rope.q_path[:, 2 * i : 2 * i + 2]  # (P, 2): this pair of q_raw rotated to each position
    r = path.norm(dim=-1).tolist()
    deg = [math.degrees(math.atan2(y, x)) for x, y in path.tolist()]
    raw = rope.q_raw[2 * i : 2 * i + 2].tolist()
    raw_r, raw_deg = math.hypot(*raw), math.degrees(math.atan2(raw[1], raw[0]))
    name = f"pair {i} (θ_i={float(rope.freqs[i]):.3g} rad/pos)"
    return [
        go.Scatterpolar(
            r=r,
            theta=deg,
            mode="markers",
            name=name,
            legendgroup=name,
            marker={"color": colour, "size": 4, "opacity": 0.45},
            customdata=rope.path_positions,
            hovertemplate="position %{customdata}<br>r %{r:.5f}<br>angle "
            "%{theta:.2f}°<extra>" + name + "</extra>",
        ),
        go.Scatterpolar(
            r=[0, raw_r],
            theta=[raw_deg, raw_deg],
            mode="lines",
            line={"color": colour, "dash": "dot"},
            legendgroup=name,
            showlegend=False,
            hovertemplate="before RoPE<br>r %{r:.5f}<br>"
            "angle %{theta:.2f}°<extra>" + name + "</extra>",
        ),
        go.Scatterpolar(
            r=[0, r[-1]],
            theta=[deg[-1], deg[-1]],
            mode="lines+markers",
            line={"color": colour, "width": 3},
            legendgroup=name,
            showlegend=False,
            marker={"size": [0, 9], "symbol": "arrow", "angleref": "previous"},
            hovertemplate=f"after RoPE at position {rope.position}<br>r %{{r:.5f}}"
            "<br>angle %{theta:.2f}°<extra>" + name + "</extra>",
        ),
    ]


def _angle_bars(rope: Any) -> go.Bar:
    angles = rope.angles.tolist()
    wrapped = [a % (2 * math.pi) for a in angles]
    custom = [
        [float(f), a, 2 * math.pi / float(f)] for f, a in zip(rope.freqs, angles, strict=True)
    ]
    return go.Bar(
        x=list(range(len(angles))),
        y=wrapped,
        customdata=custom,
        showlegend=False,
        marker={"color": COLOURS[0]},
        name="angle",
        hovertemplate="pair %{x}<br>θ_i = %{customdata[0]:.6g} rad/position<br>"
        "m·θ_i = %{customdata[1]:.6f} rad (%{y:.6f} mod 2π)<br>wavelength "
        "%{customdata[2]:.1f} positions<extra></extra>",
    )


def _score_traces(trace: Trace, rope: Any) -> list[go.Scatter]:
    offsets = [rope.position - p for p in rope.key_positions]
    keys = [esc(trace.label(p)) + f" @{p}" for p in rope.key_positions]
    out = []
    for name, scores, colour in (
        ("with RoPE", rope.scores_rope, COLOURS[1]),
        ("without RoPE", rope.scores_plain, COLOURS[4]),
    ):
        out.append(
            go.Scatter(
                x=offsets,
                y=scores.tolist(),
                mode="lines+markers",
                name=name,
                customdata=keys,
                line={"color": colour},
                marker={"size": 5},
                hovertemplate="key %{customdata}<br>offset %{x}<br>score "
                "%{y:.6f}<extra>" + name + "</extra>",
            )
        )
    return out


# KV cache -----------------------------------------------------------------------------------
def kv_cache_growth(trace: Trace, ranks: int = 1) -> go.Figure:
    """Left: bytes held after each step of this generation, stacked by layer. Right: the same
    model's cache up to max_seq_len as MHA / GQA / MQA, the preallocated capacity, the current
    context and max_seq_len. Hover gives exact bytes.

    ranks > 1 (tensor parallelism): the trace's bytes are one rank's (every rank holds the
    same amount); the figure adds the total over the ranks and says both."""
    kv = trace.kv
    if kv is None:
        return empty_figure("No KV-cache data yet: generate a few tokens with the probe on.")
    max_len, current = kv.args.max_seq_len, kv.positions[-1]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=[
            # short: longer titles ran into each other at the app's width
            f"positions {kv.positions[0]}..{current}, by layer",
            f"whole context (max_seq_len {max_len})",
        ],
    )
    fig.update_annotations(font_size=12)
    for tr in _kv_layer_traces(kv, ranks):
        fig.add_trace(tr, row=1, col=1)
    near = sorted(set(kv.positions))
    full = sorted({0, max_len, current, *range(0, max_len, max(1, max_len // 64))})
    for col, xs in ((1, near), (2, full)):
        for tr in _kv_counterfactual_traces(kv, xs, show_legend=col == 2):
            fig.add_trace(tr, row=1, col=col)
    capacity = sum(kv.capacity_bytes_per_layer)
    if ranks > 1:
        fig.add_trace(_kv_total_trace(kv, ranks), row=1, col=1)
    fig.add_hline(
        y=capacity * ranks,
        line={"color": TEXT, "dash": "dot"},
        row=1,
        col=2,
        annotation_text=f"preallocated {fmt_bytes(capacity * ranks)}"
        + (f" ({ranks} ranks × {fmt_bytes(capacity)})" if ranks > 1 else ""),
        annotation_position="top left",
    )
    fig.add_vline(
        x=current,
        line={"color": HIGHLIGHT},
        row=1,
        col=2,
        annotation_text=f"context {current}",
        annotation_position="top right",
    )
    fig.add_vline(x=max_len, line={"color": TEXT, "dash": "dot"}, row=1, col=2)
    fig.update_xaxes(title_text="positions in the cache")
    fig.update_xaxes(range=[0, max_len * 1.02], row=1, col=2)
    fig.update_yaxes(title_text="bytes (K + V, all layers)", tickformat="~s", row=1, col=1)
    fig.update_yaxes(tickformat="~s", row=1, col=2)
    return style(fig, _kv_title(kv, ranks), height=440)


def _kv_title(kv: Any, ranks: int) -> str:
    a, current = kv.args, kv.positions[-1]
    used, capacity = sum(kv.bytes_per_layer[-1]), sum(kv.capacity_bytes_per_layer)
    per_position = capacity // max(1, kv.capacity_positions)  # one rank's
    heads = per_position // (kv.batch * a.n_layers * 2 * a.head_dim * kv.itemsize)
    formula = (
        f"{kv.batch} × {a.n_layers} layers × 2 (K, V) × {heads} KV heads × {a.head_dim} dims × "
        f"{kv.itemsize} bytes = {fmt_bytes(per_position)} per position"
    )
    if ranks == 1:
        return (
            f"KV cache ({a.attention_kind}): {current} of {a.max_seq_len} positions, "
            f"{fmt_bytes(used)} of {fmt_bytes(capacity)} preallocated<br><sup>{formula}</sup>"
        )
    return (
        f"KV cache ({a.attention_kind}) over {ranks} ranks: {current} of {a.max_seq_len} "
        f"positions, {fmt_bytes(used * ranks)} of {fmt_bytes(capacity * ranks)} in total, "
        f"{fmt_bytes(used)} of {fmt_bytes(capacity)} per rank<br><sup>each rank: {formula}"
        "</sup>"
    )


def _kv_total_trace(kv: Any, ranks: int) -> go.Scatter:
    """The bytes over every rank (tensor parallelism), beside one rank's stacked layers."""
    return go.Scatter(
        x=kv.positions,
        y=[sum(b) * ranks for b in kv.bytes_per_layer],
        mode="lines",
        name=f"all {ranks} ranks",
        line={"color": TEXT, "dash": "dash"},
        hovertemplate=f"all {ranks} ranks<br>%{{x}} positions<br>%{{y:,}} bytes<extra></extra>",
    )


def _kv_layer_traces(kv: Any, ranks: int) -> list[go.Scatter]:
    label = "used, stacked by layer" + (" (one rank)" if ranks > 1 else "")
    return [
        go.Scatter(
            x=kv.positions,
            y=[b[layer] for b in kv.bytes_per_layer],
            stackgroup="used",
            name=(label if layer == 0 else f"layer {layer}"),
            legendgroup="used",
            showlegend=layer == 0,
            line={"width": 0.5, "color": COLOURS[layer % 2]},
            fillcolor=alpha(COLOURS[layer % 2], 0.55),
            customdata=kv.steps,
            hovertemplate=f"layer {layer}<br>step %{{customdata}}<br>%{{x}} positions<br>"
            "%{y:,} bytes<extra></extra>",
        )
        for layer in range(len(kv.capacity_bytes_per_layer))
    ]


def _kv_counterfactual_traces(kv: Any, xs: list[int], show_legend: bool) -> list[go.Scatter]:
    out = []
    for n, (label, n_kv) in enumerate(kv.counterfactual.items()):
        own = n_kv == kv.args.kv_heads
        name = label + (" = this model" if own else " (same model, counterfactual)")
        out.append(
            go.Scatter(
                x=xs,
                y=[kv.bytes_for(n_kv, x) for x in xs],
                mode="lines",
                name=name,
                legendgroup=label,
                showlegend=show_legend,
                line={"color": COLOURS[2 + n], "dash": "solid" if own else "dash"},
                hovertemplate=label + "<br>%{x} positions<br>%{y:,} bytes<extra></extra>",
            )
        )
    return out


# Sampling -----------------------------------------------------------------------------------
def token_probabilities(step: Any | None, chosen_label: str | None = None) -> go.Figure:
    """The top candidates for the latest token: raw softmax vs the distribution actually sampled
    (after penalties, temperature, top-k, top-p, min-p); the chosen token is outlined.
    chosen_label: the chosen token's text, named in the title when it is not among the bars."""
    if step is None:
        return empty_figure("Generate a reply to see the candidates for each token.")
    top = list(getattr(step, "top", None) or [])
    if not top:
        why = getattr(step, "finish_reason", None)
        return empty_figure(f"No candidates for this step ({why or 'none recorded'}).")
    labels = _candidate_labels(top)
    chosen = [c.token_id == step.token_id for c in top]
    fig = go.Figure()
    for name, attr, colour in (
        ("before: softmax of the logits", "prob_before", COLOURS[4]),
        ("after: what was sampled from", "prob_after", COLOURS[0]),
    ):
        values = [float(getattr(c, attr)) for c in top]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                name=name,
                marker={
                    "color": colour,
                    "line": {
                        "color": [HIGHLIGHT if c else "rgba(0,0,0,0)" for c in chosen],
                        "width": 3,
                    },
                },
                customdata=[
                    [c.token_id, "chosen" if ch else ("filtered out" if c.prob_after == 0 else "")]
                    for c, ch in zip(top, chosen, strict=True)
                ],
                hovertemplate="%{x} (id %{customdata[0]})<br>p = %{y:.6f}<br>%{customdata[1]}"
                f"<extra>{name}</extra>",
            )
        )
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="candidate token", type="category")
    fig.update_yaxes(title_text="probability", range=[0, 1.05])
    if any(chosen):
        piece = labels[chosen.index(True)]
    else:
        name = esc(chosen_label) if chosen_label else "a token"
        piece = f"{name} (id {step.token_id}, outside the top {len(top)} shown)"
    title = (
        f"Next token {piece} at position {step.position}: p = {float(step.prob):.4f} "
        "under the raw logits<br><sup>outlined: the chosen token; bars at 0 after: "
        "removed by the sampling settings</sup>"
    )
    return style(fig, title, height=380)


def _candidate_labels(top: list[Any]) -> list[str]:
    """Visible pieces, made unique (two ids can print alike) so category bars never merge."""
    labels, seen = [], set()
    for c in top:
        label = esc(token_label(c.piece))
        if label in seen:
            label = f"{label} #{c.token_id}"
        seen.add(label)
        labels.append(label)
    return labels
