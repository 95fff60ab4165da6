"""The training loss curve as a plotly figure (HTML always, PNG when kaleido works)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_curve(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train_loss": [(step, loss)], "val_loss": [...]} from a loss.csv."""
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, points in curves.items():
                if row.get(key):
                    points.append((int(row["step"]), float(row[key])))
    return curves


def write_plot(csv_path: Path, html_path: Path, png_path: Path | None = None) -> None:
    """Write the curve to `html_path` (self-contained) and, if asked, `png_path`.

    PNG export needs kaleido and a browser; when that fails the HTML is still written and the
    reason is printed (the PNG is a convenience, not part of the run's contract).
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, points in read_curve(csv_path).items():
        if points:
            steps, losses = zip(*points, strict=True)
            fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers" if key == "val_loss"
                                     else "lines", name=key.replace("_", " ")))
    fig.update_layout(title="tinychat training loss", xaxis_title="optimizer step",
                      yaxis_title="cross-entropy (nats/token)", template="plotly_white")
    fig.write_html(str(html_path), include_plotlyjs=True)
    if png_path is not None:
        try:
            fig.write_image(str(png_path), width=900, height=500)
        except Exception as exc:  # kaleido/chrome missing or broken: HTML is enough
            print(f"loss.png not written ({exc.__class__.__name__}: {exc})")
