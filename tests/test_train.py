"""Training end to end on tiny budgets: outputs, every dataset path, exact resume, NaN stop, DDP.

Models are a few thousand parameters, images 16 px and a few hundred at most, one CPU thread each,
so the whole file runs in well under a minute on two shared cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitviz.checkpoint import load_checkpoint, read_checkpoint_meta, read_safetensors
from vitviz.data import load_dataset
from vitviz.errors import ConfigError, DatasetError, TrainingError
from vitviz.evaluate import evaluate, evaluate_checkpoint
from vitviz.training import TrainConfig, train
from vitviz.training import loop as loop_module
from vitviz.training.ema import WeightEma

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"model": "vit_p4_d8_32", "img_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2}
# Dropout, stochastic depth, affine + crop augmentation, MixUp/CutMix and random erasing: every random stream
# is in use.
RANDOMISED = {"dropout": 0.1, "drop_path": 0.1, "affine": True, "crop_padding": 2, "mixup": 0.2, "cutmix": 0.5,
              "random_erase": 0.25}
# ... and a weight average, whose state the sidecar must carry too
RESUME_RUN = {**TINY_VIT, **RANDOMISED, "dataset": "digits", "epochs": 4, "limit_train": 480, "limit_eval": 40,
              "batch_size": 8, "seed": 3, "ema": 0.9}


def _config(out: Path, **kw) -> TrainConfig:
    base = {**TINY_VIT, "dataset": "digits", "epochs": 2, "limit_train": 64, "limit_eval": 40, "batch_size": 32,
            "threads": 1, "progress": False}
    return TrainConfig.from_dict({**base, "out": str(out), **kw})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), f"{a.name}: different tensor names"
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a.name}: tensors differ bit-wise: {different[:5]}"


def _log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


_TIMING = {"images_per_s", "epoch_time_s", "elapsed_s", "cpu_s"}


def _assert_same_log(a: Path, b: Path) -> None:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]
    assert strip(_log_rows(a)) == strip(_log_rows(b))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(_config(out, **RESUME_RUN))
    assert result.finished and result.epochs_done == 4
    return out


# --------------------------------------------------------------------------------------------------
# outputs


def test_run_writes_checkpoints_log_and_metadata(tmp_path):
    out = tmp_path / "run"
    seen = []
    result = train(_config(out, epochs=3, lr=3e-3), on_epoch_end=seen.append)
    assert result.finished and result.epochs_done == 3 and [r["epoch"] for r in seen] == [1, 2, 3]
    assert {p.name for p in out.iterdir()} == {"best.safetensors", "last.safetensors", "last.state.safetensors",
                                              "log.jsonl", "results.json"}
    rows = _log_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key

    meta = read_checkpoint_meta(out / "best.safetensors")
    assert meta.family == "vit" and meta.dataset == "digits" and meta.img_size == 16
    assert meta.class_names == [str(d) for d in range(10)]
    assert all(0.0 < v < 1.0 for v in (*meta.mean, *meta.std))
    assert meta.train_config == _config(out, epochs=3, lr=3e-3).to_dict(), "every setting is recorded"
    for key in ("test_accuracy", "test_macro_precision", "test_macro_recall", "test_macro_f1", "val_accuracy"):
        assert key in meta.metrics, key
    assert meta.metrics["epoch"] == result.best_epoch
    assert [r["epoch"] for r in meta.curves] == [1, 2, 3]
    assert len(meta.confusion_matrix) == 10
    assert sum(map(sum, meta.confusion_matrix)) == meta.metrics["test_num_samples"]  # each test image once
    from vitviz.checkpoint import load_checkpoint

    assert meta.num_params == sum(p.numel() for p in load_checkpoint(out / "best.safetensors")[0].parameters())
    assert meta.train_time_s is not None and meta.train_time_s > 0

    # The stored test accuracy is what `vitviz evaluate` reports for the best checkpoint.
    report = evaluate_checkpoint(out / "best.safetensors", device="cpu", limit=None)
    assert report["dataset"] == "digits" and report["split"] == "test"
    full_test = report["num_samples"]
    assert full_test > 40  # limit_eval applied to the run only
    limited = evaluate_checkpoint(out / "best.safetensors", device="cpu", limit=40)
    assert limited["num_samples"] == 40
    model, last_meta = load_checkpoint(out / "last.safetensors")
    assert last_meta.extra["epochs_done"] == 3 and not model.training


@pytest.mark.parametrize("model, settings", [
    ("hybrid_r18_vit_32", {"embed_dim": 16, "depth": 1, "num_heads": 2, "width": 8, "layers": (1, 1, 1)}),
    ("resnet18_32", {"width": 8, "layers": (1, 1), "channels_last": "on"}),
])
def test_cnn_families_train_on_shapes(tmp_path, model, settings):
    result = train(_config(tmp_path / "run", model=model, dataset="shapes", epochs=1, img_size=16, limit_train=48,
                           **{k: v for k, v in settings.items()}, **_no_vit_overrides(model)))
    meta = read_checkpoint_meta(result.best_path)
    assert meta.family == model[:6] and meta.dataset == "shapes" and len(meta.class_names) == 8
    assert 0.0 <= meta.metrics["test_accuracy"] <= 1.0


def _no_vit_overrides(model: str) -> dict:
    # TINY_VIT's patch_size-free overrides do not apply to a ResNet: clear them.
    if model.startswith("resnet"):
        return {"embed_dim": None, "depth": None, "num_heads": None}
    return {}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_format_dataset_trains(tmp_path):
    """A tiny MNIST in its real idx format goes through torchvision's reader and trains."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    result = train(_config(tmp_path / "run", dataset="mnist", data_root=str(tmp_path / "data"), epochs=1))
    assert read_checkpoint_meta(result.best_path).dataset == "mnist"


