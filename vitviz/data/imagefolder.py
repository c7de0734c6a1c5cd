"""Any folder-per-class tree of images: ``root/<class>/**/*.png|jpg|...``.

Two layouts:

* flat: ``root/<class>/...``; the data loader splits it 70/10/20 (stratified, fixed seed);
* split: ``root/train/<class>/...`` plus optional ``root/val/`` (or ``valid/``, ``validation/``) and
  ``root/test/``; a missing val or test split is carved from train with a fixed seed.

Class names are the sorted class-folder names of the training tree. Hidden files and folders are
skipped. Every image is decoded through :func:`vitviz.images.open_image` (the one door for image
bytes: safe decoding, EXIF orientation, deliberate conversion to RGB) and fitted to the model's
square with :func:`vitviz.images.fit_image`, exactly as at inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitviz.data.splits import Source, Split
from vitviz.errors import DatasetError, InvalidImageError

__all__ = ["IMAGE_EXTENSIONS", "read_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_VAL_NAMES = ("val", "valid", "validation")


def _visible(path: Path | str) -> bool:
    return not Path(path).name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


def _image_files(folder: Path) -> list[Path]:
    files = (
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and all(_visible(q) for q in p.relative_to(folder).parts)
    )
    return sorted(files)


def _has_images(folder: Path) -> bool:
    return any(_image_files(d) for d in _class_dirs(folder))


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files of a folder-per-class tree."""
    tree = {d.name: _image_files(d) for d in _class_dirs(folder)}
    empty = [name for name, files in tree.items() if not files]
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(empty)} in {folder} hold no images (accepted: "
            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders."
        )
    return tree


def _load(tree: dict[str, list[Path]], class_index: dict[str, int], img_size: int, where: Path) -> Split:
    from vitviz.images import fit_image, open_image

    unknown = sorted(set(tree) - set(class_index))
    if unknown:
        raise DatasetError(
            f"{where} has class folder(s) {', '.join(unknown)} that the training folder lacks; "
            "every class needs training images."
        )
    pixels, labels = [], []
    for name, files in tree.items():
        for path in files:
            try:
                image = fit_image(open_image(path), img_size)
            except InvalidImageError as err:
                raise DatasetError(f"cannot use {path} as a training image: {err} Fix or remove the file.") from err
            pixels.append(np.asarray(image, dtype=np.uint8))  # (S, S, 3)
            labels.append(class_index[name])
    if not pixels:
        return Split(torch.zeros((0, 3, img_size, img_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def read_image_folder(root: str | Path, *, img_size: int) -> Source:
    """Read a folder-per-class image tree into uint8 splits of side ``img_size`` (see the module doc)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"image folder {root} does not exist or is not a folder; pass the folder that holds one "
            "sub-folder of images per class."
        )
    train_dir = root / "train"
    split_layout = train_dir.is_dir() and _has_images(train_dir)
    train_tree = _scan(train_dir if split_layout else root)
    if len(train_tree) < 2:
        found = f"only {next(iter(train_tree))!r}" if train_tree else "none"
        raise DatasetError(
            f"{train_dir if split_layout else root} needs at least two class folders with images "
            f"(found {found}); lay it out as root/<class>/<image files>."
        )
    class_names = sorted(train_tree)
    class_index = {name: i for i, name in enumerate(class_names)}
    train = _load(train_tree, class_index, img_size, root)
    val = test = None
    if split_layout:
        val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
        if val_dir is not None:
            val = _load(_scan(val_dir), class_index, img_size, val_dir)
        if (root / "test").is_dir():
            test = _load(_scan(root / "test"), class_index, img_size, root / "test")
    return Source(train, val, test, class_names)
