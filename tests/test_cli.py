"""The command line: every command, and every bad argument ends in a clear message with no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitviz.checkpoint import read_checkpoint_meta
from vitviz.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = {"--model": "vit_p4_d8_32", "--img-size": "16", "--embed-dim": "16", "--depth": "1", "--num-heads": "2",
              "--dataset": "digits", "--limit-train": "64", "--batch-size": "32", "--threads": "1"}
TINY = [tok for pair in TINY_FLAGS.items() for tok in pair] + ["--no-progress"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "3e-3", "--out", str(out)]) == 0
    return out


def test_train_prints_a_summary_and_evaluate_reproduces_the_stored_test_accuracy(trained, capsys):
    code, out, err = _run(capsys, "evaluate", str(trained / "best.safetensors"), "--compact")
    assert code == 0, err
    report = json.loads(out)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "confusion_matrix"):
        assert key in report, key
    assert report["dataset"] == "digits" and report["split"] == "test"
    assert len(report["per_class"]) == 10 and len(report["confusion_matrix"]) == 10
    meta = read_checkpoint_meta(trained / "best.safetensors")
    assert report["accuracy"] == meta.metrics["test_accuracy"]
    assert report["macro_f1"] == meta.metrics["test_macro_f1"]

    code, out, _ = _run(capsys, "evaluate", str(trained / "last.safetensors"), "--dataset", "digits", "--split", "val")
    assert code == 0 and json.loads(out)["split"] == "val" and json.loads(out)["num_samples"] == 179


def test_resume_takes_left_out_flags_from_the_saved_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out))
    assert code == 0 and "continue with --resume" in err
    code, stdout, err = _run(capsys, "train", "--out", str(out), "--resume", "--no-progress")
    assert code == 0, err
    assert json.loads(stdout)["best_epoch"] in (1, 2)
    assert read_checkpoint_meta(out / "last.safetensors").extra["epochs_done"] == 2


def test_non_finite_loss_exits_1_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "3", "--lr", "1e6", "--clip-grad", "0", "--out", str(out))
    assert code == 1
    assert "non-finite" in err and "Lower the learning rate" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope_model", "--epochs", "1"], "unknown model 'nope_model'"),
    (["train", "--dataset", "nope_data", "--epochs", "1"], "unknown dataset 'nope_data'"),
    (["train", "--dataset", "cifar10", "--data-root", "{tmp}/missing", "--epochs", "1"], "cifar10"),
    (["train", "--img-size", "18", "--epochs", "1"], "not divisible by patch_size"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
    (["train", "--lr", "-1", "--epochs", "1"], "lr must be"),
    (["train", "--schedule", "linear", "--epochs", "1"], "schedule must be one of"),
    (["train", "--device", "tpu", "--epochs", "1"], "device"),
    (["train", "--width", "8", "--epochs", "1"], "vit models have no setting width"),
])
def test_bad_train_arguments(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rest = [tok for flag, value in TINY_FLAGS.items() if flag not in argv for tok in (flag, value)]
    code, _, err = _run(capsys, *argv, *rest, "--no-progress", "--out", str(out))
    assert code == 2, err
    assert message in err and "error:" in err and "Traceback" not in err
    assert not out.exists(), "no output for a run that cannot start"


@pytest.mark.parametrize("argv, code, message", [
    (["train", "--model", "vit_p4_d8_32", "--dataset", "digits", "--out", "x"], 2, "missing --epochs"),
    (["train", "--model", "vit_p4_d8_32", "--dataset", "digits", "--epochs", "1"], 2, "--out DIR is required"),
    (["train", "--layers", "two"], 2, "comma-separated integers"),
    (["train", "--bogus"], 2, "unrecognized arguments"),
    (["evaluate", "{tmp}/none.safetensors"], 2, "no such checkpoint file"),
    (["evaluate", "{ckpt}", "--split", "holdout"], 2, "invalid choice"),
    (["evaluate", "{ckpt}", "--dataset", "shapes"], 2, "evaluate it on a dataset with the same classes"),
    (["compare", "--out", "{tmp}/c"], 2, "give --preset study"),
    (["compare", "--preset", "grand", "--out", "{tmp}/c"], 2, "invalid choice"),
    (["compare", "--models", "vit_p4_d8_32,nope", "--out", "{tmp}/c"], 2, "unknown model 'nope'"),
    (["compare", "--preset", "study", "--fractions", "0.5", "--out", "{tmp}/c"], 2, "only applies"),
    (["compare", "--preset", "data-efficiency", "--fractions", "0,2", "--out", "{tmp}/c"], 2, "(0, 1]"),
    ([], 2, "required"),
])
def test_bad_arguments_of_every_command(tmp_path, capsys, trained, argv, code, message):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(trained / "best.safetensors")) for a in argv]
    got, _, err = _run(capsys, *argv)
    assert got == code, err
    assert message in err and "Traceback" not in err


def test_existing_run_is_not_overwritten(trained, capsys):
    before = (trained / "best.safetensors").read_bytes()
    code, _, err = _run(capsys, "train", *TINY, "--epochs", "2", "--out", str(trained))
    assert code == 1 and "--resume" in err and "--overwrite" in err
    assert (trained / "best.safetensors").read_bytes() == before


def test_listings(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0 and "vit_p4_d8_32" in out and "resnet18_32" in out
    code, out, _ = _run(capsys, "models", "--family", "hybrid")
    assert code == 0 and "resnet18_32" not in out and "hybrid_r18_vit_32" in out
    code, out, _ = _run(capsys, "datasets")
    assert code == 0 and {"digits", "shapes"} <= set(out.split())


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "vitviz", "train", "--model", "nope", "--dataset", "digits",
                           "--epochs", "1", "--out", "unused"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ROOT / "unused").exists()


def test_train_command_reproduces_a_config():
    import shlex

    from vitviz.cli import build_parser, train_command, train_config_from_args
    from vitviz.training import TrainConfig

    config = TrainConfig(model="hybrid_r18_vit_32", dataset="shapes", epochs=11, out="somewhere", img_size=32,
                         layers=(1, 1, 1), width=16, pooling="mean", init="mimetic", flip=True, lr=2e-3,
                         progress=False, model_args={"backbone_block": "basic"}, clip_grad=0.0,
                         attention="fused")
    command = train_command(config, out="runs/x")
    assert command.startswith("vitviz train --model hybrid_r18_vit_32 --dataset shapes --epochs 11")
    assert "--progress" not in command and "--no-progress" not in command and "--lr 0.002" in command
    args = build_parser().parse_args(shlex.split(command)[1:])
    rebuilt = train_config_from_args(args)
    assert rebuilt == config.replace(out="runs/x", progress=True)
