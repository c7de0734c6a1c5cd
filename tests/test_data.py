"""Tests of vitviz.data: datasets, the shapes generator and batched augmentation.

Torchvision datasets are exercised with tiny files written here in their real on-disk formats
(CIFAR pickles as Python 2 wrote them, MNIST idx files), never downloaded.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitviz.data import (
    SHAPE_CLASSES,
    Augment,
    DatasetSplits,
    Split,
    list_datasets,
    load_dataset,
    make_shapes,
    mixup_cutmix,
    normalize,
    random_erase,
)
from vitviz.data.augment import _affine_matrices, _warp
from vitviz.data.datasets import build_splits, resize_masks
from vitviz.data.shapes import MASK_AREA_RANGE, SIZE_RANGE
from vitviz.data.splits import stratified_partition, stratified_subset
from vitviz.data.torchvision_sets import read_torchvision_set
from vitviz.errors import ConfigError, DatasetError

LUMA = np.array([0.299, 0.587, 0.114])


def _dilate(masks: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation with a 3x3 square, ``steps`` times, of bool (N, H, W)."""
    out = torch.from_numpy(masks)[:, None].float()
    for _ in range(steps):
        out = F.max_pool2d(out, 3, stride=1, padding=1)
    return out[:, 0].bool().numpy()


def _erode(masks: np.ndarray, steps: int) -> np.ndarray:
    return ~_dilate(~masks, steps)


# --------------------------------------------------------------------------------------------------
# shapes


@pytest.fixture(scope="module")
def scenes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_shapes(96, seed=7, img_size=32)


def test_make_shapes_shapes_and_dtypes(scenes):
    images, labels, masks = scenes
    assert images.shape == (96, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (96,) and labels.dtype == np.int64
    assert masks.shape == (96, 32, 32) and masks.dtype == np.bool_
    assert len(SHAPE_CLASSES) >= 6 and len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)


