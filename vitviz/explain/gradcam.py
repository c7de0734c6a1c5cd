"""Grad-CAM (Selvaraju et al. 2017) for ResNets, hybrids and ViT tokens, so families compare on one image.

As in pytorch-grad-cam, one base class owns the forward hook and the backward pass, and a method
overrides one function that turns (activations, gradients) into a map. The hook is removed in a
``finally``, also when the forward pass fails.

Where the activations come from:

* ResNet: the last convolutional stage (``model.gradcam_layer``).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.layout import check_images, is_timm_vit, model_family, resolve_target, token_layout

__all__ = ["BaseCAM", "CAMResult", "GradCAM", "gradcam"]


@dataclass
class CAMResult:
    """A class-activation map batch with what produced it."""

    maps: torch.Tensor  # (B, h, w), non-negative, not normalised
    logits: torch.Tensor  # (B, classes)
    target: torch.Tensor  # (B,) class explained
    cell: tuple[int, int]  # pixels one map cell covers (rows, cols)


Reshape = Callable[[torch.Tensor], torch.Tensor]  # hooked output -> activations (B, C, h, w)


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
        module, reshape, cell = _cam_layer(self.model, self.layer, x.shape[-2], x.shape[-1])
        captured: list[torch.Tensor] = []

        def keep_output(_module: nn.Module, _inputs: object, output: object) -> None:
            captured.append(output[-1] if isinstance(output, (list, tuple)) else output)

        handle = module.register_forward_hook(keep_output)
        try:
            x = x.detach().requires_grad_(True)  # keeps a graph even when the weights are frozen
            with torch.enable_grad():
                logits = self.model(x)  # (B, classes)
                if not captured:
                    raise ExplainError(f"the Grad-CAM layer {type(module).__name__} was not called in forward.")
                t = resolve_target(target, logits)  # (B,)
                score = logits.gather(1, t[:, None]).sum()  # images are independent in eval mode
                (grad,) = torch.autograd.grad(score, captured[-1])
        finally:
            handle.remove()
        acts = reshape(captured[-1].detach())  # (B, C, h, w)
        grads = reshape(grad)  # (B, C, h, w)
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


def _cam_layer(model: nn.Module, layer: int | None, height: int, width: int) -> tuple[nn.Module, Reshape, tuple]:
    family = model_family(model)
    if family == "resnet":
        if layer is not None:
            raise ExplainError("a ResNet's Grad-CAM reads its last stage; leave layer unset (None).")
        step = int(model.reduction)
        return model.gradcam_layer, _as_map, (step, step)
    if family == "hybrid" and layer is None:
        if is_timm_vit(model):
            backbone = model.patch_embed.backbone
            return backbone, _as_map, (-1, -1)  # cell measured from the map size later
        step = int(model.patch_embed.reduction)
        return model.gradcam_layer, _as_map, (step, step)
    blocks = model.blocks
    index = -1 if layer is None else layer
    if isinstance(index, bool) or not isinstance(index, int) or not -len(blocks) <= index < len(blocks):
        raise ExplainError(
            f"layer {layer!r} is out of range for Grad-CAM on a model with {len(blocks)} blocks "
            f"(use 0..{len(blocks) - 1} or -{len(blocks)}..-1)."
        )
    lay = token_layout(model, height, width)
    gh, gw = lay.grid
    prefix = lay.num_prefix_tokens

    def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:]  # (B, gh*gw, D)
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)  # (B, D, gh, gw)

    if layer is None and lay.readout == "mean":
        # Mean pooling reads the last block's patch tokens directly: Grad-CAM there is CAM on the final
        # features, as for a CNN's last stage. ``model.norm`` (an Identity under mean pooling, in timm
        # and here) sees exactly those tokens, whatever the block returns.
        return model.norm, tokens_to_map, lay.cell
    return blocks[index].norm1, tokens_to_map, lay.cell


def _as_map(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 4:
        raise ExplainError(f"Grad-CAM needs a (B, C, h, w) feature map, got shape {tuple(features.shape)}.")
    return features
