"""The dashboard's plain-Python glue (dashboard.support): no Streamlit, no browser."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dashboard import support as ds
from vitviz.images import fit_image


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from demo_checkpoints import write_demo_checkpoints

    folder = tmp_path_factory.mktemp("ckpts")
    write_demo_checkpoints(folder)
    (folder / "broken.safetensors").write_bytes(b"\x00" * 3)
    (folder / "old.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # what torch.save writes: a zip
    (folder / "notes.txt").write_text("not a checkpoint, not listed")
    return folder


def test_scan_lists_good_first_and_explains_bad(ckpts):
    entries = ds.scan_checkpoints(ckpts)
    assert [e.name for e in entries] == ["vit_shapes.safetensors", "hybrid_shapes.safetensors",
                                         "resnet_shapes.safetensors", "broken.safetensors", "old.pth"]
    bad = entries[-2]
    assert not bad.usable and "incomplete" in bad.error
    assert "never unpickles" in entries[-1].error
    assert bad.label == "broken.safetensors — unusable"
    assert entries[0].label == "vit_shapes — ViT · shapes · 95.0 % test acc."
    assert ds.scan_checkpoints(ckpts / "missing") == []


def test_fingerprint_changes_with_the_files(ckpts, tmp_path):
    before = ds.folder_fingerprint(ckpts)
    assert len(before) == 5
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert ds.folder_fingerprint(tmp_path) != ds.folder_fingerprint(tmp_path / "nothing")


def test_model_info_metrics_and_curves(ckpts):
    entry = ds.scan_checkpoints(ckpts)[0]
    info = ds.checkpoint_info(entry)
    assert info.family == "vit" and info.img_size == 32 and len(info.class_names) == 8 and info.has_attention
    assert ds.metric(info, "accuracy") == pytest.approx(0.95)
    row = ds.metrics_rows([info])[0]
    assert row["Accuracy %"] == 95.0 and row["Macro F1 %"] == 93.5 and row["Family"] == "ViT"
    assert ds.accuracy_rows([info])[0]["test_macro_f1"] == pytest.approx(0.935)
    curves = ds.curves_of(info)
    assert len(curves) == 5 and curves[0]["epoch"] == 1
    assert ds.curve_metrics([curves])[:2] == ["val_accuracy", "train_loss"]
    assert np.asarray(ds.confusion_of(info)).shape == (8, 8)


def test_topk():
    top = ds.topk(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], k=2)
    assert [(n, i) for n, _, i in top] == [("b", 1), ("c", 2)]
    assert ds.topk(np.array([1.0]), ["only"], k=5) == [("only", 1.0, 0)]


def test_patch_centres_and_clicks_agree():
    grid, size = (8, 8), 32
    xs, ys, rows, cols = ds.patch_centres(grid, size)
    assert len(xs) == 64 and (rows[9], cols[9]) == (1, 1)
    for x, y, r, c in zip(xs, ys, rows, cols, strict=True):
        assert ds.point_to_patch(x, y, grid, size) == (r, c)
    assert ds.point_to_patch(-5, 1000, grid, size) == (7, 0)  # clamped


def test_clicked_patch_reads_plotly_selections():
    grid = (8, 8)
    assert ds.clicked_patch([{"curve_number": 2, "customdata": {"0": 0, "1": 6}}], grid) == (0, 6)
    assert ds.clicked_patch([{"customdata": [3, 4]}], grid) == (3, 4)
    assert ds.clicked_patch([{"x": 1.0}, {"customdata": [1, 2]}], grid) == (1, 2)  # the image trace has none
    assert ds.clicked_patch([{"customdata": [9, 0]}], grid) is None  # outside the grid
    assert ds.clicked_patch([], grid) is None


def test_fit_mask_lines_up_with_fit_image():
    # a wide image with a red square on its right third; the crop keeps the centre
    img = np.zeros((40, 80, 3), np.uint8)
    mask = np.zeros((40, 80), bool)
    img[10:30, 30:50] = (255, 0, 0)
    mask[10:30, 30:50] = True
    fitted = np.asarray(fit_image(Image.fromarray(img), 20))
    m = ds.fit_mask(mask, 20)
    assert m.shape == (20, 20)
    red = fitted[..., 0] > 128
    assert (red == m).mean() > 0.95


def test_downloads_round_trip():
    sal = np.random.default_rng(0).random((6, 5)).astype(np.float32)
    back = np.loadtxt(io.StringIO(ds.map_to_csv(sal).decode()), delimiter=",")
    assert back.shape == (6, 5) and np.allclose(back, sal, atol=1e-5)
    assert np.array_equal(np.load(io.BytesIO(ds.map_to_npy(sal))), sal)
    png = ds.overlay_png_bytes(np.zeros((32, 32, 3), np.uint8), np.ones((32, 32)), 0.5, "jet")
    assert Image.open(io.BytesIO(png)).size == (448, 448)  # enlarged so a 32-px input stays crisp
    assert ds.download_stem("shapes · star", "grad-rollout") == "vitviz_star_grad-rollout"
    assert ds.download_stem("../../etc/passwd.png", "x") == "vitviz_passwd_x"


def test_samples_are_bundled_and_offline():
    names = ds.sample_names()
    assert len(names) == 8 + 10 + 2
    star = ds.load_sample("shapes · star")
    assert star.image.shape == (64, 64, 3) and star.mask.shape == (64, 64) and star.mask.any()
    digit = ds.load_sample("digits · 3")
    assert digit.image.shape == (32, 32, 3) and digit.label == "3"
    photo = ds.load_sample("photo · china")
    assert photo.image.shape == (427, 640, 3) and photo.mask is None
    assert ds.default_sample("digits") == "digits · 3" and ds.default_sample(None).startswith("shapes")
    assert ds.dataset_samples("shapes")[0] == "shapes · circle"
    assert len(ds.dataset_images("digits", 3)) == 3
    with pytest.raises(KeyError):
        ds.load_sample("shapes · hexagon")


def test_read_results(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"kind": "data-efficiency", "dataset": "shapes", "rows": []}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"kind": "models", "rows": [{}]}))
    (tmp_path / "broken.json").write_text("{not json")
    assert len(ds.read_results(tmp_path)) == 2
    assert [r["kind"] for r in ds.read_results(tmp_path, "data-efficiency")] == ["data-efficiency"]
    assert ds.read_results(tmp_path / "missing") == []


def test_faithfulness_summary():
    fr = np.linspace(0, 1, 3)
    out = ds.summarise_faithfulness(fr, np.ones((2, 3)), np.zeros((2, 3)), np.array([0.2, 0.4]), np.array([0.5, 0.7]),
                                    np.array([True, False]), np.array([0.5, 0.1]))
    assert out["deletion_auc"] == pytest.approx(0.3) and out["pointing_game"] == 0.5 and out["images"] == 2
    row = ds.faithfulness_row("m", "ViT", "Rollout", out)
    assert row["Pointing game ↑"] == 50.0 and row["Mask IoU ↑"] == 0.3


def test_display_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    inside = tmp_path / "runs" / "ckpts"
    inside.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ds.display_path(inside) == str(Path("runs") / "ckpts")
    assert ds.display_path(tmp_path) == "."
    elsewhere = tmp_path.parent
    assert ds.display_path(elsewhere) == str(elsewhere)  # outside: as given