def test_select_last_keeps_the_final_epoch_and_mimetic_init_and_distillation_train(tmp_path):
    teacher = train(_config(tmp_path / "teacher", model="resnet18_32", width=8, layers=(1, 1), embed_dim=None,
                            depth=None, num_heads=None, epochs=1))
    result = train(_config(tmp_path / "student", epochs=2, select="last", init="mimetic",
                           distill=str(teacher.best_path), distill_alpha=0.5, distill_temperature=2.0))
    assert result.best_epoch == 2
    _assert_same_tensors(result.best_path, result.last_path)
    meta = read_checkpoint_meta(result.best_path)
    assert meta.train_config["init"] == "mimetic" and meta.train_config["distill"] == str(teacher.best_path)
    assert "test_accuracy" in meta.metrics


def test_mimetic_init_sets_attention_near_identity_and_sincos_positions():
    from vitviz import create_model
    from vitviz.training.init import mimetic_init, sincos_pos_embed

    model = create_model("vit_p4_d8_32", img_size=16, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    mimetic_init(model)
    attn = model.blocks[0].attn
    wq, wk, wv = attn.qkv.weight.view(3, 32, 32)
    vo = attn.proj.weight @ wv  # W_o W_v ~ 0.4 Z - 0.4 I
    assert vo.diagonal().mean().item() == pytest.approx(-0.4, abs=0.1)
    qk = sum(wq[h * 16 : (h + 1) * 16].T @ wk[h * 16 : (h + 1) * 16] for h in range(2))
    assert qk.diagonal().mean().item() > 3 * (qk - torch.diag(qk.diagonal())).abs().mean().item()
    assert torch.equal(model.pos_embed[0, 1:], sincos_pos_embed((4, 4), 32))
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))


def test_bad_teacher_and_init_for_a_cnn_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="init 'mimetic' applies to ViTs"):
        train(_config(tmp_path / "a", model="resnet18_32", embed_dim=None, depth=None, num_heads=None,
                      init="mimetic"))
    shapes_teacher = train(_config(tmp_path / "t", model="resnet18_32", dataset="shapes", width=8, layers=(1,),
                                   embed_dim=None, depth=None, num_heads=None, epochs=1, limit_train=16))
    with pytest.raises(ConfigError, match="distil from a model trained on the same dataset"):
        train(_config(tmp_path / "b", distill=str(shapes_teacher.best_path)))
    with pytest.raises(ConfigError, match="select must be one of"):
        _config(tmp_path / "c", select="best")


