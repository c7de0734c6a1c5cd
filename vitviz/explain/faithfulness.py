"""Which explanation to trust: deletion/insertion AUC, pointing game and mask IoU.

These are the building blocks; :mod:`vitviz.explain.trust` is the one scorer built on them (protocol
stated, patch-aligned units, ROAD, the sanity check, random maps with bootstrap intervals) that
``vitviz trust``, ``benchmarks/eval_explanations.py`` and the dashboard use.

Deletion and insertion follow RISE (Petsiuk et al. 2018). Pixels are ranked by the map (most
salient first). Deletion replaces them, step by step, with a baseline image and tracks the target
class probability: a faithful map makes it fall fast (low AUC is good). Insertion starts from the
baseline and puts the pixels back: a faithful map makes it rise fast (high AUC is good). AUC is the
trapezoid rule over the fraction of pixels changed, in [0, 1].

Baselines (the "substrate"), in the model's normalised input space:

* ``"zero"``: all zeros, i.e. the training mean colour (inputs are normalised with the mean and
  std); RISE's deletion default (black there, mean colour here, which carries less signal).
* ``"blur"``: a Gaussian blur of the image (sigma = side / 16 px), RISE's insertion default: it keeps
  colours and layout but removes shape detail.
* ``"mean"``: each image's own per-channel mean.
* a tensor broadcastable to the images.

Ties in a map are broken at random (seeded), so flat regions (e.g. Grad-CAM's zeros) are not removed
in raster order. A random-map baseline (``random_baseline=True``, or a function from maps to random
maps of the same shape) is scored the same way for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.layout import check_images, resolve_target

__all__ = [
    "BASELINES", "DeletionInsertion", "auc", "baseline_images", "deletion_insertion", "mask_iou", "pointing_game",
    "random_maps",
]

BASELINES = ("zero", "blur", "mean")
MODES = ("deletion", "insertion", "both")

RandomMaps = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DeletionInsertion:
    """Curves and AUCs of deletion/insertion for a batch (fields of a mode not run are None)."""

    fractions: torch.Tensor  # (S+1,) fraction of pixels deleted/inserted at each step, 0 .. 1
    target: torch.Tensor  # (B,) class whose probability is tracked
    deletion: torch.Tensor | None = None  # (B, S+1) target probability while deleting
    insertion: torch.Tensor | None = None  # (B, S+1) target probability while inserting
    deletion_auc: torch.Tensor | None = None  # (B,) lower is better
    insertion_auc: torch.Tensor | None = None  # (B,) higher is better
    random: DeletionInsertion | None = None  # the same for random maps, when asked


def auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Area under curves (..., S+1) over ``fractions`` (S+1,) by the trapezoid rule."""
    return torch.trapezoid(curve, fractions, dim=-1)


def random_maps(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform random maps of the same shape as ``maps`` (the default random baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(maps.shape, generator=gen).to(maps.device)


def baseline_images(images: torch.Tensor, baseline: str | torch.Tensor) -> torch.Tensor:
    """The substrate (B, C, H, W) that deleted pixels become (see the module docs)."""
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(images), images.shape)
        except RuntimeError as err:
            raise ExplainError(f"a baseline of shape {tuple(baseline.shape)} does not broadcast to images of "
                               f"shape {tuple(images.shape)}.") from err
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        return _gaussian_blur(images, sigma=max(images.shape[-2:]) / 16)
    raise ExplainError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}, or pass a tensor.")


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()  # (K,)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect" if radius < min(images.shape[-2:]) else
              "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # (B, C, H, W)


