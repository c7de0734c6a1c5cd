"""Which explanation to trust: the one scorer used by ``vitviz trust``, the benchmark and the dashboard.

Every number comes with the protocol that produced it (:class:`Protocol`, :meth:`Protocol.describe`):

* **Deletion / insertion** (Petsiuk et al. 2018): the map ranks units (patch-aligned squares on a
  transformer, a stated square size on a CNN; ties broken at random, seeded per image); ``steps``
  equal shares of the units are replaced by the baseline (deletion: zeros in normalised space, the
  training mean colour) or put back into it (insertion: a Gaussian blur of the image). The curve is
  the target class's softmax probability; AUC is the trapezoid over the fraction changed, from the
  unperturbed point (0) to 1.
* **ROAD** (Rong et al. 2022, remove-and-debias, most relevant first): the top ``f`` of the units are
  removed and filled by noisy linear imputation from their neighbours (each removed pixel the
  weighted mean of its 8 neighbours, 1/6 for edge and 1/12 for corner neighbours, solved as one
  sparse linear system, plus Gaussian noise), for ``f`` in ``road_fractions``; AUC is the trapezoid
  over those fractions (including 0) divided by the last one, i.e. the mean probability. Imputed
  pixels look like their surroundings, so the model is not pushed off its training distribution the
  way a hard baseline pushes it. Matches pytorch-grad-cam's ``ROADMostRelevantFirst``
  (tests/test_trust.py).
* **Sanity check** (Adebayo et al. 2018, cascading model-parameter randomisation): the head, then the
  layers from the top down, are re-drawn at random (each tensor from a normal with its own mean and
  std); after each stage the map of the same image and class is compared with the original map by
  Spearman rank correlation on the unit grid. A map that still correlates >= ``sanity_flag`` once the
  whole model is random does not depend on what the model learned: it is flagged.
* **Pointing game and mask IoU** where object masks exist (:mod:`vitviz.explain.faithfulness`).
* **Random maps** (uniform noise, seeded per image) are scored the same way beside every method, and
  every mean gets a percentile bootstrap interval over images; a method *beats random* on a metric
  when the paired bootstrap interval of its difference to random excludes zero on the good side.

Per-image scores depend only on the image, its global index and the seed, never on the batch or
process it ran in, so sharded runs (``torchrun``) merge to the single-process result.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.faithfulness import _curves, _unit_ranks, auc, baseline_images, mask_iou, pointing_game

__all__ = [
    "FAITHFULNESS", "METRICS", "Protocol", "TrustRecords", "cascade_stages", "impute_noisy_linear", "is_slow",
    "markdown_table", "merge_records", "perturbation_scores", "protocol_for", "score_methods", "summarise", "verdict",
]

# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "deletion_auc": ("deletion AUC", False),
    "insertion_auc": ("insertion AUC", True),
    "road_auc": ("ROAD AUC", False),
    "pointing_game": ("pointing game", True),
    "mask_iou": ("mask IoU", True),
}
FAITHFULNESS = ("deletion_auc", "insertion_auc", "road_auc")  # need no masks
RANDOM = "random"
SLOW_PASSES = 12  # forward + backward passes above which a method counts as slow (dashboards run it on request)

# noisy linear imputation: (row offset, column offset, weight) of the 8 neighbours (ROAD, Rong et al. 2022)
_NEIGHBOURS = ((0, 1, 1 / 6), (0, -1, 1 / 6), (1, 0, 1 / 6), (-1, 0, 1 / 6),
               (1, 1, 1 / 12), (1, -1, 1 / 12), (-1, 1, 1 / 12), (-1, -1, 1 / 12))


@dataclass(frozen=True)
class Protocol:
    """Everything a trust score depends on; :meth:`describe` states it in one paragraph."""

    unit: int  # side of the perturbed squares in pixels
    unit_source: str = ""  # why this unit (the model's patch, or the size stated for a CNN)
    steps: int = 16  # deletion/insertion steps (capped at the number of units)
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    road_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    road_noise: float = 0.01  # std of the imputation noise, in the model's normalised input units
    target: str = "predicted"  # "predicted" (the model's class on the intact image) or "label"
    seed: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    sanity_images: int = 8  # images the cascade randomisation runs on (0: no sanity check)
    sanity_points: int = 4  # cascade stages at which maps are compared (always the head and the whole model)
    sanity_flag: float = 0.5  # Spearman at full randomisation at or above which a method is flagged

    def __post_init__(self) -> None:
        for name in ("unit", "steps", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExplainError(f"{name} must be a positive integer, got {value!r}.")
        fr = self.road_fractions
        if not fr or fr[0] != 0.0 or any(b <= a for a, b in zip(fr, fr[1:], strict=False)) or fr[-1] >= 1.0:
            raise ExplainError(f"road_fractions must rise from 0 and stay below 1 (all removed leaves nothing to "
                               f"impute from), got {fr!r}.")
        if self.target not in ("predicted", "label"):
            raise ExplainError(f"target must be 'predicted' or 'label', got {self.target!r}.")
        if not 0 < self.confidence < 1:
            raise ExplainError(f"confidence must be in (0, 1), got {self.confidence}.")

    def describe(self) -> str:
        """The protocol in words, printed with every table."""
        fr = self.road_fractions
        target = "the class predicted on the intact image" if self.target == "predicted" else "the true label"
        return (f"Score: softmax probability of {target}. Unit: {self.unit}x{self.unit}-px squares "
                f"({self.unit_source or 'stated'}), ranked by the map's mean, ties at random (seed {self.seed}). "
                f"Deletion: {self.steps} steps to a '{self.deletion_baseline}' baseline (zeros in normalised space: "
                f"the mean colour); insertion: {self.steps} steps from a '{self.insertion_baseline}' baseline "
                "(Gaussian blur, sigma = side/16); AUC = trapezoid over the fraction changed, 0 to 1, the unperturbed "
                f"point included. ROAD (most relevant first): units removed at fractions {fr[1]:g}..{fr[-1]:g} "
                f"(step {fr[1] - fr[0]:g}), filled by noisy linear imputation from neighbours (noise std "
                f"{self.road_noise:g}); AUC = trapezoid over 0..{fr[-1]:g} / {fr[-1]:g} (mean probability). Random "
                f"baseline: uniform random maps; intervals: {self.confidence:.0%} percentile bootstrap over images "
                f"({self.bootstrap} resamples). Sanity: cascading randomisation (head, then layers top-down) on "
                f"{self.sanity_images} images, Spearman of the unit-grid maps; flagged at rho >= {self.sanity_flag:g} "
                "with the whole model random.")


def protocol_for(model: nn.Module, height: int, width: int, unit: int | None = None, **overrides: Any) -> Protocol:
    """The default protocol for ``model`` on ``height`` x ``width`` inputs.

    Unit: the token cell on a transformer (patch-aligned), else ``unit`` or the largest divisor of the
    side up to a side/8 (a CNN has no patch; 4 px at 32 px, 28 px at 224 px).
    """
    from vitviz.explain.adapters import adapter_for

    if unit is not None:
        return Protocol(unit=int(unit), unit_source="given", **overrides)
    adapter = adapter_for(model)
    if adapter.kind == "transformer":
        try:
            cell = adapter.final_tokens(height, width).cell
        except ExplainError:
            cell = None
        if cell is not None and cell[0] == cell[1] and height % cell[0] == 0 and width % cell[1] == 0:
            return Protocol(unit=int(cell[0]), unit_source="the model's token cell", **overrides)
    side = math.gcd(height, width)
    limit = max(1, min(height, width) // 8)
    unit = max(d for d in range(1, limit + 1) if side % d == 0)
    return Protocol(unit=unit, unit_source="largest divisor of the side up to side/8", **overrides)


def is_slow(method: str, model: nn.Module | None = None, height: int = 224, width: int = 224) -> bool:
    """Whether ``method`` costs many model passes (the registry's cost): dashboards run it only on request."""
    from vitviz.explain.registry import CostContext, get_method

    spec = get_method(method)
    ctx = CostContext(height=height, width=width)
    if model is not None:
        from vitviz.explain.adapters import adapter_for
        from vitviz.explain.api import cost_context

        ctx = cost_context(adapter_for(model), torch.empty(1, 3, height, width))
    cost = spec.cost_for(None, ctx)
    return cost.forward + cost.backward > SLOW_PASSES or cost.per_channel


# --- per-image randomness ----------------------------------------------------------------------------

def _generator(seed: int, index: int, salt: str) -> torch.Generator:
    """A CPU generator that depends on (seed, image index, purpose) only: batch- and process-independent."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + zlib.crc32(salt.encode())) % 2**63)


def random_unit_maps(shape: tuple[int, int], indices: Sequence[int], seed: int) -> torch.Tensor:
    """Uniform random maps (B, H, W), one per global image index."""
    return torch.stack([torch.rand(shape, generator=_generator(seed, int(i), "random-map")) for i in indices])


def _ranks(maps: torch.Tensor, unit: int, indices: Sequence[int], seed: int) -> tuple[torch.Tensor, int]:
    """Unit rank of every pixel (B, H*W), ties broken by a per-image generator, and the number of units."""
    rows, units = [], 0
    for b, i in enumerate(indices):
        r, units = _unit_ranks(maps[b:b + 1].cpu(), None if unit == 1 else unit, _generator(seed, int(i), "ties"))
        rows.append(r)
    return torch.cat(rows).to(maps.device), units


# --- ROAD ---------------------------------------------------------------------------------------------

def impute_noisy_linear(image: torch.Tensor, removed: torch.Tensor, noise: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``image`` (C, H, W) with the ``removed`` pixels (H, W) bool filled from their neighbours.

    Every removed pixel equals the weighted mean of its in-image neighbours (edges 1/6, corners 1/12),
    known or removed: one sparse linear system for all of them, solved per channel; then Gaussian noise
    of std ``noise`` is added to the filled values (ROAD's noisy linear imputation).
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = image.shape
    gone = removed.detach().cpu().numpy().reshape(-1).astype(bool)  # (H*W,)
    unknown = np.flatnonzero(gone)
    if unknown.size == 0:
        return image.clone()
    if unknown.size == gone.size:
        raise ExplainError("ROAD cannot impute an image with every pixel removed; keep road_fractions below 1.")
    values = image.detach().double().cpu().numpy().reshape(c, -1)  # (C, H*W)
    var = np.full(gone.size, -1, dtype=np.int64)
    var[unknown] = np.arange(unknown.size)
    ys, xs = unknown // w, unknown % w
    diag = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    rows, cols, vals = [], [], []
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        eq = np.flatnonzero(inside)  # equations with this neighbour in the image
        nb = ny[eq] * w + nx[eq]  # (E,) flat neighbour index
        diag[eq] += wt
        known = ~gone[nb]
        rhs[eq[known]] -= wt * values[:, nb[known]].T  # known neighbours go to the right-hand side
        rows.append(eq[~known])
        cols.append(var[nb[~known]])
        vals.append(np.full(int((~known).sum()), wt))
    n = unknown.size
    a = csc_matrix((np.concatenate([*vals, -diag]), (np.concatenate([*rows, np.arange(n)]),
                                                     np.concatenate([*cols, np.arange(n)]))), shape=(n, n))
    solved = spsolve(a, rhs).reshape(n, c)  # (U, C)
    out = image.detach().clone().reshape(c, -1)  # (C, H*W)
    filled = torch.as_tensor(solved.T, dtype=image.dtype)  # (C, U)
    if noise:
        filled = filled + noise * torch.randn(filled.shape, generator=generator, dtype=image.dtype)
    out[:, torch.as_tensor(unknown, device=out.device)] = filled.to(out.device)
    return out.reshape(c, h, w)


# --- perturbation scores of one batch ------------------------------------------------------------------

@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [model(x[s:s + batch_size]).float().softmax(-1).gather(1, target[s:s + batch_size, None])[:, 0]
           for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out)  # (n,)


def perturbation_scores(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        protocol: Protocol, indices: Sequence[int], *, road: bool = True,
                        forward_batch: int = 128) -> dict[str, torch.Tensor]:
    """Deletion, insertion and ROAD curves and AUCs of ``maps`` (B, H, W) for ``images`` (B, C, H, W).

    Returns ``{"fractions", "deletion", "insertion", "deletion_auc", "insertion_auc"}`` and, with
    ``road``, ``{"road_fractions", "road", "road_auc"}``; curves are (B, S+1), AUCs (B,).
    """
    b, _, h, w = images.shape
    if maps.shape != (b, h, w):
        raise ExplainError(f"maps must be (B, H, W) = ({b}, {h}, {w}) to match the images, got {tuple(maps.shape)}.")
    if h % protocol.unit or w % protocol.unit:
        raise ExplainError(f"the {protocol.unit}-px unit does not tile {h}x{w} images; pass a unit dividing both.")
    ranks, units = _ranks(maps, protocol.unit, indices, protocol.seed)  # (B, H*W)
    steps = min(protocol.steps, units)
    counts = [round(k * units / steps) for k in range(steps + 1)]
    fractions = torch.tensor(counts, dtype=torch.float32, device=images.device) / units  # (S+1,)
    out: dict[str, torch.Tensor] = {"fractions": fractions}
    for name, base in (("deletion", protocol.deletion_baseline), ("insertion", protocol.insertion_baseline)):
        curve = _curves(model, images, baseline_images(images, base), ranks, counts, target, name == "insertion",
                        forward_batch)  # (B, S+1)
        out[name], out[f"{name}_auc"] = curve, auc(curve, fractions)
    if road:
        fr = torch.tensor(protocol.road_fractions, dtype=torch.float32, device=images.device)  # (R,)
        perturbed = []
        for bi, i in enumerate(indices):
            gen = _generator(protocol.seed, int(i), "road-noise")
            for f in protocol.road_fractions:
                removed = (ranks[bi] < round(f * units)).reshape(h, w)
                perturbed.append(impute_noisy_linear(images[bi], removed, protocol.road_noise, gen))
        probs = _probabilities(model, torch.stack(perturbed), target.repeat_interleave(len(fr)), forward_batch)
        curve = probs.reshape(b, len(fr))  # (B, R)
        out["road_fractions"], out["road"] = fr, curve
        out["road_auc"] = auc(curve, fr) / fr[-1]
    return out


# --- sanity check: cascading model-parameter randomisation ----------------------------------------------

def cascade_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) to randomise in cascade order: the classifier head, then the layers top-down."""
    from vitviz.explain.adapters import adapter_for

    adapter = adapter_for(model)
    layers = adapter.layers()  # forward order; ExplainError for a model whose layers vitviz does not know
    stages: list[tuple[str, list[nn.Module]]] = []
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        head = next((getattr(model, n) for n in ("head", "fc", "classifier") if isinstance(getattr(model, n, None),
                                                                                      nn.Module)), None)
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        stages.append(("head", [head]))
    stages += [(layer.label, [layer.module]) for layer in reversed(layers)]
    if not stages:
        raise ExplainError(f"no layers to randomise in {type(model).__name__}.")
    return stages


def _randomise(modules: Iterable[nn.Module], seed: int, names: Mapping[int, str]) -> None:
    """Re-draw every parameter of ``modules`` from a normal with its own mean and std (seeded by its name)."""
    with torch.no_grad():
        for module in modules:
            for pname, p in module.named_parameters():
                key = f"{names.get(id(module), '')}.{pname}"
                gen = _generator(seed, 0, "cascade:" + key)
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                fresh = torch.randn(p.shape, generator=gen) * std + float(p.float().mean())
                p.copy_(fresh.to(p))


def _sanity_points(n_stages: int, k: int) -> list[int]:
    """Cascade stage indices at which maps are compared: the head, the top layer, ..., the whole model."""
    if n_stages <= k:
        return list(range(n_stages))
    return sorted({round(j * (n_stages - 1) / (k - 1)) for j in range(k)})


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman rank correlation of each pair of rows (B, P) with average ranks for ties; 0 for a constant row."""
    from scipy.stats import rankdata

    ra = rankdata(a.detach().cpu().double().numpy(), axis=1)
    rb = rankdata(b.detach().cpu().double().numpy(), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)


def _unit_grid(maps: torch.Tensor, unit: int) -> torch.Tensor:
    return F.avg_pool2d(maps[:, None].float(), unit)[:, 0].reshape(maps.shape[0], -1)  # (B, units)


# --- scoring every method --------------------------------------------------------------------------------

@dataclass
class TrustRecords:
    """Per-image scores of one run (or one shard of it); :func:`merge_records` joins shards."""

    protocol: Protocol
    indices: np.ndarray  # (N,) global image indices
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method|"random" -> metric -> (N,)
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method|"random" -> curve -> (N, S+1)
    fractions: dict[str, np.ndarray] = field(default_factory=dict)  # curve -> (S+1,)
    seconds: dict[str, float] = field(default_factory=dict)  # method -> seconds explaining these images
    costs: dict[str, str] = field(default_factory=dict)  # method -> the registry's passes per batch
    sanity_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sanity_stages: list[str] = field(default_factory=list)  # cumulative: "head", "blocks.5", ...
    sanity: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n_sanity, stages) Spearman
    errors: dict[str, str] = field(default_factory=dict)  # method -> why it was not scored

    @property
    def methods(self) -> list[str]:
        return [m for m in self.scores if m != RANDOM]


def _targets(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, protocol: Protocol) -> torch.Tensor:
    if protocol.target == "label":
        if labels is None:
            raise ExplainError("target='label' needs labels; give labels= or use target='predicted'.")
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise ExplainError(f"labels run from {int(labels.min())} to {int(labels.max())}, and the model has "
                               f"{classes} classes: are these the model's dataset's labels? Use target='predicted'.")
        return labels.to(x.device).long()
    with torch.no_grad():
        return model(x).argmax(-1)  # (B,)


def _explain(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor,
             params: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
    from vitviz.explain.api import explain_details
    from vitviz.explain.registry import get_method

    kw = dict(params)
    if "target" in get_method(method).params:
        kw["target"] = target
    res = explain_details(model, x, method, **kw)
    return res.maps, str(res.cost) if res.cost is not None else ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_methods(model: nn.Module, images: torch.Tensor, *, methods: Sequence[str] | None = None,
                  protocol: Protocol | None = None, labels: torch.Tensor | None = None,
                  masks: torch.Tensor | None = None, indices: Sequence[int] | None = None,
                  sanity_indices: Sequence[int] | None = None, batch_size: int = 16, forward_batch: int = 128,
                  params: Mapping[str, Mapping[str, Any]] | None = None, road: bool = True,
                  progress: Callable[[str], None] | None = None) -> TrustRecords:
    """Per-image trust scores of every method (default: every saliency method the model supports) and of
    random maps, on ``images`` (N, C, H, W) in the model's normalised input space.

    ``indices``: the images' global indices (default 0..N-1; seeds depend on them, so shards merge
    exactly); ``sanity_indices``: which of them run the cascade randomisation (default: up to
    ``protocol.sanity_images`` spread over the set). ``masks`` (N, H, W) bool add the pointing game and
    mask IoU. Images run ``batch_size`` at a time on the images' device.
    """
    from vitviz.explain.adapters import adapter_for
    from vitviz.explain.api import methods_for
    from vitviz.explain.registry import registry

    if images.ndim != 4 or not images.is_floating_point():
        raise ExplainError(f"images must be a float batch (N, C, H, W), got shape {tuple(images.shape)}.")
    if not adapter_for(model).has_head:
        raise ExplainError("trust scores follow a class probability, and this model has no classifier head (it "
                           "returns features); give a classifier, or a CLIP with prompts.")
    n, _, h, w = images.shape
    protocol = protocol or protocol_for(model, h, w)
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(indices) != n:
        raise ExplainError(f"indices has {len(indices)} entries for {n} images.")
    if methods is None:
        methods = methods_for(model, saliency_only=True)
    known = registry()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ExplainError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}.")
    if masks is not None and tuple(masks.shape) != (n, h, w):
        raise ExplainError(f"masks must be (N, H, W) = ({n}, {h}, {w}), got {tuple(masks.shape)}.")
    if sanity_indices is None:
        sanity_indices = spread(indices, protocol.sanity_images)
    sanity_set = set(int(i) for i in sanity_indices) & set(indices)
    params = params or {}
    device = images.device
    rec = TrustRecords(protocol=protocol, indices=np.asarray(indices, dtype=np.int64))
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    curve_parts: dict[str, dict[str, list[np.ndarray]]] = {}
    kept_maps: dict[str, list[torch.Tensor]] = {}  # method -> unit-grid maps of the sanity images
    kept_rows: list[int] = []  # positions (in this call) of the sanity images
    targets_all: list[torch.Tensor] = []
    active = list(methods)
    warm: set[str] = set()
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        x, idx = images[sl], indices[sl]
        target = _targets(model, x, None if labels is None else labels[sl], protocol)  # (b,)
        targets_all.append(target)
        in_sanity = [j for j, i in enumerate(idx) if i in sanity_set]
        kept_rows += [start + j for j in in_sanity]
        batch_maps = {RANDOM: random_unit_maps((h, w), idx, protocol.seed).to(device)}
        for method in list(active):
            if progress is not None:
                progress(f"{method}: images {sl.start}-{sl.stop - 1}")
            try:
                if method not in warm:  # first call imports the method's code: keep that out of its time
                    warm.add(method)
                    if not is_slow(method, model, h, w):
                        _explain(model, x[:1], method, target[:1], params.get(method, {}))
                _sync(device)
                t0 = time.perf_counter()
                maps, cost = _explain(model, x, method, target, params.get(method, {}))
            except ExplainError as err:  # refused at run time: drop the method from every batch
                rec.errors[method] = str(err)
                active.remove(method)
                for store in (parts, curve_parts, kept_maps, rec.seconds, rec.costs):
                    store.pop(method, None)
                continue
            _sync(device)
            rec.seconds[method] = rec.seconds.get(method, 0.0) + time.perf_counter() - t0
            rec.costs[method] = cost
            batch_maps[method] = maps.to(device)
            if in_sanity:
                kept_maps.setdefault(method, []).append(_unit_grid(maps[in_sanity], protocol.unit).cpu())
        for name, maps in batch_maps.items():
            got = perturbation_scores(model, x, maps, target, protocol, idx, road=road, forward_batch=forward_batch)
            metrics = {k: got[k] for k in ("deletion_auc", "insertion_auc", "road_auc") if k in got}
            if masks is not None:
                mk = masks[sl].to(device)
                metrics["pointing_game"] = pointing_game(maps, mk).float()
                metrics["mask_iou"] = mask_iou(maps, mk)
            for k, v in metrics.items():
                parts.setdefault(name, {}).setdefault(k, []).append(v.detach().float().cpu().numpy())
            for k in ("deletion", "insertion", "road"):
                if k in got:
                    curve_parts.setdefault(name, {}).setdefault(k, []).append(got[k].detach().float().cpu().numpy())
                    rec.fractions[k] = got["fractions" if k != "road" else "road_fractions"].cpu().numpy()
    order = [m for m in [*methods, RANDOM] if m in parts]
    rec.scores = {m: {k: np.concatenate(v) for k, v in parts[m].items()} for m in order}
    rec.curves = {m: {k: np.concatenate(v) for k, v in curve_parts[m].items()} for m in order}
    methods_done = [m for m in methods if m in rec.scores]
    if kept_rows and protocol.sanity_images > 0 and methods_done:
        target_all = torch.cat(targets_all)
        _sanity(model, images, target_all, kept_rows, kept_maps, methods_done, protocol, batch_size, params, rec,
                indices)
    return rec


def spread(indices: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` of ``indices`` spread evenly over them (the images the sanity check runs on)."""
    idx = sorted(int(i) for i in indices)
    if k <= 0 or not idx:
        return []
    if len(idx) <= k:
        return idx
    if k == 1:
        return idx[:1]
    return [idx[round(j * (len(idx) - 1) / (k - 1))] for j in range(k)]


