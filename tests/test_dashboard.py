"""The Streamlit dashboard driven headlessly with ``streamlit.testing.v1.AppTest``.

Every page and the main interactions, uploads of every kind of bad and odd file (made here with
Pillow or by hand), a broken checkpoint in a user's folder and a timm model that cannot be had
offline. Tiny untrained checkpoints of the three families are written once per module, so the
tests do not depend on the shipped ones. Every run must end without an exception in the page.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from dashboard_fixtures import dashboard_env, start_app, write_efficiency
from PIL import Image
from streamlit.testing.v1 import AppTest

TIMEOUT = 180  # seconds per script run: the first imports torch on a slow, shared CPU


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def folders(demo_folder, demo_checkpoints, tmp_path_factory):
    user = tmp_path_factory.mktemp("user_ckpts")
    demo_checkpoints.write(user, dataset="digits")
    (user / "garbage.safetensors").write_bytes(b"this is not a checkpoint at all" * 4)
    (user / "empty.safetensors").write_bytes(b"")
    rows = [{"name": f"{fam}_{f}", "family": fam, "train_fraction": f, "num_train": int(6000 * f),
             "test_accuracy": acc * (0.6 + 0.4 * f)} for fam, acc in (("vit", 0.9), ("resnet", 0.95))
            for f in (0.1, 0.25, 0.5, 1.0)]
    results = write_efficiency(tmp_path_factory.mktemp("results"), rows)
    with dashboard_env(demo_folder, results=results):
        yield {"shipped": demo_folder, "user": user, "results": results}


@pytest.fixture
def app(folders) -> AppTest:
    return start_app(TIMEOUT)


@pytest.fixture(scope="module")
def upload_app(folders) -> AppTest:
    """One app for all the upload cases: each upload replaces the last (saves a fresh start per case)."""
    return start_app(TIMEOUT)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def charts(at: AppTest) -> list:
    return list(at.get("plotly_chart"))


def chart_keys(at: AppTest) -> set[str]:
    keys = set()
    for c in charts(at):
        wid = getattr(c.proto, "id", "") or ""
        keys.add(wid.split("-")[-1] if wid else "")
    return keys


def checkpoint_key(folder: Path, stem: str) -> str:
    from dashboard.support import scan_checkpoints

    return next(e.key for e in scan_checkpoints(folder) if Path(e.path).stem == stem)


# ---------------------------------------------------------------------------------------------
# images written by the tests


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def scene(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds a few bytes of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(
        b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    img = scene(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(img, "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("P", (24, 24), i * 40) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png() -> bytes:
    arr = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


ODD_IMAGES = {
    # name: (file name, bytes factory, (expected width, height) after decoding)
    "palette": ("palette.png", lambda: encode(scene().convert("P"), "PNG"), (48, 40)),
    "LA": ("la.png", lambda: encode(scene().convert("LA"), "PNG"), (48, 40)),
    "RGBA": ("rgba.png", lambda: encode(scene().convert("RGBA"), "PNG"), (48, 40)),
    "CMYK": ("cmyk.jpg", lambda: encode(scene().convert("CMYK"), "JPEG"), (48, 40)),
    "16-bit": ("deep.png", sixteen_bit_png, (32, 32)),
    "1-bit": ("bits.bmp", lambda: encode(scene().convert("1"), "BMP"), (48, 40)),
    "animated": ("anim.gif", animated_gif, (24, 24)),
    "EXIF-rotated": ("rotated.jpg", exif_rotated_jpeg, (20, 40)),
    "very tall": ("tall.png", lambda: encode(scene(16, 3000), "PNG"), (16, 3000)),
    "very large": ("large.jpg", lambda: encode(scene(3000, 2000), "JPEG", quality=70), (3000, 2000)),
    "WebP": ("pic.webp", lambda: encode(scene(), "WEBP"), (48, 40)),
    "TIFF": ("pic.tiff", lambda: encode(scene(), "TIFF"), (48, 40)),
}

BAD_FILES = {
    # name: (file name, bytes, words the st.error must contain)
    "not an image": ("notes.png", b"hello, this is plain text and not a picture\n" * 3, "not an image"),
    "empty": ("empty.png", b"", "empty"),
    "truncated": ("cut.png", encode(scene(64, 64), "PNG")[:300], "incomplete"),
    "bomb": ("bomb.png", png_claiming(19_000, 19_000), "pixels"),
    "absurd dimensions": ("wide.png", png_claiming(100_000, 10), "refused"),
    "svg": ("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
}


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()
    assert_clean(at)
    return at


# ---------------------------------------------------------------------------------------------
# Explore


def test_explore_opens_ready(app):
    assert "Explore" in [t.value for t in app.title]
    assert not errors(app)
    # a bundled shapes scene, its prediction, the overlay, the heads grid and the patch picker
    assert app.selectbox(key="sample").value.startswith("shapes")
    assert "Prediction" in texts(app)
    assert len(charts(app)) >= 3
    assert any(m.label == "Pointing game" for m in app.metric)
    assert app.sidebar.selectbox(key="device").value in ("cpu", "cuda:0")


def method_box(at: AppTest):
    """Explore's Method box (its key carries the number of methods the model has)."""
    return next(b for b in at.selectbox if str(b.key).startswith("method_"))


