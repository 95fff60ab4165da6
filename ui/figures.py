"""Plotly figures of what a Probe recorded (llama/probes.py). Pure: data in, go.Figure out.

Every figure has a title, token labels on its axes and hover text with exact values. Colours
are chosen to read on light and dark pages alike: transparent backgrounds, mid-grey text and
grid, mid-luminance trace colours, and the perceptually uniform Viridis scale for heatmaps
(causally masked cells are left empty, so a true 0 and "cannot attend" never look alike).
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from llama.probes import LayerAttention, Trace, token_label
from ui.rope_lab import rope_lab  # noqa: F401  (part of this module's public API)

TEXT = "#8c8c8c"  # >= 3:1 contrast on both white and near-black backgrounds
GRID = "rgba(140, 140, 140, 0.25)"
COLOURS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B")
HIGHLIGHT = "#F58518"
HEATMAP_SCALE = "Viridis"
MAX_TICKS = 24  # token labels per axis before thinning (hover still names every cell)
ATTENTION_MODES = ("heads", "mean", "spread")


def style(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    """Apply the shared theme-neutral look and a title."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
        font={"color": TEXT, "size": 12}, height=height,
        margin={"l": 60, "r": 30, "t": 80, "b": 60},
        legend={"bgcolor": "rgba(0,0,0,0)"}, hoverlabel={"namelength": -1},
    )
    fig.update_xaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    fig.update_yaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank figure that says why it is blank (and what to do)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font={"size": 14, "color": TEXT})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style(fig, "", height=300)


def _esc(text: str) -> str:
    """Token text is data, not markup: plotly would read a piece like '<s>' as a tag."""
    return html.escape(text, quote=False)


def _ticks(labels: list[str], budget: int = MAX_TICKS) -> tuple[list[int], list[str]]:
    """Indices/texts of the labels to print, thinned to at most `budget` (newest kept)."""
    stride = max(1, math.ceil(len(labels) / max(2, budget)))
    keep = list(range(len(labels) - 1, -1, -stride))[::-1]
    return keep, [labels[i] for i in keep]


# Attention ---------------------------------------------------------------------------------
def attention_by_group(trace: Trace, layer: int, head: int | None = None,
                       mode: str = "heads") -> go.Figure:
    """One heatmap panel per GQA group; rows are queries, columns keys, both token-labelled.

    mode "heads": the group's query heads side by side in its panel; "mean": the group mean
    (hover adds the spread); "spread": max - min between the group's heads. head: show only
    that query head's panel. The newest query row is outlined.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode: expected one of {ATTENTION_MODES}, found {mode!r}")
    view = trace.attention.get(layer)
    if view is None:
        traced = sorted(trace.attention) or "none yet"
        return empty_figure(f"Layer {layer} has no attention data (traced layers: {traced}).")
    args = trace.args
    if head is not None and not 0 <= head < args.n_heads:
        raise ValueError(f"head: expected 0..{args.n_heads - 1}, found {head}")
    groups = range(args.kv_heads) if head is None else [head // args.n_rep]
    cols = min(len(groups), 4 if args.n_rep <= 2 or mode != "heads" else 2)
    rows = math.ceil(len(groups) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_group_title(args, g, head, mode)
                        for g in groups], horizontal_spacing=0.06,
                        vertical_spacing=min(0.12, 0.5 / rows))
    fig.update_annotations(font_size=12)  # the subplot titles
    labels = _labels(trace, view)
    for n, g in enumerate(groups):
        heads = _panel_heads(args.n_rep, g, head, mode)
        heatmap = _group_heatmap(view, g, heads, mode, labels)
        fig.add_trace(heatmap, row=n // cols + 1, col=n % cols + 1)
        _label_axes(fig, n, cols, heatmap, labels)
    fig.update_layout(coloraxis={"colorscale": HEATMAP_SCALE, "cmin": 0.0,
                                 "colorbar": {"title": {"text": "p" if mode != "spread"
                                                        else "max-min"}}})
    return style(fig, _attention_title(args, layer, mode), height=120 + 300 * rows)


def _labels(trace: Trace, view: LayerAttention) -> tuple[list[str], list[str]]:
    """Unique axis categories 'token @position' for the query rows and key columns."""
    q = [f"{_esc(trace.label(p))} @{p}" for p in view.query_positions]
    k = [f"{_esc(trace.label(p))} @{p}" for p in view.key_positions]
    return q, k


def _panel_heads(n_rep: int, group: int, head: int | None, mode: str) -> list[int]:
    """Query heads drawn in a group's panel; [-1] stands for the group mean or spread."""
    if head is not None:
        return [head]
    return list(range(group * n_rep, (group + 1) * n_rep)) if mode == "heads" else [-1]


