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
  The input itself is one more stage, ``"input"`` (:func:`pixel_statistics`): colour moments and
  histograms of the magnitudes of local pixel differences (luminance first and second differences,
  chroma first differences), the derivative statistics in which natural photos differ from other
  images (Field 1987; Huang & Mumford 1999). A network trained on flat synthetic scenes may map a
  photo onto familiar features at every stage; the photo's pixels still change the way a photo's do.
* ``"energy"``: the free energy ``-logsumexp(logits)`` (Liu et al. 2020), for models whose stages
  are not known. It only sees the logits, so confidently wrong photos pass it (see docs/ood.md).

Images reach a model through a resize (:func:`vitviz.images.preprocess`), and a scene drawn at 64 px
and shrunk to 32 px has smoother edges and less noise than any scene rendered at 32 px: the input
stage, and for some models the network's, would call it unusual. So a calibration can fit *views*:
copies of the training split as an upload brings them (made at 1.25-8 times the model's side and
resized, :func:`vitviz.data.uploads.upload_views`). Every stage then holds one Gaussian per view, and
a stage's score is the smallest over its views: an image is scored against the view it resembles most.

The threshold is the ``keep`` quantile (default 0.98) of the scores of the validation split and its
views: that share of held-out in-distribution images is kept. ``benchmarks/eval_ood.py`` measures
the share of each shipped model's test split (as it is, and resized like an upload) that is
flagged, and whether photos are.
"""

from __future__ import annotations

import base64
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vitviz.errors import CheckpointError, ConfigError
from vitviz.explain.hooks import this_thread

__all__ = [
    "DEFAULT_KEEP",
    "OOD_METHODS",
    "OodScore",
    "calibrate",
    "calibration_of",
    "ood_score",
    "pixel_statistics",
    "stage_modules",
]

OOD_METHODS = ("features", "energy")
DEFAULT_KEEP = 0.98  # a 0.95 quantile of 180 digits validation images flagged 6-9 % of the test split
DEFAULT_RANK = 32  # principal components per stage; the rest is one isotropic residual variance
# 2 adds the "input" stage (kind "pixels") and views (a list of Gaussians per stage); version 1 files
# (network stages only, one Gaussian each) still score.
CALIBRATION_VERSION = 2
READABLE_VERSIONS = (1, 2)
INPUT_STAGE = "input"  # the name the pixel statistics stage goes by in OodScore.stages
# Bin edges for the magnitudes of pixel differences, in [0, 1] pixel units: doubling steps from about
# 2.5 grey levels (sensor noise) to a third of the range (an object's edge).
PIXEL_BINS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights


@dataclass(frozen=True)
class OodScore:
    """Scores of a batch, the calibrated threshold, and which images lie beyond it."""

    scores: torch.Tensor  # (B,) float64, higher = less like the training data
    threshold: float
    method: str  # "features" | "energy"
    keep: float  # share of the validation split the threshold keeps
    stages: tuple[str, ...] = ()  # the stages the "features" score reads ("input", then the network's)
    stage_scores: torch.Tensor | None = None  # (B, len(stages)) each stage's standardised score; scores = max

    def stage(self, name: str) -> torch.Tensor:
        """(B,) one stage's standardised score, e.g. ``result.stage("input")``."""
        if self.stage_scores is None or name not in self.stages:
            raise ConfigError(f"this {self.method} score has no stage {name!r}; it has {list(self.stages)}.")
        return self.stage_scores[:, self.stages.index(name)]

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
    _check_version(cal)
    threshold, keep = _number(cal, "threshold"), _number(cal, "keep")
    if x.dim() != 4:
        raise ConfigError(f"ood_score takes a batch (B, 3, S, S), got shape {tuple(x.shape)}.")
    model.eval()
    if method == "energy":
        return OodScore(_energy(model(x)).double().cpu(), threshold, method, keep)  # (B,)
    layers = cal.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(layer, Mapping) for layer in layers):
        raise CheckpointError("the OOD calibration has no stages ('layers'); the metadata is damaged.")
    kinds = [_kind(layer) for layer in layers]
    modules = [str(layer.get("module")) for layer, kind in zip(layers, kinds, strict=True) if kind == "tokens"]
    network = iter(_stage_statistics(model, x, modules) if modules else [])  # one forward pass for all stages
    per_stage = []
    for layer, kind in zip(layers, kinds, strict=True):
        feats = next(network) if kind == "tokens" else _pixel_statistics_of(layer, x)
        per_stage.append(_layer_z(layer, feats))  # (B,)
    stage_scores = torch.stack(per_stage, dim=1).double().cpu()  # (B, stages)
    names = tuple(INPUT_STAGE if kind == "pixels" else str(layer.get("module"))
                  for layer, kind in zip(layers, kinds, strict=True))
    return OodScore(stage_scores.amax(1), threshold, method, keep, names, stage_scores)


