"""Explanation figures (plotly) and the plotly-free PNG overlay."""

from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from vitviz.errors import ExplainError
from vitviz.explain.render import COLORMAPS, colormap_lut, plotly_colorscale
from vitviz.plots.explain import (
    attention_distance_figure,
    faithfulness_figure,
    filters_figure,
    heads_figure,
    overlay_figure,
    overlay_png,
    patch_similarity_figure,
    pca_figure,
    render_overlay,
    similarity_grid_figure,
    tile_images,
)

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)
SALIENCY = RNG.random((32, 32)).astype(np.float32)
MASK = np.zeros((32, 32), dtype=bool)
MASK[8:20, 10:24] = True


def test_overlay_figure():
    fig = overlay_figure(IMAGE, SALIENCY, opacity=0.4, colorscale="Jet", mask=MASK, point=(12, 15), title="t")
    assert isinstance(fig, go.Figure)
    kinds = [t.type for t in fig.data]
    assert kinds == ["image", "heatmap", "contour", "scatter"]
    assert fig.data[1].opacity == 0.4 and list(fig.data[1].colorscale[0]) == [0.0, "rgb(0,0,131)"]
    assert isinstance(overlay_figure(IMAGE, SALIENCY, colorscale="Hot"), go.Figure)  # any plotly name works
    with pytest.raises(ExplainError, match="upsample"):
        overlay_figure(IMAGE, SALIENCY[:8, :8])
    with pytest.raises(ExplainError, match="opacity"):
        overlay_figure(IMAGE, SALIENCY, opacity=1.5)


def test_grid_figures():
    heads = RNG.random((5, 4, 4))
    assert len(heads_figure(heads).data) == 5
    filters = RNG.random((40, 8, 8, 3))
    assert filters_figure(filters, max_filters=16).data[0].type == "image"
    assert pca_figure(filters[:28], explained=np.full(28, 0.01)).layout.title.text.endswith("(28% of variance)")
    sim = RNG.uniform(-1, 1, (3, 4, 3, 4))
    grid = similarity_grid_figure(sim)
    z = np.asarray(grid.data[0].z, dtype=float)
    assert z.shape == (3 * 4 - 1, 4 * 5 - 1)  # 3x4 tiles of 3x4 with 1-px gaps
    np.testing.assert_allclose(z[:3, :4], sim[0, 0])
    np.testing.assert_allclose(z[4:7, 5:9], sim[1, 1])
    one = patch_similarity_figure(sim, 1, 2)
    np.testing.assert_allclose(np.asarray(one.data[0].z, dtype=float), sim[1, 2])
    with pytest.raises(ExplainError, match="outside"):
        patch_similarity_figure(sim, 3, 0)
    assert tile_images(RNG.random((5, 2, 2, 3)), cols=3, pad=1).shape == (5, 8, 3)


def test_distance_and_curve_figures():
    fig = attention_distance_figure(RNG.random((6, 3)) * 30, image_size=32)
    assert len(fig.data) == 3 and list(fig.data[0].x) == [1, 2, 3, 4, 5, 6]
    x = np.linspace(0, 1, 11)
    curves = faithfulness_figure(x, deletion=1 - x, insertion=x, random_deletion=1 - x**2)
    assert len(curves.data) == 3 and "AUC 0.500" in curves.data[0].name
    with pytest.raises(ExplainError, match="one image"):
        faithfulness_figure(x, deletion=np.ones((2, 11)))


def test_render_overlay_without_plotly():
    out = render_overlay(IMAGE, SALIENCY, opacity=0.0)
    np.testing.assert_array_equal(out, IMAGE)  # opacity 0: the image itself
    full = render_overlay(IMAGE, np.zeros((4, 4)), opacity=1.0, colormap="jet")
    assert (full == np.array(COLORMAPS["jet"][0][1], dtype=np.uint8)).all()  # a flat map: the lowest colour
    edged = render_overlay(IMAGE, SALIENCY, mask=MASK, point=(0, 0))
    assert (edged[8, 15] == 255).all() and (edged[0, 0] == 255).all()
    png = overlay_png(IMAGE, SALIENCY[::4, ::4], scale=3)  # a grid map is resized to the image
    assert Image.open(io.BytesIO(png)).size == (96, 96)
    with pytest.raises(ExplainError, match="colour map"):
        render_overlay(IMAGE, SALIENCY, colormap="rainbow-ish")


def test_luts_match_the_plotly_colorscales():
    for name in COLORMAPS:
        lut = colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        scale = plotly_colorscale(name)
        assert scale[0][1] == "rgb({},{},{})".format(*lut[0]) and scale[-1][1] == "rgb({},{},{})".format(*lut[-1])
