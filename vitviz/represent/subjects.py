"""The models a representation analysis compares, each with the preprocessing it was trained with.

A :class:`Subject` is a model in eval mode plus its input size, mean/std and class names, so that the
same uint8 images can be fed to models that expect different sizes and normalisations.
:func:`load_subject` reads a vitviz checkpoint, ``timm:NAME`` or ``hf:ID``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ConfigError

__all__ = ["Subject", "as_subject", "load_subject", "prepare", "same_classes"]


@dataclass
class Subject:
    """A model and how to feed it: ``img_size`` px, normalised by ``mean``/``std`` (None: fed as given)."""

    name: str
    model: nn.Module
    img_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    class_names: list[str] = field(default_factory=list)
    family: str = ""
    dataset: str | None = None

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def as_subject(model: nn.Module | Subject, name: str | None = None) -> Subject:
    """``model`` as a :class:`Subject`; a bare module is fed the images as given (float, already normalised)."""
    if isinstance(model, Subject):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch model or a Subject, got {type(model).__name__}.")
    from vitviz.explain.adapters import adapter_for

    return Subject(name=name or type(model).__name__, model=model.eval(), family=adapter_for(model).family)


def load_subject(spec: str, device: str | torch.device = "cpu", *, random_weights: bool = False) -> Subject:
    """A checkpoint path, ``timm:NAME`` or ``hf:ID`` as a :class:`Subject` in eval mode on ``device``."""
    from vitviz.explain.adapters import adapter_for

    if spec.startswith(("timm:", "hf:")):
        import vitviz

        model = vitviz.create_model(spec, pretrained=not random_weights)
        model = model.to(device).eval()
        pre = dict(getattr(model, "preprocessing", None) or {})
        if not pre and spec.startswith("timm:"):
            from vitviz.models.timm_interop import timm_preprocessing

            pre = timm_preprocessing(spec.removeprefix("timm:"))
        size = getattr(getattr(model, "vit_config", None), "img_size", None) or pre.get("img_size")
        return Subject(name=spec, model=model, img_size=int(size) if size else None,
                       mean=_triple(pre.get("mean")), std=_triple(pre.get("std")),
                       class_names=_class_names(model), family=adapter_for(model).family)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{spec!r} is neither a checkpoint file nor timm:NAME / hf:ID; give a .safetensors path "
                          "written by vitviz (e.g. checkpoints/vit_shapes.safetensors).")
    from vitviz.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path, device)
    return Subject(name=path.stem, model=model, img_size=int(meta.img_size), mean=tuple(meta.mean),
                   std=tuple(meta.std), class_names=list(meta.class_names or []), family=meta.family,
                   dataset=meta.dataset)


def prepare(subject: Subject, images: torch.Tensor) -> torch.Tensor:
    """A batch as ``subject`` takes it: uint8 (B, 3, H, W) images resized and normalised; float images as
    given (resized when the subject has a size)."""
    x = images.to(subject.device)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0  # (B, 3, H, W) in [0, 1]
        if subject.img_size and tuple(x.shape[-2:]) != (subject.img_size, subject.img_size):
            x = F.interpolate(x, size=(subject.img_size, subject.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if subject.mean is not None and subject.std is not None:
            mean = torch.tensor(subject.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(subject.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x
    if not x.is_floating_point():
        raise ConfigError(f"images must be uint8 (0-255) or float tensors, got {x.dtype}.")
    if subject.img_size and tuple(x.shape[-2:]) != (subject.img_size, subject.img_size):
        x = F.interpolate(x, size=(subject.img_size, subject.img_size), mode="bilinear", align_corners=False)
    return x


def same_classes(subject: Subject, dataset: str, class_names: Sequence[str]) -> bool:
    """Whether ``subject`` predicts the classes of ``dataset`` (named ``class_names``), so that its accuracy
    on that dataset means something: it was trained on it, or its classes are those names in that order
    (e.g. a CLIP whose prompts are the class names). A model without classes (headless) never does."""
    if not subject.class_names:
        return False
    return subject.dataset == dataset or list(subject.class_names) == list(class_names)


def _triple(value: object) -> tuple[float, float, float] | None:
    if value is None:
        return None
    v = tuple(float(t) for t in value)  # type: ignore[union-attr]
    return (v * 3)[:3] if len(v) == 1 else v[:3]  # type: ignore[return-value]


def _class_names(model: nn.Module) -> list[str]:
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    n = int(getattr(model, "num_classes", 0) or 0)
    return [f"class {i}" for i in range(n)]