def _panel(view: LayerAttention, group: int, heads: list[int], mode: str,
           labels: tuple[list[str], list[str]]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """z (T_q, X) fp32, customdata (T_q, X, C) or None, and the x categories.

    Heads sit side by side with one empty column between them; future keys are NaN (blank).
    customdata channels, only when they say something (they weigh on the page): the group
    spread in "mean" mode, then the mass before the window once the window cuts history.
    """
    qpos, kpos = np.array(view.query_positions), np.array(view.key_positions)
    causal = kpos[None, :] <= qpos[:, None]  # (T_q, T_kv)
    truncated = float(view.outside.max()) > 1e-6
    zs, extras, xs = [], [], []
    for n, h in enumerate(heads):
        if h >= 0:
            mat, outside = view.probs[h].numpy(), view.outside[h].numpy()
        else:
            mat = (view.group_mean if mode == "mean" else view.group_spread)[group].numpy()
            outside = view.outside[_group_slice(view, group)].mean(0).numpy()
        channels = [view.group_spread[group].numpy()] if mode == "mean" else []
        channels += [np.broadcast_to(outside[:, None], mat.shape)] if truncated else []
        if n:
            zs.append(np.full((len(qpos), 1), np.nan, dtype=np.float32))
            extras.append(np.zeros((len(qpos), 1, len(channels)), dtype=np.float32))
            xs.append(f"gap {n}")
        zs.append(np.where(causal, mat, np.nan).astype(np.float32))
        extras.append(np.stack(channels, -1).astype(np.float32) if channels else None)
        prefix = f"h{h}: " if len(heads) > 1 else ""
        xs += [prefix + k for k in labels[1]]
    data = np.concatenate(extras, 1) if extras[-1] is not None else None
    return np.concatenate(zs, 1), data, xs


def _group_heatmap(view: LayerAttention, group: int, heads: list[int], mode: str,
                   labels: tuple[list[str], list[str]]) -> go.Heatmap:
    z, extra, xs = _panel(view, group, heads, mode, labels)
    who = f"head {heads[0]}" if len(heads) == 1 and heads[0] >= 0 else f"group {group}"
    hover = f"{who}<br>query %{{y}}<br>key %{{x}}<br>{'max-min' if mode == 'spread' else 'p'} = "
    hover += "%{z:.6f}"
    channel = 0
    if mode == "mean":
        hover += "<br>spread (max-min) %{customdata[0]:.6f}"
        channel = 1
    if extra is not None and extra.shape[-1] > channel:
        hover += f"<br>mass before the window: %{{customdata[{channel}]:.4f}}"
    return go.Heatmap(z=z, x=xs, y=labels[0], customdata=extra, coloraxis="coloraxis",
                      hoverongaps=False, name=who, hovertemplate=hover + "<extra></extra>")


def _group_slice(view: LayerAttention, group: int) -> slice:
    n_rep = view.probs.shape[0] // view.group_mean.shape[0]
    return slice(group * n_rep, (group + 1) * n_rep)


def _label_axes(fig: go.Figure, n: int, cols: int, trace_: go.Heatmap,
                labels: tuple[list[str], list[str]]) -> None:
    """Thinned token ticks on both axes and an outline around the newest query row."""
    qs, ks = labels
    xs = list(trace_.x)
    per_head = len(ks) + 1
    xvals, xtext = [], []
    budget = min(MAX_TICKS, 60 // (cols * math.ceil(len(xs) / per_head)))  # ~15 px per label
    for start in range(0, len(xs), per_head):
        idx, text = _ticks(ks, budget)
        xvals += [xs[start + i] for i in idx]
        xtext += text
    yidx, ytext = _ticks(qs)
    row, col = n // cols + 1, n % cols + 1
    fig.update_xaxes(tickvals=xvals, ticktext=[t.split(" @")[0] for t in xtext],
                     tickangle=-60, title_text="key", row=row, col=col, showgrid=False)
    fig.update_yaxes(tickvals=[qs[i] for i in yidx], ticktext=[t.split(" @")[0] for t in ytext],
                     autorange="reversed", title_text="query" if col == 1 else None, row=row,
                     col=col, showgrid=False)
    suffix = "" if n == 0 else str(n + 1)
    last = len(qs) - 1
    fig.add_shape(type="rect", xref=f"x{suffix}", yref=f"y{suffix}", x0=-0.5,
                  x1=len(xs) - 0.5, y0=last - 0.5, y1=last + 0.5,
                  line={"color": HIGHLIGHT, "width": 2}, name="newest query")


def _group_title(args: Any, group: int, head: int | None, mode: str) -> str:
    first = group * args.n_rep
    members = ", ".join(str(h) for h in range(first, first + args.n_rep))
    what = {"heads": f"heads {members}", "mean": f"mean of heads {members}",
            "spread": f"spread of heads {members}"}[mode]
    if head is not None:
        what = f"head {head}"
    return f"group {group} (KV head {group}): {what}"


def _attention_title(args: Any, layer: int, mode: str) -> str:
    h, kv = args.n_heads, args.kv_heads
    if args.attention_kind == "MHA":
        kind = (f"MHA: groups of one head ({h} query heads, {kv} KV heads), nothing is shared, "
                "so each panel is a single head")
    elif args.attention_kind == "MQA":
        kind = f"MQA: one group, all {h} query heads share a single KV head"
    else:
        kind = f"GQA: {h} query heads in {kv} groups of {args.n_rep}, each group shares a KV head"
    return f"Layer {layer} attention ({mode})<br><sup>{kind}</sup>"


# RoPE ---------------------------------------------------------------------------------------
def rope_rotation(trace: Trace, head: int = 0) -> go.Figure:
    """How RoPE turns the traced query head: pairs rotating with position (polar), the angle of
    every pair at the newest position, and q.k against earlier keys with and without RoPE."""
    rope = trace.rope
    if rope is None:
        return empty_figure("No RoPE data yet: generate a few tokens with the RoPE probe on.")
    if head != rope.head:
        return empty_figure(f"The probe traced head {rope.head}, not head {head}: "
                            "change the probe's rope_head to see another head.")
    fig = make_subplots(rows=1, cols=3, specs=[[{"type": "polar"}, {}, {}]],
                        column_widths=[0.3, 0.35, 0.35], horizontal_spacing=0.08,
                        subplot_titles=["pairs turning as position advances",
                                        f"angle m·θ_i at position {rope.position}",
                                        "q·k/√D against earlier keys"])
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
    fig.update_polars(bgcolor="rgba(0,0,0,0)", angularaxis={"gridcolor": GRID},
                      radialaxis={"gridcolor": GRID})
    token = _esc(trace.label(rope.position))
    title = (f"RoPE: layer {rope.layer}, head {rope.head} (KV head {rope.kv_head}), position "
             f"{rope.position} '{token}'<br><sup>|q| {float(rope.q_raw.norm()):.5f} before, "
             f"{float(rope.q_rot.norm()):.5f} after; |k| {float(rope.k_raw.norm()):.5f} before, "
             f"{float(rope.k_rot.norm()):.5f} after: rotation keeps lengths</sup>")
    return style(fig, title, height=460)


def _shown_pairs(n_pairs: int) -> list[int]:
    """A fast, two middle and the slowest frequency pair."""
    return sorted({0, n_pairs // 8, n_pairs // 3, n_pairs - 1})


def _pair_traces(rope: Any, i: int, colour: str) -> list[go.Scatterpolar]:
    path = rope.q_path[:, 2 * i: 2 * i + 2]  # (P, 2): this pair of q_raw rotated to each position
    r = path.norm(dim=-1).tolist()
    deg = [math.degrees(math.atan2(y, x)) for x, y in path.tolist()]
    raw = rope.q_raw[2 * i: 2 * i + 2].tolist()
    raw_r, raw_deg = math.hypot(*raw), math.degrees(math.atan2(raw[1], raw[0]))
    name = f"pair {i} (θ_i={float(rope.freqs[i]):.3g} rad/pos)"
    return [
        go.Scatterpolar(r=r, theta=deg, mode="markers", name=name, legendgroup=name,
                        marker={"color": colour, "size": 4, "opacity": 0.45},
                        customdata=rope.path_positions,
                        hovertemplate="position %{customdata}<br>r %{r:.5f}<br>angle "
                                      "%{theta:.2f}°<extra>" + name + "</extra>"),
        go.Scatterpolar(r=[0, raw_r], theta=[raw_deg, raw_deg], mode="lines",
                        line={"color": colour, "dash": "dot"}, legendgroup=name,
                        showlegend=False, hovertemplate="before RoPE<br>r %{r:.5f}<br>"
                        "angle %{theta:.2f}°<extra>" + name + "</extra>"),
        go.Scatterpolar(r=[0, r[-1]], theta=[deg[-1], deg[-1]], mode="lines+markers",
                        line={"color": colour, "width": 3}, legendgroup=name, showlegend=False,
                        marker={"size": [0, 9], "symbol": "arrow", "angleref": "previous"},
                        hovertemplate=f"after RoPE at position {rope.position}<br>r %{{r:.5f}}"
                        "<br>angle %{theta:.2f}°<extra>" + name + "</extra>"),
    ]


def _angle_bars(rope: Any) -> go.Bar:
    angles = rope.angles.tolist()
    wrapped = [a % (2 * math.pi) for a in angles]
    custom = [[float(f), a, 2 * math.pi / float(f)] for f, a in zip(rope.freqs, angles,
                                                                     strict=True)]
    return go.Bar(x=list(range(len(angles))), y=wrapped, customdata=custom, showlegend=False,
                  marker={"color": COLOURS[0]}, name="angle",
                  hovertemplate="pair %{x}<br>θ_i = %{customdata[0]:.6g} rad/position<br>"
                  "m·θ_i = %{customdata[1]:.6f} rad (%{y:.6f} mod 2π)<br>wavelength "
                  "%{customdata[2]:.1f} positions<extra></extra>")


def _score_traces(trace: Trace, rope: Any) -> list[go.Scatter]:
    offsets = [rope.position - p for p in rope.key_positions]
    keys = [_esc(trace.label(p)) + f" @{p}" for p in rope.key_positions]
    out = []
    for name, scores, colour in (("with RoPE", rope.scores_rope, COLOURS[1]),
                                 ("without RoPE", rope.scores_plain, COLOURS[4])):
        out.append(go.Scatter(x=offsets, y=scores.tolist(), mode="lines+markers", name=name,
                              customdata=keys, line={"color": colour}, marker={"size": 5},
                              hovertemplate="key %{customdata}<br>offset %{x}<br>score "
                              "%{y:.6f}<extra>" + name + "</extra>"))
    return out


# KV cache -----------------------------------------------------------------------------------
def kv_cache_growth(trace: Trace) -> go.Figure:
    """Left: bytes held after each step of this generation, stacked by layer. Right: the same
    model's cache up to max_seq_len as MHA / GQA / MQA, the preallocated capacity, the current
    context and max_seq_len. Hover gives exact bytes."""
    kv = trace.kv
    if kv is None:
        return empty_figure("No KV-cache data yet: generate a few tokens with the probe on.")
    max_len, current = kv.args.max_seq_len, kv.positions[-1]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        f"this generation: positions {kv.positions[0]}..{current}, stacked by layer",
        f"the whole context, up to max_seq_len = {max_len}"])
    fig.update_annotations(font_size=12)
    for tr in _kv_layer_traces(kv):
        fig.add_trace(tr, row=1, col=1)
    near = sorted(set(kv.positions))
    full = sorted({0, max_len, current, *range(0, max_len, max(1, max_len // 64))})
    for col, xs in ((1, near), (2, full)):
        for tr in _kv_counterfactual_traces(kv, xs, show_legend=col == 2):
            fig.add_trace(tr, row=1, col=col)
    capacity = sum(kv.capacity_bytes_per_layer)
    fig.add_hline(y=capacity, line={"color": TEXT, "dash": "dot"}, row=1, col=2,
                  annotation_text=f"preallocated {_fmt_bytes(capacity)}",
                  annotation_position="top left")
    fig.add_vline(x=current, line={"color": HIGHLIGHT}, row=1, col=2,
                  annotation_text=f"context {current}", annotation_position="top right")
    fig.add_vline(x=max_len, line={"color": TEXT, "dash": "dot"}, row=1, col=2)
    fig.update_xaxes(title_text="positions in the cache (context length)")
    fig.update_xaxes(range=[0, max_len * 1.02], row=1, col=2)
    fig.update_yaxes(title_text="bytes (K + V, all layers)", tickformat="~s", row=1, col=1)
    fig.update_yaxes(tickformat="~s", row=1, col=2)
    used, per_position = sum(kv.bytes_per_layer[-1]), kv.bytes_for(kv.args.kv_heads, 1)
    title = (f"KV cache ({kv.args.attention_kind}): {current} of {max_len} positions, "
             f"{_fmt_bytes(used)} of {_fmt_bytes(capacity)} preallocated<br><sup>{kv.batch} × "
             f"{kv.args.n_layers} layers × 2 (K, V) × {kv.args.kv_heads} KV heads × "
             f"{kv.args.head_dim} dims × {kv.itemsize} bytes = {_fmt_bytes(per_position)} per "
             "position</sup>")
    return style(fig, title, height=440)


def _kv_layer_traces(kv: Any) -> list[go.Scatter]:
    return [go.Scatter(
        x=kv.positions, y=[b[layer] for b in kv.bytes_per_layer], stackgroup="used",
        name="used, stacked by layer" if layer == 0 else f"layer {layer}", legendgroup="used",
        showlegend=layer == 0, line={"width": 0.5, "color": COLOURS[layer % 2]},
        fillcolor=_alpha(COLOURS[layer % 2], 0.55), customdata=kv.steps,
        hovertemplate=f"layer {layer}<br>step %{{customdata}}<br>%{{x}} positions<br>"
                      "%{y:,} bytes<extra></extra>")
        for layer in range(len(kv.capacity_bytes_per_layer))]


def _kv_counterfactual_traces(kv: Any, xs: list[int], show_legend: bool) -> list[go.Scatter]:
    out = []
    for n, (label, n_kv) in enumerate(kv.counterfactual.items()):
        own = n_kv == kv.args.kv_heads
        name = label + (" = this model" if own else " (same model, counterfactual)")
        out.append(go.Scatter(
            x=xs, y=[kv.bytes_for(n_kv, x) for x in xs], mode="lines", name=name,
            legendgroup=label, showlegend=show_legend,
            line={"color": COLOURS[2 + n], "dash": "solid" if own else "dash"},
            hovertemplate=label + "<br>%{x} positions<br>%{y:,} bytes<extra></extra>"))
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _alpha(hex_colour: str, a: float) -> str:
    r, g, b = (int(hex_colour[i: i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {a})"


# Sampling -----------------------------------------------------------------------------------
def token_probabilities(step: Any | None) -> go.Figure:
    """The top candidates for the latest token: raw softmax vs the distribution actually sampled
    (after penalties, temperature, top-k, top-p, min-p); the chosen token is outlined."""
    if step is None:
        return empty_figure("Generate a reply to see the candidates for each token.")
    top = list(getattr(step, "top", None) or [])
    if not top:
        why = getattr(step, "finish_reason", None)
        return empty_figure(f"No candidates for this step ({why or 'none recorded'}).")
    labels = _candidate_labels(top)
    chosen = [c.token_id == step.token_id for c in top]
    fig = go.Figure()
    for name, attr, colour in (("before: softmax of the logits", "prob_before", COLOURS[4]),
                               ("after: what was sampled from", "prob_after", COLOURS[0])):
        values = [float(getattr(c, attr)) for c in top]
        fig.add_trace(go.Bar(
            x=labels, y=values, name=name, marker={
                "color": colour, "line": {"color": [HIGHLIGHT if c else "rgba(0,0,0,0)"
                                                    for c in chosen], "width": 3}},
            customdata=[[c.token_id, "chosen" if ch else ("filtered out" if c.prob_after == 0
                         else "")] for c, ch in zip(top, chosen, strict=True)],
            hovertemplate="%{x} (id %{customdata[0]})<br>p = %{y:.6f}<br>%{customdata[1]}"
                          f"<extra>{name}</extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="candidate token", type="category")
    fig.update_yaxes(title_text="probability", range=[0, 1.05])
    piece = labels[chosen.index(True)] if any(chosen) else f"id {step.token_id}"
    title = (f"Next token {piece} at position {step.position}: p = {float(step.prob):.4f} "
             "under the raw logits<br><sup>outlined: the chosen token; bars at 0 after: "
             "removed by the sampling settings</sup>")
    return style(fig, title, height=380)


def _candidate_labels(top: list[Any]) -> list[str]:
    """Visible pieces, made unique (two ids can print alike) so category bars never merge."""
    labels, seen = [], set()
    for c in top:
        label = _esc(token_label(c.piece))
        if label in seen:
            label = f"{label} #{c.token_id}"
        seen.add(label)
        labels.append(label)
    return labels
