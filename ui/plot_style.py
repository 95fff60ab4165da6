"""The shared look of the playground's figures, and small helpers for labels and units.

Colours read on light and dark pages alike: transparent backgrounds, mid-grey text and grid,
mid-luminance trace colours (Tableau 10), perceptually uniform Viridis for probabilities and
a diverging red/blue for signed values.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go

TEXT = "#8c8c8c"  # >= 3:1 contrast on both white and near-black backgrounds
GRID = "rgba(140, 140, 140, 0.25)"
COLOURS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B")
HIGHLIGHT = "#F58518"
HEATMAP_SCALE = "Viridis"
DIVERGING = "RdBu_r"  # signed values: blue < 0 < red, white at 0
MAX_TICKS = 24  # token labels per axis before thinning (hover still names every cell)


def style(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    """Apply the shared theme-neutral look and a title."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"color": TEXT, "size": 12},
        height=height,
        margin={"l": 60, "r": 30, "t": 80, "b": 60},
        legend={"bgcolor": "rgba(0,0,0,0)"},
        hoverlabel={"namelength": -1},
    )
    fig.update_xaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    fig.update_yaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank figure that says why it is blank (and what to do)."""
    fig = go.Figure()
    fig.add_annotation(
        text=message,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        showarrow=False,
        font={"size": 14, "color": TEXT},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style(fig, "", height=300)


def esc(text: str) -> str:
    """Token text is data, not markup: plotly would read a piece like '<s>' as a tag."""
    return html.escape(text, quote=False)


def ticks(labels: list[str], budget: int = MAX_TICKS) -> tuple[list[int], list[str]]:
    """Indices/texts of the labels to print, thinned to at most `budget` (newest kept)."""
    stride = max(1, math.ceil(len(labels) / max(2, budget)))
    keep = list(range(len(labels) - 1, -1, -stride))[::-1]
    return keep, [labels[i] for i in keep]


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def alpha(hex_colour: str, a: float) -> str:
    """'#RRGGBB' with opacity a, as an rgba() string."""
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {a})"
