"""The CKA grid of every layer of one model against every layer of another, streamed in batches.

:func:`cka_matrix` runs both models on one batch at a time, turns each layer's features into an
(n, n) kernel at once and adds the batch's unbiased HSIC values to running sums
(:class:`~vitviz.represent.cka.MinibatchCKA`): memory is one batch of features per layer, whatever
the dataset's size. Under ``torchrun`` each process takes every world-size-th batch and the sums are
added across processes, so the grid equals the single-process one (up to float64 rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.errors import ConfigError
from vitviz.represent.cka import MinibatchCKA
from vitviz.represent.features import REPRESENTATIONS, layer_features
from vitviz.represent.subjects import Subject, as_subject, prepare

__all__ = ["CKAResult", "Progress", "batches_of", "cka_matrix", "world"]

Progress = Callable[[int, int | None], None]  # (batches done, batches in all: None when not known in advance)


@dataclass
class CKAResult:
    """A (layers_a, layers_b) CKA grid with the layer labels and how it was computed."""

    grid: np.ndarray
    name_a: str
    name_b: str
    labels_a: list[str]
    labels_b: list[str]
    stages_a: list[int] = field(default_factory=list)
    stages_b: list[int] = field(default_factory=list)
    rep: str = "flat"
    examples: int = 0
    batches: int = 0
    world_size: int = 1  # processes the batches were shared over
    rank_batches: list[int] = field(default_factory=list)  # batches each process computed, by rank

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.name_a, "b": self.name_b, "rep": self.rep, "examples": self.examples,
                "batches": self.batches, "world_size": self.world_size, "rank_batches": self.rank_batches,
                "labels_a": self.labels_a, "labels_b": self.labels_b,
                "stages_a": self.stages_a, "stages_b": self.stages_b,
                "grid": [[round(float(v), 6) for v in row] for row in self.grid]}


def world() -> tuple[int, int]:
    """(rank, world size) of the process group ``torchrun`` set up, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batches_of(images: Any, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None, int | None]:
    """(batches, how many, examples) of ``images``; "how many" and "examples" are None where unknown in advance.

    ``images``: a (N, 3, H, W) tensor (cut into ``batch_size`` batches, the tail batch keeps what is
    left), a dataset split (``.images``), a :class:`~vitviz.data.DatasetSplits` (its *test* split), or an
    iterable of batches (tensors or (images, labels) pairs, e.g. a DataLoader) that is read lazily, one
    batch at a time: nothing holds more than the batch in hand.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise ConfigError(f"batch_size must be an integer of at least 4 (the estimator's minimum), got {batch_size}.")
    from vitviz.data.splits import DatasetSplits

    data = images.test if isinstance(images, DatasetSplits) else images
    data = getattr(data, "images", data)
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ConfigError(f"images must be a (N, C, H, W) batch, got shape {tuple(data.shape)}.")
        n = int(data.shape[0])
        return (data[i:i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size), n
    if isinstance(data, Iterable):
        try:
            total: int | None = len(data)  # type: ignore[arg-type]  # a DataLoader knows its batch count
        except TypeError:
            total = None
        return _stream(data), total, None
    raise ConfigError(f"expected images as a tensor, a dataset split or batches, got {type(images).__name__}.")


def _stream(data: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The image tensor of each item, pulled one at a time."""
    for k, item in enumerate(data):
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ConfigError(f"batch {k} is not a (B, C, H, W) tensor (got {getattr(batch, 'shape', type(batch))}); "
                              "give batches of images, or (images, labels) pairs.")
        yield batch


