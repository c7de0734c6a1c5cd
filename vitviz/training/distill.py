"""Knowledge distillation from a trained teacher checkpoint (soft targets, Hinton et al. 2015; DeiT 2021).

A ViT learns slowly from a few thousand images because it has to discover locality and translation
invariance that a CNN is built with; DeiT showed that a CNN teacher's predictions carry some of that
inductive bias over. The student is still trained from scratch and stays a plain ViT; the teacher is
only queried during training. The teacher is loaded with :func:`vitviz.checkpoint.load_checkpoint`
(safetensors, never a pickle) and sees each augmented batch in its own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.checkpoint import load_checkpoint
from vitviz.errors import ConfigError


class Teacher:
    """A frozen checkpoint that turns a student batch (normalised with the student's stats) into logits."""

    def __init__(self, path: str | Path, *, device: torch.device, class_names: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], img_size: int) -> None:
        model, meta = load_checkpoint(path, device=device)
        if meta.class_names is not None and list(meta.class_names) != list(class_names):
            raise ConfigError(
                f"the teacher {path} predicts classes {meta.class_names[:10]}, not this dataset's "
                f"{list(class_names)[:10]}; distil from a model trained on the same dataset."
            )
        self.model: nn.Module = model.requires_grad_(False)
        self.img_size = meta.img_size
        self.resize = meta.img_size != img_size
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, as one scale and shift per channel.
        s_mean, s_std = torch.tensor(mean), torch.tensor(std)
        t_mean, t_std = torch.tensor(meta.mean), torch.tensor(meta.std)
        self.scale = (s_std / t_std).view(1, 3, 1, 1).to(device)  # (1, 3, 1, 1)
        self.shift = ((s_mean - t_mean) / t_std).view(1, 3, 1, 1).to(device)
        self.channels_last = meta.family in ("resnet", "hybrid")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, K) for a student-normalised batch (B, 3, H, W)."""
        x = x.float() * self.scale + self.shift
        if self.resize:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, batch mean (Hinton et al.)."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)  # (B, K)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)  # (B, K)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