def _check_version(cal: Mapping[str, Any]) -> None:
    version = cal.get("version", 1)
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"this checkpoint's OOD calibration has format version {version!r}; this vitviz reads versions "
            f"{list(READABLE_VERSIONS)}. Update vitviz, or recalibrate the checkpoint with docs/calibrate_ood.py."
        )


def _kind(layer: Mapping[str, Any]) -> str:
    kind = layer.get("kind", "tokens")  # version 1 stages carry no kind: they are all network stages
    if kind not in ("tokens", "pixels"):
        raise CheckpointError(f"the OOD calibration has a stage of unknown kind {kind!r}; update vitviz.")
    return str(kind)


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
    pixels: bool = True,
    views: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """A JSON-ready calibration (for ``save_checkpoint(..., ood=...)``) from uint8 splits (N, 3, S, S).

    ``"features"`` fits one Gaussian per stage on ``train_images`` (with ``pixels``, the input's
    :func:`pixel_statistics` are the first stage), and one more per entry of ``views``: named pairs
    ``(train, val)`` of the same content as it reaches the model another way, uint8 (n, 3, S, S) too
    (:func:`vitviz.data.uploads.upload_views` makes upload copies). Both methods set the threshold to
    the ``keep`` quantile of the scores of ``val_images`` and the views' validation images. A model
    whose stages are unknown gets ``"energy"`` instead of ``"features"``. ``mean``/``std`` are the
    normalisation the model's inputs get.
    """
    from vitviz.data.augment import normalize

    if method not in OOD_METHODS:
        raise ConfigError(f"unknown OOD method {method!r}; use one of {OOD_METHODS}.")
    if not 0.5 <= keep < 1.0:
        raise ConfigError(f"keep must be in [0.5, 1), the share of validation images kept; got {keep!r}.")
    views = dict(views or {})
    _check_views(views, train_images, val_images)
    train_sets = [train_images, *(pair[0] for pair in views.values())]
    val_sets = [val_images, *(pair[1] for pair in views.values())]
    if min(map(len, val_sets)) < 1 or (method == "features" and min(map(len, train_sets)) < 2):
        raise ConfigError("OOD calibration needs at least two training images and one validation image "
                          "(in the splits and in every view).")
    if method == "features" and stage_modules(model) is None:
        method = "energy"
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device

    def batches(images: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield normalize(images[start : start + batch_size].to(device), mean, std)  # (b, 3, S, S)

    cal: dict[str, Any] = {"version": CALIBRATION_VERSION, "method": method, "keep": keep,
                           "views": ["native", *views]}
    if method == "energy":
        val = torch.cat([_energy(model(x)).cpu() for images in val_sets for x in batches(images)])  # (Nv,)
    else:
        names = stage_modules(model)
        per_view = [_collect(model, batches(images), names) for images in train_sets]  # [view][stage] (N, 2D)
        layers = [{"kind": "tokens", "module": name, "gaussians": [_fit_gaussian(f[i], rank) for f in per_view]}
                  for i, name in enumerate(names)]
        if pixels:
            where = {"kind": "pixels", "module": INPUT_STAGE, "pixel_mean": [float(m) for m in mean],
                     "pixel_std": [float(s) for s in std], "bins": list(PIXEL_BINS)}
            stats = [torch.cat([_pixel_statistics_of(where, x) for x in batches(images)]) for images in train_sets]
            layers.insert(0, {**where, "gaussians": [_fit_gaussian(f, rank) for f in stats]})  # f: (N, P)
        cal["rank"] = rank
        cal["layers"] = layers
        scoring = cal | {"threshold": 0.0}
        val = torch.cat([ood_score(model, scoring, x).scores for images in val_sets for x in batches(images)])
    cal["threshold"] = float(torch.quantile(val, keep))  # val: (Nv,) over the split and its views
    cal["num_val"] = len(val)
    return cal


def _check_views(views: Mapping[str, Any], train: torch.Tensor, val: torch.Tensor) -> None:
    shape = tuple(train.shape[1:])
    for name, pair in views.items():
        ok = (isinstance(name, str) and name and name != "native" and isinstance(pair, (tuple, list))
              and len(pair) == 2 and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                         and tuple(t.shape[1:]) == shape for t in pair))
        if not ok:
            raise ConfigError(
                f"view {name!r} must be a (train, val) pair of uint8 images shaped like the splits (N, *{shape}), "
                "under a name other than 'native'; vitviz.data.uploads.upload_views makes such pairs."
            )
    if tuple(val.shape[1:]) != shape:
        raise ConfigError(f"the validation images are {tuple(val.shape[1:])}, the training images {shape}.")


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


