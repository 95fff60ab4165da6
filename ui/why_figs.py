"""Plotly figures of the Why views (llama/probes/why.py, ablation.py). Pure: data in, figure out.

lens_heatmap and lens_token_line (the logit lens), sink_heads_figure (attention sinks),
attribution_figure (what drove a token, the method named in the title), replay_figure and
sampler_figure (what if). Token texts are data: escaped before plotly sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from llama.probes.attribution import ATTENTION_METHOD, GRADIENT_METHOD, combine_layers
from llama.probes.lens import LensColumn, decided_at, lens_grid
from llama.probes.why import WhyTrace
from ui.plot_style import COLOURS, HEATMAP_SCALE, HIGHLIGHT, TEXT, empty_figure, esc, style

LENS_COLUMNS = 24  # recent tokens shown in the lens heatmap
CELL_CHARS = 7
STRIP_TOKENS = (
    24  # tokens per row in the what-if strips  # characters of a token shown inside a heatmap cell
)


def _cell(label: str) -> str:
    return esc(label if len(label) <= CELL_CHARS else label[: CELL_CHARS - 1] + "…")


# Logit lens ---------------------------------------------------------------------------------
def lens_heatmap(trace: WhyTrace | None, last: int = LENS_COLUMNS) -> go.Figure:
    """Layers (rows) x the newest `last` positions (columns): each layer's top next token
    (text in the cell) and its probability (colour)."""
    if trace is None or not trace.lens:
        return empty_figure("The logit lens appears once the model runs with the lens on.")
    columns = trace.lens[-last:]
    ids, probs = lens_grid(columns)  # (L, C)
    x = [f"{c.position}:{_cell(trace.labels[c.position])}" for c in columns]
    text = [[_cell(trace.pieces.get(int(i), str(int(i)))) for i in row] for row in ids]
    hover = [
        [
            f"layer {c.layers[row]} at position {c.position} "
            f"(after “{esc(trace.labels[c.position])}”)"
            f"<br>top next token “{esc(trace.pieces.get(int(ids[row, j]), '?'))}” "
            f"p={float(probs[row, j]):.3f}<br>token that came: "
            f"{_came(trace, c.position)}"
            for j, c in enumerate(columns)
        ]
        for row in range(ids.shape[0])
    ]
    fig = go.Figure(
        go.Heatmap(
            z=probs.tolist(),
            x=x,
            y=[f"layer {i}" for i in columns[-1].layers],
            text=text,
            texttemplate="%{text}",
            textfont={"size": 10},
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=HEATMAP_SCALE,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "p(top)"}},
        )
    )
    fig.update_xaxes(title="input position: token (the column predicts the next token)")
    title = "Logit lens: each layer's top next token (final norm + output on its residual)"
    shown, n = len(columns[-1].layers), trace.args.n_layers
    if shown < n:
        title += f"; {shown} of {n} layers (the Why tab's “lens every”)"
    return style(fig, title, height=max(320, 46 * ids.shape[0] + 160))


def _came(trace: WhyTrace, position: int) -> str:
    if position + 1 >= len(trace.labels):
        return "not sampled yet"
    return f"“{esc(trace.labels[position + 1])}”"


def lens_token_line(trace: WhyTrace | None, position: int | None) -> go.Figure:
    """For the token generated after `position`: its rank and probability at every layer
    ("which layer decided")."""
    col = _column(trace, position)
    if trace is None or col is None or col.token_rank is None or col.token_prob is None:
        return empty_figure("Pick a generated token to see which layer decided it.")
    layers = list(col.layers)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=(col.token_rank + 1).tolist(),
            name="rank (1 = top)",
            mode="lines+markers",
            line={"color": COLOURS[0]},
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=col.token_prob.tolist(),
            name="probability",
            mode="lines+markers",
            line={"color": HIGHLIGHT},
        ),
        secondary_y=True,
    )
    fig.update_yaxes(type="log", autorange="reversed", title="rank", secondary_y=False)
    fig.update_yaxes(range=[0, 1], title="probability", secondary_y=True)
    fig.update_xaxes(
        title="layer (lensed ones)", dtick=1 if len(layers) == trace.args.n_layers else None
    )
    decided = decided_at(col)
    label = esc(trace.labels[col.position + 1]) if col.position + 1 < len(trace.labels) else "?"
    when = f"top from layer {decided} on" if decided is not None else "never the top token"
    return style(fig, f"“{label}” (position {col.position + 1}) through the layers: {when}", 360)


def _column(trace: WhyTrace | None, position: int | None) -> LensColumn | None:
    if trace is None or position is None:
        return None
    return next((c for c in trace.lens if c.position == position), None)


# Attention sinks ---------------------------------------------------------------------------
def sink_heads_figure(trace: WhyTrace | None) -> go.Figure:
    """Per layer and head, the share of the newest query's attention on the first token(s),
    sink heads flagged (★); beside it, each layer's count of sink heads over the reply."""
    sinks = trace.sinks if trace is not None else None
    if sinks is None:
        return empty_figure("Attention sinks appear once the model runs with the sink view on.")
    latest, mean = sinks.latest, sinks.mean  # (L, H)
    n_layers, n_heads = latest.shape
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.65, 0.35],
        horizontal_spacing=0.16,
        subplot_titles=[
            f"newest token (position {sinks.positions[-1]})",
            f"sink heads per layer (mean over {len(sinks.positions)})",
        ],
    )
    flags = [["★" if v >= sinks.threshold else "" for v in row] for row in latest.tolist()]
    fig.add_trace(
        go.Heatmap(
            z=latest.tolist(),
            x=[f"h{h}" for h in range(n_heads)],
            y=[f"layer {i}" for i in range(n_layers)],
            text=flags,
            texttemplate="%{text}",
            colorscale=HEATMAP_SCALE,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "mass"}, "x": 0.56, "thickness": 14},
            hovertemplate="%{y} %{x}: %{z:.3f} of its attention on the sink<extra></extra>",
        ),
        row=1,
        col=1,
    )
    counts = (mean >= sinks.threshold).sum(1).tolist()
    fig.add_trace(
        go.Bar(
            x=counts,
            y=[f"layer {i}" for i in range(n_layers)],
            orientation="h",
            marker_color=HIGHLIGHT,
            name="sink heads",
            customdata=[f"{float(m):.2f}" for m in mean.mean(1)],
            hovertemplate="%{y}: %{x} sink heads; mean mass %{customdata}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title=f"heads (of {n_heads})", range=[0, n_heads], row=1, col=2)
    first = "first token" if sinks.n_sink == 1 else f"first {sinks.n_sink} tokens"
    title = f"Attention sinks: mass on the {first} (★ ≥ {sinks.threshold:.0%})"
    return style(fig, title, height=max(320, 40 * n_layers + 160))


# What drove this token ------------------------------------------------------------------------
def attribution_figure(
    trace: WhyTrace | None, position: int | None, gradient: Tensor | None = None
) -> go.Figure:
    """Which earlier tokens the token after `position` drew on: the attention x value-norm
    attribution (combined, and per layer), and gradient x input when given ((position+1,))."""
    rows = None if trace is None or position is None else trace.attribution.get(position)
    if trace is None or rows is None:
        return empty_figure("Pick a generated token to see what drove it.")
    labels = [f"{i}:{_cell(trace.labels[i])}" for i in range(rows.shape[1])]
    colours = [COLOURS[0] if i < trace.prompt_len else HIGHLIGHT for i in range(len(labels))]
    n = 3 if gradient is not None else 2
    titles = [ATTENTION_METHOD, "the same per layer"] + ([GRADIENT_METHOD] if n == 3 else [])
    fig = make_subplots(
        rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=combine_layers(rows).tolist(),
            marker_color=colours,
            name="attention × ‖v‖",
            hovertemplate="%{x}: %{y:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=rows.tolist(),
            x=labels,
            y=[f"L{i}" for i in range(len(rows))],
            colorscale=HEATMAP_SCALE,
            showscale=False,
            hovertemplate="layer %{y}, %{x}: %{z:.3f}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    if gradient is not None:
        fig.add_trace(
            go.Bar(
                x=labels[: len(gradient)],
                y=gradient.tolist(),
                name="grad × input",
                marker_color=[COLOURS[2] if g >= 0 else COLOURS[3] for g in gradient.tolist()],
            ),
            row=3,
            col=1,
        )
    target = esc(trace.labels[position + 1]) if position + 1 < len(trace.labels) else "?"
    fig.update_layout(showlegend=False)
    title = f"What drove “{target}” (position {position + 1}): blue = prompt, orange = reply"
    if gradient is not None:
        title += "; with gradient × input"
    return style(fig, title, height=300 + 180 * n)


# What if -------------------------------------------------------------------------------------
def _strip(
    fig: go.Figure,
    rows: Sequence[Sequence[str]],
    names: Sequence[str],
    differ: set[int],
    row: int,
) -> None:
    """Token rows side by side, cells where they differ marked (z = 1). At most STRIP_TOKENS
    are shown, starting a few before the first difference (x keeps the token indices)."""
    width = max(len(r) for r in rows)
    lo = max(0, min(differ, default=0) - 4)
    xs = list(range(lo, min(width, lo + STRIP_TOKENS)))
    z = [[1.0 if i in differ else 0.0 for i in xs] for _ in rows]
    text = [[_cell(r[i]) if i < len(r) else "" for i in xs] for r in rows]
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=xs,
            y=list(names),
            text=text,
            texttemplate="%{text}",
            textfont={"size": 10},
            showscale=False,
            colorscale=[[0, "rgba(140,140,140,0.12)"], [1, HIGHLIGHT]],
            zmin=0,
            zmax=1,
            xgap=1,
            ygap=2,
            customdata=[[esc(t) for t in r] for r in text],
            hovertemplate="%{y} token %{x}: %{customdata}<extra></extra>",
        ),
        row=row,
        col=1,
    )


def replay_figure(
    original: Sequence[str],
    replayed: Sequence[str],
    diverge: int | None,
    p_original: Tensor,
    p_changed: Tensor,
    change: str,
) -> go.Figure:
    """The original reply and the replay token by token (differences marked) and the
    original tokens' probability with and without the change (teacher-forced)."""
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.4, 0.6],
        vertical_spacing=0.15,
        subplot_titles=["replies (orange: differs)", "p(original token) along the original text"],
    )
    n = max(len(original), len(replayed))
    differ = {
        i for i in range(n) if i >= min(len(original), len(replayed)) or original[i] != replayed[i]
    }
    _strip(fig, [original, replayed], ["original", "replay"], differ, 1)
    xs = list(range(len(p_original)))
    fig.add_trace(
        go.Scatter(x=xs, y=p_original.tolist(), name="original", line={"color": COLOURS[0]}),
        row=2,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=xs, y=p_changed.tolist(), name=change, line={"color": HIGHLIGHT}), row=2, col=1
    )
    if diverge is not None:
        fig.add_vline(x=diverge, line_dash="dot", line_color=TEXT)
    fig.update_yaxes(range=[0, 1.02], title="probability", row=2, col=1)
    fig.update_xaxes(title="reply token", row=2, col=1)
    where = f"diverges at token {diverge}" if diverge is not None else "identical"
    return style(fig, f"What if {esc(change)}: {where}", height=460)


def sampler_figure(
    a: Sequence[str], b: Sequence[str], differ: Sequence[int], names: tuple[str, str]
) -> go.Figure:
    """Two replies from one prompt and seed under two sampler settings, differences marked."""
    fig = make_subplots(rows=1, cols=1)
    _strip(fig, [a, b], list(names), set(differ), 1)
    first = f"first difference at token {differ[0]}" if differ else "identical"
    fig.update_xaxes(title="reply token")
    return style(fig, f"Same prompt, same seed, two samplers: {first}", height=300)


def token_choices(trace: WhyTrace | None) -> list[tuple[str, int]]:
    """(label, query position) of every reply token with a record, for a picker."""
    if trace is None:
        return []
    known = {c.position for c in trace.lens} | set(trace.attribution)
    out = []
    for pos in range(trace.prompt_len, len(trace.ids)):
        if pos - 1 in known:
            out.append((f"{pos - trace.prompt_len}: {trace.labels[pos]}", pos - 1))
    return out


__all__ = [
    "attribution_figure",
    "lens_heatmap",
    "lens_token_line",
    "replay_figure",
    "sampler_figure",
    "sink_heads_figure",
    "token_choices",
]
