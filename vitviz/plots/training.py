"""Plotly figures of training and comparison results (numbers in, ``go.Figure`` out; no Streamlit).

Inputs are plain rows as ``vitviz compare`` writes them to ``results.json`` and as checkpoints
carry them in ``meta.extra["curves"]``, so the dashboard and the CLI draw the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = ["accuracy_bars", "confusion_matrix_figure", "data_efficiency_lines", "training_curves"]

_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}
_FAMILY_COLOURS = {"vit": "#1f77b4", "hybrid": "#2ca02c", "resnet": "#d62728"}


def accuracy_bars(rows: Sequence[Mapping[str, Any]], *, title: str = "Test accuracy and macro F1") -> go.Figure:
    """Grouped bars per model: ``test_accuracy`` and ``test_macro_f1`` (in %), labelled with their value.

    Each row needs ``name``, ``test_accuracy`` and ``test_macro_f1`` (fractions in [0, 1]).
    """
    names = [str(r["name"]) for r in rows]
    fig = go.Figure()
    for key, label in (("test_accuracy", "accuracy"), ("test_macro_f1", "macro F1")):
        values = [100.0 * float(r[key]) for r in rows]
        fig.add_bar(x=names, y=values, name=label, text=[f"{v:.1f}" for v in values], textposition="outside")
    low = min([100.0 * float(r[k]) for r in rows for k in ("test_accuracy", "test_macro_f1")], default=0.0)
    fig.update_layout(title=title, barmode="group", yaxis_title="%", **_LAYOUT)
    fig.update_yaxes(range=[max(0.0, low - 10.0), 101.0])  # zoom on the differences, keep the labels visible
    return fig


def training_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], *, metric: str = "val_accuracy",
                    x: str = "epoch", title: str | None = None) -> go.Figure:
    """One line per run of ``metric`` against ``x`` (``epoch`` or ``elapsed_s``) from per-epoch log rows.

    Accuracy-like metrics (fractions) are shown in %.
    """
    fig = go.Figure()
    percent = "accuracy" in metric or "f1" in metric
    for name, rows in curves.items():
        xs = [r[x] for r in rows if metric in r]
        ys = [(100.0 if percent else 1.0) * float(r[metric]) for r in rows if metric in r]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=str(name), marker={"size": 4})
    label = metric.replace("_", " ") + (" (%)" if percent else "")
    fig.update_layout(title=title or f"{label} per {x.replace('_s', ' (s)')}", xaxis_title=x.replace("_", " "),
                      yaxis_title=label, **_LAYOUT)
    return fig


def confusion_matrix_figure(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], *,
                            normalize: bool = True, title: str = "Confusion matrix") -> go.Figure:
    """Heatmap of a confusion matrix (rows true class, columns predicted); row-normalised by default.

    Cells show the count; the colour is the fraction of the true class (the recall on the diagonal).
    """
    m = np.asarray(cm, dtype=np.float64)  # (K, K)
    rows = m.sum(axis=1, keepdims=True)
    z = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    names = [str(c) for c in class_names]
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, colorscale="Blues", text=m.astype(int), texttemplate="%{text}",
        hovertemplate="true %{y}<br>predicted %{x}<br>count %{text}<br>fraction %{z:.3f}<extra></extra>",
        zmin=0.0, zmax=1.0 if normalize else None,
    ))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")  # first class on top, as a table reads
    return fig


def data_efficiency_lines(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> go.Figure:
    """Test accuracy (%) against the fraction of the training set used, one line per family (or name).

    Each row needs ``train_fraction`` and ``test_accuracy``, and ``family`` (or ``name``) to group by;
    an optional ``num_train`` labels the points.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("family") or r["name"]), []).append(r)
    fig = go.Figure()
    for key, members in groups.items():
        members = sorted(members, key=lambda r: float(r["train_fraction"]))
        fig.add_scatter(
            x=[100.0 * float(r["train_fraction"]) for r in members],
            y=[100.0 * float(r["test_accuracy"]) for r in members],
            mode="lines+markers", name=key, line={"color": _FAMILY_COLOURS.get(key)},
            customdata=[r.get("num_train", "") for r in members],
            hovertemplate="%{x:.0f} % of train (%{customdata} images)<br>test accuracy %{y:.2f} %<extra>"
            + key + "</extra>",
        )
    fig.update_layout(title=title or "Data efficiency: test accuracy vs training-set size",
                      xaxis_title="training images used (% of the training split)", yaxis_title="test accuracy (%)",
                      **_LAYOUT)
    fig.update_xaxes(type="log", tickvals=[10, 25, 50, 100])
    return fig
