"""CIFAR-10/100, MNIST and Fashion-MNIST through torchvision's dataset classes.

torchvision does the downloading, the integrity checks and the file parsing; we check first which
files are missing (to say exactly where they are expected), translate its errors into
:class:`~vitviz.errors.DatasetError`, and take its ``data``/``targets`` arrays whole (no per-image
``__getitem__``).

Integrity, as torchvision 0.29 does it:

* CIFAR files are Python pickles. torchvision checks the md5 of every batch and of the meta file
  before unpickling, so only the genuine files are ever unpickled. We keep that check on every
  public path. ``verify=False`` (tests only: they write tiny files in the real format, whose md5s
  cannot match) uses a subclass that sets the md5 sums to ``None``, with which torchvision's own
  ``check_integrity`` checks only that each file exists; the reading code is torchvision's, unchanged.
  It is deliberately not reachable from :func:`vitviz.data.load_dataset`: unpickling a file we
  have not verified could run arbitrary code.
* MNIST-style idx files are plain arrays (no code can hide in them); torchvision checks only that
  the four decompressed files exist, so test files go through the real class unchanged.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitviz.data.splits import Source, Split
from vitviz.errors import DatasetError

__all__ = ["TORCHVISION_SETS", "read_torchvision_set"]

TORCHVISION_SETS = ("cifar10", "cifar100", "fashion-mnist", "mnist")


def _classes(name: str) -> Any:
    from torchvision import datasets

    return {
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
    }[name]


def _without_md5(cls: Any) -> Any:
    """A CIFAR class whose md5 sums are ``None``: torchvision then checks that files exist, nothing more."""

    class Unverified(cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Instance attributes shadow the class's lists, which torchvision reads through ``self``.
            self.train_list = [[fname, None] for fname, _ in cls.train_list]
            self.test_list = [[fname, None] for fname, _ in cls.test_list]
            self.meta = {**cls.meta, "md5": None}
            super().__init__(*args, **kwargs)

    Unverified.__name__ = f"Unverified{cls.__name__}"
    return Unverified


def _cifar_files(cls: Any, root: Path) -> tuple[Path, list[str]]:
    folder = root / cls.base_folder
    names = [fname for fname, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return folder, names


def _mnist_files(cls: Any, root: Path) -> tuple[Path, list[str]]:
    folder = root / cls.__name__ / "raw"
    return folder, [Path(fname).stem for fname, _ in cls.resources]  # "train-images-idx3-ubyte.gz" -> stem


def _gunzip_local_copies(folder: Path, names: list[str]) -> None:
    """Decompress ``X.gz`` next to a missing ``X``, as torchvision's download step would have."""
    for fname in names:
        target, packed = folder / fname, folder / f"{fname}.gz"
        if not target.exists() and packed.is_file():
            tmp = target.with_name(target.name + ".partial")
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)  # atomic: an interrupted run leaves no half file under the real name


def read_torchvision_set(name: str, root: str | Path, *, download: bool = False, verify: bool = True) -> Source:
    """Read a torchvision dataset's train and test splits from ``root`` (downloading if asked).

    Images come back as uint8 ``(N, 3, H, W)`` (grayscale replicated to three channels), labels as
    int64. ``verify=False`` skips CIFAR's md5 checks; only for files you wrote yourself (tests).
    """
    if name not in TORCHVISION_SETS:
        raise DatasetError(f"{name!r} is not a torchvision dataset we read; choose one of {TORCHVISION_SETS}.")
    root = Path(root).expanduser()
    cls = _classes(name)
    is_cifar = name.startswith("cifar")
    folder, names = (_cifar_files if is_cifar else _mnist_files)(cls, root)
    if not is_cifar:
        try:
            _gunzip_local_copies(folder, names)
        except (OSError, EOFError) as err:
            raise DatasetError(
                f"cannot decompress the {name} files in {folder}: {err}; delete them and retry."
            ) from err
    missing = [fname for fname in names if not (folder / fname).is_file()]
    if missing and not download:
        raise DatasetError(
            f"{name} not found: expected {', '.join(missing)} in {folder}. Pass download=True (CLI: --download) "
            f"to fetch it there, or point root (CLI: --data-root) at the folder that contains "
            f"{folder.relative_to(root).parts[0]!r}."
        )
    ds_cls = _without_md5(cls) if is_cifar and not verify else cls
    try:
        train = ds_cls(str(root), train=True, download=download)
        test = ds_cls(str(root), train=False, download=False)
    except RuntimeError as err:
        if download:
            raise DatasetError(f"could not download or read {name} into {root}: {err}") from err
        raise DatasetError(
            f"the {name} files in {folder} are not the original ones (integrity check failed: {err}). "
            "Delete them and pass download=True (CLI: --download) to fetch them again."
        ) from err
    except (OSError, ValueError, TypeError, AssertionError, KeyError, EOFError) as err:
        # Malformed files: bad idx headers (assert/ValueError), truncated pickles, missing keys.
        raise DatasetError(
            f"cannot read the {name} files in {folder}: {err!r}; delete them and download again."
        ) from err
    class_names = [str(d) for d in range(10)] if name == "mnist" else [str(c) for c in train.classes]
    return Source(_to_split(train.data, train.targets), None, _to_split(test.data, test.targets), class_names)


def _to_split(data: Any, targets: Any) -> Split:
    images = torch.as_tensor(np.asarray(data))
    if images.dtype != torch.uint8:
        raise DatasetError(f"expected uint8 pixels, got {images.dtype}; the dataset files look malformed.")
    if images.ndim == 3:  # (N, H, W) grayscale -> three identical channels
        images = images[:, None].expand(-1, 3, -1, -1)
    else:  # (N, H, W, 3) as torchvision keeps CIFAR
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{images.shape[0]} images but {labels.shape[0]} labels; the dataset files look malformed.")
    return Split(images.contiguous(), labels)  # (N, 3, H, W) uint8, (N,) int64
