"""``vitviz compare``: specs, a tiny end-to-end comparison (tables, JSON, plots) and the plot functions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitviz.cli import main
from vitviz.compare import PRESETS, CompareSpec, RunSpec, markdown_table
from vitviz.errors import ConfigError
from vitviz.plots.training import accuracy_bars, confusion_matrix_figure, data_efficiency_lines, training_curves

TINY = ["--img-size", "16", "--limit-train", "40", "--limit-eval", "30", "--threads", "1", "--no-progress"]


def test_study_preset_is_the_reference_projects_comparison():
    spec = CompareSpec.from_cli(preset="study", models=None, dataset="digits", epochs=None)
    models = [r.model for r in spec.runs]
    assert {"vit_p8_d12_32", "vit_p4_d8_32", "hybrid_r18_vit_32", "resnet34_32"} <= set(models)
    assert spec.kind == "models" and spec.epochs == PRESETS["study"]["epochs"] and spec.img_size == 32
    narrowed = CompareSpec.from_cli(preset="study", models="vit_p4_d8,resnet34", dataset="digits", epochs=2)
    assert [r.name for r in narrowed.runs] == ["vit_p4_d8", "resnet34"] and narrowed.epochs == 2


def test_data_efficiency_runs_every_family_at_every_fraction_with_equal_steps():
    spec = CompareSpec.from_cli(preset="data-efficiency", models=None, dataset="shapes", epochs=4)
    assert spec.kind == "data-efficiency"
    assert {r.train_fraction for r in spec.runs} == {0.1, 0.25, 0.5, 1.0}
    assert len(spec.runs) == 3 * 4
    epochs = {r.train_fraction: spec.epochs_for(r) for r in spec.runs}
    assert epochs == {0.1: 40, 0.25: 16, 0.5: 8, 1.0: 4}  # the same number of optimiser steps
    custom = CompareSpec.from_cli(preset="data-efficiency", models="vit", dataset="digits", epochs=1,
                                  fractions="0.5,1")
    assert [r.name for r in custom.runs] == ["vit_f050", "vit_f100"]


def test_spec_errors():
    with pytest.raises(ConfigError, match="give --preset"):
        CompareSpec.from_cli(preset=None, models=None, dataset="digits", epochs=1)
    with pytest.raises(ConfigError, match="not in preset"):
        CompareSpec.from_cli(preset="study", models="resnet50", dataset="digits", epochs=1)
    with pytest.raises(ConfigError, match="epochs"):
        CompareSpec.from_cli(preset=None, models="resnet18_32", dataset="digits", epochs=0)


def test_compare_models_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "vit_p4_d8_32,resnet18_32", "--dataset", "digits", "--epochs", "1",
            "--out", str(out), *TINY]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["vit_p4_d8_32", "resnet18_32"]
    assert [r["family"] for r in summary["rows"]] == ["vit", "resnet"]
    for row in summary["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and len(row["curves"]) == 1
        assert (out / row["name"] / "best.safetensors").exists()
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 3 and "`resnet18_32`" in table  # header + two rows
    assert {p.rsplit("/", 1)[-1] for p in printed["plots"]} == {
        "accuracy.html", "curves.html", "confusion_vit_p4_d8_32.html", "confusion_resnet18_32.html"}
    assert all((out / p.rsplit("/", 1)[-1]).stat().st_size > 1000 for p in printed["plots"])
    # the pages open offline: plotly.js sits beside them, no CDN link
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert "cdn.plot.ly" not in (out / "accuracy.html").read_text()

    # --resume reuses finished runs: nothing is retrained, the table is the same.
    stamp = (out / "resnet18_32" / "best.safetensors").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert (out / "resnet18_32" / "best.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["rows"] == summary["rows"]


def test_compare_data_efficiency_end_to_end(tmp_path, capsys):
    out = tmp_path / "eff"
    assert main(["compare", "--preset", "data-efficiency", "--models", "resnet", "--fractions", "0.5,1",
                 "--dataset", "digits", "--epochs", "1", "--out", str(out), *TINY]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["name"], r["train_fraction"], r["epochs"]) for r in rows] == [("resnet_f050", 0.5, 2),
                                                                             ("resnet_f100", 1.0, 1)]
    assert (out / "data_efficiency.html").exists()
    assert "train fraction" in (out / "results.md").read_text()


# --------------------------------------------------------------------------------------------------
# tables and figures


def _rows():
    return [
        {"name": "a", "model": "vit_p4_d8_32", "family": "vit", "num_params": 1_200_000, "epochs": 3,
         "test_accuracy": 0.9, "test_macro_f1": 0.88, "train_time_s": 12.3, "cpu_time_s": 11.6,
         "train_fraction": 0.5, "num_train": 50},
        {"name": "b", "model": "resnet18_32", "family": "resnet", "num_params": 700_000, "epochs": 3,
         "test_accuracy": 0.95, "test_macro_f1": 0.949, "train_time_s": 8.0, "train_fraction": 1.0, "num_train": 100},
    ]


def test_markdown_table():
    table = markdown_table(_rows())
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | preset | params")
    assert lines[2] == "| a | `vit_p4_d8_32` | 1.20 M | 3 | 90.00 | 0.8800 | 12 | 12 |"
    assert "50 %" in markdown_table(_rows(), fractions=True)


def test_accuracy_bars_and_curves():
    fig = accuracy_bars(_rows())
    assert [t.name for t in fig.data] == ["a", "b"]  # one trace per model, in its family's colour
    assert list(fig.data[0].x) == ["accuracy", "macro F1"]
    assert [t.y[0] for t in fig.data] == pytest.approx([90.0, 95.0])
    curves = training_curves({"a": [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.75}]})
    assert list(curves.data[0].x) == [1, 2] and list(curves.data[0].y) == [50.0, 75.0]
    loss = training_curves({"a": [{"epoch": 1, "elapsed_s": 3.0, "val_loss": 1.5}]}, metric="val_loss", x="elapsed_s")
    assert list(loss.data[0].y) == [1.5] and list(loss.data[0].x) == [3.0]


def test_confusion_matrix_figure_normalises_rows():
    cm = [[3, 1], [0, 0]]
    fig = confusion_matrix_figure(cm, ["x", "y"])
    np.testing.assert_allclose(np.asarray(fig.data[0].z), [[0.75, 0.25], [0.0, 0.0]])
    raw = confusion_matrix_figure(cm, ["x", "y"], normalize=False)
    np.testing.assert_allclose(np.asarray(raw.data[0].z), cm)


def test_data_efficiency_lines_group_by_family():
    rows = [*_rows(), {**_rows()[0], "train_fraction": 1.0, "test_accuracy": 0.97}]
    fig = data_efficiency_lines(rows)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"vit", "resnet"}
    assert list(by_name["vit"].x) == [50.0, 100.0] and list(by_name["vit"].y) == pytest.approx([90.0, 97.0])


def test_run_spec_defaults():
    assert RunSpec("a", "resnet18_32").train_fraction == 1.0