def test_image_folder_dataset_trains(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        folder = tmp_path / "images" / cls
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    result = train(_config(tmp_path / "run", dataset="imagefolder", data_root=str(tmp_path / "images"), epochs=1,
                           batch_size=8))
    meta = read_checkpoint_meta(result.best_path)
    assert meta.dataset == "imagefolder" and meta.class_names == ["blue", "red"]


# --------------------------------------------------------------------------------------------------
# weight averaging


def test_weight_ema_follows_the_model_with_a_warming_up_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(model, decay=0.5)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 3
    ema.update(model, step=0)  # decay min(0.5, 1/10) = 0.1: the first updates mostly take the model's weights
    first = 0.1 * w0 + 0.9 * (w0 + 1.0)
    torch.testing.assert_close(ema.module[0].weight, first)
    assert int(ema.module[1].num_batches_tracked) == 3  # integer buffers are copied, not averaged
    ema.update(model, step=1000)  # past the warm-up: the configured decay
    torch.testing.assert_close(ema.module[0].weight, 0.5 * first + 0.5 * (w0 + 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert model[0].weight.requires_grad, "the trained model is untouched"


def test_ema_run_validates_and_saves_the_average(straight_run):
    sidecar = _tensors(straight_run / "last.state.safetensors")
    average = {k.removeprefix("ema."): v for k, v in sidecar.items() if k.startswith("ema.")}
    raw = {k.removeprefix("model."): v for k, v in sidecar.items() if k.startswith("model.")}
    assert average.keys() == raw.keys()
    last = _tensors(straight_run / "last.safetensors")
    assert all(torch.equal(last[k], average[k]) for k in average)
    assert any(not torch.equal(average[k], raw[k]) for k in raw if raw[k].is_floating_point())
    # the validation accuracy logged for the last epoch is the average's
    model, meta = load_checkpoint(straight_run / "last.safetensors")
    data = load_dataset("digits", img_size=16)
    val_split = loop_module._seeded_subset(data.val, RESUME_RUN["limit_eval"], 1)  # the run's validation images
    val = evaluate(model, val_split, mean=meta.mean, std=meta.std, class_names=data.class_names)
    assert val["accuracy"] == pytest.approx(_log_rows(straight_run)[-1]["val_accuracy"])


# --------------------------------------------------------------------------------------------------
# exact resume


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, straight_run):
    out = tmp_path / "run"
    first = train(_config(out, **RESUME_RUN, stop_after=1))
    assert not first.finished and first.epochs_done == 1 and not (out / "results.json").exists()
    resumed = train(_config(out, **RESUME_RUN, resume=True))
    assert resumed.finished and resumed.epochs_done == 4
    for name in ("last.safetensors", "best.safetensors", "last.state.safetensors"):
        _assert_same_tensors(straight_run / name, out / name)
    _assert_same_log(straight_run, out)
    assert resumed.test == json.loads((straight_run / "results.json").read_text())["test"]


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, straight_run):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "vitviz", "train", "--out", str(out)] + _flags(_config(out, **RESUME_RUN))
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.state.safetensors").exists():  # epoch 1 is done: kill inside epoch 2
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run wrote no training state"
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed; make its epochs longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    train(_config(out, **RESUME_RUN, resume=True))
    for name in ("last.safetensors", "best.safetensors", "last.state.safetensors"):
        _assert_same_tensors(straight_run / name, out / name)
    _assert_same_log(straight_run, out)


def test_kill_between_state_and_last_writes_is_repaired(tmp_path, straight_run, monkeypatch):
    """A crash after the sidecar but before last.safetensors: resume rewrites last, then finishes identically."""
    out = tmp_path / "run"
    real_save = loop_module._Run._save
    calls = {"last": 0}

    def crash_on_second_last(self, name, *args, **kwargs):
        if name == "last.safetensors":
            calls["last"] += 1
            if calls["last"] == 2:
                raise KeyboardInterrupt  # as if killed right after the epoch-2 sidecar
        return real_save(self, name, *args, **kwargs)

    monkeypatch.setattr(loop_module._Run, "_save", crash_on_second_last)
    with pytest.raises(KeyboardInterrupt):
        train(_config(out, **RESUME_RUN))
    monkeypatch.setattr(loop_module._Run, "_save", real_save)
    assert read_checkpoint_meta(out / "last.safetensors").extra["epochs_done"] == 1  # lags the sidecar (2)
    train(_config(out, **RESUME_RUN, resume=True, stop_after=2))
    assert read_checkpoint_meta(out / "last.safetensors").extra["epochs_done"] == 2, "repaired from the sidecar"
    train(_config(out, **RESUME_RUN, resume=True))
    for name in ("last.safetensors", "best.safetensors"):
        _assert_same_tensors(straight_run / name, out / name)


def _flags(config: TrainConfig) -> list[str]:
    """CLI flags reproducing a TrainConfig (for subprocess runs)."""
    flags = []
    for key, value in config.to_dict().items():
        if key == "out" or value is None or value == {} or value is False and key != "progress":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, str(value)]
    return flags


