"""The static RoPE lab: position encodings compared, R_m^T R_n = R_(n-m), the frequency spectrum.

Needs only the model's ModelArgs (head_dim, rope_theta, max_seq_len), no generation. All
rotations come from llama/rope.py; the absolute encodings use the same angles m * theta_i so
the four encodings differ only in how they use them (Su et al. 2021, sec. 3; Vaswani et al.
2017, sec. 3.5).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from llama.config import ModelArgs
from llama.rope import apply_rope, rope_angles, rope_frequencies, rotation_matrix
from ui.plot_style import COLOURS, DIVERGING, style

LAB_POSITIONS = 64  # positions drawn in the encodings figure
LAB_DIMS = 32  # dimensions drawn (the first LAB_DIMS / 2 frequency pairs)
LINE, MARK = COLOURS[0], COLOURS[3]
ENCODED = {
    "binary": "bits of m",
    "sin only": "sin(m·θ_i)",
    "sin + cos": "sin, cos(m·θ_i)",
    "rotary": "R_m q",
}
SIMILARITY = {
    "binary": "e(m)·e(n)",
    "sin only": "e(m)·e(n)",
    "sin + cos": "e(m)·e(n)",
    "rotary": "(R_m q)·(R_n k)",
}


def rope_lab(args: ModelArgs) -> dict[str, go.Figure]:
    """{"encodings", "relative", "spectrum"}: the three RoPE lab figures for this model."""
    figs = {
        "encodings": style(encodings_figure(args), _enc_title(args), height=640),
        "relative": style(relative_figure(args), _rel_title(args), height=680),
        "spectrum": style(spectrum_figure(args), _spec_title(args), height=420),
    }
    for fig in figs.values():
        fig.update_annotations(font_size=12)  # panel titles, smaller than the figure title
    return figs


# Encodings compared -------------------------------------------------------------------------
def encodings(args: ModelArgs, positions: int, dims: int) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (encoding (P, dims'), similarity (P, P)) for binary, sin, sin+cos and rotary.

    The absolute encodings' similarity is e(m).e(n); rotary's is (R_m q).(R_n k) for a fixed
    random q, k (seeded), i.e. what attention sees. Only sin+cos and rotary depend on m - n alone.
    """
    pos = torch.arange(positions)
    angles = rope_angles(pos, dims, args.rope_theta)  # (P, dims/2)
    bits = ((pos[:, None] >> torch.arange(dims)[None, :]) & 1).float()  # (P, dims)
    sin = torch.sin(angles)  # (P, dims/2)
    sincos = torch.stack((torch.sin(angles), torch.cos(angles)), -1).flatten(1)  # (P, dims)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, dims, generator=gen)
    cos_t, sin_t = torch.cos(angles), torch.sin(angles)
    q_rot = apply_rope(q.expand(1, positions, 1, dims), cos_t, sin_t)[0, :, 0]  # (P, dims)
    k_rot = apply_rope(k.expand(1, positions, 1, dims), cos_t, sin_t)[0, :, 0]  # (P, dims)
    return {
        "binary": (bits, bits @ bits.T),
        "sin only": (sin, sin @ sin.T),
        "sin + cos": (sincos, sincos @ sincos.T),
        "rotary": (q_rot, q_rot @ k_rot.T),
    }


def offset_deviation(sim: Tensor) -> float:
    """max over offsets d of the spread of sim[m, m+d]: 0 iff sim depends only on n - m."""
    n = sim.shape[0]
    return max(float(d.max() - d.min()) for d in (torch.diagonal(sim, o) for o in range(-n + 1, n)))


def encodings_figure(args: ModelArgs) -> go.Figure:
    positions = min(LAB_POSITIONS, args.max_seq_len)
    dims = min(LAB_DIMS, args.head_dim)
    encs = encodings(args, positions, dims)
    titles = [f"{name}: {ENCODED[name]}" for name in encs] + [
        f"{SIMILARITY[name]}<br>spread along diagonals {offset_deviation(s):.2g}"
        for name, (_, s) in encs.items()
    ]
    fig = make_subplots(
        rows=2, cols=4, subplot_titles=titles, vertical_spacing=0.2, horizontal_spacing=0.05
    )
    fig.update_annotations(font_size=12)
    for col, (name, (enc, sim)) in enumerate(encs.items(), start=1):
        fig.add_trace(
            _heat(enc.T, f"{name}<br>dim %{{y}}, position %{{x}}<br>value %{{z:.6f}}", "coloraxis"),
            row=1,
            col=col,
        )
        fig.add_trace(
            _heat(
                sim,
                f"{name}<br>m %{{y}}, n %{{x}} (n-m = offset)<br>similarity %{{z:.6f}}",
                "coloraxis2",
            ),
            row=2,
            col=col,
        )
        fig.update_xaxes(title_text="position m", row=1, col=col)
        fig.update_xaxes(title_text="position n", row=2, col=col)
        fig.update_yaxes(autorange="reversed", row=2, col=col)
    fig.update_yaxes(title_text="dimension", row=1, col=1)
    fig.update_yaxes(title_text="position m", row=2, col=1)
    fig.update_layout(
        coloraxis={
            "colorscale": DIVERGING,
            "cmid": 0,
            "colorbar": {"y": 0.8, "len": 0.4, "title": {"text": "e"}},
        },
        coloraxis2={
            "colorscale": DIVERGING,
            "cmid": 0,
            "colorbar": {"y": 0.22, "len": 0.4, "title": {"text": "sim"}},
        },
    )
    return fig


