"""Plotly figures for explanations and for what a ViT learned. numpy arrays or tensors in, figures out.

Nothing here touches a model or Streamlit: pass what :mod:`vitviz.explain` returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vitviz.errors import ExplainError
from vitviz.explain.render import COLORMAPS, overlay_png, plotly_colorscale, render_overlay

__all__ = [
    "attention_distance_figure", "faithfulness_figure", "filters_figure", "heads_figure", "map_figure",
    "map_label", "overlay_figure", "overlay_png", "patch_similarity_figure", "pca_figure", "render_overlay",
    "similarity_grid_figure", "tile_images",
]


def _np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _colorscale(name: str) -> str | list:
    """Our colour maps by name (identical to the PNG renderer), else a plotly colorscale name."""
    return plotly_colorscale(name) if str(name).lower() in COLORMAPS else name


def _image_axes(fig: go.Figure, row: int | None = None, col: int | None = None) -> None:
    kw = {"row": row, "col": col} if row is not None else {}
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, **kw)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
                     scaleanchor="x" if row is None else None, **kw)


# What a method's map measures, in the words of its colour bar and hover label.
_ATTENTION_METHODS = ("attention", "rollout", "grad-rollout")


def map_label(method: str) -> str:
    """"attention" for attention maps (raw, rolled out), "similarity" for feature similarity, else "importance"."""
    if method in _ATTENTION_METHODS:
        return "attention"
    return "similarity" if method == "similarity" else "importance"


def overlay_figure(image: np.ndarray, saliency: np.ndarray, opacity: float = 0.5, colorscale: str = "Jet",
                   mask: np.ndarray | None = None, point: tuple[int, int] | None = None,
                   title: str | None = None, label: str = "importance") -> go.Figure:
    """Heatmap of ``saliency`` (H, W) over ``image`` (H, W, 3) uint8, with an optional mask outline and point.

    The map is drawn at the image's pixel coordinates (resize it to the image first; explain does).
    ``point``: (row, col), e.g. the map's maximum for the pointing game. ``label`` names the values in
    the colour bar and hover text (:func:`map_label` of the method: "attention" for attention maps).
    """
    img = _np(image)
    sal = _np(saliency).astype(np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ExplainError(f"image must be (H, W, 3) uint8, got shape {img.shape}.")
    if sal.shape != img.shape[:2]:
        raise ExplainError(f"saliency {sal.shape} must match the image's (H, W) {img.shape[:2]}; upsample it first.")
    if not 0.0 <= opacity <= 1.0:
        raise ExplainError(f"opacity must be in [0, 1], got {opacity}.")
    fig = go.Figure(go.Image(z=img.astype(np.uint8), hoverinfo="skip"))
    fig.add_trace(go.Heatmap(z=sal, opacity=opacity, colorscale=_colorscale(colorscale), zmin=0.0, zmax=1.0,
                             colorbar={"title": label, "thickness": 12},
                             hovertemplate=f"row %{{y}}, col %{{x}}<br>{label} %{{z:.3f}}<extra></extra>"))
    if mask is not None:
        m = _np(mask).astype(np.float32)
        if m.shape != sal.shape:
            raise ExplainError(f"mask {m.shape} must match the image's (H, W) {sal.shape}.")
        fig.add_trace(go.Contour(z=m, showscale=False, hoverinfo="skip", name="object mask",
                                 contours={"start": 0.5, "end": 0.5, "size": 1, "coloring": "none"},
                                 line={"color": "white", "width": 2}))
    if point is not None:
        fig.add_trace(go.Scatter(x=[point[1]], y=[point[0]], mode="markers", name="maximum",
                                 marker={"symbol": "x", "size": 12, "color": "white",
                                         "line": {"color": "black", "width": 1}},
                                 hovertemplate="maximum at row %{y}, col %{x}<extra></extra>"))
    _image_axes(fig)
    fig.update_layout(title=title, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10}, showlegend=False)
    return fig


def map_figure(values: np.ndarray, colorscale: str = "Viridis", title: str | None = None,
               zmin: float | None = None, zmax: float | None = None) -> go.Figure:
    """A single map (h, w) as a heatmap, e.g. a grid map before upsampling."""
    v = _np(values)
    if v.ndim != 2:
        raise ExplainError(f"expected one map (h, w), got shape {v.shape}.")
    fig = go.Figure(go.Heatmap(z=v, colorscale=_colorscale(colorscale), zmin=zmin, zmax=zmax,
                               hovertemplate="row %{y}, col %{x}<br>%{z:.3f}<extra></extra>"))
    _image_axes(fig)
    fig.update_layout(title=title, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig


def heads_figure(heads: np.ndarray, cols: int | None = None, colorscale: str = "Viridis",
                 normalize_each: bool = True, title: str | None = None, image: np.ndarray | None = None,
                 tile_px: int = 170) -> go.Figure:
    """One heatmap of attention per head: ``heads`` (heads, gh, gw) (one image of ``attention_heads``' output).

    ``normalize_each`` scales every head to its own [0, 1] (heads differ a lot in peakiness).
    ``image`` (H, W, 3) uint8 or (H, W): drawn faint and grey under every tile, so each head's attention
    is read against the picture. ``tile_px``: the height of one tile; titles get a gap of their own
    between rows, so they never overlap the tile above.
    """
    h = _np(heads).astype(np.float64)
    if h.ndim != 3:
        raise ExplainError(f"expected (heads, gh, gw), got shape {h.shape}; index the batch first.")
    n, gh, gw = h.shape
    if normalize_each:
        lo = h.reshape(n, -1).min(axis=1)[:, None, None]
        hi = h.reshape(n, -1).max(axis=1)[:, None, None]
        h = np.where(hi > lo, (h - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    under = None if image is None else _faint_grey(_np(image))
    cols = cols or min(n, 6)
    rows = math.ceil(n / cols)
    title_gap, top = 26, 60 if title else 30  # px: one line of subplot title between rows, and above the first
    height = rows * tile_px + (rows - 1) * title_gap + top + 10
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {i}" for i in range(n)],
                        horizontal_spacing=0.02, vertical_spacing=title_gap / (height - top - 10) if rows > 1 else 0)
    for i in range(n):
        r, c = i // cols + 1, i % cols + 1
        if under is not None:
            # pixel centres spread over the tile's cells: cell k spans [k - 0.5, k + 0.5]
            fig.add_trace(go.Image(z=under, x0=-0.5 + gw / under.shape[1] / 2, dx=gw / under.shape[1],
                                   y0=-0.5 + gh / under.shape[0] / 2, dy=gh / under.shape[0], hoverinfo="skip"),
                          row=r, col=c)
        fig.add_trace(go.Heatmap(z=h[i], coloraxis="coloraxis", opacity=0.6 if under is not None else 1.0,
                                 hovertemplate=f"head {i}<br>row %{{y}}, col %{{x}}<br>attention %{{z:.3f}}"
                                               "<extra></extra>"),
                      row=r, col=c)
        _image_axes(fig, r, c)
        fig.update_xaxes(range=[-0.5, gw - 0.5], ticks="", row=r, col=c)
        fig.update_yaxes(range=[gh - 0.5, -0.5], autorange=False, ticks="", row=r, col=c)
    bar = "attention (each head scaled to its range)" if normalize_each else "attention"
    fig.update_layout(coloraxis={"colorscale": _colorscale(colorscale),
                                 "colorbar": {"title": {"text": bar, "side": "right"}, "thickness": 12}},
                      title=title, height=height, margin={"l": 10, "r": 10, "t": top, "b": 10})
    return fig


def _faint_grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 grey at low contrast, lifted towards white: visible under a map, never competing with it."""
    img = image.astype(np.float64)
    grey = img if img.ndim == 2 else img[..., :3] @ np.array([0.299, 0.587, 0.114])  # (H, W) luma
    if grey.max() <= 1.0 and image.dtype != np.uint8:
        grey = grey * 255.0
    faint = 100.0 + 0.6 * grey  # [100, 253]
    return np.repeat(faint.round().astype(np.uint8)[..., None], 3, axis=2)


def tile_images(images: np.ndarray, cols: int | None = None, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """Mosaic of K images (K, h, w, C) in [0, 1] -> (rows*(h+pad)-pad, cols*(w+pad)-pad, C), padded with ``fill``."""
    x = _np(images).astype(np.float64)
    if x.ndim == 3:
        x = x[..., None]
    k, h, w, c = x.shape
    cols = cols or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), fill, dtype=np.float64)
    for i in range(k):
        r, q = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = x[i]
    return out


