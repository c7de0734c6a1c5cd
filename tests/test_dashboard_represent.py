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
import torch
from dashboard_fixtures import ROOT, dashboard_env, start_app
from streamlit.testing.v1 import AppTest
from threadpoolctl import threadpool_limits

TIMEOUT = 300
PAGE = ROOT / "dashboard" / "pages" / "representations.py"


@pytest.fixture(scope="module")
def env(demo_folder):
    # one OpenMP thread for t-SNE while the module runs: on a busy 2-core machine its threads wait for each other
    with dashboard_env(demo_folder), threadpool_limits(1, user_api="openmp"):
        yield demo_folder


@pytest.fixture(scope="module")
def app(env):
    return start_app(TIMEOUT, page="pages/representations.py")


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


# ---------------------------------------------------------------------------------------------
# Any model in the sidebar: a tiny random timm ViT (registered with timm here: 48 px input, a normalisation far
# from the checkpoints', 5 classes of its own) against the demo checkpoints (32 px, mean 0.5, std 0.25, the 8
# shapes classes).

TIMM_VIT, TIMM_HEADLESS = "vitviz_test_rep_vit", "vitviz_test_rep_headless"
default_cfgs = {  # read by timm's register_model from this module: the models' input size and normalisation
    name: {"input_size": (3, 48, 48), "mean": (0.2, 0.5, 0.8), "std": (0.1, 0.3, 0.5), "num_classes": k}
    for name, k in ((TIMM_VIT, 5), (TIMM_HEADLESS, 0))}


@pytest.fixture(scope="module")
def timm_app(env):
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    def tiny(name: str, pretrained: bool, kwargs: dict):
        args = {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                "num_classes": default_cfgs[name]["num_classes"], **kwargs}
        return build_model_with_cfg(VisionTransformer, name, pretrained, **args)

    def vitviz_test_rep_vit(pretrained: bool = False, **kwargs):
        return tiny(TIMM_VIT, pretrained, kwargs)

    def vitviz_test_rep_headless(pretrained: bool = False, **kwargs):
        return tiny(TIMM_HEADLESS, pretrained, kwargs)

    # names only this module uses, without weights (timm lists them in no pretrained list); timm has no public
    # way to unregister, so they stay registered for the rest of the process
    register_model(vitviz_test_rep_vit)
    register_model(vitviz_test_rep_headless)
    return start_app(TIMEOUT, page="pages/representations.py")


def pick_timm(at: AppTest, name: str, images: str = "shapes") -> None:
    """``name`` with random weights in the sidebar's timm field, and the page's images."""
    if at.button_group(key="model_source").value != "timm":
        at.button_group(key="model_source").set_value("timm").run()
    at.text_input(key="timm_name").input(name)
    at.toggle(key="timm_pretrained").set_value(False).run()
    rerun(at)
    at.radio(key="rep_images").set_value(images).run()
    rerun(at)


def traces(at: AppTest, key: str) -> dict[str, dict]:
    return {t["name"]: t for t in chart(at, key)["data"]}


def texts(at: AppTest, kind: str) -> str:
    return " ".join(e.value for e in getattr(at, kind))


def timm_subject(at: AppTest, mean=None, std=None):
    """The sidebar's timm model as the library takes it: its own size and normalisation unless given others."""
    from vitviz.represent.subjects import Subject

    model = at.session_state["vitviz.loaded"].model
    own = default_cfgs[TIMM_VIT]
    return Subject("timm", model, 48, mean or own["mean"], std or own["std"])


def test_a_timm_model_gets_a_cka_grid_against_a_checkpoint_fed_at_each_models_size(timm_app, env):
    from vitviz.data import load_dataset
    from vitviz.represent.matrix import cka_matrix
    from vitviz.represent.subjects import load_subject

    pick_timm(timm_app, TIMM_VIT)
    label = f"timm:{TIMM_VIT} (random weights)"
    options = timm_app.selectbox(key="rep_other").options  # the sidebar's model, then the dataset's checkpoints
    assert options[0] == label and sorted(options[1:]) == ["hybrid_shapes", "resnet_shapes", "vit_shapes"]
    timm_app.selectbox(key="rep_other").set_value("vit_shapes").run()
    rerun(timm_app)
    fig = chart(timm_app, "rep_cka")
    assert fig["layout"]["yaxis"]["title"]["text"].startswith(label)
    z = values(fig["data"][0]["z"])
    assert z.shape == (2, 2)  # the timm model's 2 blocks against the demo ViT's 2
    # the same grid from the library: 32 px shapes test images, each model resizing and normalising its own way
    images = load_dataset("shapes", img_size=32).test.images[:256]
    checkpoint = load_subject(str(env / "vit_shapes.safetensors"))
    expected = cka_matrix(timm_subject(timm_app), checkpoint, images, rep="flat", batch_size=64).grid
    np.testing.assert_allclose(z, expected, atol=1e-5)
    # and the check tells preprocessings apart: the checkpoint's normalisation for the timm model is another grid
    other = cka_matrix(timm_subject(timm_app, (0.5,) * 3, (0.25,) * 3), checkpoint, images, rep="flat",
                       batch_size=64).grid
    assert np.abs(other - z).max() > 0.05  # about 0.2 over random initialisations


