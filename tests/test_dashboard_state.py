"""Dashboard state, warnings and captions, driven headlessly with AppTest.

The out-of-distribution warning (Explore) and caveat (Compare's trust scores), the Method box after
a model that could not load, an upload that survives a visit to another page, Compare opening on the
sidebar model's dataset, and captions that describe the plotted numbers. Tiny untrained checkpoints
(``tests/demo_checkpoints.py``) stand in for the shipped ones; the digits ones get an OOD calibration on the
digits set, which is grayscale, so a colour photo is out of distribution for them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from dashboard_fixtures import dashboard_env, start_app
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard.captions import attention_distance_caption, position_similarity_caption

TIMEOUT = 180


@pytest.fixture(scope="module")
def folder(demo_folder, demo_checkpoints):
    from vitviz.checkpoint import load_checkpoint, update_checkpoint_meta
    from vitviz.data import load_dataset
    from vitviz.ood import calibrate

    digits = demo_checkpoints.write(demo_folder, dataset="digits")  # copies of this module's own: calibrated here
    data = load_dataset("digits", img_size=32)
    for path in digits:
        model, meta = load_checkpoint(path)
        cal = calibrate(model, data.train.images[:400], data.val.images, mean=meta.mean, std=meta.std)
        update_checkpoint_meta(path, ood=cal)
    with dashboard_env(demo_folder):
        yield demo_folder


@pytest.fixture
def app(folder) -> AppTest:
    at = start_app(TIMEOUT)
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def warnings(at: AppTest) -> list[str]:
    return [str(w.value) for w in at.warning]


def pick_model(at: AppTest, folder: Path, stem: str) -> None:
    from dashboard.support import scan_checkpoints

    key = next(e.key for e in scan_checkpoints(folder) if Path(e.path).stem == stem)
    at.sidebar.selectbox(key="ckpt_Shipped").set_value(key).run()
    assert_clean(at)


def photo_png(name: str = "china.jpg") -> bytes:
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buf, "PNG")
    return buf.getvalue()


def upload(at: AppTest, name: str, data: bytes) -> None:
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()
    assert_clean(at)


def method_box(at: AppTest):
    return next(b for b in at.selectbox if str(b.key).startswith("method_"))


# ---------------------------------------------------------------------------------------------
# out-of-distribution warnings


def test_explore_warns_when_a_photo_is_out_of_distribution(app, folder):
    pick_model(app, folder, "vit_digits")
    assert app.selectbox(key="sample").value.startswith("digits")
    assert not any("unlike anything" in w for w in warnings(app)), "a digit is what this model knows"
    upload(app, "temple.png", photo_png())
    warning = next(w for w in warnings(app) if "unlike anything" in w)
    assert "10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in warning
    assert "grayscale handwritten digits" in warning and "timm" in warning

    app.switch_page("pages/compare.py").run()
    assert_clean(app)
    assert app.segmented_control(key="cmp_dataset_digits").value == "digits", "Compare follows the sidebar"
    caveat = next(w for w in warnings(app) if "unlike what" in w)
    assert "temple.png" in caveat and "trust" in caveat
    app.button_group(key="faith_set").set_value("set").run()  # bundled digits: the caveat goes
    assert_clean(app)
    assert not any("unlike what" in w for w in warnings(app))


def test_models_without_a_calibration_show_no_warning(app):
    upload(app, "temple.png", photo_png())  # the default model: a shapes checkpoint written without one
    assert not any("unlike anything" in w for w in warnings(app))


# ---------------------------------------------------------------------------------------------
# state


def test_method_box_shows_the_method_that_is_drawn_after_a_model_failed_to_load(app):
    """The browser shows a selectbox's default index when it has no value of its own: it must be the value."""
    def consistent() -> str:
        box = method_box(app)
        assert box.proto.default == box.index, "the browser would show another method than the one drawn"
        return box.value

    assert consistent() == "chefer"
    app.button_group(key="model_source").set_value("timm").run()  # offline: pretrained weights fail
    app.toggle(key="timm_pretrained").set_value(False).run()
    assert_clean(app)
    assert consistent() == "chefer" and "Relevance of Chefer" in texts(app)
    app.button_group(key="model_source").set_value("Shipped").run()
    assert_clean(app)
    assert consistent() == "chefer" and "Relevance of Chefer" in texts(app)


