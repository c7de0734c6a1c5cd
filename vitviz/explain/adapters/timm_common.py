"""Helpers shared by the timm adapters: which class a model is, its patch grid and patch filters."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch
from torch import nn

from vitviz.errors import ExplainError

__all__ = ["common_heads", "is_timm", "linear_patch_filters", "patch_grid"]


def is_timm(model: nn.Module, module: str, *names: str) -> bool:
    """Whether ``model`` is an instance of one of the classes ``names`` of timm's ``module``."""
    if not type(model).__module__.startswith("timm."):
        return False
    mod = importlib.import_module(module)
    return any(isinstance(model, getattr(mod, n)) for n in names if hasattr(mod, n))


def patch_grid(patch_embed: nn.Module, height: int, width: int, dynamic: bool | None = None) -> tuple[int, int]:
    """The token grid timm's ``PatchEmbed`` makes of a ``height`` x ``width`` input; ExplainError for a size it refuses.

    ``dynamic``: True when the model takes any size, False when it could (``dynamic_img_size``) but was not
    built to, None when it has no such option. A fixed-size model takes exactly its ``img_size``.
    """
    if dynamic and hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(int(g) for g in patch_embed.dynamic_feat_size((height, width)))
    else:
        size = tuple(int(v) for v in patch_embed.img_size)
        if (height, width) != size:
            other = " (or dynamic_img_size=True)" if dynamic is False else ""
            wanted = str(height) if height == width else f"({height}, {width})"
            raise ExplainError(
                f"this timm model takes {size[0]}x{size[1]} px images, got {height}x{width}; resize the image, or "
                f"create the model with img_size={wanted}{other}."
            )
        grid = tuple(int(g) for g in patch_embed.grid_size)
    if grid[0] < 1 or grid[1] < 1:
        raise ExplainError(f"an input of {height}x{width} px is smaller than one token cell.")
    return grid  # type: ignore[return-value]


def linear_patch_filters(stem: nn.Module | None) -> torch.Tensor | None:
    """Filters (D, C, p, p) of a non-overlapping, ungrouped Conv2d patch projection (a patch embedding with a
    ``proj``, or the conv itself), else None: a hybrid's CNN stem or an overlapping conv stem has none."""
    proj = stem if isinstance(stem, nn.Conv2d) else getattr(stem, "proj", None)
    if hasattr(stem, "backbone") or not isinstance(proj, nn.Conv2d):
        return None
    if proj.kernel_size != proj.stride or proj.groups != 1:
        return None
    return proj.weight


def common_heads(attentions: Iterable[nn.Module]) -> int | None:
    """The heads every attention module has, or None when they differ (a hierarchical model's stages)."""
    counts = {int(a.num_heads) for a in attentions}
    return counts.pop() if len(counts) == 1 else None