def _sanity(model: nn.Module, images: torch.Tensor, target: torch.Tensor, rows: list[int],
            originals: dict[str, list[torch.Tensor]], methods: list[str], protocol: Protocol, batch_size: int,
            params: Mapping[str, Mapping[str, Any]], rec: TrustRecords, indices: Sequence[int]) -> None:
    """Cascading randomisation on the images at ``rows``, in the same batches as the main pass."""
    try:
        stages = cascade_stages(model)
    except ExplainError as err:
        for m in methods:
            rec.errors.setdefault(f"{m} (sanity)", str(err))
        return
    points = set(_sanity_points(len(stages), protocol.sanity_points))
    random_model = copy.deepcopy(model).eval()
    names = {id(mod): name for name, mod in random_model.named_modules()}
    # the copy's modules at the same positions as the original's stages
    inverse = {id(mod): name for name, mod in model.named_modules()}
    copy_modules = dict(random_model.named_modules())
    # rows grouped by the main pass's batches, so each batch's composition is the same in every process
    groups: list[list[int]] = []
    for r in rows:
        if groups and groups[-1][0] // batch_size == r // batch_size:
            groups[-1].append(r)
        else:
            groups.append([r])
    orig = {m: torch.cat(originals[m]) for m in methods if m in originals}
    result = {m: [] for m in orig}
    for s, (name, modules) in enumerate(stages):
        _randomise([copy_modules[inverse[id(mod)]] for mod in modules], protocol.seed, names)
        if s not in points:
            continue
        rec.sanity_stages.append(name)
        for m in orig:
            maps = []
            for g in groups:
                try:
                    out, _ = _explain(random_model, images[g], m, target[g], params.get(m, {}))
                except ExplainError as err:  # e.g. a random head with NaNs: report, do not fail the run
                    rec.errors.setdefault(f"{m} (sanity)", str(err))
                    out = torch.zeros(len(g), *images.shape[-2:], device=images.device)
                maps.append(_unit_grid(out, protocol.unit).cpu())
            result[m].append(spearman_rows(orig[m], torch.cat(maps)))
    rec.sanity_indices = np.asarray([indices[r] for r in rows], dtype=np.int64)
    rec.sanity = {m: np.stack(v, axis=1) for m, v in result.items()}  # (n_sanity, points)


