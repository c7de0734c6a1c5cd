"""An exponential moving average of a model's weights (Polyak averaging), updated every optimiser step.

Averaged weights generalise better than the last step's on small data; ``vitviz train --ema DECAY``
validates, selects and saves them. The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after
``t`` updates (as in timm and TensorFlow's ExponentialMovingAverage), so the average is not dominated by
the random initialisation in short runs; because ``t`` is the run's global step, resuming needs only
the averaged weights, which the training-state sidecar stores.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightEma"]


class WeightEma:
    """A frozen copy of ``model`` whose floating-point weights and buffers trail the model's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used for the update after ``step`` earlier updates."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``ema <- d * ema + (1 - d) * model`` for floating tensors; integer buffers are copied."""
        d = self.decay_at(step)
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], 1.0 - d)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])
