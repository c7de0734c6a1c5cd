"""Plotly figures of the representation analyses: CKA grids, per-layer curves, embedding maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from vitviz.represent.matrix import CKAResult

__all__ = ["Curve", "cka_figure", "curves_figure", "embedding_figure", "lens_depth", "lens_figure",
           "relative_depth"]


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


class Curve(NamedTuple):
    """One line of a per-layer figure.

    ``depth``: each value's relative depth in its model (0 its first layer, 1 its last); None spaces the
    values evenly from 0 to 1 (a curve over every layer). ``labels``: the layers' names, for the hover.
    """

    name: str
    values: Sequence[float]
    depth: Sequence[float] | None = None
    labels: Sequence[str] | None = None


def relative_depth(positions: Sequence[int], layers: int) -> list[float]:
    """Layer indices among ``layers`` layers as relative depth (first 0, last 1), as :func:`curves_figure` draws."""
    return [p / (layers - 1) if layers > 1 else 1.0 for p in positions]


def curves_figure(curves: Sequence[Curve | tuple], title: str, yaxis: str = "accuracy") -> go.Figure:
    """One line per model over relative depth (first layer 0, last layer 1), so models of any depth compare.

    ``curves``: :class:`Curve` s, or (name, values) pairs (values over every layer of the model).
    """
    fig = go.Figure()
    for k, curve in enumerate(curves):
        _add_curve(fig, Curve(*curve), _color(k))
    _curve_layout(fig, title, yaxis)
    return fig


def lens_figure(lens: Sequence[dict[str, Any]], title: str = "Logit lens by depth") -> go.Figure:
    """Logit-lens curves of :meth:`LensResult.to_dict` results: agreement with the final prediction (solid)
    and accuracy (dashed, where labels were known), one colour per model, each layer at its depth among all
    of the model's layers (a hybrid's first block sits after its CNN stem, where its probe point is)."""
    fig = go.Figure()
    for k, entry in enumerate(lens):
        depth = lens_depth(entry)
        color = _color(k)
        _add_curve(fig, Curve(f"{entry['model']}: agreement", entry["agreement"], depth, entry["labels"]), color)
        if entry.get("accuracy") is not None:
            _add_curve(fig, Curve(f"{entry['model']}: accuracy", entry["accuracy"], depth, entry["labels"]), color,
                       dash="dash")
    _curve_layout(fig, title, "agreement (solid) / accuracy (dashed)")
    return fig


def lens_depth(entry: dict[str, Any]) -> list[float] | None:
    """Relative depth of a lens result's layers among all of its model's layers (``positions`` of ``layers``);
    None where they are not recorded (the layers are then spaced evenly)."""
    if entry.get("positions") and entry.get("layers"):
        return relative_depth(entry["positions"], int(entry["layers"]))
    return None


def _add_curve(fig: go.Figure, curve: Curve, color: str, dash: str | None = None) -> None:
    n = len(curve.values)
    depth = list(curve.depth) if curve.depth is not None else list(np.linspace(0.0, 1.0, n) if n > 1 else [1.0])
    labels = list(curve.labels) if curve.labels is not None else [f"layer {i + 1}/{n}" for i in range(n)]
    fig.add_trace(go.Scatter(x=depth, y=list(curve.values), mode="lines+markers", name=curve.name,
                             line={"color": color, "dash": dash}, customdata=labels,
                             hovertemplate=f"{curve.name}<br>%{{customdata}}<br>%{{y:.3f}}<extra></extra>"))


def _curve_layout(fig: go.Figure, title: str, yaxis: str) -> None:
    fig.update_layout(title=title, xaxis_title="relative depth (first layer 0, last 1)", yaxis_title=yaxis,
                      yaxis_range=[0, 1.02], height=420, margin={"l": 10, "r": 10, "t": 50, "b": 10})


def _color(k: int) -> str:
    palette = plotly.colors.qualitative.Plotly
    return palette[k % len(palette)]


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
