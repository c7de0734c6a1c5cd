"""Classification metrics from a confusion matrix: accuracy, macro precision / recall / F1, per class.

Everything is computed from one integer confusion matrix, so metrics of a sharded evaluation are the
metrics of the all-reduced (summed) matrix, and the numbers agree with scikit-learn's
``precision_recall_fscore_support(average="macro", zero_division=0)`` over all classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["classification_report", "confusion_matrix"]


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``(num_classes, num_classes)`` int64; row = true class, column = predicted (as sklearn).

    ``preds`` and ``labels`` are integer tensors of the same shape, on any device; the matrix is
    built on that device with one ``bincount``.
    """
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    flat = labels.reshape(-1).long() * num_classes + preds.reshape(-1).long()  # (n,) cell index
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(cm: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-ready metrics of a confusion matrix (rows true, columns predicted).

    Returns ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1`` (unweighted means over
    all classes; a class never predicted has precision 0, one never present recall 0), ``num_samples``,
    ``per_class`` (a list of ``{name, precision, recall, f1, support}``) and ``confusion_matrix``
    (a list of lists).
    """
    m = np.asarray(cm.detach().cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.int64)
    k = m.shape[0]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    tp = np.diag(m).astype(np.float64)  # (K,)
    predicted = m.sum(axis=0).astype(np.float64)  # (K,) column sums
    support = m.sum(axis=1).astype(np.float64)  # (K,) row sums
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = m.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()) if k else 0.0,
        "macro_recall": float(recall.mean()) if k else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "num_samples": int(total),
        "per_class": [
            {"name": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": m.tolist(),
    }


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # 0/0 is 0 (sklearn's zero_division=0): an absent class counts against the macro average.
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)
