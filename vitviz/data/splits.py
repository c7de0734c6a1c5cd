"""Containers for dataset splits and the seeded, stratified index arithmetic that makes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["DatasetSplits", "Source", "Split", "stratified_partition", "stratified_subset"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, kept in memory.

    ``images``: uint8 ``(N, 3, H, W)``; ``labels``: int64 ``(N,)``; ``masks``: bool ``(N, H, W)``
    object masks where the dataset has them (``shapes``), else ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor) -> Split:
        """The samples at ``index`` (integer positions), in that order."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        masks = self.masks[idx] if self.masks is not None else None
        return Split(self.images[idx], self.labels[idx], masks)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset ready for training: three splits, class names and the train split's pixel statistics.

    ``mean`` and ``std`` are per channel (R, G, B) in [0, 1] pixel units, computed on ``train``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> int:
        return int(self.train.images.shape[-1])


class Source(NamedTuple):
    """What a dataset reader produces before splitting, subsetting, resizing and statistics.

    ``val`` / ``test`` are ``None`` when the dataset has no such split of its own; they are then
    carved from ``train`` with a fixed seed.
    """

    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def stratified_partition(labels: np.ndarray | torch.Tensor, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split sample indices into ``len(fractions)`` parts with the same class proportions.

    Per class, the counts follow the fractions by largest remainder (they add up to the class size
    exactly), and a class with at least as many samples as there are parts puts one in each part,
    so a small class is not missing from validation or test. Returns sorted index arrays; the same
    ``labels``, ``fractions`` and ``seed`` always give the same parts.
    """
    y = _as_labels(labels)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.ndim != 1 or len(frac) < 1 or (frac < 0).any() or not np.isclose(frac.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and add up to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in frac]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        n = len(members)
        quota = frac * n
        counts = np.floor(quota).astype(np.int64)
        # Largest remainder: hand the leftover samples to the parts that lost the most by flooring.
        for k in np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]:
            counts[k] += 1
        if n >= len(frac):
            for k in np.flatnonzero((counts == 0) & (frac > 0)):
                counts[k] += 1
                counts[np.argmax(counts)] -= 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k in range(len(frac)):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def stratified_subset(labels: np.ndarray | torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset keeping ``fraction`` of every class (at least one sample each).

    Per class the kept count is ``round(fraction * class_size)`` (half up), at least 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    y = _as_labels(labels)
    rng = np.random.default_rng(seed)
    kept = []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        k = max(1, int(np.floor(fraction * len(members) + 0.5)))
        kept.append(members[:k])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
