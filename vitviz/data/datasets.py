"""The dataset registry: names to readers, and the one pipeline every dataset goes through.

``load_dataset`` = read (a reader per dataset gives a :class:`Source`) -> carve the missing
validation/test splits with a fixed seed -> keep a stratified ``train_fraction`` of train (seeded
by the user's ``seed``) -> resize to ``img_size`` -> per-channel statistics of the train split.

Fixed seeds make validation and test sets the same in every run, whatever the user's seed, so test
accuracies are comparable across runs and studies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitviz.data.shapes import SHAPE_CLASSES, make_shapes
from vitviz.data.splits import DatasetSplits, Source, Split, stratified_partition, stratified_subset
from vitviz.errors import ConfigError, DatasetError

__all__ = [
    "MAX_IMG_SIZE",
    "MIN_IMG_SIZE",
    "build_splits",
    "channel_stats",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "resize_masks",
    "resize_uint8",
]

MIN_IMG_SIZE, MAX_IMG_SIZE = 8, 1024
SPLIT_SEED = 20_240_611  # fixed, not the user's seed: the same val/test samples in every run
VAL_FRACTION = 0.1  # validation carved from train when a dataset has no validation split
TRAIN_VAL_TEST = (0.7, 0.1, 0.2)  # datasets that come as one pool (digits, flat image folders)
SHAPES_SIZES = {"train": 6000, "val": 1000, "test": 2000}
SHAPES_SEEDS = {"train": 1_000_001, "val": 1_000_002, "test": 1_000_003}  # distinct and fixed
# Shapes render in numpy at ~0.3 ms per 32-px scene and ~1 ms at 64 px (rendering cost grows with the
# pixel count); larger sizes render at 64 px and are resized like every other dataset (masks too), so a
# 224-px shapes dataset loads in about 15-30 s on two cores instead of minutes.
SHAPES_MAX_RENDER = 64
_RESIZE_CHUNK_PIXELS = 2**24  # values per resize chunk: bounds the float temporaries to ~64 MB each

Reader = Callable[[Path | None, bool, int], Source]  # (root, download, img_size) -> Source


def default_data_root() -> Path:
    """Where downloads go and local copies are looked for when no root is given.

    ``$VITVIZ_DATA`` if set, else ``~/.cache/vitviz/data``.
    """
    return Path(os.environ.get("VITVIZ_DATA", "~/.cache/vitviz/data")).expanduser()


# --------------------------------------------------------------------------------------------------
# readers of the bundled / generated datasets (the torchvision ones and image folders have modules)


def _read_digits(root: Path | None, download: bool, img_size: int) -> Source:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, offline), in one fixed stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), ink is bright
    images = torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    pool = Split(images, labels)
    train, val, test = (pool.subset(i) for i in stratified_partition(labels, TRAIN_VAL_TEST, SPLIT_SEED))
    return Source(train, val, test, [str(d) for d in range(10)])


def _read_shapes(root: Path | None, download: bool, img_size: int) -> Source:
    """The procedural shapes scenes (see :mod:`vitviz.data.shapes`), each split from its own fixed seed."""
    render = min(img_size, SHAPES_MAX_RENDER)
    splits = {}
    for part, n in SHAPES_SIZES.items():
        images, labels, masks = make_shapes(n, seed=SHAPES_SEEDS[part], img_size=render)
        splits[part] = Split(
            torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # (N, 3, H, W)
            torch.from_numpy(labels),
            torch.from_numpy(masks),
        )
    return Source(splits["train"], splits["val"], splits["test"], list(SHAPE_CLASSES))


def _read_torchvision(name: str) -> Reader:
    def read(root: Path | None, download: bool, img_size: int) -> Source:
        from vitviz.data.torchvision_sets import read_torchvision_set

        return read_torchvision_set(name, root if root is not None else default_data_root(), download=download)

    return read


def _read_imagefolder(root: Path | None, download: bool, img_size: int) -> Source:
    from vitviz.data.imagefolder import read_image_folder

    if root is None:
        raise DatasetError(
            "the imagefolder dataset needs a root: pass root= (CLI: --data-root) pointing at a folder "
            "with one sub-folder of images per class."
        )
    return read_image_folder(root, img_size=img_size)


_REGISTRY: dict[str, Reader] = {
    "digits": _read_digits,
    "shapes": _read_shapes,
    "cifar10": _read_torchvision("cifar10"),
    "cifar100": _read_torchvision("cifar100"),
    "fashion-mnist": _read_torchvision("fashion-mnist"),
    "mnist": _read_torchvision("mnist"),
    "imagefolder": _read_imagefolder,
}


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts."""
    return list(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# tensor helpers of the pipeline


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``(N, C, h, w)`` to ``(N, C, size, size)``: bilinear, antialiased, in chunks.

    Returns the input itself when it already has that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8, device=images.device)
    chunk = max(1, _RESIZE_CHUNK_PIXELS // (images.shape[1] * size * size))
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk]  # (n, C, h, w)
        # antialias=True low-pass filters when shrinking (a no-op when enlarging), as PIL does. On the
        # CPU torch resamples uint8 directly (3x faster than through float, within 1 level of it).
        if x.device.type != "cpu":
            x = x.float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if y.dtype != torch.uint8:
            y = y.round_().clamp_(0, 255).to(torch.uint8)
        out[start : start + chunk] = y  # (n, C, size, size)
    return out


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Resize bool ``(N, h, w)`` masks like their images: bilinear coverage, kept where >= 1/2."""
    if masks.shape[-2:] == (size, size):
        return masks
    out = torch.empty((masks.shape[0], size, size), dtype=torch.bool, device=masks.device)
    chunk = max(1, _RESIZE_CHUNK_PIXELS // (size * size))
    shrink = size < max(masks.shape[-2:])  # the antialiasing filter only matters when shrinking
    for start in range(0, masks.shape[0], chunk):
        x = masks[start : start + chunk, None].float()  # (n, 1, h, w)
        cover = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + chunk] = cover[:, 0] >= 0.5  # (n, size, size)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, 3, H, W)`` images, in [0, 1] units.

    Exact: computed from per-channel histograms of the 256 levels (10x faster than float sums, and
    no float copy of a large train split), accumulated over chunks of images.
    """
    if images.shape[0] == 0:
        raise DatasetError("cannot compute pixel statistics of an empty train split.")
    channels = images.shape[1]
    hist = torch.zeros((channels, 256), dtype=torch.int64)
    chunk = max(1, _RESIZE_CHUNK_PIXELS // images[0].numel())
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].cpu()  # (n, C, H, W) uint8
        for c in range(channels):
            hist[c] += torch.bincount(x[:, c].reshape(-1), minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255.0  # (256,)
    freq = hist.double() / hist.sum(dim=1, keepdim=True)  # (C, 256)
    mean = freq @ levels
    std = (freq @ (levels * levels) - mean * mean).clamp_min(0.0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _resize_split(split: Split, size: int) -> Split:
    masks = resize_masks(split.masks, size) if split.masks is not None else None
    return Split(resize_uint8(split.images, size), split.labels, masks)


def build_splits(
    name: str, source: Source, *, img_size: int, train_fraction: float = 1.0, seed: int = 0
) -> DatasetSplits:
    """Turn a reader's :class:`Source` into :class:`DatasetSplits` (the second half of :func:`load_dataset`)."""
    train, val, test = source.train, source.val, source.test
    if test is None:
        # One pool: 70/10/20 (a given val split stays, and train keeps the remaining 80 %).
        fractions = TRAIN_VAL_TEST if val is None else (0.8, 0.0, 0.2)
        tr, va, te = stratified_partition(train.labels, fractions, SPLIT_SEED)
        train, val, test = train.subset(tr), val if val is not None else train.subset(va), train.subset(te)
    elif val is None:
        tr, va = stratified_partition(train.labels, (1.0 - VAL_FRACTION, VAL_FRACTION), SPLIT_SEED)
        train, val = train.subset(tr), train.subset(va)
    if train_fraction < 1.0:
        train = train.subset(stratified_subset(train.labels, train_fraction, seed))
    if len(train) == 0:
        raise DatasetError(f"dataset {name!r} has no training images; check its files.")
    train, val, test = (_resize_split(s, img_size) for s in (train, val, test))
    mean, std = channel_stats(train.images)
    return DatasetSplits(name, train, val, test, list(source.class_names), mean, std)


# --------------------------------------------------------------------------------------------------
# the public entry point


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)


def load_dataset(
    name: str,
    *,
    img_size: int,
    root: str | Path | None = None,
    download: bool = False,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> DatasetSplits:
    """Load a dataset as in-memory uint8 splits resized to ``img_size`` x ``img_size``.

    Args:
        name: one of :func:`list_datasets` (case and ``_``/``-`` are forgiven).
        img_size: output side in pixels, 8 to 1024.
        root: folder holding the dataset files (torchvision sets: default :func:`default_data_root`;
            ``imagefolder``: required). Ignored by ``digits`` and ``shapes``.
        download: let torchvision download a missing torchvision set into ``root``.
        train_fraction: keep this stratified fraction of the training split, chosen by ``seed``;
            validation and test stay whole.
        seed: seeds only the ``train_fraction`` subset; val/test splits use fixed seeds.

    Raises:
        DatasetError: unknown name, missing or malformed files.
        ConfigError: impossible ``img_size`` or ``train_fraction``.
    """
    key = _canonical_name(name)
    if key not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}.")
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)):
        raise ConfigError(f"img_size must be an integer number of pixels, got {img_size!r}.")
    if not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:
        raise ConfigError(f"img_size must be from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} pixels, got {img_size}.")
    fraction_ok = isinstance(train_fraction, (int, float)) and not isinstance(train_fraction, bool)
    if not fraction_ok or not 0.0 < train_fraction <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1] (e.g. 0.1 for 10 %), got {train_fraction!r}.")
    source = _REGISTRY[key](Path(root).expanduser() if root is not None else None, bool(download), int(img_size))
    return build_splits(key, source, img_size=int(img_size), train_fraction=float(train_fraction), seed=int(seed))
