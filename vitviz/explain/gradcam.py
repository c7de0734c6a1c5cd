"""Grad-CAM (Selvaraju et al. 2017) for ResNets, hybrids and ViT tokens, so families compare on one image.

As in pytorch-grad-cam, one base class owns the forward hook and the backward pass, and a method
overrides one function that turns (activations, gradients) into a map. The hook is removed in a
``finally``, also when the forward pass fails.

Where the activations come from is the model adapter's answer (``Adapter.cam_forward``):

* ResNet: the last convolutional stage (``model.gradcam_layer``); any other timm CNN: the feature
  map its ``forward_features`` returns.
* hybrid: its CNN backbone's last feature map (``gradcam_layer``; timm extractors return a list,
  the last entry is used), or transformer tokens when ``layer`` is a block index.
* ViT: the patch tokens entering block ``layer`` (default: the last), i.e. the output of that
  block's ``norm1``, reshaped to the grid. Not the last block's *output*: with class-token pooling
  the head reads only the class token, so the last block's output patch tokens have zero gradient
  and their Grad-CAM is empty. With mean pooling the head reads exactly those output tokens, so the
  default (``layer=None``) takes them: the transformer's counterpart of a CNN's last feature map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.explain.layout import check_images, resolve_target

__all__ = ["BaseCAM", "CAMResult", "GradCAM", "gradcam"]


@dataclass
class CAMResult:
    """A class-activation map batch with what produced it."""

    maps: torch.Tensor  # (B, h, w), non-negative, not normalised
    logits: torch.Tensor  # (B, classes)
    target: torch.Tensor  # (B,) class explained
    cell: tuple[int, int]  # pixels one map cell covers (rows, cols)


class BaseCAM:
    """Hook one layer, run forward once, differentiate the target score, let a subclass weigh the maps."""

    def __init__(self, model: nn.Module, layer: int | None = None) -> None:
        self.model = model
        self.layer = layer

    def weighted_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(B, h, w) map from activations and gradients (B, C, h, w); ReLU is applied afterwards."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None) -> CAMResult:
        check_images(x)
        adapter = adapter_for(self.model)
        if not adapter.has_head:
            raise ExplainError(f"Grad-CAM explains a class score, and {type(self.model).__name__} has no classifier "
                               "head (it returns features); use 'attention', 'rollout' or 'similarity'.")
        x = x.detach().requires_grad_(True)  # keeps a graph even when the weights are frozen
        with torch.enable_grad():
            run = adapter.cam_forward(x, self.layer)
            logits = run.logits  # (B, classes)
            if isinstance(logits, (tuple, list)):
                raise ExplainError(f"{type(self.model).__name__} returned {len(logits)} outputs; call model.eval().")
            t = resolve_target(target, logits)  # (B,)
            score = logits.gather(1, t[:, None]).sum()  # images are independent in eval mode
            (grad,) = torch.autograd.grad(score, run.activations)
        acts = run.reshape(run.activations.detach())  # (B, C, h, w)
        grads = run.reshape(grad)  # (B, C, h, w)
        cell = run.cell
        maps = self.weighted_map(acts, grads).clamp(min=0)  # (B, h, w): only evidence for the class
        if cell[0] <= 0:  # a timm backbone of unknown stride: measure it from the map
            cell = (math.ceil(x.shape[-2] / maps.shape[-2]), math.ceil(x.shape[-1] / maps.shape[-1]))
        return CAMResult(maps=maps, logits=logits.detach(), target=t, cell=cell)


class GradCAM(BaseCAM):
    """Channel weights = spatial mean of the gradient; map = ReLU(sum_c w_c A_c)."""

    def weighted_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        weights = gradients.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return (weights * activations).sum(dim=1)  # (B, h, w)


def gradcam(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
            layer: int | None = None) -> CAMResult:
    """Grad-CAM of ``model`` on ``x`` (B, C, H, W) for ``target`` (default: the predicted class).

    ``layer``: None for the family's default (see the module docs); for a ViT or hybrid, a block
    index (negative ok) takes the tokens entering that block.
    """
    return GradCAM(model, layer)(x, target)