def test_every_method_and_parameter_renders(app):
    labels = method_box(app).options
    assert {"Raw attention", "Relevance (Chefer et al. 2021)", "Grad-CAM (Selvaraju et al. 2017)"} <= set(labels)
    for method in ("attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity"):
        method_box(app).set_value(method).run()
        assert_clean(app)
        assert not errors(app), method
    method_box(app).set_value("attention").run()
    app.selectbox(key="head_2").set_value(1).run()
    app.slider(key="att_layer_2").set_value(1).run()
    assert_clean(app)
    method_box(app).set_value("rollout").run()
    app.slider(key="discard").set_value(0.5).run()
    app.selectbox(key="fusion").select("max").run()
    assert_clean(app)
    assert not errors(app)


def test_display_widgets_recompute_nothing(app, monkeypatch):
    import vitviz.explain as vx

    calls = []
    real = vx.explain
    monkeypatch.setattr(vx, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    app.slider(key="opacity").set_value(0.9).run()
    app.selectbox(key="cmap").select("viridis").run()
    assert_clean(app)
    assert calls == []
    app.slider(key="start_2").set_value(2).run()  # a real parameter change does compute
    assert_clean(app)
    assert len(calls) == 1


def test_patch_sliders_move_the_query(app):
    app.slider(key="patch_row_8").set_value(1).run()
    app.slider(key="patch_col_8").set_value(6).run()
    assert_clean(app)
    assert "Attention of patch (1, 6)" in texts(app)


def test_samples_of_every_kind(app):
    for name in ("digits · 7", "photo · china", "shapes · ring"):
        app.selectbox(key="sample").set_value(name).run()
        assert_clean(app)
        assert not errors(app), name


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_images_are_handled(upload_app, kind):
    name, make, (w, h) = ODD_IMAGES[kind]
    upload(upload_app, name, make())
    assert not errors(upload_app), errors(upload_app)
    assert f"{name} · {w}×{h} px" in texts(upload_app)
    assert len(charts(upload_app)) >= 3


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_are_refused_clearly(upload_app, kind):
    name, data, words = BAD_FILES[kind]
    upload(upload_app, name, data)
    errs = errors(upload_app)
    assert len(errs) == 1, errs
    assert "can't be used" in errs[0] and words.lower() in errs[0].lower(), errs[0]
    assert not charts(upload_app)  # nothing is explained


def test_hybrid_every_method(app, folders):
    app.sidebar.selectbox(key="ckpt_Shipped").set_value(checkpoint_key(folders["shipped"], "hybrid_shapes")).run()
    assert_clean(app)
    for method in ("attention", "rollout", "grad-rollout", "chefer", "gradcam"):
        method_box(app).set_value(method).run()
        assert_clean(app)
        assert not errors(app), (method, errors(app))
    app.selectbox(key="cam_layer_1_hybrid").set_value(0).run()  # Grad-CAM on the tokens of block 1
    assert_clean(app)
    assert not errors(app)


def test_resnet_gets_no_attention_methods(app, folders):
    app.sidebar.selectbox(key="ckpt_Shipped").set_value(checkpoint_key(folders["shipped"], "resnet_shapes")).run()
    assert_clean(app)
    options = method_box(app).options
    assert {"Grad-CAM (Selvaraju et al. 2017)", "Feature similarity to a patch"} <= set(options)
    assert not {"Raw attention", "Attention rollout (Abnar & Zuidema 2020)"} & set(options)
    assert "no attention we can record" in texts(app)
    assert not errors(app)


# ---------------------------------------------------------------------------------------------
# models from elsewhere


def test_bad_checkpoints_in_a_folder_are_listed_not_fatal(app, folders):
    app.button_group(key="model_source").set_value("Folder").run()
    assert_clean(app)
    app.text_input(key="model_folder").input(str(folders["user"])).run()
    assert_clean(app)
    unusable = [m.value for m in app.sidebar.markdown if "unusable" in str(m.value)]
    assert len(unusable) == 2, unusable
    assert any("empty" in u for u in unusable) and any("garbage" in u for u in unusable)
    # the good checkpoints of the folder still work (digits models: a digit sample is the default)
    assert app.selectbox(key="sample").value.startswith("digits")
    assert not errors(app)
    assert len(charts(app)) >= 3


def test_missing_folder_says_so(app):
    app.button_group(key="model_source").set_value("Folder").run()
    app.text_input(key="model_folder").input("/no/such/folder").run()
    assert_clean(app)
    assert any("not a folder" in e for e in errors(app))


def test_timm_offline_says_how_to_supply_weights(app):
    app.button_group(key="model_source").set_value("timm").run()
    assert_clean(app)
    assert not errors(app)  # offline (HF_HUB_OFFLINE=1), nothing cached: advice, not an error
    warnings = [w.value for w in app.warning]
    assert warnings and "Weights file" in warnings[0] and "pretrained_file" not in warnings[0], warnings
    assert "https://huggingface.co/timm/vit_tiny_patch16_224." in warnings[0]  # the real hub id, with its tag
    assert any("random weights" in i.value for i in app.info)
    app.selectbox(key="timm_pick").set_value("swin_tiny_patch4_window7_224.ms_in1k").run()
    assert_clean(app)
    assert app.text_input(key="timm_name").value == "swin_tiny_patch4_window7_224.ms_in1k"
    assert "timm/swin_tiny_patch4_window7_224.ms_in1k" in app.warning[0].value
    app.text_input(key="timm_name").input("not_a_model_name").run()
    assert_clean(app)
    assert any("unknown timm model" in e for e in errors(app))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "vit_small_patch14_dinov2"])
