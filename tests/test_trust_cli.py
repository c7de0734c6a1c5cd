"""``vitviz trust``: outputs, errors, and torchrun sharding over 2 CPU processes (gloo) equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_explain_capture import tiny_vit

from vitviz.checkpoint import save_checkpoint
from vitviz.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random ViT checkpoint and a folder of 6 photos of the user's (random pictures, odd sizes)."""
    root = tmp_path_factory.mktemp("trust")
    ckpt = save_checkpoint(tiny_vit(patch_size=8), root / "vit.safetensors", dataset="shapes",
                           class_names=[f"c{i}" for i in range(5)], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 36, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not an image")
    return ckpt, photos


ARGS = ["--methods", "rollout,chefer,gradcam", "--sanity-images", "3", "--bootstrap", "100", "--batch-size", "2",
        "--threads", "1", "--device", "cpu"]


def test_trust_writes_the_table_json_and_an_offline_page(setup, tmp_path, capsys):
    ckpt, photos = setup
    out = tmp_path / "out"
    assert main(["trust", "--checkpoint", str(ckpt), "--images", str(photos), "--out", str(out), *ARGS]) == 0
    report = json.loads((out / "trust.json").read_text())
    assert report["images"] == 6 and sorted(report["ranking"]) == ["chefer", "gradcam", "rollout"]
    assert report["metrics"] == ["deletion_auc", "insertion_auc", "road_auc"]  # no masks: no pointing game
    assert report["protocol"]["unit"] == 8 and "8x8-px squares" in report["protocol"]["text"]
    for m, e in report["methods"].items():
        assert set(e["metrics"]) == set(report["metrics"]) and e["cost"] and e["ms_per_image"] > 0, m
        assert len(e["sanity"]["spearman"]) == len(e["sanity"]["stages"]) and e["sanity"]["images"] == 3
    assert len(report["per_image"]["scores"]["random"]["road_auc"]) == 6
    md = (out / "trust.md").read_text()
    assert md.count("\n| ") == 1 + 3 and report["verdict"] in md and md in capsys.readouterr().out
    page = (out / "trust.html").read_text()
    assert "<script" not in page and "src=" not in page and "href=" not in page  # offline: nothing to fetch
    assert page.count("<svg") == 3 and "Relevance (Chefer et al. 2021)" in page


def test_bad_arguments_end_in_one_line(setup, tmp_path, capsys):
    ckpt, photos = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--images", str(photos), "--target", "label"], "--target label needs labels"),
        (["--images", str(empty)], "no images there"),
        (["--images", str(photos), "--methods", "rollout,nonsense"], "nonsense cannot explain this model"),
        (["--images", str(photos), "--steps", "0"], "--steps must be a positive integer"),
    ]
    for extra, message in cases:
        assert main(["trust", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_torchrun_shards_merge_to_the_single_process_result(setup, tmp_path):
    ckpt, photos = setup
    common = ["--checkpoint", str(ckpt), "--images", str(photos), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "vitviz", "trust", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vitviz", "trust", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "trust.json").read_text())
    b = json.loads((tmp_path / "two" / "trust.json").read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    assert a["per_image"]["indices"] == b["per_image"]["indices"] == list(range(6))
    for method, scores in a["per_image"]["scores"].items():
        for metric, values in scores.items():
            np.testing.assert_allclose(b["per_image"]["scores"][method][metric], values, atol=1e-5,
                                       err_msg=f"{method}/{metric}")
    for method, rows in a["per_image"]["sanity"].items():
        np.testing.assert_allclose(b["per_image"]["sanity"][method], rows, atol=1e-5)
    assert a["ranking"] == b["ranking"] and a["verdict"] == b["verdict"]
    for m in a["methods"]:
        for k, s in a["methods"][m]["metrics"].items():
            t = b["methods"][m]["metrics"][k]
            assert s["mean"] == pytest.approx(t["mean"], abs=1e-5) and s["low"] == pytest.approx(t["low"], abs=1e-5)


FEW = ["--methods", "rollout,chefer,gradcam", "--sanity-images", "2", "--bootstrap", "50", "--batch-size", "3",
       "--threads", "1", "--device", "cpu"]


def _photos(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30 + 5 * i, 34, 3), dtype=np.uint8)).save(root / f"q{i}.png")
    return root


def test_trust_scores_a_hugging_face_folder(tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(0)
    folder = tmp_path / "hf_vit"
    T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=8,
                                            num_labels=3)).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["trust", "--model", f"hf:{folder}", "--images", str(_photos(tmp_path / "p")), "--out", str(out),
                 *FEW]) == 0
    report = json.loads((out / "trust.json").read_text())
    assert report["model"] == f"hf:{folder}" and report["images"] == 3
    assert sorted(report["ranking"]) == ["chefer", "gradcam", "rollout"] and "prompts" not in report
    assert report["protocol"]["unit"] == 8  # the model's own patch, read through the adapter
    for m, e in report["methods"].items():
        assert len(e["sanity"]["spearman"]) == len(e["sanity"]["stages"]) > 0, m
        assert all(0.0 <= v <= 1.0 for v in report["per_image"]["scores"][m]["deletion_auc"]), m


def test_trust_scores_a_clip_on_the_users_prompts(tmp_path, monkeypatch):
    """open_clip's ViT-B-32 shrunk as in test_clip_prompts (the CLI has no size flags: create_model gets them)."""
    import torch
    from test_clip_prompts import TINY

    import vitviz

    create = vitviz.create_model

    def tiny(name, **kwargs):
        torch.manual_seed(0)
        return create(name, **kwargs, **(TINY if name.startswith("open_clip:") else {}))

    monkeypatch.setattr(vitviz, "create_model", tiny)
    prompts = ["a striped shape", "a red square", "a green disc", "a blue ring"]
    out = tmp_path / "out"
    args = ["trust", "--model", "open_clip:ViT-B-32", "--random-weights", "--images", str(_photos(tmp_path / "p")),
            "--out", str(out), *FEW]
    assert main([*args, *[a for p in prompts for a in ("--prompt", p)]]) == 0
    report = json.loads((out / "trust.json").read_text())
    assert report["prompts"] == prompts and report["images"] == 3
    assert sorted(report["ranking"]) == ["chefer", "gradcam", "rollout"]
    md = (out / "trust.md").read_text()
    assert 'Classes: the prompts "a striped shape"; "a red square"; "a green disc"; "a blue ring".' in md
    assert report["protocol"]["unit"] == 16  # the shrunk ViT-B-32's 16-px patches at 64 px
    # without --prompt, the default prompts (as vitviz explain)
    from vitviz.models.clip import DEFAULT_PROMPTS

    assert main([*args, "--methods", "rollout", "--out", str(tmp_path / "default")]) == 0  # the last flag wins
    assert json.loads((tmp_path / "default" / "trust.json").read_text())["prompts"] == list(DEFAULT_PROMPTS)