def pixel_statistics(x: torch.Tensor, bins: Sequence[float] = PIXEL_BINS) -> torch.Tensor:
    """Statistics of images ``x`` (B, 3, H, W) with values in [0, 1]: (B, 6 + 3 * len(bins)) float64.

    Per image: the mean and standard deviation of each colour channel, then three histograms of
    difference magnitudes over the bins ``[0, bins[0]), [bins[0], bins[1]), ...``: luminance first
    differences (horizontal and vertical neighbours), luminance second differences (the 4-neighbour
    Laplacian), and chroma first differences (red-green and yellow-blue opponents). Each histogram
    drops its last bin, which the others determine (the shares sum to one): a Gaussian cannot score
    a direction the data never varies in. Values are first rounded to the 256 levels of 8-bit
    images, as models receive them: this undoes the float error of normalising and un-normalising,
    which could otherwise move a difference across a bin edge.
    """
    if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 3:
        raise ConfigError(f"pixel statistics need RGB images (B, 3, H, W) of at least 3x3, got {tuple(x.shape)}.")
    p = (x.detach().cpu().double() * 255).round() / 255  # (B, 3, H, W); float64 is not on every accelerator
    edges = torch.tensor([float(b) for b in bins], dtype=torch.float64)
    luma = (_LUMA[0] * p[:, 0] + _LUMA[1] * p[:, 1] + _LUMA[2] * p[:, 2])[:, None]  # (B, 1, H, W)
    chroma = torch.stack([p[:, 0] - p[:, 1], (p[:, 0] + p[:, 1]) / 2 - p[:, 2]], dim=1)  # (B, 2, H, W)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    second = F.conv2d(luma, laplace[None, None]).abs().flatten(1)  # (B, (H-2)(W-2))
    colour = torch.cat([p.mean((2, 3)), p.std((2, 3), correction=0)], dim=1)  # (B, 6)
    hists = [_share_per_bin(v, edges) for v in (_neighbour_steps(luma), second, _neighbour_steps(chroma))]
    return torch.cat([colour, *hists], dim=1)


def _neighbour_steps(t: torch.Tensor) -> torch.Tensor:
    """|differences| of horizontal and vertical neighbours of (B, C, H, W), pooled: (B, M)."""
    across = (t[..., :, 1:] - t[..., :, :-1]).abs().flatten(1)  # (B, C H (W-1))
    down = (t[..., 1:, :] - t[..., :-1, :]).abs().flatten(1)  # (B, C (H-1) W)
    return torch.cat([across, down], dim=1)