def test_timm_models_that_do_not_convert_open_as_they_are(app, name):
    app.button_group(key="model_source").set_value("timm").run()
    app.toggle(key="timm_pretrained").set_value(False).run()
    app.text_input(key="timm_name").input(name).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    methods = next(b for b in app.selectbox if str(b.key).startswith("method_"))
    if "dinov2" in name:  # headless: features, no prediction, no class-specific method
        assert "No classifier head" in texts(app)
        assert "Grad-CAM (Selvaraju et al. 2017)" not in methods.options
    else:
        assert "Hierarchical transformer" in texts(app)
        assert "Raw attention" in methods.options and "Grad-CAM (Selvaraju et al. 2017)" in methods.options
        methods.set_value("attention").run()
        layer = next(s for s in app.slider if str(s.key).startswith("att_layer_"))
        assert layer.max == 12  # Swin-T's 2 + 2 + 6 + 2 blocks, each on its own stage's grid
        layer.set_value(1).run()
        assert_clean(app)
        assert not errors(app), errors(app)
    assert "What the features group together" in [s.value for s in app.subheader]


@pytest.mark.slow
def test_timm_random_weights_explore(app):
    app.button_group(key="model_source").set_value("timm").run()
    app.toggle(key="timm_pretrained").set_value(False).run()
    assert_clean(app)
    assert not errors(app), errors(app)
    assert "224×224" in texts(app)
    assert len(charts(app)) >= 3


