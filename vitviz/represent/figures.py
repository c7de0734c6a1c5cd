"""Plotly figures of the representation analyses: CKA grids, per-layer curves, embedding maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from vitviz.represent.matrix import CKAResult

__all__ = ["cka_figure", "curves_figure", "embedding_figure"]


def cka_figure(result: CKAResult, title: str | None = None) -> go.Figure:
    """The grid as a heatmap: model B's layers across, model A's layers up (the first layer at the bottom)."""
    fig = go.Figure(go.Heatmap(
        z=result.grid, x=result.labels_b, y=result.labels_a, zmin=0.0, zmax=1.0, colorscale="Magma",
        colorbar={"title": "CKA"}, hovertemplate="A %{y}<br>B %{x}<br>CKA %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title if title is not None else f"CKA ({result.rep}): {result.name_a} vs {result.name_b}",
                      xaxis_title=f"{result.name_b} layer", yaxis_title=f"{result.name_a} layer",
                      height=460, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    fig.update_xaxes(type="category", tickangle=-45)
    fig.update_yaxes(type="category")
    return fig


def curves_figure(curves: Sequence[tuple[str, Sequence[float]]], title: str, yaxis: str = "accuracy") -> go.Figure:
    """One line per model over relative depth (first layer 0, last layer 1), so models of any depth compare."""
    fig = go.Figure()
    for name, values in curves:
        n = len(values)
        depth = np.linspace(0.0, 1.0, n) if n > 1 else np.array([1.0])
        fig.add_trace(go.Scatter(x=depth, y=list(values), mode="lines+markers", name=name,
                                 hovertemplate=f"{name}<br>layer %{{customdata}}/{n}<br>%{{y:.3f}}<extra></extra>",
                                 customdata=np.arange(1, n + 1)))
    fig.update_layout(title=title, xaxis_title="relative depth (first layer 0, last 1)", yaxis_title=yaxis,
                      yaxis_range=[0, 1.02], height=420, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def embedding_figure(coords: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                     hover: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """A scatter of (N, 2) coordinates, one trace per class; ``hover`` names each point (e.g. "test #12")."""
    labels = np.asarray(labels)
    hover = list(hover) if hover is not None else [f"#{i}" for i in range(len(labels))]
    fig = go.Figure()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        name = class_names[c] if c < len(class_names) else f"class {c}"
        fig.add_trace(go.Scattergl(x=coords[idx, 0], y=coords[idx, 1], mode="markers", name=name,
                                   marker={"size": 6}, customdata=idx, text=[hover[i] for i in idx],
                                   hovertemplate="%{text}<br>" + name + "<extra></extra>"))
    fig.update_layout(title=title, height=480, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
    return fig