def test_make_shapes_is_deterministic_per_seed(scenes):
    again = make_shapes(96, seed=7, img_size=32)
    for a, b in zip(scenes, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_shapes(96, seed=8, img_size=32)
    assert not np.array_equal(scenes[0], other[0])
    assert not np.array_equal(scenes[2], other[2])


def test_make_shapes_classes_are_balanced(scenes):
    counts = np.bincount(scenes[1], minlength=len(SHAPE_CLASSES))
    assert counts.min() >= 1, "every class appears"
    assert counts.max() - counts.min() <= 1
    assert scenes[1].max() < len(SHAPE_CLASSES)


def test_make_shapes_masks_cover_a_sensible_area(scenes):
    masks = scenes[2]
    area = masks.mean(axis=(1, 2))
    assert area.min() >= MASK_AREA_RANGE[0] and area.max() <= MASK_AREA_RANGE[1]
    # The object's larger extent follows SIZE_RANGE (a rotated triangle spans at least 3/4 of its circle).
    extent = np.maximum(masks.any(axis=2).sum(axis=1), masks.any(axis=1).sum(axis=1)) / masks.shape[1]
    assert extent.min() >= 0.75 * SIZE_RANGE[0] and extent.max() <= SIZE_RANGE[1] + 2 / 32


def test_make_shapes_mask_is_the_object(scenes):
    images, _, masks = scenes
    img = images.astype(np.float64)
    interior = _erode(masks, 1)  # away from antialiased edges (thin rings at 32 px have none)
    ring = _dilate(masks, 3) & ~_dilate(masks, 1)  # background just outside the object
    closer_fraction, flat_pixels = [], []
    for i in range(len(images)):
        inside, around = img[i][masks[i]], img[i][ring[i]]  # (k, 3) each
        colour = np.median(inside, axis=0)
        # Mask pixels are at least half object: closer to the object's colour than to its surroundings.
        # (Edge pixels, half covered, are near the middle; small objects are mostly edge at 32 px.)
        closer = np.linalg.norm(inside - colour, axis=1) < np.linalg.norm(inside - around.mean(axis=0), axis=1)
        assert closer.mean() > 0.7, f"scene {i}: the mask holds more than the object"
        closer_fraction.append(closer.mean())
        assert abs((colour - around.mean(axis=0)) @ LUMA) > 60, f"scene {i}: object does not stand out"
        if interior[i].sum() >= 12:
            # One flat colour plus sensor noise (sigma ~5 levels): no clutter or background inside
            # (a few partly covered pixels at concave corners may differ).
            flat = np.abs(img[i][interior[i]] - colour).max(axis=1) < 25
            assert flat.mean() > 0.7, f"scene {i}: object not flat"
            flat_pixels.append(flat)
    assert np.mean(closer_fraction) > 0.9 and np.concatenate(flat_pixels).mean() > 0.95
    assert (interior.sum(axis=(1, 2)) >= 12).mean() > 0.7


def test_make_shapes_same_scene_at_any_resolution():
    """Scene parameters do not depend on resolution, so masks resized from 64 px match 96-px masks."""
    _, labels64, masks64 = make_shapes(40, seed=3, img_size=64)  # more scenes than one 96-px chunk
    _, labels96, masks96 = make_shapes(40, seed=3, img_size=96)
    np.testing.assert_array_equal(labels64, labels96)
    resized = resize_masks(torch.from_numpy(masks64), 96).numpy()
    iou = (resized & masks96).sum((1, 2)) / (resized | masks96).sum((1, 2))
    assert iou.min() > 0.85


def test_make_shapes_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        make_shapes(4, img_size=4)
    with pytest.raises(ConfigError):
        make_shapes(-1)
    assert make_shapes(0)[0].shape == (0, 32, 32, 3)


def test_load_shapes_has_fixed_splits_with_masks():
    ds = load_dataset("shapes", img_size=16, train_fraction=0.1, seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (600, 1000, 2000)
    assert ds.class_names == list(SHAPE_CLASSES)
    for split in (ds.train, ds.val, ds.test):
        assert split.masks is not None and split.masks.shape == (len(split), 16, 16)
        assert split.images.shape == (len(split), 3, 16, 16)
    again = load_dataset("shapes", img_size=16, train_fraction=0.1, seed=2)
    assert torch.equal(ds.test.images, again.test.images) and torch.equal(ds.test.masks, again.test.masks)
    assert not torch.equal(ds.train.labels, again.train.labels) or not torch.equal(ds.train.images, again.train.images)


# --------------------------------------------------------------------------------------------------
# digits, registry, splitting


def _recomputed_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = images.numpy().astype(np.float64) / 255.0  # (N, 3, H, W)
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits

    a = load_dataset("digits", img_size=8, seed=0)
    b = load_dataset("digits", img_size=8, seed=123)
    assert isinstance(a, DatasetSplits) and a.name == "digits"
    assert a.class_names == [str(d) for d in range(10)] and a.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)

    # Together the splits are exactly the 1,797 images, each once.
    full = np.rint(load_digits().images * 255.0 / 16.0).astype(np.uint8)
    ours = torch.cat([a.train.images, a.val.images, a.test.images])[:, 0].numpy()
    assert sorted(im.tobytes() for im in ours) == sorted(im.tobytes() for im in full)
    assert torch.equal(a.train.images[:, 0], a.train.images[:, 2]), "grey replicated to 3 channels"

    # Stratified 70/10/20: every class keeps those proportions to within one sample.
    total = np.bincount(load_digits().target, minlength=10)
    for split, frac in ((a.train, 0.7), (a.val, 0.1), (a.test, 0.2)):
        counts = np.bincount(split.labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * total) <= 1)


def test_digits_resized_with_train_statistics():
    ds = load_dataset("digits", img_size=24)
    assert ds.train.images.shape == (len(ds.train), 3, 24, 24) and ds.train.images.dtype == torch.uint8
    assert ds.test.labels.dtype == torch.int64 and ds.img_size == 24
    mean, std = _recomputed_stats(ds.train.images)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(ds.std, std, rtol=1e-9)
    assert len(ds.mean) == len(ds.std) == 3
    assert 0.05 < ds.mean[0] < 0.6 and 0.1 < ds.std[0] < 0.5  # mostly dark background, bright ink


