"""Datasets as in-memory uint8 tensors, and batched augmentation that runs where the batch is.

``load_dataset(name, img_size=...)`` gives train/val/test :class:`Split` s, class names and the
train split's per-channel mean/std; ``make_shapes`` renders the procedural shapes scenes with their
ground-truth object masks; :mod:`vitviz.data.augment` augments batches on the training device.
"""

from vitviz.data.augment import Augment, mixup_cutmix, normalize, random_erase
from vitviz.data.datasets import default_data_root, list_datasets, load_dataset
from vitviz.data.shapes import SHAPE_CLASSES, make_shapes
from vitviz.data.splits import DatasetSplits, Split

__all__ = [
    "SHAPE_CLASSES",
    "Augment",
    "DatasetSplits",
    "Split",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "make_shapes",
    "mixup_cutmix",
    "normalize",
    "random_erase",
]
