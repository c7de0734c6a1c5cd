"""Widgets shared by pages: explanation parameters, and the clickable patch picker."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from dashboard import state
from dashboard import support as ds


def layer_slider(label: str, depth: int, default: int, key: str, help: str | None = None) -> int:
    """A 1-based layer slider; a one-layer model has nothing to choose, so no widget (sliders need min < max)."""
    if depth <= 1:
        st.caption(f"{label}: 1 (the model has one layer)")
        return 1
    return st.slider(label, 1, depth, default, key=key, help=help)


def head_label(head: str | int) -> str:
    return {"mean": "mean of heads", "max": "max over heads", "min": "min over heads"}.get(head, f"head {head}")


def explanation_controls(subject: state.Subject, method: str, probs: np.ndarray, prefix: str = "") -> dict[str, Any]:
    """Widgets for the parameters ``method`` takes (see ``vitviz.explain.METHOD_PARAMS``); returns its kwargs.

    Keys depend on the model's depth, heads and classes, so switching models never leaves a widget
    with a value outside its new range.
    """
    from vitviz.explain import HEAD_FUSIONS, METHOD_PARAMS

    info, model = subject.info, subject.model
    dims = ds.transformer_dims(model)  # None unless every layer has the same heads
    depth = dims[0] if dims is not None else (ds.attention_depth(model) or 0)
    heads = dims[1] if dims is not None else 0  # a hierarchical model's heads change by stage: fusions only
    # Grad-CAM's layer choice is a block of a plain transformer; attention's is any attention layer.
    has_layer = depth > 0 if method == "attention" else dims is not None
    wanted = [p for p in METHOD_PARAMS[method]
              if p not in ("query", "batch") and not (p == "layer" and not has_layer)]
    if not wanted:
        return {}
    kwargs: dict[str, Any] = {}
    cols = st.columns(len(wanted))
    for col, name in zip(cols, wanted, strict=True):
        with col:
            if name == "target":
                names = info.class_names
                # A fixed label for the default: the browser keeps a selected option's old text when only
                # its label changes, so "predicted: <class>" would go stale with a new image.
                target = st.selectbox(
                    "Target class", [-1, *range(len(names))], key=f"{prefix}target_{info.key}",
                    format_func=lambda i, names=names: "the predicted class" if i < 0 else names[i],
                    help=f"The class whose evidence is shown (now: the predicted {names[int(np.argmax(probs))]}). "
                         "Try another class: a faithful map changes.")
                kwargs["target"] = None if target < 0 else target
            elif name == "layer" and method == "attention":
                kwargs["layer"] = layer_slider("Layer", depth, depth, key=f"{prefix}att_layer_{depth}",
                                               help="Which encoder block's attention to show (1 = first).") - 1
            elif name == "layer":  # Grad-CAM on a transformer: CNN backbone / last block by default, or a block
                default = "default (CNN backbone)" if info.family == "hybrid" else "default (last block)"
                layer = st.selectbox(
                    "Grad-CAM layer", ["default", *range(depth)], key=f"{prefix}cam_layer_{depth}_{info.family}",
                    format_func=lambda i, d=default: d if i == "default" else f"tokens into block {i + 1}",
                    help="Where activations and gradients are read.")
                kwargs["layer"] = None if layer == "default" else layer
            elif name == "head":
                kwargs["head"] = st.selectbox(
                    "Head", ["mean", "max", "min", *range(heads)], key=f"{prefix}head_{heads}",
                    format_func=head_label)
            elif name == "head_fusion":
                kwargs["head_fusion"] = st.selectbox("Head fusion", list(HEAD_FUSIONS), key=f"{prefix}fusion",
                                                     help="How the heads of a layer are combined before rolling out.")
            elif name == "discard_ratio":
                kwargs["discard_ratio"] = round(st.slider(
                    "Discard ratio", 0.0, 0.95, 0.0, 0.05, key=f"{prefix}discard",
                    help="Drop this fraction of the weakest attention weights in every layer (denoises rollout)."), 2)
            elif name == "start_layer":
                kwargs["start_layer"] = layer_slider("Start layer", depth, 1, key=f"{prefix}start_{depth}",
                                                     help="Skip the layers before this one.") - 1
            else:  # a registry parameter with no widget of its own: a number or a switch from its default
                value = _generic_param(method, name, METHOD_PARAMS[method][name], prefix)
                if value is not None:
                    kwargs[name] = value
    return kwargs


def _generic_param(method: str, name: str, default: Any, prefix: str) -> Any:
    """A widget for a plain bool / int / float parameter (RISE's masks, IG's steps, ...); None to keep the default."""
    if name == "batch":  # how many passes run at once: speed and memory, not the map
        return None
    label, key = name.replace("_", " ").capitalize(), f"{prefix}{method}_{name}"
    help_ = f"{method}'s {name} (default {default!r}; see vitviz.explain.registry)."
    if isinstance(default, bool):
        return st.toggle(label, value=default, key=key, help=help_)
    if isinstance(default, int):
        return int(st.number_input(label, min_value=0 if name == "seed" else 1, value=default, step=1, key=key,
                                   help=help_))
    if isinstance(default, float):
        return float(st.number_input(label, value=default, key=key, help=help_, format="%.3g"))
    return None


def picked_patch(grid: tuple[int, int], chart_key: str = "patch_pick") -> tuple[str, str]:
    """Session keys of the row/col sliders, updated from a click on the patch picker when there is a new one."""
    row_key, col_key = f"patch_row_{grid[0]}", f"patch_col_{grid[1]}"
    st.session_state.setdefault(row_key, grid[0] // 2)
    st.session_state.setdefault(col_key, grid[1] // 2)
    event = st.session_state.get(chart_key)
    points = ((event or {}).get("selection") or {}).get("points") or []
    clicked = ds.clicked_patch(points, grid)
    if clicked is not None and clicked != st.session_state.get("_patch_consumed"):
        st.session_state[row_key], st.session_state[col_key] = clicked
        st.session_state["_patch_consumed"] = clicked
    return row_key, col_key


def patch_picker_figure(subject: state.Subject, amap: np.ndarray, grid: tuple[int, int], chosen: tuple[int, int]):
    """The attention overlay plus one invisible, clickable marker per patch and a box around the chosen one.

    Plotly heatmaps send no selection events, so the click lands on the marker at the patch centre.
    """
    import plotly.graph_objects as go

    from vitviz.plots.explain import overlay_figure

    size = subject.info.img_size
    fig = overlay_figure(subject.fitted_array, amap, opacity=0.6, colorscale="inferno", label="attention")
    fig.update_traces(hoverinfo="skip", hovertemplate=None, selector={"type": "heatmap"})
    xs, ys, rows, cols = ds.patch_centres(grid, size)
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", customdata=np.stack([rows, cols], axis=1), name="patches",
        marker={"size": max(6, int(360 / max(grid))), "color": "rgba(255,255,255,0.01)", "symbol": "square"},
        selected={"marker": {"opacity": 0.01}}, unselected={"marker": {"opacity": 0.01}},
        hovertemplate="patch (%{customdata[0]}, %{customdata[1]})<extra>click to pick</extra>",
    ))
    ph, pw = size / grid[0], size / grid[1]
    r, c = chosen
    fig.add_shape(type="rect", x0=c * pw - 0.5, x1=(c + 1) * pw - 0.5, y0=r * ph - 0.5, y1=(r + 1) * ph - 0.5,
                  line={"color": "#00e5ff", "width": 3})
    fig.update_layout(height=430, hovermode="closest", hoverdistance=200)
    fig.update_xaxes(fixedrange=True)  # a click picks a patch; dragging must not pan the image away
    fig.update_yaxes(fixedrange=True)
    return fig