def test_train_fraction_keeps_a_stratified_subset():
    full = load_dataset("digits", img_size=8)
    quarter = load_dataset("digits", img_size=8, train_fraction=0.25, seed=1)
    same = load_dataset("digits", img_size=8, train_fraction=0.25, seed=1)
    other = load_dataset("digits", img_size=8, train_fraction=0.25, seed=2)
    per_class = np.bincount(full.train.labels.numpy(), minlength=10)
    kept = np.bincount(quarter.train.labels.numpy(), minlength=10)
    assert np.all(np.abs(kept - 0.25 * per_class) <= 1)
    assert len(quarter.val) == len(full.val) and len(quarter.test) == len(full.test)
    assert torch.equal(quarter.test.images, full.test.images)
    assert torch.equal(quarter.train.images, same.train.images)
    assert not torch.equal(quarter.train.images, other.train.images)
    mean, _ = _recomputed_stats(quarter.train.images)
    np.testing.assert_allclose(quarter.mean, mean, rtol=1e-9)


def test_stratified_partition_properties():
    labels = np.repeat(np.arange(5), [3, 10, 17, 40, 2])
    parts = stratified_partition(labels, (0.7, 0.1, 0.2), seed=0)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels))), "disjoint and complete"
    for cls in range(4):  # classes with >= 3 samples reach every part
        assert all((labels[p] == cls).any() for p in parts)
    assert [p.tolist() for p in parts] == [p.tolist() for p in stratified_partition(labels, (0.7, 0.1, 0.2), 0)]
    sub = stratified_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [1, 1, 2, 4, 1]


def test_registry_names_and_errors():
    assert list_datasets() == ["digits", "shapes", "cifar10", "cifar100", "fashion-mnist", "mnist", "imagefolder"]
    with pytest.raises(DatasetError, match="known datasets: digits, shapes, cifar10"):
        load_dataset("imagenet-21k", img_size=32)
    with pytest.raises(ConfigError, match="img_size"):
        load_dataset("digits", img_size=4)
    with pytest.raises(ConfigError, match="img_size"):
        load_dataset("digits", img_size=100_000)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="train_fraction"):
            load_dataset("digits", img_size=8, train_fraction=bad)


# --------------------------------------------------------------------------------------------------
# torchvision datasets from tiny files in their real formats