# --- merging and summarising --------------------------------------------------------------------------------

def merge_records(parts: Sequence[TrustRecords]) -> TrustRecords:
    """Join the records of shards (any order) into one, sorted by global image index; times add up."""
    parts = [p for p in parts if len(p.indices)]
    if not parts:
        raise ExplainError("nothing to merge: every shard was empty.")
    first = parts[0]
    out = TrustRecords(protocol=first.protocol, indices=np.concatenate([p.indices for p in parts]))
    order = np.argsort(out.indices, kind="stable")
    out.indices = out.indices[order]
    for name in first.scores:
        out.scores[name] = {k: np.concatenate([p.scores[name][k] for p in parts])[order] for k in first.scores[name]}
        out.curves[name] = {k: np.concatenate([p.curves[name][k] for p in parts])[order] for k in first.curves[name]}
    out.fractions = dict(first.fractions)
    for p in parts:
        for m, s in p.seconds.items():
            out.seconds[m] = out.seconds.get(m, 0.0) + s
        out.costs.update(p.costs)
        out.errors.update(p.errors)
    with_sanity = [p for p in parts if len(p.sanity_indices)]
    if with_sanity:
        sidx = np.concatenate([p.sanity_indices for p in with_sanity])
        sorder = np.argsort(sidx, kind="stable")
        out.sanity_indices = sidx[sorder]
        out.sanity_stages = list(with_sanity[0].sanity_stages)
        out.sanity = {m: np.concatenate([p.sanity[m] for p in with_sanity])[sorder] for m in with_sanity[0].sanity}
    return out


