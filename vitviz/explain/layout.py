"""Input checks, class targets, and the token layout a model's adapter reports.

Every explanation reads the grid, the number of prefix tokens and the pixels one grid cell covers
from the model's adapter (:mod:`vitviz.explain.adapters`) instead of guessing (never a hard-coded 14x14).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError

__all__ = ["TokenLayout", "check_images", "model_family", "resolve_target", "token_layout"]


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's tokens sit on the input image."""

    grid: tuple[int, int]  # patch/token grid (rows, cols)
    num_prefix_tokens: int  # class (and register) tokens before the patch tokens
    cell: tuple[int, int]  # pixels one grid cell covers (rows, cols)
    image_size: tuple[int, int]  # input (H, W) in pixels
    # What the head reads: "token" (the class token), "dist" (class and distillation tokens averaged),
    # "mean" (the patch tokens' mean), "max"/"avgmax" (a max pool), "pool" (an attention pool). Maps
    # "from the model's point of view" start from this readout; with mean pooling the class token's
    # last-layer output is never read, so its attention row explains nothing.
    readout: str = "token"

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def model_family(model: nn.Module) -> str:
    """The model's family as its adapter names it ("vit", "hybrid", "resnet", "hierarchical", "cnn");
    ExplainError for a model no adapter knows."""
    from vitviz.explain.adapters import adapter_for

    return adapter_for(model).family


def token_layout(model: nn.Module, height: int, width: int) -> TokenLayout:
    """Final token grid, prefix count and cell size of a transformer for an input of ``height`` x ``width``."""
    from vitviz.explain.adapters import adapter_for

    adapter = adapter_for(model)
    if adapter.kind != "transformer":
        raise ExplainError(
            f"{type(model).__name__} is a CNN ({adapter.family}): it has no tokens or attention. Use "
            "method='gradcam' for CNNs."
        )
    tokens = adapter.final_tokens(height, width)
    return TokenLayout(grid=tokens.grid, num_prefix_tokens=tokens.prefix, cell=tokens.cell,
                       image_size=(height, width), readout=adapter.readout_kind())


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