def _mosaic_figure(images: np.ndarray, cols: int | None, title: str | None, scale: int) -> go.Figure:
    mosaic = tile_images(images, cols=cols, pad=1)
    rgb = (np.clip(mosaic, 0, 1) * 255).round().astype(np.uint8)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    if scale > 1:  # plotly smooths small images; enlarge with nearest so each filter pixel stays sharp
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    fig = go.Figure(go.Image(z=rgb, hoverinfo="skip"))
    _image_axes(fig)
    fig.update_layout(title=title, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig


def filters_figure(filters: np.ndarray, max_filters: int | None = 64, cols: int | None = None,
                   title: str | None = "Patch-embedding filters (RGB)") -> go.Figure:
    """Grid of patch-embedding filters (D, p, p, C) in [0, 1] (``patch_embedding_filters``)."""
    f = _np(filters)
    if f.ndim != 4:
        raise ExplainError(f"expected filters (D, p, p, C), got shape {f.shape}.")
    if max_filters is not None:
        f = f[:max_filters]
    return _mosaic_figure(f, cols, title, scale=max(1, 64 // f.shape[1]))


def pca_figure(components: np.ndarray, explained: Sequence[float] | None = None, cols: int | None = 7,
               title: str | None = "Principal components of the patch-embedding filters") -> go.Figure:
    """Grid of PCA components (K, p, p, C) in [0, 1], as the ViT paper's Fig. 7 (left: 28 components, 7 per row)."""
    c = _np(components)
    if c.ndim != 4:
        raise ExplainError(f"expected components (K, p, p, C), got shape {c.shape}.")
    if explained is not None:
        ev = _np(explained)
        shown = float(ev[: c.shape[0]].sum())
        title = f"{title} ({shown:.0%} of variance)" if title else None
    return _mosaic_figure(c, cols, title, scale=max(1, 64 // c.shape[1]))


def similarity_grid_figure(similarity: np.ndarray, colorscale: str = "Viridis",
                           title: str | None = "Position embedding similarity") -> go.Figure:
    """Grid of grids (the paper's Fig. 7, centre): tile (i, j) shows the similarity of patch (i, j) to all.

    ``similarity``: (gh, gw, gh, gw) cosine similarities (``position_similarity``).
    """
    s = _np(similarity).astype(np.float64)
    if s.ndim != 4:
        raise ExplainError(f"expected (gh, gw, gh, gw), got shape {s.shape}.")
    gh, gw = s.shape[:2]
    tiles = s.reshape(gh * gw, gh, gw)[..., None]  # (gh*gw, gh, gw, 1)
    z = tile_images(tiles, cols=gw, pad=1, fill=np.nan)[..., 0]
    step_r, step_c = gh + 1, gw + 1
    rows = np.arange(z.shape[0]) // step_r
    cols = np.arange(z.shape[1]) // step_c
    text = [[f"patch ({r}, {c})" for c in cols] for r in rows]
    fig = go.Figure(go.Heatmap(z=z, colorscale=_colorscale(colorscale), zmin=-1.0, zmax=1.0, text=text,
                               colorbar={"title": "cosine", "thickness": 12},
                               hovertemplate="%{text}<br>similarity %{z:.3f}<extra></extra>"))
    _image_axes(fig)
    fig.update_layout(title=title, xaxis_title="input patch column", yaxis_title="input patch row",
                      margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig


def patch_similarity_figure(similarity: np.ndarray, row: int, col: int, colorscale: str = "Viridis",
                            title: str | None = None) -> go.Figure:
    """Similarity of one patch's position embedding (row, col) with every other: a (gh, gw) heatmap."""
    s = _np(similarity)
    if s.ndim != 4:
        raise ExplainError(f"expected (gh, gw, gh, gw), got shape {s.shape}.")
    gh, gw = s.shape[:2]
    if not (0 <= row < gh and 0 <= col < gw):
        raise ExplainError(f"patch ({row}, {col}) is outside the {gh}x{gw} grid.")
    fig = map_figure(s[row, col], colorscale=colorscale, zmin=-1.0, zmax=1.0,
                     title=title or f"Similarity of patch ({row}, {col})'s position embedding")
    fig.add_trace(go.Scatter(x=[col], y=[row], mode="markers", marker={"symbol": "x", "size": 12, "color": "red"},
                             hoverinfo="skip", showlegend=False))
    return fig


def attention_distance_figure(distances: np.ndarray, image_size: int | None = None,
                              title: str | None = "Mean attention distance") -> go.Figure:
    """Scatter of mean attention distance (px) per head against layer (the paper's Fig. 7, right).

    ``distances``: (depth, heads) from ``attention_distance``; one point per head, coloured by head.
    """
    d = _np(distances)
    if d.ndim != 2:
        raise ExplainError(f"expected (depth, heads), got shape {d.shape}.")
    depth, heads = d.shape
    layers = np.arange(1, depth + 1)
    fig = go.Figure()
    for h in range(heads):
        fig.add_trace(go.Scatter(x=layers, y=d[:, h], mode="markers", name=f"head {h}",
                                 hovertemplate=f"head {h}<br>layer %{{x}}<br>%{{y:.1f}} px<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="network depth (layer)", yaxis_title="mean attention distance (px)",
                      margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    fig.update_xaxes(dtick=1)
    if image_size:
        fig.update_yaxes(range=[0, image_size])
    return fig


def faithfulness_figure(fractions: np.ndarray, deletion: np.ndarray | None = None,
                        insertion: np.ndarray | None = None, random_deletion: np.ndarray | None = None,
                        random_insertion: np.ndarray | None = None,
                        title: str | None = "Deletion and insertion") -> go.Figure:
    """Deletion/insertion curves (probability of the target vs fraction of pixels changed), AUC in the legend.

    Curves are (S+1,) for one image (or already averaged); the random-map curves are drawn dashed.
    """
    x = _np(fractions)
    fig = go.Figure()
    series = [("deletion", deletion, "#d62728", "solid"), ("insertion", insertion, "#1f77b4", "solid"),
              ("deletion, random map", random_deletion, "#d62728", "dash"),
              ("insertion, random map", random_insertion, "#1f77b4", "dash")]
    for name, y, colour, dash in series:
        if y is None:
            continue
        y = _np(y)
        if y.shape != x.shape:
            raise ExplainError(f"curve {name!r} has shape {y.shape}, fractions {x.shape}; pass one image's curve.")
        area = float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{name} (AUC {area:.3f})",
                                 line={"color": colour, "dash": dash}))
    fig.update_layout(title=title, xaxis_title="fraction of pixels deleted / inserted",
                      yaxis_title="probability of the target class", yaxis_range=[0, 1.02],
                      margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig
