"""Tests for vitviz.checkpoint: round trips per family, header-only reads, bad files, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from vitviz.checkpoint import (
    FORMAT_VERSION,
    CheckpointMeta,
    load_checkpoint,
    read_checkpoint_meta,
    read_safetensors,
    save_checkpoint,
    write_safetensors_atomic,
)
from vitviz.config import HybridConfig, ResNetConfig, ViTConfig
from vitviz.errors import CheckpointError, ConfigError
from vitviz.models import build_model

IMG = 16
TINY_VIT = ViTConfig(img_size=IMG, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
CONFIGS = {
    "vit": ("vit", TINY_VIT),
    "resnet": ("resnet", ResNetConfig(layers=(1, 1), width=8, stem="small", img_size=IMG, num_classes=3)),
    "hybrid": (
        "hybrid",
        HybridConfig(
            vit=ViTConfig(img_size=IMG, patch_size=1, embed_dim=16, depth=1, num_heads=2, num_classes=3),
            backbone_layers=(1, 1), backbone_block="basic", backbone_stem="small", backbone_width=8,
        ),
    ),
    # timm's own tiny test network, built with pretrained=False: every weight comes from the file.
    "hybrid_timm": (
        "hybrid",
        HybridConfig(
            vit=ViTConfig(img_size=32, patch_size=1, embed_dim=16, depth=1, num_heads=2, num_classes=3),
            backbone="timm:test_resnet", timm_out_index=1,
        ),
    ),
}
CLASSES = ["cat", "dog", "bird"]


def make_model(key: str = "vit", seed: int = 0) -> nn.Module:
    family, config = CONFIGS[key]
    torch.manual_seed(seed)
    model = build_model(family, config)
    with torch.no_grad():  # non-default buffers, so a lost BatchNorm statistic would show
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and "running" in name:
                buf.uniform_(0.5, 1.5)
    return model.eval()


def saved(tmp_path, key: str = "vit", name: str = "model.safetensors", **kwargs) -> tuple[nn.Module, object]:
    model = make_model(key)
    path = save_checkpoint(model, tmp_path / name, class_names=CLASSES, **kwargs)
    return model, path


def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("key", list(CONFIGS))
def test_round_trip_each_family(tmp_path, key):
    model = make_model(key)
    family, config = CONFIGS[key]
    metrics = {"test_accuracy": 0.75, "macro_precision": 0.7, "macro_recall": 0.72, "macro_f1": 0.71}
    path = save_checkpoint(
        model, tmp_path / "ck" / f"{key}.safetensors", dataset="shapes", class_names=CLASSES,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train_config={"epochs": 2, "lr": 1e-3},
        metrics=metrics, curves=[{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
    )
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    size = config.img_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    assert meta.family == family and meta.dataset == "shapes" and meta.class_names == CLASSES
    assert meta.img_size == size and meta.num_classes == 3
    assert meta.mean == (0.5, 0.5, 0.5) and meta.std == (0.25, 0.25, 0.25)
    assert meta.train_config == {"epochs": 2, "lr": 1e-3} and meta.metrics == metrics
    assert meta.curves == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}] and "created_at" in meta.extra
    assert meta.format_version == FORMAT_VERSION and meta.vitviz_version
    assert read_checkpoint_meta(path) == meta


def test_defaults_come_from_the_model(tmp_path):
    model, path = saved(tmp_path, "hybrid")
    meta = read_checkpoint_meta(path)
    assert meta.family == "hybrid" and meta.img_size == IMG  # from config.vit.img_size
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert meta.dataset is None and meta.metrics is None and meta.train_config is None
    assert meta.model_config["vit"]["embed_dim"] == 16


def test_meta_dict_round_trip_and_json(tmp_path):
    _, path = saved(tmp_path, metrics={"test_accuracy": np.float32(0.5), "per_class": np.array([1, 2, 3])})
    meta = read_checkpoint_meta(path)
    assert meta.metrics == {"test_accuracy": 0.5, "per_class": [1, 2, 3]}  # numpy made plain
    d = meta.to_dict()
    json.dumps(d)
    assert CheckpointMeta.from_dict(d) == meta
    assert isinstance(meta.mean, tuple)


def test_read_meta_loads_no_tensors(tmp_path, monkeypatch):
    _, path = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    assert read_checkpoint_meta(path).class_names == CLASSES


def test_never_calls_torch_load(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    load_checkpoint(path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickled.pt")


def test_wrapped_models_save_plain_keys(tmp_path):
    model = make_model("resnet")
    path = save_checkpoint(nn.DataParallel(model), tmp_path / "dp.safetensors")
    tensors, _ = read_safetensors(path)
    assert set(tensors) == set(model.state_dict())
    loaded, meta = load_checkpoint(path)
    assert meta.family == "resnet"


def test_shared_and_view_tensors_are_written(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"a": base, "tied": base, "row": base[1], "t": base.t(), "empty": torch.zeros(0)}
    path = write_safetensors_atomic(tmp_path / "s.safetensors", tensors, {"step": 7})
    back, meta = read_safetensors(path)
    assert meta == {"step": 7}
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    assert back["a"].untyped_storage().data_ptr() != back["tied"].untyped_storage().data_ptr()


def test_tied_weights_in_a_model(tmp_path):
    model = make_model("vit")
    model.extra_head = nn.Linear(16, 3)  # registered submodule whose weight aliases the real head's
    model.extra_head.weight = model.head.weight
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path)
    tensors, _ = read_safetensors(path)
    assert torch.equal(tensors["extra_head.weight"], tensors["head.weight"])


def test_sidecar_round_trip_and_is_not_a_model(tmp_path):
    state = {"opt.exp_avg.0": torch.randn(5), "step": torch.tensor(3)}
    path = write_safetensors_atomic(
        tmp_path / "run" / "state.safetensors", state, {"kind": "training_state", "epoch": np.int64(4)}
    )
    tensors, meta = read_safetensors(path)
    assert meta == {"kind": "training_state", "epoch": 4}
    assert torch.equal(tensors["opt.exp_avg.0"], state["opt.exp_avg.0"])
    with pytest.raises(CheckpointError, match=r"state.safetensors.*'training_state' file, not a model"):
        read_checkpoint_meta(path)
    bare = write_safetensors_atomic(tmp_path / "bare.safetensors", state, {"epoch": 4})
    with pytest.raises(CheckpointError, match=r"bare.safetensors.*lacks"):
        load_checkpoint(bare)


def test_file_mode_and_parents(tmp_path):
    _, path = saved(tmp_path, name="a/b/c/model.safetensors")
    assert path.is_file() and path.parent.name == "c"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert leftovers(path.parent) == []


# ---------------------------------------------------------------------------------------------
# save-time errors


def test_unserialisable_metadata_is_named_and_nothing_written(tmp_path):
    model = make_model()
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"cannot store metrics\['bad'\] \(set\)"):
        save_checkpoint(model, path, metrics={"ok": 1, "bad": {1, 2}})
    with pytest.raises(CheckpointError, match="callback"):
        save_checkpoint(model, path, callback=lambda: None)
    assert not path.exists() and leftovers(tmp_path) == []


def test_save_argument_errors(tmp_path):
    model = make_model()
    with pytest.raises(ConfigError, match="3 outputs"):
        save_checkpoint(model, tmp_path / "x.safetensors", class_names=["a", "b"])
    with pytest.raises(ConfigError, match="mean"):
        save_checkpoint(model, tmp_path / "x.safetensors", mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="std"):
        save_checkpoint(model, tmp_path / "x.safetensors", std=(0.5, 0.0, 0.5))
    with pytest.raises(ConfigError, match="family"):
        save_checkpoint(model, tmp_path / "x.safetensors", family="transformer")
    with pytest.raises(CheckpointError, match=r"no \.config"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "x.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        save_checkpoint(model, tmp_path / "dir.safetensors")


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_crash_at_rename_keeps_the_old_file(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*disk vanished"):
        save_checkpoint(make_model(seed=1), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_crash_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fp:
            fp.write(b"\x00" * 100)  # a partial file on disk, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_model(seed=1), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    loaded, _ = load_checkpoint(path)  # still a good checkpoint


def test_overwrite_replaces_content(tmp_path):
    _, path = saved(tmp_path)
    other = make_model(seed=5)
    save_checkpoint(other, path)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.head.weight, other.head.weight)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# bad files: every message names the file


def expect_error(path, pattern: str) -> None:
    for reader in (read_checkpoint_meta, load_checkpoint):
        with pytest.raises(CheckpointError, match=pattern) as info:
            reader(path)
        assert os.path.basename(path) in str(info.value), str(info.value)


def test_missing_directory_empty(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such checkpoint file")
    (tmp_path / "folder.safetensors").mkdir()
    expect_error(tmp_path / "folder.safetensors", "is a directory")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expect_error(tmp_path / "empty.safetensors", "is empty")


def test_truncated_files(tmp_path):
    _, path = saved(tmp_path)
    data = path.read_bytes()
    cuts = {"data.safetensors": len(data) - 10, "header.safetensors": 60, "tiny.safetensors": 5}
    for name, cut in cuts.items():
        (tmp_path / name).write_bytes(data[:cut])
        expect_error(tmp_path / name, "incomplete")


def test_garbage_files(tmp_path):
    (tmp_path / "text.safetensors").write_bytes(b"this is definitely not a checkpoint\n" * 20)
    expect_error(tmp_path / "text.safetensors", "not a vitviz checkpoint")
    (tmp_path / "small.safetensors").write_bytes(struct.pack("<Q", 5) + b"abcde")
    expect_error(tmp_path / "small.safetensors", "not a vitviz checkpoint")
    rng = np.random.default_rng(3)
    (tmp_path / "random.safetensors").write_bytes(b"\x00" + rng.bytes(999))
    expect_error(tmp_path / "random.safetensors", "not a vitviz checkpoint|incomplete")


def test_inconsistent_header_sizes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "sizes.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    expect_error(tmp_path / "sizes.safetensors", "wrong number of bytes")
    _, path = saved(tmp_path)
    (tmp_path / "trail.safetensors").write_bytes(path.read_bytes() + b"extra")
    expect_error(tmp_path / "trail.safetensors", "unexpected bytes")


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickled_torch_file(tmp_path, zipfile):
    path = tmp_path / f"legacy_{zipfile}.pt"
    torch.save(make_model().state_dict(), path, _use_new_zipfile_serialization=zipfile)
    expect_error(path, "pickled PyTorch file.*never unpickles.*save_checkpoint")


def test_metadata_missing_or_not_ours(tmp_path):
    t = {"w": torch.zeros(2)}
    safetensors.torch.save_file(t, tmp_path / "bare.safetensors")
    expect_error(tmp_path / "bare.safetensors", "without vitviz metadata")
    safetensors.torch.save_file(t, tmp_path / "other.safetensors", metadata={"format": "pt"})
    expect_error(tmp_path / "other.safetensors", "without vitviz metadata")
    safetensors.torch.save_file(t, tmp_path / "notjson.safetensors", metadata={"vitviz": "{oops"})
    expect_error(tmp_path / "notjson.safetensors", "not valid JSON")
    safetensors.torch.save_file(t, tmp_path / "array.safetensors", metadata={"vitviz": "[1, 2]"})
    expect_error(tmp_path / "array.safetensors", "not an object")


def rewrite(src, dst, *, meta_changes=None, tensors_fn=None):
    """Copy checkpoint ``src`` to ``dst`` with its metadata or tensors edited."""
    tensors, meta = read_safetensors(src)
    meta.update(meta_changes or {})
    if tensors_fn:
        tensors = tensors_fn(dict(tensors))
    return write_safetensors_atomic(dst, tensors, meta)


def test_bad_metadata_values(tmp_path):
    _, good = saved(tmp_path)
    cases = {
        "family.safetensors": ({"family": "transformer"}, "unknown model family 'transformer'"),
        "newer.safetensors": ({"format_version": FORMAT_VERSION + 1}, "newer vitviz"),
        "size.safetensors": ({"img_size": -3}, "img_size must be a positive integer"),
        "mean.safetensors": ({"mean": [0.5]}, "mean must be three numbers"),
        "names.safetensors": ({"class_names": "cat"}, "class_names must be a list"),
    }
    for name, (changes, pattern) in cases.items():
        expect_error(rewrite(good, tmp_path / name, meta_changes=changes), pattern)


def test_config_that_fails(tmp_path):
    _, good = saved(tmp_path)
    meta = read_checkpoint_meta(good)
    broken = {**meta.model_config, "num_heads": 5}  # 16 is not divisible by 5
    path = rewrite(good, tmp_path / "cfg.safetensors", meta_changes={"model_config": broken})
    with pytest.raises(CheckpointError, match=r"cfg.safetensors.*cannot be rebuilt.*num_heads"):
        load_checkpoint(path)
    unknown = {**meta.model_config, "wings": 2}
    path = rewrite(good, tmp_path / "cfg2.safetensors", meta_changes={"model_config": unknown})
    with pytest.raises(CheckpointError, match=r"cfg2.safetensors.*wings"):
        load_checkpoint(path)


def test_state_dict_mismatches(tmp_path):
    _, good = saved(tmp_path)

    def drop(t):
        del t["head.weight"]
        return t

    def add(t):
        t["surprise.weight"] = torch.zeros(1)
        return t

    def reshape(t):
        t["head.weight"] = torch.zeros(4, 16)
        return t

    missing = rewrite(good, tmp_path / "missing.safetensors", tensors_fn=drop)
    with pytest.raises(CheckpointError, match=r"missing.safetensors.*1 tensor missing: head.weight"):
        load_checkpoint(missing)
    unexpected = rewrite(good, tmp_path / "unexpected.safetensors", tensors_fn=add)
    with pytest.raises(CheckpointError, match=r"unexpected.safetensors.*1 tensor unexpected: surprise.weight"):
        load_checkpoint(unexpected)
    shape = rewrite(good, tmp_path / "shape.safetensors", tensors_fn=reshape)
    with pytest.raises(CheckpointError, match=r"shape.safetensors.*head.weight \(4, 16\) vs \(3, 16\)"):
        load_checkpoint(shape)

    # strict=False tolerates missing/unexpected keys, never wrong shapes.
    model, _ = load_checkpoint(unexpected, strict=False)
    model, _ = load_checkpoint(missing, strict=False)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(shape, strict=False)


# ---------------------------------------------------------------------------------------------
# devices


def test_devices(tmp_path):
    _, path = saved(tmp_path)
    model, _ = load_checkpoint(path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected
    with pytest.raises(ConfigError, match="unknown device"):
        load_checkpoint(path, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_checkpoint(path, device="cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            read_safetensors(path, device="cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip(tmp_path):
    model, path = saved(tmp_path)
    loaded, _ = load_checkpoint(path, device="cuda")
    assert next(loaded.parameters()).is_cuda
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.cuda()).cpu(), model(x), rtol=1e-4, atol=1e-5)
    tensors, _ = read_safetensors(path, device="cuda")
    assert all(t.is_cuda for t in tensors.values())
    # saving a CUDA model writes CPU tensors that load anywhere
    save_checkpoint(loaded, tmp_path / "from_cuda.safetensors")
    back, _ = load_checkpoint(tmp_path / "from_cuda.safetensors")
    assert torch.equal(back.head.weight, model.head.weight)


def test_typed_training_records_round_trip_and_older_files_are_read(tmp_path):
    """curves, confusion matrix, parameter count and training time are typed fields; files that kept them in
    ``extra`` (as vitviz train wrote them before) are read into the same fields."""
    import json

    from vitviz.checkpoint import CheckpointMeta, read_checkpoint_meta, save_checkpoint
    from vitviz.models import build_model
    from vitviz.models.registry import preset_config

    model = build_model(*preset_config("vit_p4_d8_32", num_classes=2))
    path = save_checkpoint(model, tmp_path / "m.safetensors", curves=[{"epoch": 1, "val_accuracy": 0.5}],
                           confusion_matrix=[[3, 1], [0, 4]], train_time_s=12.5)
    meta = read_checkpoint_meta(path)
    assert meta.curves == [{"epoch": 1, "val_accuracy": 0.5}] and meta.confusion_matrix == [[3, 1], [0, 4]]
    assert meta.num_params == sum(p.numel() for p in model.parameters()) and meta.train_time_s == 12.5
    assert "curves" not in meta.extra
    old = {k: v for k, v in meta.to_dict().items() if k not in ("curves", "confusion_matrix", "num_params",
                                                                  "train_time_s")}
    old["extra"] = {**old["extra"], "curves": meta.curves, "test_confusion_matrix": meta.confusion_matrix,
                    "num_params": meta.num_params, "train_time_s": 12.5}
    again = CheckpointMeta.from_dict(json.loads(json.dumps(old)))
    assert (again.curves, again.confusion_matrix, again.num_params, again.train_time_s) == (
        meta.curves, meta.confusion_matrix, meta.num_params, meta.train_time_s)
    assert "test_confusion_matrix" not in again.extra
    with pytest.raises(ConfigError, match="square table of counts"):
        save_checkpoint(model, tmp_path / "bad.safetensors", confusion_matrix=[[1, 2, 3], [4, 5, 6]])
