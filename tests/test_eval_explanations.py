"""benchmarks/eval_explanations.py on the shipped shapes ViT, at a tiny scale, and its target checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("eval_explanations", ROOT / "benchmarks" / "eval_explanations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_scores_every_method_and_the_random_baseline(bench, tmp_path):
    out = tmp_path / "eval.json"
    assert bench.main(["--families", "vit", "--n", "6", "--select-n", "4", "--steps", "2", "--sanity-images", "2",
                       "--skip-slow", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["vit"]
    methods = result["methods"]
    assert {"attention", "rollout", "grad-rollout", "chefer", "gradcam"} <= set(methods)
    starred = [m for m in methods if m.startswith("attention, layer ")]
    assert len(starred) == 1 and 0 <= int(starred[0].split()[-1].rstrip("*")) < 6  # the shipped ViT has 6 blocks
    for scores in [*methods.values(), result["random"]]:
        assert 0.0 <= scores["pointing_game_pct"] <= 100.0 and 0.0 <= scores["mask_iou"] <= 1.0
        assert 0.0 <= scores["deletion_auc"] <= 1.0 and 0.0 <= scores["insertion_auc"] <= 1.0
        assert 0.0 <= scores["road_auc"] <= 1.0
    assert all("sanity_spearman" in m for name, m in methods.items() if not name.endswith("*"))


def test_target_checks_name_what_fails(bench):
    def row(pointing: float, deletion: float) -> dict:
        return {"pointing_game_pct": pointing, "deletion_auc": deletion, "sanity_spearman": 0.1}

    good = {"vit": {"methods": {"rollout": row(85.0, 0.2), "gradcam": row(40.0, 0.3)}, "random": row(19.0, 0.35)}}
    assert [line.split(":")[0] for line in bench.check_targets(good)] == ["PASS", "PASS", "PASS"]
    bad = {"vit": {"methods": {"rollout": row(79.0, 0.2), "attention": row(30.0, 0.4)}, "random": row(19.0, 0.35)}}
    del bad["vit"]["methods"]["attention"]["sanity_spearman"]
    lines = bench.check_targets(bad)
    assert lines[0].startswith("FAIL") and "79.0" in lines[0]
    assert lines[1].startswith("FAIL") and "vit/attention" in lines[1] and "rollout" not in lines[1]
    assert lines[2].startswith("FAIL") and "vit/attention" in lines[2] and "rollout" not in lines[2]