def test_a_timm_model_gets_probes_and_lens_agreement_but_no_accuracy_nor_gallery(timm_app):
    from vitviz.data import load_dataset
    from vitviz.represent.features import collect_readouts
    from vitviz.represent.probes import probe_layers
    from vitviz.represent.subjects import prepare

    pick_timm(timm_app, TIMM_VIT)
    label = f"timm:{TIMM_VIT} (random weights)"
    probes = traces(timm_app, "rep_probes")
    assert sorted(probes) == sorted([label, "hybrid_shapes", "resnet_shapes", "vit_shapes"])
    assert probes[label]["customdata"] == ["blocks.0", "blocks.1"]
    split, s = load_dataset("shapes", img_size=32), timm_subject(timm_app)  # the probe fits the dataset's labels
    train, test = (collect_readouts(s.model, [prepare(s, images[i:i + 128]) for i in range(0, len(images), 128)],
                                    lens=False) for images in (split.train.images[:1000], split.test.images[:256]))
    expected = probe_layers(train.features, split.train.labels[:1000], test.features, split.test.labels[:256])
    np.testing.assert_allclose(values(probes[label]["y"]), expected.test_accuracy, atol=1e-4)
    lens = traces(timm_app, "rep_lens")
    assert f"{label}: agreement" in lens and f"{label}: accuracy" not in lens  # its classes are not the shapes'
    assert {"vit_shapes: agreement", "vit_shapes: accuracy"} <= set(lens)
    assert values(lens[f"{label}: agreement"]["y"])[-1] == pytest.approx(1.0)  # the last lens is the model
    captions = texts(timm_app, "caption")
    assert f"Agreement only, no accuracy: {label} predicts 5 classes of its own, not the shapes classes" in captions
    classes = {t["name"] for t in chart(timm_app, "rep_map")["data"]}  # the map: coloured by the dataset's classes
    assert classes == set(split.class_names)
    assert label in chart(timm_app, "rep_map")["layout"]["title"]["text"]
    assert "No error gallery" in texts(timm_app, "info") and "predicts 5 classes of its own" in texts(timm_app, "info")
    assert not [s for s in timm_app.slider if s.key == "rep_gallery_n"] and not timm_app.get("image")


def test_the_images_choice_recomputes_every_section_on_the_other_dataset(timm_app):
    pick_timm(timm_app, TIMM_VIT)
    label = f"timm:{TIMM_VIT} (random weights)"
    on_shapes = values(traces(timm_app, "rep_probes")[label]["y"])
    timm_app.radio(key="rep_images").set_value("digits").run()
    rerun(timm_app)
    assert "No checkpoint trained on digits" in texts(timm_app, "info")  # the module's folder holds shapes ones only
    assert timm_app.selectbox(key="rep_other").options == [label]
    np.testing.assert_allclose(np.diag(values(chart(timm_app, "rep_cka")["data"][0]["z"])), 1.0, atol=1e-4)
    assert list(traces(timm_app, "rep_probes")) == [label]
    assert not np.allclose(values(traces(timm_app, "rep_probes")[label]["y"]), on_shapes)  # digits, not cached shapes
    assert {t["name"] for t in chart(timm_app, "rep_map")["data"]} == {str(d) for d in range(10)}


def test_a_headless_timm_model_gets_everything_but_the_lens_and_gallery(timm_app):
    pick_timm(timm_app, TIMM_HEADLESS)
    label = f"timm:{TIMM_HEADLESS} (random weights)"
    assert timm_app.selectbox(key="rep_other").options[0] == label
    assert chart(timm_app, "rep_cka")["layout"]["yaxis"]["title"]["text"].startswith(label)
    assert label in traces(timm_app, "rep_probes")
    assert not [name for name in traces(timm_app, "rep_lens") if name.startswith(label)]
    assert f"No lens for {label}: no classifier head" in texts(timm_app, "caption")
    assert label in chart(timm_app, "rep_map")["layout"]["title"]["text"]
    assert f"{label} has no classifier head" in texts(timm_app, "info")


def test_same_classes_needs_the_datasets_classes():
    from vitviz.represent.subjects import Subject, same_classes

    shapes = ["circle", "square"]
    model = torch.nn.Linear(2, 2)
    assert same_classes(Subject("ckpt", model, class_names=shapes, dataset="shapes"), "shapes", shapes)
    assert same_classes(Subject("clip", model, class_names=shapes), "shapes", shapes)  # prompts = the class names
    assert not same_classes(Subject("clip", model, class_names=shapes[::-1]), "shapes", shapes)  # another order
    assert not same_classes(Subject("timm", model, class_names=["class 0", "class 1"]), "shapes", shapes)
    assert not same_classes(Subject("dino", model), "shapes", shapes)  # headless: no classes
