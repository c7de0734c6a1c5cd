"""``vitviz represent``: the report it writes, and under torchrun (2 CPU processes, gloo) the same CKA grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitviz.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = [str(ROOT / "checkpoints" / f"{f}_digits.safetensors") for f in ("vit", "resnet")]
FAST = ["--dataset", "digits", "--n-test", "40", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single")
    code = main(["represent", "--models", *MODELS, *FAST, "--n-train", "80", "--embed-n", "30", "--embed-layer", "1",
                 "--gallery", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_the_report_has_every_pair_curves_and_figures(single):
    out, report = single
    pairs = [(c["a"], c["b"]) for c in report["cka"]]
    assert pairs == [("vit_digits", "vit_digits"), ("vit_digits", "resnet_digits"),
                     ("resnet_digits", "resnet_digits")]
    own = report["cka"][0]
    assert np.allclose(np.diag(own["grid"]), 1.0) and own["examples"] == 40 and own["batches"] == 5
    assert report["world_size"] == 1 and all(c["rank_batches"] == [5] for c in report["cka"])
    assert [p["model"] for p in report["probes"]] == ["vit_digits", "resnet_digits"]
    assert all(0.0 <= a <= 1.0 for p in report["probes"] for a in p["test_accuracy"])
    assert [x["model"] for x in report["lens"]] == ["vit_digits"]  # the ResNet has no logit lens
    assert report["lens"][0]["agreement"][-1] == 1.0  # the last layer's lens is the model's own prediction
    assert report["lens"][0]["accuracy"][-1] == pytest.approx(report["accuracy"]["vit_digits"], abs=1e-5)
    assert "logit_lens" in " ".join(report["figures"])
    assert report["embedding"]["layers"] == {"vit_digits": "blocks.1", "resnet_digits": "layer1.1"}  # --embed-layer 1
    assert "at blocks.1 (layer 2 of 6)" in (out / "figures" / "embedding_vit_digits.html").read_text()
    assert len(report["attention_distance"]) == 1
    for f in report["figures"]:
        assert (out / f).is_file()
    assert (out / "figures" / "plotly.min.js").is_file()  # offline: the figures need no network
    assert "| vit_digits | resnet_digits | 6 x 8 |" in (out / "report.md").read_text()


def test_torchrun_shards_and_gives_the_same_grids(single, tmp_path):
    _, report = single
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitviz", "represent", "--models", *MODELS, *FAST, "--n-train", "0", "--embed", "none",
           "--gallery", "0", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sharded = json.loads((out / "report.json").read_text())
    assert sharded["world_size"] == 2
    for one, two in zip(report["cka"], sharded["cka"], strict=True):
        assert two["examples"] == 40 and two["batches"] == 5  # summed over the processes
        assert two["world_size"] == 2 and two["rank_batches"] == [3, 2]  # batches 0, 2, 4 on rank 0; 1, 3 on rank 1
        np.testing.assert_allclose(two["grid"], one["grid"], atol=1e-9)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["represent", "--models", "nope.safetensors", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitviz represent: error:") and "checkpoint" in err and "\n" not in err
    assert main(["represent", "--models", *MODELS, "--dataset", "digits", "--n", "2", "--out", str(tmp_path)]) == 2
    assert "--n must be at least 4" in capsys.readouterr().err


def test_a_folder_of_images_and_a_timm_model(tmp_path):
    """--images: labels from the class folders; a timm: model with random weights (nothing downloaded)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(10):  # folders named like resnet_digits' classes, so that it has an accuracy here
        folder = tmp_path / "images" / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["represent", "--models", "timm:test_vit", MODELS[1], "--images", str(tmp_path / "images"),
                 "--random-weights", "--n", "8", "--batch-size", "4", "--embed", "none", "--gallery", "1",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "images" and report["images"] == 8
    assert [m["name"] for m in report["models"]] == ["timm:test_vit", "resnet_digits"]
    vit_vs_resnet = report["cka"][1]
    assert (vit_vs_resnet["a"], vit_vs_resnet["b"]) == ("timm:test_vit", "resnet_digits")
    assert vit_vs_resnet["examples"] == 8 and len(vit_vs_resnet["labels_a"]) == len(vit_vs_resnet["grid"])
    # labels come from the class folders "0".."9", resnet_digits' classes; the random timm model's classes are
    # not those, so it has no accuracy, no lens accuracy (agreement only) and no errors of its own
    assert set(report["accuracy"]) == {"resnet_digits"}
    assert report["lens"][0]["accuracy"] is None and report["lens"][0]["agreement"][-1] == 1.0
    assert report["gallery"] and {row["model"] for row in report["gallery"]} == {"resnet_digits"}
    assert report["probes"] == []  # a folder has no training images
    assert [x["model"] for x in report["lens"]] == ["timm:test_vit"]
    for row in report["gallery"]:  # misclassified by the named model, with every model's prediction
        assert row["predictions"][row["model"]] != row["label"]
        assert set(row["predictions"]) == {"timm:test_vit", "resnet_digits"}
    assert "embedding" not in report


def test_an_unknown_embedding_layer_is_one_line(tmp_path, capsys):
    assert main(["represent", "--models", *MODELS, *FAST, "--embed-layer", "blocks.9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "vit_digits has no layer 'blocks.9'" in err and "blocks.0" in err and "\n" not in err
    assert main(["represent", "--models", *MODELS, *FAST, "--embed-layer", "8", "--out", str(tmp_path)]) == 2
    assert "layer index 8 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