class _Py2Str(str):
    """A str that pickles as Python 2's byte string (opcode SHORT_BINSTRING), like the CIFAR files."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _py2_pickle(obj, path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_pixels(labels: list[int]) -> np.ndarray:
    """(N, 3072) rows as CIFAR stores them: 1024 red, 1024 green, 1024 blue, row-major."""
    rows = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        rows[i, 0], rows[i, 1], rows[i, 2] = 10 * y, 100 + y, 250 - y  # channel-identifying values
        rows[i, 0, 0, :] = np.arange(32)  # a gradient along the top row: checks row-major order
    return rows.reshape(len(labels), 3072)


def _write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):  # 5 batches x 4 images: 20 train images, 2 per class
        labels = [(4 * (b - 1) + i) % 10 for i in range(4)]
        batch = {_Py2Str("batch_label"): _Py2Str(f"training batch {b} of 5"), _Py2Str("labels"): labels}
        batch[_Py2Str("data")] = _cifar_pixels(labels)
        _py2_pickle(batch, folder / f"data_batch_{b}")
    test_labels = list(range(10))
    _py2_pickle({_Py2Str("labels"): test_labels, _Py2Str("data"): _cifar_pixels(test_labels)}, folder / "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {_Py2Str("label_names"): [_Py2Str(n) for n in names], _Py2Str("num_vis"): 3072}
    _py2_pickle(meta, folder / "batches.meta")
    return names


def test_cifar10_real_format_through_torchvision(tmp_path):
    names = _write_cifar10(tmp_path)
    # The keys really are Python 2 byte strings (b"data" when read with encoding="bytes").
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")

    source = read_torchvision_set("cifar10", tmp_path, verify=False)
    ds = build_splits("cifar10", source, img_size=32)
    assert ds.class_names == names
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 10, 10)  # 2 per class: 1 stays, 1 to val
    assert ds.test.labels.tolist() == list(range(10))
    img = ds.test.images[3]  # label 3: R=30, G=103, B=247 and the gradient on the red top row
    assert img.shape == (3, 32, 32)
    assert img[0, 1:].unique().tolist() == [30] and img[1].unique().tolist() == [103]
    assert img[2].unique().tolist() == [247] and img[0, 0].tolist() == list(range(32))
    small = build_splits("cifar10", source, img_size=16)
    assert small.train.images.shape == (10, 3, 16, 16)


def test_cifar_public_loader_verifies_md5(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="integrity"):
        load_dataset("cifar10", img_size=32, root=tmp_path)


def test_cifar_missing_files_say_where_and_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-100-python.*download=True.*--download"):
        load_dataset("cifar100", img_size=32, root=tmp_path / "nowhere")


def test_cifar100_real_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for split, labels in (("train", fine), ("test", [2, 1, 0])):
        entry = {_Py2Str("fine_labels"): labels, _Py2Str("coarse_labels"): [0] * len(labels)}
        entry[_Py2Str("data")] = _cifar_pixels(labels)
        _py2_pickle(entry, folder / split)
    meta = {_Py2Str("fine_label_names"): [_Py2Str(n) for n in ("apple", "aquarium_fish", "baby")]}
    _py2_pickle(meta, folder / "meta")
    ds = build_splits("cifar100", read_torchvision_set("cifar100", tmp_path, verify=False), img_size=8)
    assert ds.class_names == ["apple", "aquarium_fish", "baby"]
    assert ds.test.labels.tolist() == [2, 1, 0] and ds.test.images.shape == (3, 3, 8, 8)
    assert len(ds.train) + len(ds.val) == 10 and len(ds.val) >= 3


def _idx_bytes(array: np.ndarray) -> bytes:
    """MNIST's idx format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train: int, n_test: int, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = np.arange(n, dtype=np.uint8) % 10
    for fname, arr in arrays.items():
        data = _idx_bytes(arr)
        if compress:
            (folder / f"{fname}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / fname).write_bytes(data)
    return arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]


def test_mnist_idx_files_load_end_to_end(tmp_path):
    test_images, test_labels = _write_mnist(tmp_path / "MNIST" / "raw", 40, 12, compress=False)
    ds = load_dataset("mnist", img_size=28, root=tmp_path)
    assert ds.class_names == [str(d) for d in range(10)]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 12)
    assert torch.equal(ds.test.images[:, 1], torch.from_numpy(test_images)), "pixels read unchanged"
    assert torch.equal(ds.test.images[:, 0], ds.test.images[:, 2]), "grey replicated to 3 channels"
    assert ds.test.labels.tolist() == test_labels.tolist()
    resized = load_dataset("mnist", img_size=16, root=tmp_path)
    assert resized.train.images.shape == (30, 3, 16, 16)


def test_fashion_mnist_from_gzipped_files(tmp_path):
    _write_mnist(tmp_path / "FashionMNIST" / "raw", 20, 5, compress=True)
    ds = load_dataset("fashion_mnist", img_size=12, root=tmp_path)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert len(ds.test) == 5 and ds.test.images.shape == (5, 3, 12, 12)


def test_malformed_idx_file_is_a_dataset_error(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw", 10, 5, compress=False)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x01garbage")
    with pytest.raises(DatasetError, match="MNIST"):
        load_dataset("mnist", img_size=28, root=tmp_path)


# --------------------------------------------------------------------------------------------------
# image folders


