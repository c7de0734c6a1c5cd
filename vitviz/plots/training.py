"""Plotly figures of training and comparison results (numbers in, ``go.Figure`` out; no Streamlit).

Inputs are plain rows as ``vitviz compare`` writes them to ``results.json`` and as checkpoints
carry them in ``meta.extra["curves"]``, so the dashboard and the CLI draw the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from vitviz.plots.colours import family_colour, family_styles

__all__ = ["accuracy_bars", "confusion_matrix_figure", "data_efficiency_lines", "training_curves"]

_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}


def accuracy_bars(rows: Sequence[Mapping[str, Any]], *, title: str = "Test accuracy and macro F1") -> go.Figure:
    """Grouped bars, one trace per model in its family's colour: ``test_accuracy`` and ``test_macro_f1`` (in %).

    Each row needs ``name``, ``test_accuracy`` and ``test_macro_f1`` (fractions in [0, 1]); an optional
    ``family`` colours the model's bars (:mod:`vitviz.plots.colours`), same-family models differ by pattern.
    """
    fig = go.Figure()
    styles = family_styles([r.get("family") for r in rows])
    for r, style in zip(rows, styles, strict=True):
        values = [100.0 * float(r["test_accuracy"]), 100.0 * float(r["test_macro_f1"])]
        fig.add_bar(x=["accuracy", "macro F1"], y=values, name=str(r["name"]), text=[f"{v:.1f}" for v in values],
                    textposition="outside", marker={"color": style["colour"], "pattern": {"shape": style["pattern"]}}
                    if r.get("family") else None)
    low = min([100.0 * float(r[k]) for r in rows for k in ("test_accuracy", "test_macro_f1")], default=0.0)
    fig.update_layout(title=title, barmode="group", yaxis_title="%", **_LAYOUT)
    fig.update_yaxes(range=[max(0.0, low - 10.0), 101.0])  # zoom on the differences, keep the labels visible
    return fig


def training_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], *, metric: str = "val_accuracy",
                    x: str = "epoch", title: str | None = None,
                    families: Mapping[str, str] | None = None) -> go.Figure:
    """One line per run of ``metric`` against ``x`` (``epoch`` or ``elapsed_s``) from per-epoch log rows.

    Accuracy-like metrics (fractions) are shown in %. ``families`` (run name -> family) colours each
    line by its family (:mod:`vitviz.plots.colours`); same-family runs differ by dash.
    """
    fig = go.Figure()
    percent = "accuracy" in metric or "f1" in metric
    styles = family_styles([(families or {}).get(name) for name in curves])
    for (name, rows), style in zip(curves.items(), styles, strict=True):
        xs = [r[x] for r in rows if metric in r]
        ys = [(100.0 if percent else 1.0) * float(r[metric]) for r in rows if metric in r]
        line = {"color": style["colour"], "dash": style["dash"]} if name in (families or {}) else None
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=str(name), marker={"size": 4}, line=line)
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
            mode="lines+markers", name=key, line={"color": family_colour(key) if members[0].get("family") else None},
            customdata=[r.get("num_train", "") for r in members],
            hovertemplate="%{x:.0f} % of train (%{customdata} images)<br>test accuracy %{y:.2f} %<extra>"
            + key + "</extra>",
        )
    fig.update_layout(title=title or "Data efficiency: test accuracy vs training-set size",
                      xaxis_title="training images used (% of the training split)", yaxis_title="test accuracy (%)",
                      **_LAYOUT)
    fig.update_xaxes(type="log", tickvals=[10, 25, 50, 100])
    return fig
