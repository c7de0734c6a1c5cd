"""The Representations page driven headlessly with ``streamlit.testing.v1.AppTest`` on tiny demo checkpoints.

AppTest reruns the whole script on every interaction, so these tests count the real computations behind
each section (the library functions the page's cached computations call, wrapped to count and then
called as they are): a parameter of one section must compute only that section's result again.
"""

from __future__ import annotations

import ast
import base64
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dashboard_fixtures import ROOT, dashboard_env, start_app
from streamlit.testing.v1 import AppTest
from threadpoolctl import threadpool_limits

TIMEOUT = 300
PAGE = ROOT / "dashboard" / "pages" / "representations.py"


@pytest.fixture(scope="module")
def app(demo_folder):
    # one OpenMP thread for t-SNE while the module runs: on a busy 2-core machine its threads wait for each other
    with dashboard_env(demo_folder), threadpool_limits(1, user_api="openmp"):
        yield start_app(TIMEOUT, page="pages/representations.py")


@pytest.fixture
def computed(monkeypatch) -> Counter:
    """How often each computation behind the page ran: CKA grids, readouts (probes and logit lens),
    embedding maps and explanations (each wrapper counts, then calls the real function)."""
    import vitviz.explain
    import vitviz.represent.embedding
    import vitviz.represent.features
    import vitviz.represent.matrix

    counts: Counter = Counter()
    for module, name in ((vitviz.represent.matrix, "cka_matrix"), (vitviz.represent.features, "collect_readouts"),
                         (vitviz.represent.embedding, "embed_2d"), (vitviz.explain, "explain_details")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def chart(at: AppTest, key: str) -> dict:
    """The figure of the plotly chart ``key`` as the page sent it."""
    for c in at.get("plotly_chart"):
        if key in getattr(c.proto, "id", ""):
            return json.loads(c.proto.spec)
    raise AssertionError(f"no chart {key}")


def values(v: object) -> np.ndarray:
    """A figure's array as a float array: plotly writes numpy arrays as {dtype, bdata (base64), shape}."""
    if isinstance(v, dict) and "bdata" in v:
        flat = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = [int(d) for d in str(v.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).astype(float)
    return np.asarray(v, dtype=float)


def rerun(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_the_page_shows_cka_curves_map_and_errors(app):
    rerun(app)
    assert "Representations" in [t.value for t in app.title]
    ids = " ".join(getattr(c.proto, "id", "") for c in app.get("plotly_chart"))
    for key in ("rep_cka", "rep_probes", "rep_lens", "rep_map"):  # demo models: a ViT, a hybrid, a ResNet
        assert key in ids
    other = app.selectbox(key="rep_other")
    assert len(other.options) == 3  # the three demo families of the dataset
    assert app.slider(key="rep_gallery_n") is not None  # untrained demo models make errors to show
    assert len(app.get("image")) == 4 * 4  # 4 errors, each: the image and 3 explanations


def test_the_lens_shows_agreement_and_accuracy_at_the_probes_depth(app):
    probes, lens = chart(app, "rep_probes")["data"], chart(app, "rep_lens")["data"]
    assert sorted(t["name"] for t in probes) == ["hybrid_shapes", "resnet_shapes", "vit_shapes"]
    assert sorted(t["name"] for t in lens) == sorted(  # the transformers, both kinds; a CNN has no lens
        f"{m}: {kind}" for m in ("vit_shapes", "hybrid_shapes") for kind in ("agreement", "accuracy"))
    hybrid = next(t for t in probes if "hybrid" in t["name"].lower())
    hybrid_lens = next(t for t in lens if "hybrid" in t["name"].lower())
    at_probe = dict(zip(hybrid["customdata"], values(hybrid["x"]), strict=True))  # layer -> depth in the probe plot
    for label, x in zip(hybrid_lens["customdata"], values(hybrid_lens["x"]), strict=True):
        assert x == pytest.approx(at_probe[label])  # the hybrid's blocks sit after its stem in both plots
    assert values(hybrid_lens["x"]).min() > 0.0


def test_another_model_or_features_recompute_only_the_grid(app, computed):
    app.radio(key="rep_rep").set_value("mean").run()  # a representation no other test computes
    rerun(app)
    assert computed["cka_matrix"] == 1
    first = app.selectbox(key="rep_other").value
    grids = {first: chart(app, "rep_cka")}
    for option in app.selectbox(key="rep_other").options:
        if option in grids:
            continue
        app.selectbox(key="rep_other").set_value(option).run()
        rerun(app)
        grids[option] = chart(app, "rep_cka")
        assert option.split(" ")[0] in grids[option]["layout"]["xaxis"]["title"]["text"]
    assert computed["cka_matrix"] == 3  # one new grid per other model, nothing else
    z = [values(g["data"][0]["z"]) for g in grids.values()]
    assert all(a.shape != b.shape or not np.allclose(a, b) for i, a in enumerate(z) for b in z[i + 1:])
    app.selectbox(key="rep_other").set_value(first).run()  # back to the first: cached, the same grid
    rerun(app)
    assert computed["cka_matrix"] == 3
    np.testing.assert_allclose(values(chart(app, "rep_cka")["data"][0]["z"]), z[0])
    assert computed["collect_readouts"] == computed["embed_2d"] == computed["explain_details"] == 0


def test_the_embedding_layer_recomputes_only_the_map(app, computed):
    box = app.selectbox(key="rep_layer")
    last, first = box.value, box.options[0]
    assert last == box.options[-1] and first != last
    before = chart(app, "rep_map")
    box.set_value(first).run()
    rerun(app)
    after = chart(app, "rep_map")
    assert first in after["layout"]["title"]["text"] and last in before["layout"]["title"]["text"]
    xs = [np.concatenate([values(t["x"]) for t in fig["data"]]) for fig in (before, after)]
    assert not np.allclose(*xs)  # another layer's features: another map
    assert computed["embed_2d"] == 1
    app.selectbox(key="rep_layer").set_value(last).run()
    rerun(app)
    assert computed["embed_2d"] == 1  # the last layer's map is cached
    assert computed["cka_matrix"] == computed["collect_readouts"] == computed["explain_details"] == 0


def test_every_section_is_a_fragment():
    """A section's widgets rerun only that section in the browser: each ``*_section`` is a ``ui.fragment``."""
    tree = ast.parse(Path(PAGE).read_text())
    sections = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.endswith("_section")]
    assert {f.name for f in sections} >= {"cka_section", "curves_section", "embedding_section", "gallery_section"}
    for f in sections:
        assert any(isinstance(d, ast.Call) and ast.unparse(d.func) == "ui.fragment" for d in f.decorator_list), f.name