def _write_image(path, colour, size=(20, 14), mode="RGB", fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.convert(mode).save(path, format=fmt)


def _write_tree(root, classes=("blue", "green", "red"), per_class=10):
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    for name in classes:
        for i in range(per_class):
            if i % 3 == 0:
                _write_image(root / name / f"{i}.jpg", colours[name], size=(30, 18), fmt="JPEG")
            elif i % 3 == 1:
                _write_image(root / name / "nested" / f"{i}.PNG", colours[name], mode="RGBA")
            else:
                _write_image(root / name / f"{i}.png", colours[name], size=(9, 25), mode="P")
    (root / classes[0] / ".DS_Store").write_bytes(b"junk")
    (root / ".hidden").mkdir()
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_imagefolder_flat_layout(tmp_path):
    _write_tree(tmp_path)
    ds = load_dataset("imagefolder", img_size=16, root=tmp_path)
    assert ds.class_names == ["blue", "green", "red"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (21, 3, 6)  # 7/1/2 per class
    assert ds.train.images.shape == (21, 3, 16, 16) and ds.train.images.dtype == torch.uint8
    for cls, channel in ((0, 2), (1, 1), (2, 0)):  # blue, green, red: the dominant channel is right
        means = ds.train.images[ds.train.labels == cls].float().mean(dim=(0, 2, 3))
        assert means.argmax().item() == channel
    again = load_dataset("imagefolder", img_size=16, root=tmp_path, seed=9)
    assert torch.equal(ds.test.images, again.test.images), "fixed split"


def test_imagefolder_split_layout(tmp_path):
    _write_tree(tmp_path / "train", classes=("green", "red"), per_class=10)
    _write_tree(tmp_path / "test", classes=("green", "red"), per_class=3)
    ds = load_dataset("imagefolder", img_size=8, root=tmp_path)
    assert ds.class_names == ["green", "red"]
    assert len(ds.test) == 6 and (len(ds.train), len(ds.val)) == (18, 2)  # val carved from train


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", img_size=16, root=tmp_path / "missing")
    with pytest.raises(DatasetError, match="needs a root"):
        load_dataset("imagefolder", img_size=16)
    with pytest.raises(DatasetError, match="at least two class folders"):
        load_dataset("imagefolder", img_size=16, root=tmp_path)  # empty
    _write_tree(tmp_path / "one", classes=("red",), per_class=3)
    with pytest.raises(DatasetError, match="at least two class folders"):
        load_dataset("imagefolder", img_size=16, root=tmp_path / "one")
    _write_tree(tmp_path / "bad", classes=("green", "red"), per_class=3)
    (tmp_path / "bad" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("imagefolder", img_size=16, root=tmp_path / "bad")


# --------------------------------------------------------------------------------------------------
# augmentation


def _batch(b=16, size=12, seed=0) -> torch.Tensor:
    return torch.rand((b, 3, size, size), generator=torch.Generator().manual_seed(seed))


ALL_ON = dict(crop_padding=2, flip=True, affine=True, randaugment=True)


def test_augment_preserves_shape_dtype_device_and_range():
    x = _batch()
    out = Augment(**ALL_ON)(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    half = Augment(**ALL_ON)(x.double(), generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.float64


def test_augment_is_deterministic_with_a_generator():
    x, aug = _batch(), Augment(**ALL_ON)
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_identity_when_off():
    x = _batch()
    assert torch.equal(Augment()(x), x)
    assert not Augment().active and Augment(flip=True).active
    with pytest.raises(ConfigError, match="float batch"):
        Augment(flip=True)((x * 255).to(torch.uint8))


def test_flip_flips_some_images():
    x = _batch(b=32)
    out = Augment(flip=True)(x, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_crop_shifts_content_by_integer_offsets():
    x, p = _batch(b=24, size=10), 2
    out = Augment(crop_padding=p)(x, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (p,) * 4, mode="reflect")
    offsets = []
    for o, pad in zip(out, padded, strict=True):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(o, pad[:, dy : dy + 10, dx : dx + 10])
        ]
        assert hits, "every output is a window of the padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1 and any(off != (p, p) for off in offsets)
    with pytest.raises(ConfigError, match="crop_padding"):
        Augment(crop_padding=10)(x)


def test_affine_geometry():
    x = _batch(b=4, size=16)
    still = Augment(affine=True, max_rotate=0.0, max_scale=0.0, max_translate=0.0)(x)
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    zero, one = torch.zeros(4), torch.ones(4)
    shifted = _warp(x, _affine_matrices(zero, one, torch.full((4,), 0.25), zero, zero, zero), "zeros")
    torch.testing.assert_close(shifted[..., 4:], x[..., :-4], atol=1e-5, rtol=0)  # 1/4 of 16 px to the right
    assert shifted[..., :4].abs().max() < 1e-6
    quarter = _warp(x, _affine_matrices(torch.full((4,), torch.pi / 2), one, zero, zero, zero, zero), "zeros")
    torch.testing.assert_close(quarter, torch.rot90(x, k=-1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_randaugment_changes_images_within_range():
    x = _batch(b=64)
    out = Augment(randaugment=True, randaugment_ops=2, randaugment_magnitude=15)(
        x, generator=torch.Generator().manual_seed(0)
    )
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.sum() > 32 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ConfigError):
        Augment(randaugment=True, randaugment_magnitude=31)


def test_mixup_targets_match_the_mixed_images():
    b = 8
    x, y = _batch(b=b), torch.arange(b)  # one class per image: a target row names its partners
    mixed, t = mixup_cutmix(x, y, b, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.sum(1), torch.ones(b))
    torch.testing.assert_close(mixed.flatten(1), t @ x.flatten(1), atol=1e-5, rtol=0)
    again, t2 = mixup_cutmix(x, y, b, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, mixed) and torch.equal(t2, t)


def test_cutmix_targets_match_pasted_area():
    b = 8
    x, y = _batch(b=b, size=16), torch.arange(b)
    mixed, t = mixup_cutmix(x, y, b, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t.sum(1), torch.ones(b))
    own = (mixed == x).all(dim=1).float().mean(dim=(1, 2))  # fraction of pixels still from the image itself
    for i in range(b):
        if t[i, i] < 1:  # paired with another image
            assert abs(own[i].item() - t[i, i].item()) < 1e-6


def test_mixup_off_returns_one_hot_and_normalize():
    x, y = _batch(b=4), torch.tensor([0, 2, 1, 2])
    same, t = mixup_cutmix(x, y, 3)
    assert same is x and torch.equal(t, F.one_hot(y, 3).float())
    soft = torch.full((4, 3), 1 / 3)
    _, t_soft = mixup_cutmix(x, soft, 3, mixup_alpha=1.0)
    torch.testing.assert_close(t_soft.sum(1), torch.ones(4))

    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (u8.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normalize(u8, mean, std), expected)
    torch.testing.assert_close(normalize(u8.float() / 255, mean, std), expected)
    with pytest.raises(ConfigError):
        normalize(u8, mean, (0.2, 0.0, 0.1))


def test_random_erase_blanks_one_rectangle_per_chosen_image():
    b, h, w = 400, 16, 24
    x = torch.randn(b, 3, h, w) + 5.0  # no pixel is 0 before erasing
    out = random_erase(x, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    erased = out == 0  # (B, 3, H, W)
    assert torch.equal(erased.all(1), erased.any(1)), "every channel of an erased pixel is the fill"
    kept = ~erased
    assert torch.equal(out[kept], x[kept]), "pixels outside the rectangle are untouched"
    hit = erased.all(1)  # (B, H, W)
    chosen = hit.flatten(1).any(1)  # (B,)
    assert 0.4 < chosen.float().mean() < 0.6  # prob 0.5 per image
    for i in torch.nonzero(chosen).flatten().tolist():
        rows, cols = hit[i].any(1).nonzero().flatten(), hit[i].any(0).nonzero().flatten()
        # one solid rectangle: its bounding box is all erased
        assert hit[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert int(hit[i].sum()) == len(rows) * len(cols) and len(rows) == rows.max() - rows.min() + 1
        assert int(hit[i].sum()) <= h * w / 3 + max(h, w) + 1  # at most a third of the image (plus rounding)
    again = random_erase(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    assert torch.equal(random_erase(x, 0.0), x)
    assert random_erase(x, 1.0).eq(0).all(1).flatten(1).any(1).all()
    assert random_erase(x, 1.0, fill=-7.0).eq(-7.0).all(1).flatten(1).any(1).all()
    with pytest.raises(ConfigError, match="random-erasing probability"):
        random_erase(x, 1.5)


def test_split_subset_keeps_masks():
    split = Split(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), torch.zeros(4, 8, 8, dtype=torch.bool))
    sub = split.subset(np.array([3, 1]))
    assert sub.labels.tolist() == [3, 1] and sub.masks.shape == (2, 8, 8) and len(sub) == 2
