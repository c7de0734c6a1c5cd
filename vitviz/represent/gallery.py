"""The error gallery: a model's misclassified test images, each explained by that model and by the others.

Every model explains its *own* prediction on the image with its default method (Chefer relevance for
transformers, Grad-CAM for CNNs), so one row shows what each family looked at on an image that one of
them got wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vitviz.errors import ConfigError
from vitviz.represent.subjects import Subject, prepare

__all__ = ["Explained", "GalleryItem", "default_method", "error_gallery", "predictions"]


@dataclass
class Explained:
    """One model's prediction on an image and its saliency map (H, W) in [0, 1] at the model's input size."""

    model: str
    method: str
    pred: int
    confidence: float
    saliency: np.ndarray


@dataclass
class GalleryItem:
    """A misclassified image: its index in the images given, the true class, and every model's explanation."""

    index: int
    label: int
    image: np.ndarray  # (H, W, 3) uint8
    explained: list[Explained] = field(default_factory=list)


def default_method(subject: Subject) -> str:
    """The method a gallery uses for ``subject``: chefer where it is defined, else gradcam."""
    from vitviz.explain.api import refusal

    return "chefer" if refusal(subject.model, "chefer") is None else "gradcam"


def predictions(subject: Subject, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's predicted class of every image (N,), batched, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(subject.model(prepare(subject, images[i:i + batch_size])).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def error_gallery(subjects: list[Subject], images: torch.Tensor, labels: torch.Tensor, *, of: int = 0,
                  limit: int = 8, methods: dict[str, str] | None = None,
                  pred: torch.Tensor | None = None) -> list[GalleryItem]:
    """Up to ``limit`` images that ``subjects[of]`` misclassifies, each explained by every subject.

    ``images``: uint8 (N, 3, H, W); ``labels``: (N,). ``methods``: a method per subject name (default:
    :func:`default_method`). ``pred``: the model's predictions when already known.
    """
    from vitviz.explain import explain_details

    if not subjects or not 0 <= of < len(subjects):
        raise ConfigError(f"of={of} must index one of the {len(subjects)} models.")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ConfigError("the error gallery takes uint8 images (N, 3, H, W), as a dataset split holds them.")
    labels = torch.as_tensor(labels).cpu()
    pred = predictions(subjects[of], images) if pred is None else pred.cpu()
    wrong = torch.nonzero(pred != labels).flatten()[:limit].tolist()
    items = []
    for i in wrong:
        item = GalleryItem(index=int(i), label=int(labels[i]), image=images[i].permute(1, 2, 0).numpy())
        for s in subjects:
            method = (methods or {}).get(s.name) or default_method(s)
            res = explain_details(s.model, prepare(s, images[i:i + 1]), method)
            probs = torch.softmax(res.logits[0].float(), dim=-1)
            k = int(probs.argmax())
            item.explained.append(Explained(model=s.name, method=method, pred=k, confidence=float(probs[k]),
                                            saliency=res.maps[0].detach().cpu().numpy().astype(np.float32)))
        items.append(item)
    return items