def _unit_ranks(maps: torch.Tensor, patch_size: int | None, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Rank of each pixel's unit (pixel or patch) by saliency, most salient = 0: ((B, H*W), units)."""
    b, h, w = maps.shape
    values = maps.float()
    if patch_size is not None:
        if h % patch_size or w % patch_size:
            raise ExplainError(f"patch_size {patch_size} does not tile a {h}x{w} map; use a divisor or steps=.")
        values = F.avg_pool2d(values[:, None], patch_size)[:, 0]  # (B, gh, gw)
    flat = values.reshape(b, -1)  # (B, U)
    units = flat.shape[1]
    # Random order first, then a stable sort by value: ties end up in random order.
    shuffle = torch.rand(flat.shape, generator=gen).argsort(dim=1).to(flat.device)  # (B, U)
    order = shuffle.gather(1, flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))  # (B, U)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(units, device=flat.device).expand(b, -1))
    if patch_size is not None:  # each pixel takes its patch's rank
        gh, gw = values.shape[-2:]
        ranks = ranks.reshape(b, gh, 1, gw, 1).expand(b, gh, patch_size, gw, patch_size).reshape(b, h * w)
    return ranks, units


@torch.no_grad()
def _curves(model: nn.Module, images: torch.Tensor, substrate: torch.Tensor, ranks: torch.Tensor,
            counts: list[int], target: torch.Tensor, insert: bool, batch_size: int) -> torch.Tensor:
    """Target probability (B, S+1) after changing the ``counts[k]`` top-ranked units, for every step k."""
    b, c, h, w = images.shape
    steps = len(counts)
    probs = torch.empty(b, steps, device=images.device)
    jobs = [(i, k) for i in range(b) for k in range(steps)]  # one forward input per (image, step)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        idx = torch.tensor([i for i, _ in chunk], device=images.device)
        limit = torch.tensor([counts[k] for _, k in chunk], device=images.device)
        changed = (ranks[idx] < limit[:, None]).reshape(-1, 1, h, w)  # (n, 1, H, W)
        keep, put = (substrate[idx], images[idx]) if insert else (images[idx], substrate[idx])
        batch = torch.where(changed, put, keep)  # (n, C, H, W)
        p = model(batch).softmax(dim=-1)  # (n, classes)
        rows = torch.tensor([k for _, k in chunk], device=images.device)
        probs[idx, rows] = p.gather(1, target[idx][:, None])[:, 0]
    return probs


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, *,
                       target: int | torch.Tensor | None = None, mode: str = "both", steps: int | None = None,
                       patch_size: int | None = None, deletion_baseline: str | torch.Tensor = "zero",
                       insertion_baseline: str | torch.Tensor = "blur",
                       random_baseline: bool | RandomMaps = False, seed: int = 0,
                       batch_size: int = 128) -> DeletionInsertion:
    """Deletion and/or insertion curves and AUCs of ``maps`` (B, H, W) for ``images`` (B, C, H, W).

    Steps: ``patch_size=p`` ranks whole p x p patches (mean saliency) and changes one patch per
    step unless ``steps`` is given; otherwise pixels are ranked and ``steps`` (default 50) equal
    fractions are changed per step. Forward passes are batched ``batch_size`` inputs at a time.
    ``target`` defaults to each image's predicted class on the intact image.
    """
    check_images(images)
    maps = torch.as_tensor(maps, device=images.device)
    if maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ExplainError(f"maps must be (B, H, W) = ({images.shape[0]}, {images.shape[-2]}, {images.shape[-1]}) "
                           f"to match the images, got {tuple(maps.shape)}; upsample them first (explain does).")
    if mode not in MODES:
        raise ExplainError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1):
        raise ExplainError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ExplainError(f"steps must be a positive integer, got {steps!r}.")
    if batch_size < 1:
        raise ExplainError(f"batch_size must be positive, got {batch_size}.")
    images = images.detach()
    with torch.no_grad():
        if target is None:  # the predicted class of each intact image
            logits = torch.cat([model(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
        else:  # only the number of classes is needed to check the target
            logits = model(images[:1]).expand(images.shape[0], -1)  # (B, classes)
    t = resolve_target(target, logits)
    substrates = {
        "deletion": baseline_images(images, deletion_baseline) if mode != "insertion" else None,
        "insertion": baseline_images(images, insertion_baseline) if mode != "deletion" else None,
    }
    result = _score(model, images, maps, t, substrates, steps, patch_size, seed, batch_size)
    if random_baseline is not False:
        rand = random_maps(maps, seed + 1) if random_baseline is True else torch.as_tensor(random_baseline(maps))
        if rand.shape != maps.shape:
            raise ExplainError(f"the random baseline returned maps of shape {tuple(rand.shape)}, "
                               f"expected {tuple(maps.shape)}.")
        result.random = _score(model, images, rand.to(images.device), t, substrates, steps, patch_size, seed,
                               batch_size)
    return result


def _score(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
           substrates: dict[str, torch.Tensor | None], steps: int | None, patch_size: int | None, seed: int,
           batch_size: int) -> DeletionInsertion:
    gen = torch.Generator().manual_seed(seed)
    ranks, units = _unit_ranks(maps, patch_size, gen)
    n_steps = steps if steps is not None else (units if patch_size is not None else 50)
    n_steps = min(n_steps, units)
    counts = [round(k * units / n_steps) for k in range(n_steps + 1)]  # units changed after step k
    fractions = torch.tensor(counts, dtype=torch.float32, device=images.device) / units  # (S+1,)
    out = DeletionInsertion(fractions=fractions, target=target)
    for name, substrate in substrates.items():
        if substrate is None:
            continue
        curve = _curves(model, images, substrate, ranks, counts, target, name == "insertion", batch_size)
        setattr(out, name, curve)
        setattr(out, f"{name}_auc", auc(curve, fractions))
    return out


# --- localisation against ground-truth masks ---------------------------------------------------------

def _as_tensors(maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(np.asarray(maps) if isinstance(maps, np.ndarray) else maps).float()
    k = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks).bool()
    if m.ndim == 2:  # a single map
        m = m[None]
    if k.ndim == 2:
        k = k[None]
    if m.ndim != 3 or k.shape != m.shape:
        raise ExplainError(f"maps and masks must both be (B, H, W) of the same shape, got {tuple(m.shape)} and "
                           f"{tuple(k.shape)}; upsample maps to the image first.")
    return m, k.to(m.device)


def pointing_game(maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                  tolerance: float = 0.0) -> torch.Tensor:
    """Whether each map's maximum falls inside its mask (or within ``tolerance`` px of it): (B,) bool.

    The maximum is the first pixel in raster order holding the largest value. Images whose mask is
    empty count as misses.
    """
    if tolerance < 0:
        raise ExplainError(f"tolerance must be >= 0 px, got {tolerance}.")
    m, k = _as_tensors(maps, masks)
    b, h, w = m.shape
    peak = m.reshape(b, -1).argmax(dim=1)  # (B,)
    py, px = (peak // w).float(), (peak % w).float()  # (B,)
    if tolerance == 0:
        return k.reshape(b, -1).gather(1, peak[:, None])[:, 0]
    ys = torch.arange(h, device=m.device, dtype=torch.float32)[None, :, None]  # (1, H, 1)
    xs = torch.arange(w, device=m.device, dtype=torch.float32)[None, None, :]  # (1, 1, W)
    d2 = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2  # (B, H, W)
    d2 = torch.where(k, d2, torch.full_like(d2, float("inf")))
    return d2.reshape(b, -1).min(dim=1).values <= tolerance**2


def mask_iou(maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
             top_percent: float | None = None) -> torch.Tensor:
    """IoU (B,) of each map's most salient pixels with its mask.

    The map is thresholded at its top ``top_percent`` % of pixels; by default at as many pixels as
    the mask has (so a perfect ranking scores 1). Ties at the threshold are broken in raster order.
    """
    m, k = _as_tensors(maps, masks)
    b = m.shape[0]
    flat, truth = m.reshape(b, -1), k.reshape(b, -1)  # (B, HW)
    if top_percent is None:
        counts = truth.sum(dim=1)  # (B,)
    else:
        if not 0 < top_percent <= 100:
            raise ExplainError(f"top_percent must be in (0, 100], got {top_percent}.")
        counts = torch.full((b,), max(1, round(flat.shape[1] * top_percent / 100)), device=m.device)
    order = flat.argsort(dim=1, descending=True, stable=True)  # (B, HW)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=m.device).expand(b, -1))
    chosen = rank < counts[:, None]  # (B, HW)
    inter = (chosen & truth).sum(dim=1).float()
    union = (chosen | truth).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
