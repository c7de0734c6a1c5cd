"""Out-of-distribution scores: does an image look like the ones a checkpoint was trained on?

A classifier trained on eight synthetic shapes answers "circle — 90 %" for a photo of a temple: its
softmax only ranks the classes it knows. :func:`ood_score` says how unlike the training data an input
is, with a threshold calibrated on the checkpoint's own validation split and stored in its metadata
(``meta.ood``), so the dashboard and users can say "this model was not trained on images like this".

Two calibrated scores (higher = less like the training data):

* ``"features"`` (the default): at every stage of the network (the patch embedding or stem, then each
  block or stage), the mean and standard deviation over tokens (or feature-map cells) of its output
  are scored by a Gaussian fitted on the training split (probabilistic PCA of rank 32: squared
  Mahalanobis distance in the top components plus the residual over the isotropic rest; Tipping &
  Bishop 1999). Each stage's log-distance is standardised by the training split, and the score is the
  maximum over stages, in the spirit of Lee et al. (2018), who score every layer's features.
  Every stage counts because a classifier learns to ignore what does not separate its classes (a
  background, colour, texture), so its last features can look typical for a photo; earlier stages
  still see that the photo's colours and textures are unlike any training image.
* ``"energy"``: the free energy ``-logsumexp(logits)`` (Liu et al. 2020), for models whose stages
  are not known. It only sees the logits, so confidently wrong photos pass it (see docs/ood.md).

The threshold is the ``keep`` quantile (default 0.98) of the validation split's scores: that share
of held-out in-distribution images is kept. ``benchmarks/eval_ood.py`` measures the share of each
shipped model's test split that is flagged, and whether photos are.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.errors import CheckpointError, ConfigError

__all__ = [
    "DEFAULT_KEEP",
    "OOD_METHODS",
    "OodScore",
    "calibrate",
    "calibration_of",
    "ood_score",
    "stage_modules",
]

OOD_METHODS = ("features", "energy")
DEFAULT_KEEP = 0.98  # a 0.95 quantile of 180 digits validation images flagged 6-9 % of the test split
DEFAULT_RANK = 32  # principal components per stage; the rest is one isotropic residual variance
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class OodScore:
    """Scores of a batch, the calibrated threshold, and which images lie beyond it."""

    scores: torch.Tensor  # (B,) float64, higher = less like the training data
    threshold: float
    method: str  # "features" | "energy"
    keep: float  # share of the validation split the threshold keeps

    @property
    def flagged(self) -> torch.Tensor:
        """(B,) bool: True where an image is out of distribution."""
        return self.scores > self.threshold

    @property
    def score(self) -> float:
        """The score of a single image (a batch of one)."""
        return float(self._single(self.scores))

    @property
    def out_of_distribution(self) -> bool:
        """The verdict for a single image (a batch of one)."""
        return bool(self._single(self.flagged))

    @property
    def verdict(self) -> str:
        """``"out of distribution"`` or ``"in distribution"`` for a single image."""
        return "out of distribution" if self.out_of_distribution else "in distribution"

    def _single(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() != 1:
            raise ConfigError(f"this score holds {t.numel()} images; read .scores and .flagged for a batch.")
        return t.reshape(())


# --------------------------------------------------------------------------------------------------
# scoring


def calibration_of(meta: Any) -> dict[str, Any] | None:
    """The OOD calibration of a checkpoint: ``meta.ood`` (CheckpointMeta or anything with ``.ood``), or a dict."""
    if meta is None:
        return None
    cal = meta if isinstance(meta, Mapping) and "method" in meta else getattr(meta, "ood", None)
    return dict(cal) if isinstance(cal, Mapping) else None


@torch.no_grad()
def ood_score(model: nn.Module, meta: Any, x: torch.Tensor) -> OodScore:
    """Score a normalised batch ``x`` (B, 3, S, S) (as :func:`vitviz.images.preprocess` makes it).

    ``meta`` is the checkpoint's :class:`~vitviz.checkpoint.CheckpointMeta` (or a calibration dict).
    Raises :class:`~vitviz.errors.CheckpointError` when it has no calibration, or a damaged one.
    """
    cal = calibration_of(meta)
    if cal is None:
        raise CheckpointError(
            "this checkpoint has no out-of-distribution calibration (meta.ood); checkpoints written by "
            "`vitviz train` carry one, and docs/calibrate_ood.py adds one to an existing checkpoint."
        )
    method = cal.get("method")
    if method not in OOD_METHODS:
        raise CheckpointError(f"unknown OOD calibration method {method!r}; this vitviz knows {OOD_METHODS}.")
    threshold, keep = _number(cal, "threshold"), _number(cal, "keep")
    if x.dim() != 4:
        raise ConfigError(f"ood_score takes a batch (B, 3, S, S), got shape {tuple(x.shape)}.")
    model.eval()
    if method == "energy":
        scores = _energy(model(x))  # (B,)
    else:
        layers = cal.get("layers")
        if not isinstance(layers, list) or not layers:
            raise CheckpointError("the OOD calibration has no stages ('layers'); the metadata is damaged.")
        stats = _stage_statistics(model, x, [str(layer.get("module")) for layer in layers])
        scores = torch.stack([_layer_z(layer, stats[i]) for i, layer in enumerate(layers)]).amax(0)  # (B,)
    return OodScore(scores.double().cpu(), threshold, method, keep)


def _energy(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ConfigError("the energy score needs a classifier's logits (B, classes); this model has no head.")
    return -torch.logsumexp(logits.double(), dim=-1)  # (B,)


# --------------------------------------------------------------------------------------------------
# calibration


@torch.no_grad()
def calibrate(
    model: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    method: str = "features",
    keep: float = DEFAULT_KEEP,
    rank: int = DEFAULT_RANK,
    batch_size: int = 256,
) -> dict[str, Any]:
    """A JSON-ready calibration (for ``save_checkpoint(..., ood=...)``) from uint8 splits (N, 3, S, S).

    ``"features"`` fits one Gaussian per stage on ``train_images``; both methods set the threshold to
    the ``keep`` quantile of the scores of ``val_images``. A model whose stages are unknown gets
    ``"energy"`` instead of ``"features"``.
    """
    from vitviz.data.augment import normalize

    if method not in OOD_METHODS:
        raise ConfigError(f"unknown OOD method {method!r}; use one of {OOD_METHODS}.")
    if not 0.5 <= keep < 1.0:
        raise ConfigError(f"keep must be in [0.5, 1), the share of validation images kept; got {keep!r}.")
    if len(val_images) < 1 or (method == "features" and len(train_images) < 2):
        raise ConfigError("OOD calibration needs at least two training images and one validation image.")
    if method == "features" and stage_modules(model) is None:
        method = "energy"
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device

    def batches(images: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield normalize(images[start : start + batch_size].to(device), mean, std)  # (b, 3, S, S)

    cal: dict[str, Any] = {"version": CALIBRATION_VERSION, "method": method, "keep": keep}
    if method == "energy":
        val = torch.cat([_energy(model(x)).cpu() for x in batches(val_images)])  # (Nv,)
    else:
        names = stage_modules(model)
        train = _collect(model, batches(train_images), names)  # per stage (N, 2D)
        layers = [_fit_layer(name, f, rank) for name, f in zip(names, train, strict=True)]
        val_stats = _collect(model, batches(val_images), names)
        val = torch.stack([_layer_z(layer, f) for layer, f in zip(layers, val_stats, strict=True)]).amax(0)
        cal["rank"] = rank
        cal["layers"] = layers
    cal["threshold"] = float(torch.quantile(val, keep))
    cal["num_val"] = len(val)
    return cal


def stage_modules(model: nn.Module) -> list[str] | None:
    """Names of the modules whose outputs the ``features`` score reads, in forward order; None if unknown.

    A vitviz ViT or hybrid: the patch embedding and every block. A vitviz ResNet: the stem and every stage.
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and isinstance(getattr(model, "patch_embed", None), nn.Module):
        return ["patch_embed", *(f"blocks.{i}" for i in range(len(blocks)))]
    stages = getattr(model, "stage_names", None)
    if isinstance(stages, (list, tuple)) and stages and all(isinstance(s, str) for s in stages):
        stem = ["maxpool"] if isinstance(getattr(model, "maxpool", None), nn.Module) else []
        return [*stem, *stages]
    return None


