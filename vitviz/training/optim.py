"""AdamW parameter groups and learning-rate schedules.

The schedule is a pure function of the global step, so the only scheduler state a resumed run
needs is the step count (no scheduler object to serialise and get subtly wrong).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are never decayed besides 1-d ones (norm scales, biases): embeddings that encode
# positions or act as a learned input, as in timm's ``no_weight_decay``.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices / kernels, and undecayed norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA, the foreach one elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None,
                             foreach=None if fused else True)


def lr_at(step: int, total_steps: int, *, peak: float, schedule: str, warmup_steps: int,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    * ``cosine``: linear warmup from ``peak / warmup_steps`` to ``peak``, then cosine to ``min_lr``.
    * ``onecycle``: as PyTorch's OneCycleLR (cosine annealing): from ``peak / 25`` up to ``peak`` over
      ``warmup_steps``, then down to ``peak / 25e4`` (``min_lr`` if larger).
    * ``constant``: ``peak`` throughout.
    """
    if schedule == "constant":
        return peak
    if schedule == "onecycle":
        start, end = peak / 25.0, max(peak / 25e4, min_lr)
        up = max(warmup_steps, 1)
        if step < up:
            return _cos_between(start, peak, step / up)
        return _cos_between(peak, end, (step - up) / max(total_steps - up, 1))
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return _cos_between(peak, min_lr, progress)


def _cos_between(start: float, end: float, t: float) -> float:
    """Cosine interpolation from ``start`` (t=0) to ``end`` (t=1)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
