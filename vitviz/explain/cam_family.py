"""The CAM family through pytorch-grad-cam: Grad-CAM++, HiResCAM, Score-CAM, Eigen-CAM and LayerCAM.

pytorch-grad-cam's users write the boilerplate themselves: which layer to hook and how to reshape a
transformer's tokens into a (B, C, h, w) map. Here the model's adapter answers both, as it does for
vitviz's own Grad-CAM (``Adapter.cam_forward``: ViT tokens entering the last block, a pooled
transformer's final tokens, a hybrid's or CNN's last feature map, any block with ``layer``). The
activations and their gradients of that one pass are reshaped by the adapter and handed to the
pytorch-grad-cam class's own ``get_cam_image``, so the weighting of every method is pytorch-grad-cam's
code; Score-CAM's masked forward passes run through the model as pytorch-grad-cam runs them.

pytorch-grad-cam is optional: without it these methods are refused with the install command (see
:data:`vitviz.explain.registry.CAM_EXTRA`). vitviz's Grad-CAM (``method="gradcam"``) needs nothing.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter
from vitviz.explain.layout import check_images, resolve_target
from vitviz.explain.registry import CAM_EXTRA, MapResult

__all__ = ["CAM_CLASSES", "cam_map", "run_cam"]

# method name -> pytorch-grad-cam class name
CAM_CLASSES: dict[str, str] = {"gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "scorecam": "ScoreCAM",
                               "eigencam": "EigenCAM", "layercam": "LayerCAM"}


class _Logits(nn.Module):
    """The model as pytorch-grad-cam calls it, leaving the model's train/eval mode as the user set it
    (pytorch-grad-cam calls ``.eval()`` on what it is given)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def train(self, mode: bool = True) -> _Logits:
        self.training = mode  # not passed on to the wrapped model
        return self


def _cam_class(method: str) -> type:
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise ExplainError(f"{method} runs through pytorch-grad-cam, which is not installed; {CAM_EXTRA}.") from err
    if method not in CAM_CLASSES:
        raise ExplainError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_CLASSES)}.")
    return getattr(pytorch_grad_cam, CAM_CLASSES[method])


def run_cam(method: str, adapter: Adapter, x: torch.Tensor, p: dict[str, Any]) -> MapResult:
    """The registry's runner for the CAM family."""
    return cam_map(adapter, x, method, target=p.get("target"), layer=p.get("layer"), batch=p.get("batch", 32))


def cam_map(adapter: Adapter, x: torch.Tensor, method: str, target: Any = None, layer: int | None = None,
            batch: int = 32) -> MapResult:
    """``method``'s map (B, h, w) on the layer the adapter picks (``layer``: a block index on transformers).

    Non-negative and not normalised, as pytorch-grad-cam computes it before its min-max scaling and
    resize. ``batch``: Score-CAM's masked images per forward pass. EigenCAM is class-agnostic (its
    target is None) and runs on headless models too.
    """
    check_images(x)
    cls = _cam_class(method)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExplainError(f"batch must be a positive integer, got {batch!r}.")
    uses_target = method != "eigencam"
    if uses_target and not adapter.has_head:
        raise ExplainError(f"{method} explains a class score, and {type(adapter.model).__name__} has no classifier "
                           "head (it returns features); use 'eigencam', 'attention' or 'similarity'.")
    x = x.detach().requires_grad_(True)  # keeps a graph even when the weights are frozen
    grad = t = None
    with torch.enable_grad() if uses_target else torch.no_grad():
        run = adapter.cam_forward(x, layer)
        logits = run.logits  # (B, classes)
        if isinstance(logits, (tuple, list)):
            raise ExplainError(f"{type(adapter.model).__name__} returned {len(logits)} outputs; call model.eval().")
        if uses_target:
            t = resolve_target(target, logits)  # (B,)
            score = logits.gather(1, t[:, None]).sum()  # images are independent in eval mode
            (grad,) = torch.autograd.grad(score, run.activations)
    acts = run.reshape(run.activations.detach()).float()  # (B, C, h, w)
    grads = None if grad is None else run.reshape(grad).float().cpu().numpy()  # (B, C, h, w)
    cam = cls(model=_Logits(adapter.model), target_layers=[])  # no hooks: the adapter's pass supplied them
    cam.batch_size = batch  # Score-CAM's masked images per call
    targets = None
    if t is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in t]
    quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
    with torch.no_grad(), quiet:  # Score-CAM draws a progress bar per image
        raw = cam.get_cam_image(x.detach(), None, targets, acts.cpu().numpy(), grads, False)  # (B, h, w)
    maps = torch.from_numpy(np.maximum(raw, 0).astype(np.float32)).to(x.device)  # (B, h, w)
    cell = run.cell
    if cell[0] <= 0:  # a backbone of unknown stride: measure it from the map
        cell = (math.ceil(x.shape[-2] / maps.shape[-2]), math.ceil(x.shape[-1] / maps.shape[-1]))
    return MapResult(maps, maps, logits.detach(), t, cell)
