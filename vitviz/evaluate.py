"""Evaluate a model on a dataset split: loss, accuracy, macro precision / recall / F1, confusion matrix.

:func:`confusion_and_loss` is the one batched inference loop (used by training's validation, where
ranks evaluate shards and sum their matrices); :func:`evaluate` turns it into a report and
:func:`evaluate_checkpoint` is what ``vitviz evaluate`` runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitviz.data.augment import normalize
from vitviz.data.splits import Split
from vitviz.errors import ConfigError, DatasetError
from vitviz.metrics import classification_report, confusion_matrix

__all__ = ["SPLITS", "autocast", "confusion_and_loss", "evaluate", "evaluate_checkpoint"]

SPLITS = ("train", "val", "test")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``dtype`` is given, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def confusion_and_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion matrix ``(K, K)`` int64 and summed cross-entropy (a 0-d float64 tensor), on ``device``.

    ``images`` are uint8 ``(N, 3, H, W)`` (on any device; moved batch by batch); the model is put in
    eval mode and left there.
    """
    device = torch.device(device)
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)  # (B, 3, H, W)
        y = labels[start : start + batch_size].to(device, non_blocking=True)  # (B,)
        with autocast(device, amp_dtype):
            logits = model(x.contiguous(memory_format=fmt))  # (B, K)
        logits = logits.float()
        if logits.shape[-1] != num_classes:
            raise ConfigError(
                f"the model has {logits.shape[-1]} outputs but the dataset has {num_classes} classes; "
                "evaluate it on the dataset it was trained on."
            )
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        cm += confusion_matrix(logits.argmax(dim=-1), y, num_classes)
    return cm, loss_sum


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Report of ``model`` on ``split``: ``loss``, ``accuracy``, ``macro_*``, ``per_class``, ``confusion_matrix``."""
    if len(split) == 0:
        raise DatasetError("cannot evaluate on an empty split.")
    cm, loss_sum = confusion_and_loss(
        model, split.images, split.labels, num_classes=len(class_names), mean=mean, std=std,
        batch_size=batch_size, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
    )
    report = classification_report(cm, class_names)
    return {"loss": float(loss_sum) / len(split), **report}


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    split: str = "test",
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    device: str = "auto",
    batch_size: int = 512,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint and evaluate it on a dataset split (by default the one it was trained on).

    Preprocessing (image size, mean and std) comes from the checkpoint, as the model was trained
    with it. Returns :func:`evaluate`'s report plus ``checkpoint``, ``dataset``, ``split`` and
    ``num_samples``.
    """
    from vitviz.checkpoint import load_checkpoint, read_checkpoint_meta
    from vitviz.data import load_dataset

    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    meta = read_checkpoint_meta(path)  # cheap: fails on a bad file before any data is loaded
    name = dataset or meta.dataset
    if not name:
        raise ConfigError(f"{path} does not record the dataset it was trained on; pass --dataset NAME.")
    data = load_dataset(name, img_size=meta.img_size, root=data_root, download=download)
    if meta.class_names is not None and list(meta.class_names) != list(data.class_names):
        raise ConfigError(
            f"{path} was trained on classes {meta.class_names[:10]}..., but {name!r} has classes "
            f"{data.class_names[:10]}...; evaluate it on a dataset with the same classes."
        )
    model, meta = load_checkpoint(path, device=device)
    dev = next(model.parameters()).device
    part: Split = getattr(data, split)
    if limit is not None:
        part = part.subset(torch.arange(min(limit, len(part))))
    report = evaluate(model, part, mean=meta.mean, std=meta.std, class_names=data.class_names,
                      batch_size=batch_size, device=dev)
    return {"checkpoint": str(path), "dataset": name, "split": split, **report}


def predict_proba(model: Any, x: Any) -> np.ndarray:
    """Class probabilities (B, classes) of a batch, as float64 numpy (softmax of the logits)."""
    import torch

    with torch.inference_mode():
        logits = model(x)
    return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)


def topk(probs: np.ndarray, class_names: Sequence[str], k: int = 5) -> list[tuple[str, float, int]]:
    """The ``k`` most probable classes of one probability vector: (name, probability, index), best first."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    k = max(1, min(int(k), p.size))
    idx = np.argsort(-p, kind="stable")[:k]
    return [(class_names[i] if i < len(class_names) else f"class {i}", float(p[i]), int(i)) for i in idx]
