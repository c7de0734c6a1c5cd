"""A dataset's images as an upload brings them to a model: made at a larger side, then resized.

A model trained on 32-px shapes scenes sees, in the dashboard and through the API, images that were
drawn or saved at some other size and resized by :func:`vitviz.images.preprocess` (bicubic,
antialiased). Resizing changes an image's fine-scale statistics: downscaling a scene rendered at 64 px
averages away most of its sensor noise and softens its edges, so it is not pixel-for-pixel like any
scene rendered at 32 px, although it shows the same kind of content. The out-of-distribution
calibration (:func:`vitviz.ood.calibrate`, ``views=``) fits these copies next to the splits themselves.

How the larger copy is made depends on what vitviz knows about the data:

* ``shapes``: the scenes are rendered again at the larger side (new scenes from the split's seed,
  up to :data:`MAX_UPLOAD_SIDE` px), as a user's drawing or the bundled 64-px samples are;
* ``digits``: scikit-learn's 8x8 digits are resized to the larger side (what ``load_dataset`` does
  to reach any size), as the bundled 32-px digit samples are;
* any other dataset: the images at the model's side are enlarged (bicubic), the best guess without
  its source files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vitviz.errors import ConfigError

__all__ = ["MAX_UPLOAD_SIDE", "UPLOAD_SCALES", "upload_copies", "upload_views"]

# Multiples of the model's side. Dense just above 1x, where a resize changes the statistics most (the
# first halvings of the noise); from about 3x on they hardly change, and 8x stands for everything
# larger (the noise is averaged away, the edges are as smooth as bicubic makes them). docs/ood.md
# measures 1.25x to 12x on the shipped checkpoints.
UPLOAD_SCALES: tuple[float, ...] = (1.25, 1.5, 3.0, 8.0)
MAX_UPLOAD_SIDE = 256  # shapes render in about 20 ms at 256 px; larger sides cost more and add nothing new
DEFAULT_LIMIT = 1000  # images per copy of the training split (a few hundred suffice for a rank-32 Gaussian)


def upload_copies(dataset: str, images: torch.Tensor, side: int, *, part: str = "train") -> torch.Tensor:
    """``len(images)`` images like ``images`` (uint8 (N, 3, S, S)), made at ``side`` px and resized to S.

    ``part`` ("train", "val" or "test") picks the split a regenerated dataset (shapes, digits) is
    drawn from. Returns uint8 (N, 3, S, S), resized exactly as :func:`vitviz.images.preprocess` does.
    """
    from vitviz.images import fit_image

    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ConfigError(
            f"upload copies need uint8 RGB images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}."
        )
    if part not in ("train", "val", "test"):
        raise ConfigError(f"part must be 'train', 'val' or 'test', got {part!r}.")
    n, size = len(images), int(images.shape[-1])
    big = _made_at(str(dataset).lower(), images, side, part)  # (n, side, side, 3) uint8
    fitted = [np.asarray(fit_image(Image.fromarray(a), size)) for a in big[:n]]
    return torch.from_numpy(np.stack(fitted)).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S)


def upload_views(
    dataset: str,
    train: torch.Tensor,
    val: torch.Tensor,
    *,
    scales: Sequence[float] = UPLOAD_SCALES,
    limit: int = DEFAULT_LIMIT,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Upload copies of a training and a validation split, for ``vitviz.ood.calibrate(..., views=...)``.

    One ``(train, val)`` pair of uint8 (n, 3, S, S) tensors per scale, named ``"x1.25"`` etc.: the
    content made at ``scale`` times the side S (at most :data:`MAX_UPLOAD_SIDE` px; scales that give
    no larger side are left out) and resized back to S. Each copy has at most ``limit`` training and
    ``limit // 2`` validation images.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
        raise ConfigError(f"limit must be an integer of at least 2 images per copy, got {limit!r}.")
    size = int(train.shape[-1])
    views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sides: set[int] = set()
    for scale in scales:
        side = min(round(float(scale) * size), MAX_UPLOAD_SIDE)
        if side <= size or side in sides:
            continue
        sides.add(side)
        views[f"x{float(scale):g}"] = (upload_copies(dataset, train[:limit], side, part="train"),
                                       upload_copies(dataset, val[: max(1, limit // 2)], side, part="val"))
    return views


def _made_at(dataset: str, images: torch.Tensor, side: int, part: str) -> np.ndarray:
    """(n, side, side, 3) uint8: the dataset's content at ``side`` px (see the module docstring)."""
    n = len(images)
    if dataset == "shapes":
        from vitviz.data.datasets import SHAPES_SEEDS
        from vitviz.data.shapes import make_shapes

        return make_shapes(n, seed=SHAPES_SEEDS[part], img_size=side)[0]
    if dataset == "digits":
        from vitviz.data.datasets import load_dataset, resize_uint8

        # The 8x8 source split, then only the images needed resized, as load_dataset(img_size=side) resizes each.
        source = getattr(load_dataset("digits", img_size=8), part).images  # (M, 3, 8, 8)
        picked = source[torch.arange(n) % len(source)]  # (n, 3, 8, 8)
        return resize_uint8(picked, side).permute(0, 2, 3, 1).numpy()
    resample = Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(a).resize((side, side), resample))
                     for a in images.permute(0, 2, 3, 1).cpu().numpy()])
