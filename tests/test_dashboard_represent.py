"""The Representations page driven headlessly with ``streamlit.testing.v1.AppTest`` on tiny demo checkpoints."""

from __future__ import annotations

import pytest
from dashboard_fixtures import dashboard_env, start_app
from streamlit.testing.v1 import AppTest

TIMEOUT = 300


@pytest.fixture(scope="module")
def app(demo_folder):
    with dashboard_env(demo_folder):
        yield start_app(TIMEOUT, page="pages/representations.py")


def chart_ids(at: AppTest) -> list[str]:
    return [getattr(c.proto, "id", "") for c in at.get("plotly_chart")]


def test_the_page_shows_cka_curves_map_and_errors(app):
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    assert "Representations" in [t.value for t in app.title]
    ids = " ".join(chart_ids(app))
    for key in ("rep_cka", "rep_probes", "rep_lens", "rep_map"):  # demo models: a ViT, a hybrid, a ResNet
        assert key in ids
    other = app.selectbox(key="rep_other")
    assert len(other.options) == 3  # the three demo families of the dataset
    assert app.slider(key="rep_gallery_n") is not None  # untrained demo models make errors to show
    assert len(app.get("image")) == 4 * 4  # 4 errors, each: the image and 3 explanations


def test_another_model_and_features_recompute_the_grid(app):
    box = app.selectbox(key="rep_other")
    before = len(app.get("plotly_chart"))
    for option in box.options:
        app.selectbox(key="rep_other").set_value(option).run()
        assert not app.exception, [e.value for e in app.exception]
    app.radio(key="rep_rep").set_value("readout").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error
    assert len(app.get("plotly_chart")) == before


def test_the_embedding_layer_changes_only_the_map(app):
    first = app.selectbox(key="rep_layer").options[0]
    app.selectbox(key="rep_layer").set_value(first).run()
    assert app.selectbox(key="rep_layer").value == first
    assert not app.exception, [e.value for e in app.exception]
    assert "rep_map" in " ".join(chart_ids(app))
