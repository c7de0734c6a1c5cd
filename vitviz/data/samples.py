"""The sample images that ship with vitviz and scikit-learn (no network): shapes scenes with their object
masks, digits of vitviz's own test split, and scikit-learn's two photos. The dashboard offers them, and
the OOD and trust checks use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PHOTOS", "Sample", "dataset_images", "dataset_samples", "default_sample", "load_sample", "sample_kind",
           "sample_names", "sklearn_image_dir"]



@dataclass(frozen=True)
class Sample:
    """A bundled image: uint8 RGB pixels, the object mask for shapes scenes, and its true label."""

    name: str
    kind: str  # "shapes" | "digits" | "photo"
    image: np.ndarray = field(compare=False, hash=False)  # (H, W, 3) uint8
    mask: np.ndarray | None = field(default=None, compare=False, hash=False)  # (H, W) bool
    label: str | None = None


SHAPES_SAMPLE_SEED = 20_250_101  # not a training seed: scenes no model was trained on
SHAPES_SAMPLE_SIZE = 64
DIGIT_SAMPLE_SIZE = 32
PHOTOS = ("china.jpg", "flower.jpg")


def sample_names() -> list[str]:
    """Names of the bundled samples, shapes first (they carry masks), then digits, then photos."""
    from vitviz.data.shapes import SHAPE_CLASSES

    return (
        [f"shapes · {c}" for c in SHAPE_CLASSES]
        + [f"digits · {d}" for d in range(10)]
        + [f"photo · {Path(p).stem}" for p in PHOTOS]
    )


def default_sample(dataset: str | None) -> str:
    """The sample that suits a model trained on ``dataset`` (a shapes scene unless it knows digits or photos)."""
    if dataset and "digit" in str(dataset).lower():
        return "digits · 3"
    if dataset and str(dataset).lower() in ("imagenet", "photo", "photos"):
        return "photo · flower"
    return "shapes · star"


def sample_kind(name: str) -> str:
    return name.split(" · ", 1)[0]


def load_sample(name: str) -> Sample:
    """Render or read one bundled sample by name (see :func:`sample_names`)."""
    kind, _, what = name.partition(" · ")
    if kind == "shapes":
        from vitviz.data.shapes import SHAPE_CLASSES, make_shapes

        if what not in SHAPE_CLASSES:
            raise KeyError(name)
        cls = SHAPE_CLASSES.index(what)
        images, labels, masks = make_shapes(2 * len(SHAPE_CLASSES), seed=SHAPES_SAMPLE_SEED,
                                            img_size=SHAPES_SAMPLE_SIZE)
        i = int(np.flatnonzero(labels == cls)[0])
        return Sample(name, kind, images[i], masks[i], what)
    if kind == "digits":
        digit = int(what)
        images, labels = _digit_test_images()
        i = int(np.flatnonzero(labels == digit)[0])
        gray = Image.fromarray(images[i]).resize((DIGIT_SAMPLE_SIZE, DIGIT_SAMPLE_SIZE), Image.Resampling.BILINEAR)
        return Sample(name, kind, np.asarray(gray.convert("RGB")), None, what)
    if kind == "photo":
        from vitviz.images import open_image

        path = sklearn_image_dir() / f"{what}.jpg"
        return Sample(name, kind, np.asarray(open_image(path)), None, None)
    raise KeyError(name)


def dataset_images(dataset: str | None, n: int) -> list[np.ndarray]:
    """``n`` bundled uint8 RGB images like a model's training data (shapes scenes, digits, else a mix)."""
    kind = str(dataset or "").lower()
    if "digit" in kind:
        images, _ = _digit_test_images()
        return [np.asarray(Image.fromarray(images[i % len(images)]).resize(
            (DIGIT_SAMPLE_SIZE, DIGIT_SAMPLE_SIZE), Image.Resampling.BILINEAR).convert("RGB")) for i in range(n)]
    from vitviz.data.shapes import make_shapes

    scenes = list(make_shapes(n, seed=SHAPES_SAMPLE_SEED, img_size=SHAPES_SAMPLE_SIZE)[0])
    if "shape" in kind or n < 4:
        return scenes
    photos = [load_sample(f"photo · {Path(p).stem}").image for p in PHOTOS]
    return (photos + scenes)[:n]


def dataset_samples(dataset: str | None) -> list[str]:
    """Sample names that suit a model trained on ``dataset`` (all of them when it is unknown)."""
    names = sample_names()
    kind = str(dataset or "").lower()
    for key in ("shapes", "digits"):
        if key in kind:
            return [n for n in names if sample_kind(n) == key]
    return names


def _digit_test_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits of vitviz's fixed test split (8x8 uint8, ink bright) and their labels."""
    from sklearn.datasets import load_digits

    from vitviz.data.datasets import SPLIT_SEED, TRAIN_VAL_TEST
    from vitviz.data.splits import stratified_partition

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    test = stratified_partition(labels, TRAIN_VAL_TEST, SPLIT_SEED)[2]
    gray = np.rint(bunch.images[test] * (255.0 / 16.0)).astype(np.uint8)
    return gray, labels[test]


def sklearn_image_dir() -> Path:
    """Folder of scikit-learn's bundled sample photos, found without importing scikit-learn (slow)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed; its sample photos are unavailable.")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
