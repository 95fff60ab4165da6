"""Attention per GQA group: one heatmap panel per group, its query heads side by side.

The grid is laid out by hand (axis domains, titles and outlines in one layout dict) rather
than with make_subplots and per-panel updates: an MHA model such as LLaMA-2 7B has 32 panels,
and plotly's per-panel calls cost seconds there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from llama.probes.views import LayerAttention, Trace
from ui.plot_style import HEATMAP_SCALE, HIGHLIGHT, MAX_TICKS, empty_figure, esc, style, ticks

ATTENTION_MODES = ("heads", "mean", "spread")
PANEL_PX = 300  # height of one row of panels
H_GAP, V_GAP_PX = 0.06, 110  # between panels: fraction of the width, pixels of height


def attention_by_group(
    trace: Trace, layer: int, head: int | None = None, mode: str = "heads"
) -> go.Figure:
    """One heatmap panel per GQA group; rows are queries, columns keys, both token-labelled.

    mode "heads": the group's query heads side by side in its panel; "mean": the group mean
    (hover adds the spread); "spread": max - min between the group's heads. head: show only
    that query head's panel (its group's mean or spread in those modes). The newest query row
    is outlined.
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
    groups = list(range(args.kv_heads)) if head is None else [head // args.n_rep]
    cols = min(len(groups), 4 if args.n_rep <= 2 or mode != "heads" else 2)
    rows = math.ceil(len(groups) / cols)
    labels = _labels(trace, view)
    heatmaps, layout = [], _grid(rows, cols, [_group_title(args, g, head, mode) for g in groups])
    for n, g in enumerate(groups):
        heatmap = _group_heatmap(view, g, _panel_heads(args.n_rep, g, head, mode), mode, labels)
        suffix = "" if n == 0 else str(n + 1)
        heatmap.update(xaxis=f"x{suffix}", yaxis=f"y{suffix}")
        heatmaps.append(heatmap)
        _label_axes(layout, suffix, n % cols, cols, list(heatmap.x), labels)
    layout["coloraxis"] = {
        "colorscale": HEATMAP_SCALE,
        "cmin": 0.0,
        "colorbar": {"title": {"text": "p" if mode != "spread" else "max-min"}},
    }
    fig = go.Figure(data=heatmaps, layout=layout)
    return style(fig, _attention_title(args, layer, mode), height=_height(rows))


def _height(rows: int) -> int:
    return 140 + PANEL_PX * rows + V_GAP_PX * (rows - 1)


def _grid(rows: int, cols: int, titles: list[str]) -> dict[str, Any]:
    """Axis domains for a rows x cols grid (filled row by row) and a title above each panel."""
    width = (1 - H_GAP * (cols - 1)) / cols
    v_gap = V_GAP_PX / (PANEL_PX * rows + V_GAP_PX * (rows - 1))
    height = (1 - v_gap * (rows - 1)) / rows
    layout: dict[str, Any] = {"annotations": [], "shapes": []}
    for n, title in enumerate(titles):
        r, c = divmod(n, cols)
        x0, y1 = c * (width + H_GAP), 1 - r * (height + v_gap)
        suffix = "" if n == 0 else str(n + 1)
        xd = [max(0.0, round(x0, 6)), min(1.0, round(x0 + width, 6))]  # float error off [0, 1]
        yd = [max(0.0, round(y1 - height, 6)), min(1.0, round(y1, 6))]
        layout[f"xaxis{suffix}"] = {"domain": xd, "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"domain": yd, "anchor": f"x{suffix}"}
        layout["annotations"].append(
            {
                "text": title,
                "x": x0 + width / 2,
                "y": y1,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 12},
            }
        )
    return layout


def _labels(trace: Trace, view: LayerAttention) -> tuple[list[str], list[str]]:
    """Unique axis categories 'token @position' for the query rows and key columns."""
    q = [f"{esc(trace.label(p))} @{p}" for p in view.query_positions]
    k = [f"{esc(trace.label(p))} @{p}" for p in view.key_positions]
    return q, k


def _panel_heads(n_rep: int, group: int, head: int | None, mode: str) -> list[int]:
    """Query heads drawn in a group's panel; [-1] stands for the group mean or spread (also
    with one head picked: then its group's mean or spread, so the modes differ)."""
    if head is not None and mode == "heads":
        return [head]
    return list(range(group * n_rep, (group + 1) * n_rep)) if mode == "heads" else [-1]


def _panel(
    view: LayerAttention,
    group: int,
    heads: list[int],
    mode: str,
    labels: tuple[list[str], list[str]],
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
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


def _group_heatmap(
    view: LayerAttention,
    group: int,
    heads: list[int],
    mode: str,
    labels: tuple[list[str], list[str]],
) -> go.Heatmap:
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
    return go.Heatmap(
        z=z,
        x=xs,
        y=labels[0],
        customdata=extra,
        coloraxis="coloraxis",
        hoverongaps=False,
        name=who,
        hovertemplate=hover + "<extra></extra>",
    )


def _group_slice(view: LayerAttention, group: int) -> slice:
    n_rep = view.probs.shape[0] // view.group_mean.shape[0]
    return slice(group * n_rep, (group + 1) * n_rep)


def _label_axes(
    layout: dict[str, Any],
    suffix: str,
    col: int,
    cols: int,
    xs: list[str],
    labels: tuple[list[str], list[str]],
) -> None:
    """Thinned token ticks on both axes and an outline around the newest query row."""
    qs, ks = labels
    per_head = len(ks) + 1
    budget = min(MAX_TICKS, 60 // (cols * math.ceil(len(xs) / per_head)))  # ~15 px per label
    xvals, xtext = [], []
    for start in range(0, len(xs), per_head):
        idx, text = ticks(ks, budget)
        xvals += [xs[start + i] for i in idx]
        xtext += text
    yidx, ytext = ticks(qs)
    layout[f"xaxis{suffix}"].update(
        tickvals=xvals,
        ticktext=[t.split(" @")[0] for t in xtext],
        tickangle=-60,
        title={"text": "key"},
        showgrid=False,
    )
    layout[f"yaxis{suffix}"].update(
        tickvals=[qs[i] for i in yidx],
        ticktext=[t.split(" @")[0] for t in ytext],
        autorange="reversed",
        title={"text": "query" if col == 0 else ""},
        showgrid=False,
    )
    last = len(qs) - 1
    layout["shapes"].append(
        {
            "type": "rect",
            "xref": f"x{suffix}",
            "yref": f"y{suffix}",
            "x0": -0.5,
            "x1": len(xs) - 0.5,
            "y0": last - 0.5,
            "y1": last + 0.5,
            "line": {"color": HIGHLIGHT, "width": 2},
            "name": "newest query",
        }
    )


def _group_title(args: Any, group: int, head: int | None, mode: str) -> str:
    first = group * args.n_rep
    members = ", ".join(str(h) for h in range(first, first + args.n_rep))
    if args.n_rep == 1:
        return f"group {group} (KV head {group}): head {first} alone"
    what = {
        "heads": f"heads {members}",
        "mean": f"mean of heads {members}",
        "spread": f"spread of heads {members}",
    }[mode]
    if head is not None:
        what = f"head {head}" if mode == "heads" else f"{what} (head {head}'s group)"
    return f"group {group} (KV head {group}): {what}"


def _attention_title(args: Any, layer: int, mode: str) -> str:
    h, kv = args.n_heads, args.kv_heads
    if args.attention_kind == "MHA":
        kind = (
            f"MHA: groups of one head ({h} query heads, {kv} KV heads), nothing is shared, "
            "so each panel is a single head"
        )
    elif args.attention_kind == "MQA":
        kind = f"MQA: one group, all {h} query heads share a single KV head"
    else:
        kind = f"GQA: {h} query heads in {kv} groups of {args.n_rep}, each group shares a KV head"
    return f"Layer {layer} attention ({mode})<br><sup>{kind}</sup>"
