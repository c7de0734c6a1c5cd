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
    code = main(["represent", "--models", *MODELS, *FAST, "--n-train", "80", "--embed-n", "30", "--gallery", "1",
                 "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_the_report_has_every_pair_curves_and_figures(single):
    out, report = single
    pairs = [(c["a"], c["b"]) for c in report["cka"]]
    assert pairs == [("vit_digits", "vit_digits"), ("vit_digits", "resnet_digits"),
                     ("resnet_digits", "resnet_digits")]
    own = report["cka"][0]
    assert np.allclose(np.diag(own["grid"]), 1.0) and own["examples"] == 40 and own["batches"] == 5
    assert [p["model"] for p in report["probes"]] == ["vit_digits", "resnet_digits"]
    assert all(0.0 <= a <= 1.0 for p in report["probes"] for a in p["test_accuracy"])
    assert [x["model"] for x in report["lens"]] == ["vit_digits"]  # the ResNet has no logit lens
    assert report["lens"][0]["agreement"][-1] == 1.0  # the last layer's lens is the model's own prediction
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
    for one, two in zip(report["cka"], sharded["cka"], strict=True):
        assert two["examples"] == 40 and two["batches"] == 5  # 3 batches on rank 0, 2 on rank 1, summed
        np.testing.assert_allclose(two["grid"], one["grid"], atol=1e-9)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["represent", "--models", "nope.safetensors", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitviz represent: error:") and "checkpoint" in err and "\n" not in err
    assert main(["represent", "--models", *MODELS, "--dataset", "digits", "--n", "2", "--out", str(tmp_path)]) == 2
    assert "--n must be at least 4" in capsys.readouterr().err