def _bootstrap(values: np.ndarray, draws: np.ndarray, alpha: float) -> tuple[float, float]:
    means = values[draws].mean(axis=1)  # (R,)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def summarise(rec: TrustRecords, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The report: per method and metric the mean, its bootstrap interval, random's beside it, whether the
    method beats random; sanity, cost per image; the ranking and the verdict sentence."""
    from vitviz.explain.registry import registry

    labels = {**{k: m.label for k, m in registry().items()}, **(labels or {})}
    p = rec.protocol
    n = len(rec.indices)
    draws = np.random.default_rng(p.seed).integers(0, n, size=(p.bootstrap, n))  # the same resamples everywhere
    alpha = 1 - p.confidence
    rnd = rec.scores.get(RANDOM, {})
    metrics = [m for m in METRICS if m in rnd]

    def stats(values: np.ndarray) -> dict[str, float]:
        low, high = _bootstrap(values, draws, alpha)
        return {"mean": float(values.mean()), "low": low, "high": high}

    random_stats = {k: stats(rnd[k]) for k in metrics}
    methods: dict[str, dict[str, Any]] = {}
    for m in rec.methods:
        entry: dict[str, Any] = {"label": labels.get(m, m), "metrics": {}}
        for k in metrics:
            vals = rec.scores[m][k]
            s = stats(vals)
            better = METRICS[k][1]
            diff = vals - rnd[k]
            dlow, dhigh = _bootstrap(diff, draws, alpha)
            s.update(random=random_stats[k]["mean"], random_low=random_stats[k]["low"],
                     random_high=random_stats[k]["high"], diff_low=dlow, diff_high=dhigh,
                     beats_random=bool(dlow > 0 if better else dhigh < 0))
            entry["metrics"][k] = s
        secs = rec.seconds.get(m)
        entry["ms_per_image"] = None if secs is None else 1000.0 * secs / n
        entry["cost"] = rec.costs.get(m, "")
        if m in rec.sanity:
            curve = rec.sanity[m].mean(axis=0)  # (points,)
            entry["sanity"] = {"stages": list(rec.sanity_stages), "spearman": [float(v) for v in curve],
                               "final": float(curve[-1]), "images": int(rec.sanity[m].shape[0]),
                               "flagged": bool(curve[-1] >= p.sanity_flag)}
        methods[m] = entry
    ranking = _rank(methods, metrics)
    for r, m in enumerate(ranking, 1):
        methods[m]["rank"] = r
    report = {"protocol": {**asdict(p), "text": p.describe()}, "images": n, "metrics": metrics,
              "methods": {m: methods[m] for m in ranking}, "random": random_stats, "ranking": ranking,
              "errors": dict(rec.errors)}
    report["verdict"] = verdict(report)
    return report


def _rank(methods: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """Methods ordered by: faithfulness metrics beaten over random (more first), not flagged by the sanity
    check, then the mean of their ranks on those metrics."""
    faith = [k for k in FAITHFULNESS if k in metrics]
    names = list(methods)
    mean_rank = dict.fromkeys(names, 0.0)
    for k in faith:
        better = METRICS[k][1]
        ordered = sorted(names, key=lambda m: -methods[m]["metrics"][k]["mean"] if better
                         else methods[m]["metrics"][k]["mean"])
        for r, m in enumerate(ordered):
            mean_rank[m] += r / max(1, len(faith))

    def key(m: str) -> tuple:
        wins = sum(methods[m]["metrics"][k]["beats_random"] for k in faith)
        flagged = methods[m].get("sanity", {}).get("flagged", False)
        return (-wins, flagged, mean_rank[m], m)

    return sorted(names, key=key)


def verdict(report: Mapping[str, Any]) -> str:
    """One plain sentence: which map to trust for this model on these images, and why."""
    methods = report["methods"]
    n = report["images"]
    faith = [k for k in FAITHFULNESS if k in report["metrics"]]
    if not methods:
        return "No method could be scored on this model."
    best = report["ranking"][0]
    e = methods[best]
    wins = [METRICS[k][0] for k in faith if e["metrics"][k]["beats_random"]]
    sanity = e.get("sanity")
    images = f"{n} image{'s' if n != 1 else ''}"
    if not wins:
        return (f"Trust none of these maps for this model: on {images} no method beats random maps on "
                f"{', '.join(METRICS[k][0] for k in faith)}" + (" (one image gives no interval; score more)."
                                                                  if n < 2 else "."))
    why = f"it beats random maps on {', '.join(wins)} over {images}"
    if sanity is not None:
        why += (f", and its map changes when the model's weights are randomised (rank correlation "
                f"{sanity['final']:.2f})" if not sanity["flagged"] else
                f", but its map barely changes when the model's weights are randomised (rank correlation "
                f"{sanity['final']:.2f}), so treat it with care")
    if n < 2:
        why += " (one image: no interval; score more images before relying on it)"
    return f"Trust {e['label']} for this model: {why}."


# --- rendering ----------------------------------------------------------------------------------------------

def _cell(s: Mapping[str, Any], scale: float = 1.0, digits: int = 3, interval: bool = True) -> str:
    mark = " ✓" if s.get("beats_random") else ""
    spread = f" [{s['low'] * scale:.{digits}f}, {s['high'] * scale:.{digits}f}]" if interval else ""
    return f"{s['mean'] * scale:.{digits}f}{spread} vs {s['random'] * scale:.{digits}f}{mark}"


def table_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ranked table as rows of strings (Markdown, HTML and the dashboard share it)."""
    rows = []
    for e in report["methods"].values():
        row: dict[str, Any] = {"rank": e["rank"], "method": e["label"]}
        for k in report["metrics"]:
            label, better = METRICS[k]
            scale, digits = (100.0, 1) if k == "pointing_game" else (1.0, 3)
            # one image has no spread to resample: its "interval" would be the value twice
            row[f"{label} {'↑' if better else '↓'}"] = _cell(e["metrics"][k], scale, digits,
                                                            interval=report.get("images", 2) > 1)
        s = e.get("sanity")
        row["sanity ρ ↓"] = "—" if s is None else f"{s['final']:.2f}" + (" ⚠ flagged" if s["flagged"] else "")
        row["cost (passes)"] = e["cost"] or "—"
        row["ms / image"] = "—" if e["ms_per_image"] is None else f"{e['ms_per_image']:.1f}"
        rows.append(row)
    return rows


def markdown_table(report: Mapping[str, Any]) -> str:
    """The ranked Markdown table with the protocol above it and the verdict below."""
    rows = table_rows(report)
    if not rows:
        return "No method could be scored.\n"
    cols = list(rows[0])
    lines = [f"{report['images']} images. {report['protocol']['text']}", "",
             "Each cell: mean [bootstrap interval] vs the random map's mean; ✓ = beats random (paired interval).", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in ("rank", "ms / image") else "---"
                                                            for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", report["verdict"]]
    if report.get("errors"):
        lines += ["", "Not scored: " + "; ".join(f"{m}: {why}" for m, why in report["errors"].items())]
    return "\n".join(lines) + "\n"