def _collect(model: nn.Module, batches: Iterator[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    parts: list[list[torch.Tensor]] = [[] for _ in names]
    for x in batches:
        for i, s in enumerate(_stage_statistics(model, x, names)):
            parts[i].append(s)
    return [torch.cat(p) for p in parts]


def _stage_statistics(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    """Per stage, the mean and std over tokens of its output: (B, 2D) float64 each, from one forward pass."""
    found: dict[str, torch.Tensor] = {}
    with _hooks(model, names, found):
        model(x)
    missing = [n for n in names if n not in found]
    if missing:
        raise CheckpointError(f"the OOD calibration names stages this model never ran: {missing}.")
    return [found[n] for n in names]


@contextmanager
def _hooks(model: nn.Module, names: list[str], found: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = []
    try:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as err:
                raise CheckpointError(
                    f"the OOD calibration names a stage {name!r} this model does not have; it belongs to "
                    "another model."
                ) from err
            handles.append(module.register_forward_hook(_pooling_hook(name, found)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pooling_hook(name: str, found: dict[str, torch.Tensor]):
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        if t.dim() == 4:
            t = t.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        elif t.dim() == 2:
            t = t[:, None]  # (B, D) -> (B, 1, D)
        t = t.detach().double()  # (B, N, D)
        found[name] = torch.cat([t.mean(1), t.std(1, correction=0)], dim=1).cpu()  # (B, 2D)

    return hook


def _fit_layer(name: str, feats: torch.Tensor, rank: int) -> dict[str, Any]:
    """Probabilistic PCA of one stage's training statistics, and how its log-distances spread."""
    mu = feats.mean(0)  # (P,)
    d = feats - mu  # (N, P)
    cov = d.T @ d / len(d)  # (P, P)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    # A floor keeps directions the training data never varies in (a grayscale set's colour) finite:
    # an image that varies there gets a huge but finite distance.
    floor = max(float(evals.clamp_min(0).sum()) / len(evals), 1e-30) * 1e-9
    r = max(1, min(rank, len(evals) - 1, len(d) - 1))
    variances = evals[:r].clamp_min(floor)
    residual = float(evals[r:].clamp_min(0).mean()) if len(evals) > r else floor
    layer = {"module": name, "mean": _encode(mu), "components": _encode(evecs[:, :r].T.contiguous()),
             "variances": _encode(variances), "residual_variance": max(residual, floor)}
    logd = torch.log(_distance(layer, feats))  # (N,)
    layer["log_median"] = float(logd.median())
    layer["log_scale"] = max(float(logd.std()), 1e-6)
    return layer


def _distance(layer: Mapping[str, Any], feats: torch.Tensor) -> torch.Tensor:
    """Squared PPCA Mahalanobis distance of (B, P) statistics: (B,) float64."""
    mu, comps, var = (_decode(layer, k) for k in ("mean", "components", "variances"))
    if feats.shape[-1] != mu.shape[0] or comps.shape != (var.shape[0], mu.shape[0]):
        raise CheckpointError(
            f"the OOD calibration of stage {layer.get('module')!r} expects {mu.shape[0]} statistics, the model "
            f"gives {feats.shape[-1]}; it belongs to another model."
        )
    d = feats.double() - mu  # (B, P)
    z = d @ comps.T  # (B, r)
    inside = (z**2 / var).sum(1)  # (B,)
    rest = ((d**2).sum(1) - (z**2).sum(1)).clamp_min(0)  # (B,) energy outside the top components
    return inside + rest / _number(layer, "residual_variance") + 1e-300


def _layer_z(layer: Mapping[str, Any], feats: torch.Tensor) -> torch.Tensor:
    """A stage's log-distance in units of its training spread: (B,)."""
    return (torch.log(_distance(layer, feats)) - _number(layer, "log_median")) / _number(layer, "log_scale")


# --------------------------------------------------------------------------------------------------
# arrays in JSON: little-endian float32, base64 (about 4x smaller than decimal text)


def _encode(t: torch.Tensor) -> dict[str, Any]:
    a = t.detach().cpu().to(torch.float32).numpy().astype("<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(layer: Mapping[str, Any], key: str) -> torch.Tensor:
    entry = layer.get(key)
    try:
        shape = [int(s) for s in entry["shape"]]
        raw = base64.b64decode(entry["base64"], validate=True)
        a = np.frombuffer(raw, dtype="<f4").reshape(shape)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the OOD calibration's {key!r} array is damaged ({err}).") from err
    return torch.from_numpy(a.astype(np.float64))


def _number(cal: Mapping[str, Any], key: str) -> float:
    value = cal.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"the OOD calibration's {key!r} is {value!r}, not a finite number; it is damaged.")
    return float(value)