def _share_per_bin(v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(B, M) magnitudes -> (B, len(edges)) share in each bin but the last."""
    counts = F.one_hot(torch.bucketize(v, edges, right=True), len(edges) + 1).sum(1)  # (B, bins)
    return counts[:, :-1].double() / v.shape[1]


def _pixel_statistics_of(layer: Mapping[str, Any], x: torch.Tensor) -> torch.Tensor:
    """The input stage's statistics of a normalised batch: undo the stored normalisation first."""
    mean, std, bins = (_numbers(layer, key) for key in ("pixel_mean", "pixel_std", "bins"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError("the OOD calibration's input stage has a damaged normalisation (pixel_mean, pixel_std).")
    if any(b <= a for a, b in zip([0.0, *bins], bins, strict=False)):
        raise CheckpointError(f"the OOD calibration's input stage has bins {bins}, not increasing from 0; damaged.")
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return pixel_statistics(x.detach().cpu().double() * s + m, bins)  # (B, P)


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
            handles.append(module.register_forward_hook(this_thread(_pooling_hook(name, found))))
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


def _fit_gaussian(feats: torch.Tensor, rank: int) -> dict[str, Any]:
    """Probabilistic PCA of (N, P) training statistics, and how their log-distances spread."""
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
    gaussian = {"mean": _encode(mu), "components": _encode(evecs[:, :r].T.contiguous()),
                "variances": _encode(variances), "residual_variance": max(residual, floor)}
    logd = torch.log(_distance(gaussian, feats))  # (N,)
    gaussian["log_median"] = float(logd.median())
    gaussian["log_scale"] = max(float(logd.std()), 1e-6)
    return gaussian


def _distance(gaussian: Mapping[str, Any], feats: torch.Tensor, stage: str = "") -> torch.Tensor:
    """Squared PPCA Mahalanobis distance of (B, P) statistics: (B,) float64."""
    mu, comps, var = (_decode(gaussian, k) for k in ("mean", "components", "variances"))
    if feats.shape[-1] != mu.shape[0] or comps.shape != (var.shape[0], mu.shape[0]):
        raise CheckpointError(
            f"the OOD calibration of stage {stage!r} expects {mu.shape[0]} statistics, the model "
            f"gives {feats.shape[-1]}; it belongs to another model."
        )
    d = feats.double() - mu  # (B, P)
    z = d @ comps.T  # (B, r)
    inside = (z**2 / var).sum(1)  # (B,)
    rest = ((d**2).sum(1) - (z**2).sum(1)).clamp_min(0)  # (B,) energy outside the top components
    return inside + rest / _number(gaussian, "residual_variance") + 1e-300


def _layer_z(layer: Mapping[str, Any], feats: torch.Tensor) -> torch.Tensor:
    """A stage's score: the log-distance in units of the training spread, to the nearest view's Gaussian: (B,)."""
    stage = str(layer.get("module"))
    z = [(torch.log(_distance(g, feats, stage)) - _number(g, "log_median")) / _number(g, "log_scale")
         for g in _gaussians(layer)]  # per view (B,)
    return torch.stack(z).amin(0)


def _gaussians(layer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A stage's Gaussians, one per view; a version 1 stage is its own single Gaussian."""
    if "gaussians" not in layer:
        return [layer]
    found = layer["gaussians"]
    if not isinstance(found, list) or not found or not all(isinstance(g, Mapping) for g in found):
        raise CheckpointError(f"the OOD calibration of stage {layer.get('module')!r} has no Gaussians; it is damaged.")
    return found


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


def _numbers(cal: Mapping[str, Any], key: str) -> list[float]:
    values = cal.get(key)
    if not isinstance(values, list) or not values or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise CheckpointError(f"the OOD calibration's {key!r} is {values!r}, not a list of numbers; it is damaged.")
    return [float(v) for v in values]


def _number(cal: Mapping[str, Any], key: str) -> float:
    value = cal.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"the OOD calibration's {key!r} is {value!r}, not a finite number; it is damaged.")
    return float(value)
