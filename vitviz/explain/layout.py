"""What explanation code needs to know about a model: its family, token grid and class targets.

Every explanation reads the grid, the number of prefix tokens and the pixels one grid cell covers
from here instead of guessing (never a hard-coded 14x14). Our ViT/hybrid expose these directly;
timm ViTs are read from their ``patch_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError

__all__ = ["TokenLayout", "check_images", "is_timm_vit", "model_family", "resolve_target", "token_layout"]


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's tokens sit on the input image."""

    grid: tuple[int, int]  # patch/token grid (rows, cols)
    num_prefix_tokens: int  # class (and register) tokens before the patch tokens
    cell: tuple[int, int]  # pixels one grid cell covers (rows, cols)
    image_size: tuple[int, int]  # input (H, W) in pixels
    # What the head reads: "token" (the class token) or "mean" (the mean of the patch tokens). Maps
    # "from the model's point of view" start from this readout; with mean pooling the class token's
    # last-layer output is never read, so its attention row explains nothing.
    readout: str = "token"

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm VisionTransformer (plain or hybrid), used as it comes."""
    if not type(model).__module__.startswith("timm."):
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def model_family(model: nn.Module) -> str:
    """"vit", "hybrid" or "resnet" for our models and timm ViTs; ExplainError for anything else."""
    family = getattr(model, "family", None)
    if family in ("vit", "hybrid", "resnet"):
        return family
    if is_timm_vit(model):
        return "hybrid" if hasattr(model.patch_embed, "backbone") else "vit"
    raise ExplainError(
        f"vitviz cannot explain a {type(model).__name__}: pass a vitviz model (create_model / load_checkpoint), "
        "a timm VisionTransformer, or convert a timm model with vitviz.from_timm."
    )


def token_layout(model: nn.Module, height: int, width: int) -> TokenLayout:
    """Token grid, prefix count and cell size of a transformer for an input of ``height`` x ``width``."""
    family = model_family(model)
    if family == "resnet":
        raise ExplainError(
            f"{type(model).__name__} is a ResNet: it has no tokens or attention. Use method='gradcam' for CNNs."
        )
    if is_timm_vit(model):
        pe = model.patch_embed
        if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            grid = tuple(int(g) for g in pe.dynamic_feat_size((height, width)))
        else:
            grid = tuple(int(g) for g in pe.grid_size)
        if hasattr(pe, "backbone"):  # hybrid: a cell is the backbone stride times the feature patch
            cell = (math.ceil(height / grid[0]), math.ceil(width / grid[1]))
        else:
            cell = (int(pe.patch_size[0]), int(pe.patch_size[1]))
        prefix = int(model.num_prefix_tokens)
        # timm's avg / max / avgmax / map pooling all read the patch tokens as a set: the mean is their readout
        readout = "token" if model.global_pool == "token" and prefix > 0 else "mean"
    else:
        grid = tuple(int(g) for g in model.patch_grid(height, width))
        pe = model.patch_embed
        step = int(pe.patch_size) * int(getattr(pe, "reduction", 1))  # hybrid cells cover reduction * p px
        cell = (step, step)
        prefix = int(model.num_prefix_tokens)
        pooling = getattr(getattr(model, "vit_config", None), "pooling", "token")
        readout = "token" if pooling == "token" and prefix > 0 else "mean"
    if grid[0] < 1 or grid[1] < 1:
        raise ExplainError(f"an input of {height}x{width} px is smaller than one token cell ({cell[0]} px).")
    return TokenLayout(grid=grid, num_prefix_tokens=prefix, cell=cell, image_size=(height, width), readout=readout)


def check_images(x: torch.Tensor) -> None:
    """Refuse anything but a float batch (B, C, H, W) with a clear message."""
    if not isinstance(x, torch.Tensor):
        raise ExplainError(
            f"expected a float tensor batch (B, 3, H, W), got {type(x).__name__}; use vitviz.preprocess(images, meta)."
        )
    if x.ndim != 4 or not x.is_floating_point():
        raise ExplainError(
            f"expected a float batch (B, C, H, W), got a {x.dtype} tensor of shape {tuple(x.shape)}; "
            "add a batch dimension with x[None] or use vitviz.preprocess."
        )


def resolve_target(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Class index per image, (B,) long: the predicted class when ``target`` is None.

    An int applies to every image; a sequence or tensor gives one class per image.
    """
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=-1)  # (B,)
    if isinstance(target, bool):
        raise ExplainError(f"target must be a class index, got {target!r}.")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        try:
            t = torch.as_tensor(target, device=logits.device)
        except (TypeError, ValueError) as err:
            raise ExplainError(f"target must be a class index or one index per image, got {target!r}.") from err
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ExplainError(f"target must hold integer class indices, got {t.dtype}.")
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ExplainError(f"target has {t.numel()} entries for a batch of {batch} images; give one per image.")
    bad = (t < 0) | (t >= classes)
    if bool(bad.any()):
        raise ExplainError(
            f"target class {int(t[bad][0])} is out of range: the model has {classes} classes (0..{classes - 1})."
        )
    return t.contiguous()