def _heat(z: Tensor, hover: str, axis: str) -> go.Heatmap:
    return go.Heatmap(z=z.numpy(), coloraxis=axis, hovertemplate=hover + "<extra></extra>")


def _enc_title(args: ModelArgs) -> str:
    return (
        "Position encodings compared (top: the encoding; bottom: how two positions "
        "interact)<br><sup>only sin+cos and rotary are constant along diagonals, i.e. depend "
        f"on the offset alone; first {min(LAB_DIMS, args.head_dim)} dims, "
        f"rope_theta={args.rope_theta:g}</sup>"
    )


# R_m^T R_n = R_(n-m) ------------------------------------------------------------------------
def relative_errors(args: ModelArgs, pairs: list[tuple[int, int]]) -> list[float]:
    """max |R_m^T R_n - R_(n-m)| over the full head_dim matrix for each (m, n), in fp32."""
    d, theta = args.head_dim, args.rope_theta
    return [
        float(
            (
                rotation_matrix(m, d, theta).T @ rotation_matrix(n, d, theta)
                - rotation_matrix(n - m, d, theta)
            )
            .abs()
            .max()
        )
        for m, n in pairs
    ]


def relative_pairs(args: ModelArgs) -> list[tuple[int, int]]:
    last = args.max_seq_len - 1
    return sorted(
        {
            (3, 10),
            (10, 3),
            (0, 7),
            (100, 107),
            (last // 2, last // 2 + 7),
            (last - 7, last),
            (last, 0),
        }
    )


def relative_figure(args: ModelArgs, m: int = 3, n: int = 10) -> go.Figure:
    d, theta = args.head_dim, args.rope_theta
    shown = min(d, LAB_DIMS)
    r_m, r_n = rotation_matrix(m, d, theta), rotation_matrix(n, d, theta)
    lhs, rhs = r_m.T @ r_n, rotation_matrix(n - m, d, theta)
    fig = make_subplots(
        rows=2,
        cols=3,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.12,
        specs=[[{}, {}, {}], [{"type": "table", "colspan": 3}, None, None]],
        subplot_titles=[
            f"R_{m}ᵀ R_{n}",
            f"R_{n - m}",
            f"difference (max {float((lhs - rhs).abs().max()):.2g})",
            "",
        ],
    )
    for col, mat in enumerate((lhs, rhs, lhs - rhs), start=1):
        fig.add_trace(
            _heat(mat[:shown, :shown], "row %{y}, col %{x}<br>%{z:.8f}", "coloraxis"),
            row=1,
            col=col,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    pairs = relative_pairs(args)
    errors = relative_errors(args, pairs)
    fig.add_trace(
        go.Table(
            header={
                "values": ["m", "n", "n - m", "max |R_mᵀ R_n − R_(n−m)| (fp32)"],
                "fill": {"color": "rgba(140,140,140,0.25)"},
            },
            cells={
                "values": [
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    [p[1] - p[0] for p in pairs],
                    [f"{e:.3g}" for e in errors],
                ],
                "fill": {"color": "rgba(0,0,0,0)"},
            },
        ),
        row=2,
        col=1,
    )
    fig.update_layout(coloraxis={"colorscale": DIVERGING, "cmid": 0})
    return fig


def _rel_title(args: ModelArgs) -> str:
    return (
        "Relative positions: R_mᵀ R_n = R_(n−m), so (R_m q)·(R_n k) = q·R_(n−m) k"
        f"<br><sup>head_dim {args.head_dim} (first {min(args.head_dim, LAB_DIMS)} dims "
        "drawn; the table checks the full matrix; errors are fp32 rounding of m·θ_i)</sup>"
    )


# Frequency spectrum -------------------------------------------------------------------------
def spectrum_figure(args: ModelArgs) -> go.Figure:
    freqs = rope_frequencies(args.head_dim, args.rope_theta)  # (D/2,) rad / position
    waves = (2 * math.pi / freqs).tolist()
    pairs = list(range(len(freqs)))
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["θ_i (radians per position)", "wavelength 2π/θ_i (positions)"],
    )
    fig.add_trace(
        go.Scatter(
            x=pairs,
            y=freqs.tolist(),
            mode="lines+markers",
            name="θ_i",
            line={"color": LINE},
            hovertemplate="pair %{x}<br>θ_i = %{y:.8g} rad/position<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=pairs,
            y=waves,
            mode="lines+markers",
            name="wavelength",
            line={"color": LINE},
            hovertemplate="pair %{x}<br>one turn every %{y:,.1f} positions<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(
            x=[pairs[0], pairs[-1]],
            y=[args.max_seq_len] * 2,
            mode="lines",
            name=f"max_seq_len {args.max_seq_len}",
            line={"dash": "dot", "color": MARK},
            hovertemplate="max_seq_len %{y}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="frequency pair i")
    return fig


def _spec_title(args: ModelArgs) -> str:
    freqs = rope_frequencies(args.head_dim, args.rope_theta)
    slow = int((2 * math.pi / freqs > args.max_seq_len).sum())
    return (
        f"RoPE frequency spectrum: rope_theta={args.rope_theta:g}, head_dim "
        f"{args.head_dim} ({len(freqs)} pairs)<br><sup>θ_i = rope_theta^(-2i/head_dim); "
        f"{slow} pair(s) never complete a turn within max_seq_len={args.max_seq_len}</sup>"
    )
