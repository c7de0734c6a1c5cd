"""What a newcomer sees at a glance: family colours, the heads grid, labels, sidebar names, errors, hosted mode.

Figures are checked as data (plotly traces); pages run headlessly with ``AppTest`` over tiny untrained
checkpoints written once per module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from dashboard_fixtures import dashboard_env, start_app, write_efficiency
from streamlit.testing.v1 import AppTest

from vitviz.plots.colours import FAMILY_BADGES, FAMILY_COLOURS, family_colour

TIMEOUT = 180  # seconds per script run: the first imports torch on a slow, shared CPU
FAMILIES = ("vit", "hybrid", "resnet", "hierarchical", "cnn")


@pytest.fixture(scope="module")
def folder(demo_folder, tmp_path_factory):
    # data-efficiency rows in the order resnet, vit, hybrid: a colour by position would differ from the others
    rows = [{"name": f"{fam}_{f}", "family": fam, "train_fraction": f, "num_train": int(600 * f),
             "test_accuracy": 0.5 + 0.3 * f} for fam in ("resnet", "vit", "hybrid") for f in (0.25, 1.0)]
    results = write_efficiency(tmp_path_factory.mktemp("results"), rows)
    with dashboard_env(demo_folder, results=results, VITVIZ_HOSTED=None):
        yield demo_folder


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def figure(chart) -> dict:
    """The plotly figure of an AppTest plotly_chart element, as a dict."""
    return json.loads(chart.proto.spec)


def trace_colour(trace: dict) -> str | None:
    return (trace.get("line") or {}).get("color") or (trace.get("marker") or {}).get("color")


# ---------------------------------------------------------------------------------------------
# 1. one colour per family


def test_families_have_distinct_colours_and_matching_badges():
    assert set(FAMILY_COLOURS) >= set(FAMILIES) and set(FAMILY_BADGES) >= set(FAMILIES)
    assert len({FAMILY_COLOURS[f] for f in FAMILIES}) == len(FAMILIES)
    assert len({FAMILY_BADGES[f] for f in FAMILIES}) == len(FAMILIES)
    assert family_colour("unknown") not in {FAMILY_COLOURS[f] for f in FAMILIES}


def test_a_family_has_the_same_colour_in_every_training_figure():
    from vitviz.plots.training import accuracy_bars, data_efficiency_lines, training_curves

    # three figures, the families in three different orders
    bars = accuracy_bars([{"name": n, "family": n, "test_accuracy": 0.8, "test_macro_f1": 0.7}
                          for n in ("hybrid", "vit", "resnet", "hierarchical", "cnn")])
    curves = training_curves({n: [{"epoch": 1, "val_accuracy": 0.5}] for n in ("cnn", "resnet", "vit", "hybrid")},
                             families={n: n for n in ("cnn", "resnet", "vit", "hybrid")})
    lines = data_efficiency_lines([{"name": f"{f}_1", "family": f, "train_fraction": 1.0, "test_accuracy": 0.9}
                                   for f in ("resnet", "hierarchical", "vit", "hybrid")])
    seen: dict[str, set[str]] = {}
    for fig in (bars, curves, lines):
        for trace in fig.data:
            colour = trace.line.color if trace.type == "scatter" else trace.marker.color
            seen.setdefault(trace.name, set()).add(colour)
    assert set(seen) == set(FAMILIES)
    for family, colours in seen.items():
        assert colours == {FAMILY_COLOURS[family]}, family


def test_two_models_of_one_family_share_its_colour_and_differ_by_dash():
    from vitviz.plots.training import training_curves

    fig = training_curves({"a": [{"epoch": 1, "val_accuracy": 0.5}], "b": [{"epoch": 1, "val_accuracy": 0.6}]},
                          families={"a": "vit", "b": "vit"})
    assert fig.data[0].line.color == fig.data[1].line.color == FAMILY_COLOURS["vit"]
    assert fig.data[0].line.dash != fig.data[1].line.dash


def test_compare_page_colours_every_chart_and_badge_by_family(folder):
    from dashboard.support import scan_checkpoints

    at = start_app(TIMEOUT)
    at.switch_page("pages/compare.py").run()
    assert_clean(at)
    family_of = {Path(e.path).stem: e.meta.family for e in scan_checkpoints(folder)}
    family_of.update({f: f for f in FAMILIES})  # the data-efficiency lines are named by family
    by_key = {str(c.proto.id).split("-")[-1]: figure(c) for c in at.get("plotly_chart")}
    checked = 0
    for key in ("bars", "curves", "efficiency"):
        for trace in by_key[key]["data"]:
            stem = next(s for s in family_of if trace["name"].startswith(s))
            assert trace_colour(trace) == FAMILY_COLOURS[family_of[stem]], (key, trace["name"])
            checked += 1
    assert checked == 3 + 3 + 3
    badges = " ".join(m.value for m in at.markdown if "-badge[" in m.value)
    for family in ("vit", "hybrid", "resnet"):
        assert f":{FAMILY_BADGES[family]}-badge[" in badges


# ---------------------------------------------------------------------------------------------
# 2. the heads grid and the words on attention maps


def _image(h: int = 32, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("n", [3, 8, 12])
def test_heads_grid_titles_sit_in_their_own_gap(n):
    from vitviz.plots.explain import heads_figure

    fig = heads_figure(np.random.default_rng(1).random((n, 4, 4)), cols=6, image=_image())
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    tops = sorted({round(fig.layout[f"yaxis{i or ''}"].domain[1], 6) for i in range(n)}, reverse=True)
    bottoms = sorted({round(fig.layout[f"yaxis{i or ''}"].domain[0], 6) for i in range(n)}, reverse=True)
    titles = [a for a in fig.layout.annotations if str(a.text).startswith("head ")]
    assert len(titles) == n
    for a in titles:  # each title stands on the top edge of a tile...
        assert a.yanchor == "bottom" and round(a.y, 6) in tops
    # ...with room for a line of text below the row above
    for upper_bottom, lower_top in zip(bottoms, tops[1:], strict=False):
        assert (upper_bottom - lower_top) * plot_px >= 20
    assert fig.layout.margin.t >= 20  # the first row's titles stay inside the figure


def test_heads_grid_shows_the_image_faintly_under_every_tile_and_titles_its_colour_bar():
    from vitviz.plots.explain import heads_figure

    n, gh, gw = 5, 4, 4
    img = _image(32, 32)
    fig = heads_figure(np.random.default_rng(2).random((n, gh, gw)), cols=3, image=img)
    images = [t for t in fig.data if t.type == "image"]
    maps = [t for t in fig.data if t.type == "heatmap"]
    assert len(images) == len(maps) == n
    for im, hm in zip(images, maps, strict=True):
        assert (im.xaxis, im.yaxis) == (hm.xaxis, hm.yaxis)  # same tile
        assert fig.data.index(im) < fig.data.index(hm)  # drawn first: under the map
        assert hm.opacity < 1.0  # the map lets the image through
        z = np.asarray(im.z)
        assert z.shape == (32, 32, 3) and (z[..., 0] == z[..., 1]).all() and (z[..., 1] == z[..., 2]).all()
        assert z.min() >= 64  # faint: lifted towards white, never black
        # the image spans exactly the tile's cells, [-0.5, g - 0.5]
        assert im.x0 - im.dx / 2 == pytest.approx(-0.5) and im.x0 + (32 - 0.5) * im.dx == pytest.approx(gw - 0.5)
        assert im.y0 - im.dy / 2 == pytest.approx(-0.5) and im.y0 + (32 - 0.5) * im.dy == pytest.approx(gh - 0.5)
        assert "attention" in hm.hovertemplate and "saliency" not in hm.hovertemplate
    assert "attention" in fig.layout.coloraxis.colorbar.title.text
    # brighter pixels stay brighter under the lift (the picture is recognisable)
    grey = img @ np.array([0.299, 0.587, 0.114])
    order = np.argsort(grey.ravel())
    assert (np.diff(np.asarray(images[0].z)[..., 0].ravel()[order].astype(int)) >= 0).all()


def test_attention_maps_are_labelled_attention():
    from vitviz.plots.explain import map_label, overlay_figure

    img, amap = _image(16, 16), np.random.default_rng(3).random((16, 16))
    for method in ("attention", "rollout"):
        heat = next(t for t in overlay_figure(img, amap, label=map_label(method)).data if t.type == "heatmap")
        assert heat.colorbar.title.text == "attention" and "attention" in heat.hovertemplate
    heat = next(t for t in overlay_figure(img, amap, label=map_label("chefer")).data if t.type == "heatmap")
    assert "attention" not in heat.hovertemplate and "saliency" not in heat.hovertemplate


def test_explore_draws_attention_labels_and_the_image_under_the_heads(folder):
    at = start_app(TIMEOUT)
    assert_clean(at)
    box = next(b for b in at.selectbox if str(b.key).startswith("method_"))
    box.set_value("attention").run()
    assert_clean(at)
    figs = {str(c.proto.id).split("-")[-1]: figure(c) for c in at.get("plotly_chart")}
    heat = next(t for t in figs["overlay"]["data"] if t["type"] == "heatmap")
    assert heat["colorbar"]["title"]["text"] == "attention"
    patch = next(t for t in figs["patch_pick"]["data"] if t["type"] == "heatmap")
    assert patch["colorbar"]["title"]["text"] == "attention"
    heads = figs["heads"]
    assert sum(t["type"] == "image" for t in heads["data"]) == sum(t["type"] == "heatmap" for t in heads["data"])
    assert "attention" in heads["layout"]["coloraxis"]["colorbar"]["title"]["text"]
    words = " ".join(str(x.value) for x in [*at.markdown, *at.caption]).lower()
    assert "saliency" not in words


# ---------------------------------------------------------------------------------------------
# 3. checkpoint names in the sidebar


def test_short_label_keeps_both_ends_of_a_long_name():
    from dashboard.ui import SIDEBAR_CHARS, short_label

    assert short_label("vit_shapes") == "vit_shapes"
    long = "vit_p4_d8_32_shapes_lr3e-4_seed17_final"
    short = short_label(long)
    assert len(short) == SIDEBAR_CHARS and "…" in short
    head, _, tail = short.partition("…")
    assert long.startswith(head) and long.endswith(tail) and len(head) >= 10 and len(tail) >= 10


def test_sidebar_checkpoint_names_fit_and_the_full_name_is_at_hand(folder, tmp_path):
    import shutil

    from dashboard.ui import SIDEBAR_CHARS

    long = "vit_p4_d8_32_shapes_lr3e-4_seed17_final_run"
    shutil.copy(folder / "vit_shapes.safetensors", tmp_path / f"{long}.safetensors")
    at = start_app(TIMEOUT)
    box = at.sidebar.selectbox(key="ckpt_Shipped")
    assert box.options and all(len(o) <= SIDEBAR_CHARS for o in box.options)
    assert "vit_shapes" in box.options  # the shipped names are short enough to be shown whole
    at.sidebar.segmented_control(key="model_source").set_value("Folder").run()
    at.sidebar.text_input(key="model_folder").input(str(tmp_path)).run()
    assert_clean(at)
    box = at.sidebar.selectbox(key="ckpt_Folder")
    assert len(box.options) == 1 and len(box.options[0]) <= SIDEBAR_CHARS
    assert f"{long}.safetensors" in box.proto.help  # the whole name in the box's help...
    card = " ".join(c.value for c in at.sidebar.caption).replace("\\_", "_")
    assert f"{long}.safetensors" in card  # ...and in the model card under it


# ---------------------------------------------------------------------------------------------
# 5. the first open says it is loading


def test_first_run_clears_the_loading_note(folder):
    at = start_app(TIMEOUT)
    assert_clean(at)
    assert at.session_state["vitviz.loaded_once"]
    assert not any("Loading vitviz" in str(m.value) for m in at.markdown)


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium (apt-get install)")
def test_a_browser_sees_loading_before_the_page_and_not_after(folder):
    from playwright.sync_api import sync_playwright

    from dashboard.harness import StreamlitServer, launch_chromium, wait_done

    # a MutationObserver from the first byte of the page notes whether the loading text was ever drawn
    watch = """
        window.__sawLoading = false;
        new MutationObserver(() => {
            if (document.body && document.body.innerText.includes('Loading vitviz')) window.__sawLoading = true;
        }).observe(document, {subtree: true, childList: true, characterData: true});
    """
    with StreamlitServer("dashboard/app.py") as server, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.add_init_script(watch)
            page.goto(server.url)
            page.wait_for_selector("[data-testid=stMain] .js-plotly-plot", timeout=TIMEOUT * 1000)
            wait_done(page, TIMEOUT * 1000)
            assert page.evaluate("window.__sawLoading")
            assert "Loading vitviz" not in page.inner_text("body")
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------
# 6. error texts in plain words

JARGON = ("pillow", "bytes not processed", "header", "decompression", "truncated", "offsets",
          "tensor ", "unidentified", "mode '")


def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_image_errors_say_what_is_wrong_without_jargon():
    from vitviz.errors import InvalidImageError
    from vitviz.images import open_image

    png = _png(64, 64)
    bad = {
        "cut.png": png[: len(png) // 2],  # Pillow: "image file is truncated (N bytes not processed)"
        "noise.png": np.random.default_rng(1).bytes(2000),
        "broken.png": png[:40] + b"\xff" * 60,
        "bomb.png": _png_claiming(30_000, 30_000),
        "notes.png": b"plain text, not a picture\n" * 4,
    }
    for name, data in bad.items():
        with pytest.raises(InvalidImageError) as info:
            open_image(_named(data, name))  # an upload carries its file name, as Streamlit's does
        text = str(info.value)
        assert name in text, text
        assert not [w for w in JARGON if w in text.lower()], text
        assert any(w in text for w in ("try again", "upload a PNG")), text  # says what to do


def _named(data: bytes, name: str):
    import io

    f = io.BytesIO(data)
    f.name = name
    return f


def test_checkpoint_errors_say_what_is_wrong_without_jargon(tmp_path, folder):
    import struct

    from vitviz.checkpoint import read_checkpoint_meta
    from vitviz.errors import CheckpointError

    good = (folder / "vit_shapes.safetensors").read_bytes()
    bad = {
        "text.safetensors": b"this is not a checkpoint at all" * 4,  # "header too large"
        "cut.safetensors": good[: len(good) - 100],
        "start.safetensors": good[:60],
        "tiny.safetensors": good[:5],
        "json.safetensors": struct.pack("<Q", 5) + b"abcde",
        "trail.safetensors": good + b"extra",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint_meta(tmp_path / name)
        text = str(info.value)
        assert name in text and not [w for w in JARGON if w in text.lower()], text
        assert "Re-save or re-download it" in text, text


# ---------------------------------------------------------------------------------------------
# 7. the hosted setting


def test_hosted_offers_no_folder_and_no_downloads(folder, monkeypatch):
    monkeypatch.setenv("VITVIZ_HOSTED", "1")
    at = start_app(TIMEOUT)
    assert_clean(at)
    source = at.sidebar.segmented_control(key="model_source")
    assert list(source.options) == ["Shipped", "timm"]  # no Folder, no Hugging Face, no CLIP
    assert "downloads no weights" in source.help
    assert at.sidebar.selectbox(key="ckpt_Shipped").options  # the shipped checkpoints are all there
    source.set_value("timm").run()
    assert_clean(at)
    assert not [t for t in at.sidebar.text_input if t.key in ("timm_weights", "model_folder")]  # no server paths
    toggle = at.sidebar.toggle(key="timm_pretrained_hosted")
    assert toggle.value is False and toggle.disabled
    assert at.session_state["vitviz.loaded"].info.label.endswith("(random weights)")  # loaded, nothing fetched
    at.sidebar.text_input(key="timm_name").input("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k").run()
    assert not at.exception
    assert any("public deployment" in str(e.value) for e in at.error)  # refused, not fetched


def test_not_hosted_offers_every_source(folder):
    at = start_app(TIMEOUT)
    assert list(at.sidebar.segmented_control(key="model_source").options) == [
        "Shipped", "Folder", "timm", "Hugging Face", "CLIP"]
