"""The logit lens for transformers with a head: each layer's tokens through the final norm and the head.

Where the last layer's lens is the model itself (checked on every batch: the largest difference from
the model's logits is reported), the curve says from which depth the final answer is already there:
per layer, the fraction of images whose lens top-1 equals the model's prediction, and its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitviz.errors import ConfigError, ExplainError
from vitviz.represent.features import Readouts

__all__ = ["LensResult", "logit_lens"]

LENS_TOLERANCE = 1e-3  # the last layer's lens must give the model's logits up to float rounding


@dataclass
class LensResult:
    """Per-layer agreement of the lens top-1 with the final prediction, and its accuracy (None: no labels).

    ``positions``: each lens layer's index among all ``layers`` of the model (a hybrid's lens starts after
    its CNN stem), so lens curves can be drawn at the same depth as the probes of every layer.
    """

    name: str
    labels: list[str]
    agreement: list[float]
    accuracy: list[float] | None
    positions: list[int] = field(default_factory=list)
    layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.name, "labels": self.labels, "agreement": [round(a, 5) for a in self.agreement],
                "accuracy": None if self.accuracy is None else [round(a, 5) for a in self.accuracy],
                "positions": self.positions, "layers": self.layers}


def logit_lens(readouts: Readouts, targets: torch.Tensor | np.ndarray | None = None, *, name: str = "") -> LensResult:
    """The lens curve of the layers where it is defined (a transformer's last stage).

    ``targets``: the true classes (N,), for the lens accuracy per layer; None gives agreement only.
    """
    layers = [k for k, p in enumerate(readouts.lens_pred) if p is not None]
    if not layers:
        raise ExplainError(f"{name or 'this model'} has no logit lens: it needs a transformer whose blocks feed "
                           "the final norm and head directly (not a CNN, nor a model with class-attention layers).")
    if readouts.lens_error > LENS_TOLERANCE:
        raise ExplainError(f"the last layer passed through the final norm and head differs from the model's logits "
                           f"by {readouts.lens_error:.3g}: something runs between the blocks and the head, so a "
                           "logit lens would not describe this model.")
    pred = readouts.pred
    y = None if targets is None else torch.as_tensor(np.asarray(targets))
    if y is not None and y.shape != pred.shape:
        raise ConfigError(f"targets must hold one class per image: shape {tuple(y.shape)} vs {tuple(pred.shape)}.")
    agreement = [float((readouts.lens_pred[k] == pred).float().mean()) for k in layers]
    accuracy = None if y is None else [float((readouts.lens_pred[k] == y).float().mean()) for k in layers]
    return LensResult(name=name, labels=[readouts.labels[k] for k in layers], agreement=agreement,
                      accuracy=accuracy, positions=layers, layers=len(readouts.labels))