# ---------------------------------------------------------------------------------------------
# Embeddings and Compare


@pytest.mark.parametrize("stem", ["vit_shapes", "hybrid_shapes", "resnet_shapes"])
def test_embeddings_page(app, folders, stem):
    app.switch_page("pages/embeddings.py").run()
    assert_clean(app)
    app.sidebar.selectbox(key="ckpt_Shipped").set_value(checkpoint_key(folders["shipped"], stem)).run()
    assert_clean(app)
    assert not errors(app)
    assert "Embeddings" in [t.value for t in app.title]
    n = len(charts(app))
    if stem == "vit_shapes":
        assert n == 5  # filters, PCA, similarity grid, one patch, attention distance
        app.slider(key="pos_row_8").set_value(0).run()
        app.select_slider(key="dist_images").set_value(4).run()
        assert_clean(app)
    elif stem == "hybrid_shapes":
        assert n == 3 and "no pixel-space patch filters" in texts(app)
    else:
        assert n == 0 and "This is a CNN" in texts(app)


def test_compare_page(app):
    app.switch_page("pages/compare.py").run()
    assert_clean(app)
    assert not errors(app)
    assert "Compare" in [t.value for t in app.title]
    assert len(app.dataframe) == 2  # scores and faithfulness
    # bars, curves, 3 confusion matrices, data efficiency, 3 overlays, faithfulness curves
    assert len(charts(app)) == 10
    table = app.dataframe[1].value
    # every model's maps that are quick to score (the registry's cost), each method once per model
    from vitviz.checkpoint import load_checkpoint
    from vitviz.explain import METHOD_LABELS, methods_for
    from vitviz.explain.trust import is_slow

    for stem in ("vit_shapes", "hybrid_shapes", "resnet_shapes"):
        model, meta = load_checkpoint(Path(os.environ["VITVIZ_CHECKPOINTS"]) / f"{stem}.safetensors")
        fast = [METHOD_LABELS[m] for m in methods_for(model, saliency_only=True)
                if not is_slow(m, model, meta.img_size, meta.img_size)]
        assert sorted(table[table["Model"] == stem]["Method"]) == sorted(fast), stem
    assert {"Deletion AUC ↓", "Insertion AUC ↑", "ROAD AUC ↓", "Pointing game ↑"} <= set(table.columns)
    app.button_group(key="faith_set").set_value("set").run()
    app.selectbox(key="curve_metric").set_value("train_loss").run()
    app.selectbox(key="cmp_method").set_value("rollout").run()
    assert_clean(app)
    assert not errors(app)


def test_compare_reuses_the_explored_image(app):
    upload(app, "mine.png", encode(scene(), "PNG"))
    app.switch_page("pages/compare.py").run()
    assert_clean(app)
    box = app.selectbox(key="cmp_image_shapes")
    assert "the image on Explore (mine.png)" in box.options[0]


def test_cuda_is_listed_first_when_there_is_a_gpu(monkeypatch):
    import torch

    from dashboard import state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    state.devices.clear()
    try:
        assert state.devices() == ["cuda:0", "cuda:1", "cpu"]
    finally:
        state.devices.clear()


def test_guard_turns_errors_into_messages():
    def page():
        import streamlit as st

        from dashboard import ui
        from vitviz.errors import CheckpointError

        with ui.guard("a test"):
            raise CheckpointError("the file is damaged; re-save it.")
        with ui.guard("a test"):
            raise RuntimeError("boom")
        st.write("still here")

    at = AppTest.from_function(page, default_timeout=TIMEOUT).run()
    assert_clean(at)
    assert errors(at)[0] == "the file is damaged; re-save it."
    assert "RuntimeError: boom" in errors(at)[1]
    assert "still here" in texts(at)