def test_an_upload_survives_a_visit_to_another_page_until_removed(app):
    upload(app, "mine.png", photo_png("flower.jpg"))
    app.switch_page("pages/embeddings.py").run()
    assert_clean(app)
    app.switch_page("pages/explore.py").run()
    assert_clean(app)
    assert "mine.png · 640×427 px" in texts(app) and "uploaded earlier" in texts(app)
    assert app.selectbox(key="sample").disabled
    app.button(key="forget_upload").click().run()
    assert_clean(app)
    shown = texts(app)
    assert "mine.png · 640×427 px" not in shown and "uploaded earlier" not in shown
    assert not app.selectbox(key="sample").disabled and f"{app.selectbox(key='sample').value} · " in shown


def test_compare_opens_on_the_dataset_of_the_sidebar_model(app, folder):
    app.switch_page("pages/compare.py").run()
    assert_clean(app)
    assert app.segmented_control(key="cmp_dataset_shapes").value == "shapes"  # the default model is a shapes ViT
    pick_model(app, folder, "resnet_digits")
    assert app.segmented_control(key="cmp_dataset_digits").value == "digits"
    assert "resnet_digits" in texts(app)


# ---------------------------------------------------------------------------------------------
# captions say what the plot shows


def test_captions_make_no_claims_the_plots_can_contradict(app):
    method = method_box(app)
    method.set_value("gradcam").run()
    assert_clean(app)
    assert "transformers alike" not in texts(app) and "less faithful" in texts(app)
    app.switch_page("pages/embeddings.py").run()
    assert_clean(app)
    shown = texts(app)
    assert "mean cosine similarity: neighbours" in shown and "px in layer 1" in shown
    assert "a row/column structure appears" not in shown
    app.switch_page("pages/compare.py").run()
    assert_clean(app)
    assert "trained the same way" not in texts(app)


def _grid_similarity(gh: int, gw: int, scale: float) -> np.ndarray:
    r, c = np.divmod(np.arange(gh * gw), gw)
    d = np.hypot(r[:, None] - r[None], c[:, None] - c[None])
    return np.exp(-d / scale).reshape(gh, gw, gh, gw)


def test_position_caption_is_measured_from_the_similarities():
    local = position_similarity_caption(_grid_similarity(6, 6, 1.0))
    assert local.startswith("Here neighbouring patches have more similar embeddings")
    assert "neighbours 0.31" in local  # exp(-1) and exp(-sqrt 2) averaged over the 8-neighbourhood
    uniform = position_similarity_caption(np.full((6, 6, 6, 6), 0.9))
    assert "close to uniform" in uniform and "little 2-D structure" in uniform
    lines = np.zeros((4, 4, 4, 4))
    for i in range(4):
        lines[i, :, i, :] = 1.0  # same row
        lines[:, i, :, i] = 1.0  # same column
    assert "same row or column are more similar" in position_similarity_caption(lines)
    assert "too small" in position_similarity_caption(np.ones((2, 2, 2, 2)))


def test_distance_caption_follows_the_plotted_trend():
    rising = np.array([[2.0, 4.0], [6.0, 8.0], [10.0, 12.0]])
    assert "grows with depth: 3.0 px in layer 1 and 11.0 px in layer 3" in attention_distance_caption(rising, 32)
    assert "falls with depth: 11.0 px in layer 1 and 3.0 px in layer 3" in attention_distance_caption(rising[::-1],
                                                                                                   32)
    assert "stays about the same" in attention_distance_caption(np.array([[5.0, 5.0], [5.5, 5.5]]), 32)
    assert "One layer" in attention_distance_caption(np.array([[3.0, 4.0]]), 32)
