"""Linear probes by depth: how linearly readable the class is at each layer (Raghu et al. 2021, Sec. 6).

A scikit-learn logistic regression is fitted on each layer's readout features of the training images
(standardised first, so that one regularisation strength suits every layer) and scored on the test
images. :func:`probe_layers` works on features already collected (:func:`collect_readouts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitviz.arrays import to_numpy
from vitviz.errors import ConfigError

__all__ = ["ProbeResult", "probe_layers"]


@dataclass
class ProbeResult:
    """Per-layer linear-probe accuracy on the training and the test images."""

    name: str
    labels: list[str]
    stages: list[int]
    train_accuracy: list[float]
    test_accuracy: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.name, "labels": self.labels, "stages": self.stages,
                "train_accuracy": [round(a, 5) for a in self.train_accuracy],
                "test_accuracy": [round(a, 5) for a in self.test_accuracy]}


def probe_layers(train: list[torch.Tensor], y_train: torch.Tensor | np.ndarray, test: list[torch.Tensor],
                 y_test: torch.Tensor | np.ndarray, *, labels: list[str] | None = None, stages: list[int] | None = None,
                 name: str = "", c: float = 1.0, max_iter: int = 500, seed: int = 0) -> ProbeResult:
    """Fit one logistic regression per layer: ``train[l]`` (N, D_l) -> ``y_train``; score on ``test[l]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train) != len(test) or not train:
        raise ConfigError(f"need the same layers for train and test, got {len(train)} and {len(test)}.")
    ytr, yte = np.asarray(y_train), np.asarray(y_test)
    if len(np.unique(ytr)) < 2:
        raise ConfigError("a linear probe needs training images of at least 2 classes.")
    train_acc, test_acc = [], []
    for a, b in zip(train, test, strict=True):
        xa, xb = _numpy(a), _numpy(b)
        if xa.shape[0] != ytr.shape[0] or xb.shape[0] != yte.shape[0]:
            raise ConfigError(f"features and labels disagree: {xa.shape[0]} vs {ytr.shape[0]} (train), "
                              f"{xb.shape[0]} vs {yte.shape[0]} (test).")
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
        clf.fit(xa, ytr)
        train_acc.append(float(clf.score(xa, ytr)))
        test_acc.append(float(clf.score(xb, yte)))
    n = len(train)
    return ProbeResult(name=name, labels=labels or [f"layer {i}" for i in range(n)], stages=stages or [0] * n,
                       train_accuracy=train_acc, test_accuracy=test_acc)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return to_numpy(x, np.float64)