# --------------------------------------------------------------------------------------------------
# failure modes


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = loop_module.build_model
    calls = {"train": 0}

    def build_poisoned(family, config):
        model = real_build(family, config)

        def poison(module, inputs, output):
            if module.training:
                calls["train"] += 1
                if calls["train"] > 2:  # epoch 1 has 2 steps (64 images, batch 32); epoch 2 goes NaN
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(loop_module, "build_model", build_poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite .* epoch 2") as err:
        train(_config(out, epochs=3))
    assert "last good checkpoints" in str(err.value)
    model, meta = load_checkpoint(out / "last.safetensors")
    assert meta.extra["epochs_done"] == 1
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    assert [r["epoch"] for r in _log_rows(out)] == [1]


def test_bad_settings_fail_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown model"):
        train(_config(out, model="vit_nonexistent"))
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        train(_config(out, img_size=18))
    with pytest.raises(DatasetError, match="unknown dataset"):
        train(_config(out, dataset="nonexistent"))
    with pytest.raises(DatasetError):
        train(_config(out, dataset="cifar10", data_root=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="lr"):
        _config(out, lr=-1.0)
    with pytest.raises(ConfigError, match="warmup"):
        _config(out, warmup_epochs=5)
    with pytest.raises(ConfigError, match="ema must be"):
        _config(out, ema=1.0)
    with pytest.raises(ConfigError, match="random_erase must be"):
        _config(out, random_erase=1.5)
    assert not out.exists(), "nothing is written for a run that cannot start"


def test_existing_runs_are_protected_and_resume_checks_settings(tmp_path):
    out = tmp_path / "run"
    train(_config(out, epochs=2, stop_after=1))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(_config(out, epochs=2))
    with pytest.raises(TrainingError, match="lr: 0.001 -> 0.01"):
        train(_config(out, epochs=2, lr=1e-2, resume=True))
    result = train(_config(out, epochs=2, resume=True, device="cpu"))  # device may change on resume
    assert result.finished and result.epochs_done == 2
    again = train(_config(out, epochs=2, resume=True))  # a finished run resumes to itself
    assert again.epochs_done == 2
    fresh = train(_config(out, epochs=1, overwrite=True))
    assert fresh.epochs_done == 1 and [r["epoch"] for r in _log_rows(out)] == [1]


def test_resume_with_nothing_to_resume_starts_fresh(tmp_path):
    result = train(_config(tmp_path / "run", epochs=1, resume=True))
    assert result.finished and result.epochs_done == 1


# --------------------------------------------------------------------------------------------------
# data parallel


def test_torchrun_two_processes_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vitviz", "train", "--out", str(out), *_flags(_config(out, epochs=2, limit_train=60))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr
    rows = _log_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    meta = read_checkpoint_meta(out / "best.safetensors")
    assert "test_accuracy" in meta.metrics
    _, state = read_safetensors(out / "last.state.safetensors")
    assert state["world_size"] == 2
    tensors = _tensors(out / "last.state.safetensors")
    # Each rank has its own augmentation stream; the data order is shared (then sharded).
    assert not torch.equal(tensors["rng.0.aug"], tensors["rng.1.aug"])
    assert torch.equal(tensors["rng.0.data"], tensors["rng.1.data"])
    # Validation is sharded and all-reduced: it equals one process evaluating all 40 images (a ViT has no
    # BatchNorm, so every rank holds the same weights).
    model, meta_last = load_checkpoint(out / "last.safetensors")
    data = load_dataset("digits", img_size=16)
    val = loop_module._seeded_subset(data.val, 40, 1)
    report = evaluate(model, val, mean=meta_last.mean, std=meta_last.std, class_names=data.class_names)
    assert rows[-1]["val_accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert rows[-1]["val_loss"] == pytest.approx(report["loss"], rel=1e-4)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] == meta.metrics["test_accuracy"]


@pytest.mark.parametrize(("attention", "fused_in_training"), [("auto", False), ("fused", True)])
def test_attention_setting_picks_the_training_kernel(tmp_path, fused_attention_calls, attention, fused_in_training):
    train(_config(tmp_path / attention, attention=attention, epochs=1))
    assert any(fused_attention_calls) is fused_in_training  # True entries: calls in a training forward
    assert fused_attention_calls.count(False) > 0  # validation and test always take the fused kernel


def test_configs_saved_before_the_attention_setting_rerun_with_the_fused_kernel(tmp_path):
    legacy = _config(tmp_path).to_dict()
    del legacy["attention"]  # what runs and checkpoints written before the setting hold
    assert TrainConfig.from_saved(legacy).attention == "fused"
    assert TrainConfig.from_dict(legacy).attention == "auto"  # new configs default to auto
    assert TrainConfig.from_saved(_config(tmp_path, attention="explicit").to_dict()).attention == "explicit"
    with pytest.raises(ConfigError, match="attention must be one of"):
        _config(tmp_path, attention="flash")


def test_random_erasing_reaches_every_training_batch(tmp_path, monkeypatch):
    real = loop_module.random_erase
    batches: list[torch.Tensor] = []

    def spied(x: torch.Tensor, prob: float, generator=None) -> torch.Tensor:
        out = real(x, prob, generator)
        batches.append(out.eq(0).all(1).flatten(1).any(1))  # (B,) images with a mean-colour rectangle
        return out

    monkeypatch.setattr(loop_module, "random_erase", spied)
    train(_config(tmp_path / "off", epochs=1))
    assert not batches, "off by default"
    result = train(_config(tmp_path / "on", epochs=1, random_erase=1.0))
    assert len(batches) == 2  # 64 images in batches of 32
    assert all(b.all() for b in batches), "probability 1 erases a rectangle in every image"
    saved = load_checkpoint(tmp_path / "on" / "last.safetensors")[1]
    assert saved.train_config["random_erase"] == 1.0
    assert result.finished