def cka_matrix(model_a: nn.Module | Subject, model_b: nn.Module | Subject, images: Any, *, rep: str = "flat",
               batch_size: int = 128, progress: bool | Progress = False,
               distributed: bool | None = None) -> CKAResult:
    """Linear CKA of every layer of ``model_a`` with every layer of ``model_b`` over ``images``.

    ``images``: uint8 (N, 3, H, W) (each model resizes and normalises them as it was trained, when
    given as a :class:`Subject`), float tensors fed as they are, a dataset split or an iterable of
    batches (see :func:`batches_of`: an iterable is read one batch at a time). ``rep``: how a layer
    becomes one vector per image (:data:`REPRESENTATIONS`). Batches of fewer than 4 images are skipped
    (the estimator needs 4). ``progress``: a tqdm bar (True) or a callback. ``distributed``: shard over
    the ``torchrun`` processes (default: when there are several): process r computes batches r, r +
    world size, ...; every process reads the whole iterable, so give each the full dataset, not one
    already split by a DistributedSampler.
    """
    if rep not in REPRESENTATIONS:
        raise ConfigError(f"unknown representation {rep!r}; use one of {', '.join(REPRESENTATIONS)}.")
    a, b = as_subject(model_a, "A"), as_subject(model_b, "B")
    same = a.model is b.model and a.img_size == b.img_size and a.mean == b.mean and a.std == b.std
    batches, total, _ = batches_of(images, batch_size)
    rank, size = world() if distributed is not False else (0, 1)
    acc: MinibatchCKA | None = None
    labels: tuple[list[str], list[str], list[int], list[int]] | None = None
    examples = 0
    bar = _bar(progress, total, rank)
    try:
        for k, batch in enumerate(batches):
            if k % size != rank or batch.shape[0] < 4:
                _step(bar, k + 1, total)
                continue
            pass_a = layer_features(a.model, prepare(a, batch))
            pass_b = pass_a if same else layer_features(b.model, prepare(b, batch))
            if acc is None:
                acc = MinibatchCKA(len(pass_a.layers), len(pass_b.layers))
                labels = (pass_a.labels, pass_b.labels, [f.stage for f in pass_a.layers],
                          [f.stage for f in pass_b.layers])
            acc.update([f.vector(rep) for f in pass_a.layers], [f.vector(rep) for f in pass_b.layers])
            examples += int(batch.shape[0])
            del pass_a, pass_b  # one batch of features at a time
            _step(bar, k + 1, total)
    finally:
        if bar is not None and not callable(bar):
            bar.close()
    rank_batches = [acc.batches if acc is not None else 0]
    if size > 1:
        acc, labels, examples, rank_batches = _reduce(acc, labels, examples, a, b, rank, size)
    if acc is None or labels is None:
        raise ConfigError("no batch of at least 4 images to compare; give more images (or a larger batch_size).")
    return CKAResult(grid=acc.value(), name_a=a.name, name_b=b.name, labels_a=labels[0], labels_b=labels[1],
                     stages_a=labels[2], stages_b=labels[3], rep=rep, examples=examples, batches=acc.batches,
                     world_size=size, rank_batches=rank_batches)


def _reduce(acc: MinibatchCKA | None, labels: Any, examples: int, a: Subject, b: Subject, rank: int, size: int):
    """Sum the running HSIC sums (and example counts) over the processes of the group, and gather how many
    batches each process computed (a run whose processes each did everything shows there)."""
    import torch.distributed as dist

    from vitviz.represent.features import layer_labels

    if labels is None:  # this rank had no batch: it still joins the reduction with zeros
        la, lb = layer_labels(a.model), layer_labels(b.model)
        acc = MinibatchCKA(len(la), len(lb))
        labels = (la, lb, [], [])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine = torch.zeros(size, dtype=torch.float64)
    mine[rank] = float(acc.batches)  # (world,) this rank's count in its own slot: the sum gathers them all
    flat = torch.cat([acc.sums(), torch.tensor([float(examples)], dtype=torch.float64), mine]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    per_rank = [int(round(float(v))) for v in flat[-size:]]
    flat = flat[:-size]
    acc.load_sums(flat[:-1])
    if not labels[2]:
        from vitviz.explain.adapters import adapter_for

        labels = (labels[0], labels[1], [layer.stage for layer in adapter_for(a.model).layers()],
                  [layer.stage for layer in adapter_for(b.model).layers()])
    return (acc if acc.batches else None), labels, int(round(float(flat[-1]))), per_rank


def _bar(progress: bool | Progress, total: int, rank: int):
    if callable(progress):
        return progress
    if progress and rank == 0:
        from tqdm import tqdm

        return tqdm(total=total, desc="CKA", unit="batch", leave=False)
    return None


def _step(bar: Any, done: int, total: int) -> None:
    if bar is None:
        return
    if callable(bar) and not hasattr(bar, "update"):
        bar(done, total)
    else:
        bar.update(1)
