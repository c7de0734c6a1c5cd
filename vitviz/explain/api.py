"""``explain(model, x, method=...)``: one call for every saliency method, on batches, on any adapted model.

Every method asks the model's adapter (:mod:`vitviz.explain.adapters`) what it needs: the tokens on
the grid, what the head reads, where Grad-CAM reads; a method that is not defined for a model is
refused with the adapter's reason and the methods to use instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter, adapter_for
from vitviz.explain.attention import layer_query_rows
from vitviz.explain.capture import Capture, Layer, capture_attention, mean_heads
from vitviz.explain.features import patch_similarity
from vitviz.explain.gradcam import gradcam
from vitviz.explain.layout import check_images
from vitviz.explain.maps import normalize_maps, upsample_maps
from vitviz.explain.registry import Cost, CostContext, MapResult, get_method, method_names, registry
from vitviz.explain.rollout import RowStep, check_discard_ratio, check_fusion, fuse_heads, propagate_row

__all__ = ["FEATURE_METHODS", "METHODS", "METHOD_LABELS", "METHOD_PARAMS", "Explanation", "explain", "explain_details",
           "methods_for", "refusal"]

# Everything below is read from the one method registry (vitviz.explain.registry); these names stay for the
# dashboard, the CLI and user code that read them.
METHODS: tuple[str, ...] = method_names()

# The parameters each method takes (and their defaults); anything else is refused, not ignored.
METHOD_PARAMS: dict[str, dict[str, Any]] = {name: dict(m.params) for name, m in registry().items()}

METHOD_LABELS: dict[str, str] = {name: m.label for name, m in registry().items()}

# Methods that describe the features, not a prediction: left out of faithfulness scores.
FEATURE_METHODS: tuple[str, ...] = tuple(name for name, m in registry().items() if m.feature)


@dataclass
class Explanation:
    """Saliency maps of one batch with what produced them."""

    method: str
    maps: torch.Tensor  # (B, H, W) float32 in [0, 1] (or (B, gh, gw) when not upsampled)
    grid_maps: torch.Tensor  # (B, gh, gw) raw values on the method's grid, not normalised
    logits: torch.Tensor  # (B, classes) from the same forward pass ((B, D) features for a headless model)
    target: torch.Tensor | None  # (B,) class explained; None for class-agnostic methods
    cell: tuple[int, int]  # pixels one grid cell covers
    params: dict[str, Any] = field(default_factory=dict)  # the parameters used, defaults filled in
    cost: Cost | None = None  # model passes this explanation cost (from the registry)


def refusal(model: nn.Module | Adapter, method: str) -> str | None:
    """Why ``method`` is not defined for ``model`` (with what to use instead), or None when it is."""
    methods = registry()
    if method not in methods:
        return f"unknown method {method!r}; choose one of {', '.join(methods)}."
    m = methods[method]
    adapter = adapter_for(model)
    if m.needs_head and not adapter.has_head:
        return (f"{method} explains a class score, and {type(adapter.model).__name__} has no classifier head (it "
                "returns features); use 'attention', 'rollout' or 'similarity'.")
    if m.models == "transformer" and adapter.kind != "transformer":
        return (f"{type(adapter.model).__name__} is a CNN: it has no attention layers, and {method} needs attention; "
                "use a method for any model (gradcam, occlusion, integrated-gradients, ...).")
    why = adapter.refusal(method) or m.own_refusal(adapter)
    if why is None and m.like is not None:
        like = adapter.refusal(m.like)
        why = None if like is None else f"{method} needs what {m.like} needs: {like}"
    return why or m.missing()


def methods_for(model: nn.Module, *, saliency_only: bool = False) -> list[str]:
    """The methods of :data:`METHODS` that are defined for ``model``; ``saliency_only`` leaves out
    :data:`FEATURE_METHODS` (which say what the features are alike, not why the model predicts)."""
    adapter = adapter_for(model)
    return [m for m in METHODS if refusal(adapter, m) is None and not (saliency_only and m in FEATURE_METHODS)]


def explain(model: nn.Module, x: torch.Tensor, method: str = "rollout", *, upsample: bool = True,
            **params: Any) -> torch.Tensor:
    """Saliency maps (B, H, W), float32, each image's map min-max normalised to [0, 1].

    ``method``: one of :data:`METHODS` (the registry, :mod:`vitviz.explain.registry`, says what each takes,
    applies to and costs); ``upsample=False`` returns the grid maps (B, gh, gw), also
    normalised. Parameters per method (see :data:`METHOD_PARAMS`):

    * attention: ``layer`` (-1), ``head`` (None = mean, an index, or "max"/"min"), ``query``
      (None = the readout: what the head reads; (row, col) or a flat patch index for one patch);
    * rollout: ``head_fusion`` ("mean" | "max" | "min"), ``discard_ratio`` in [0, 1), ``start_layer``;
    * grad-rollout: ``target``, ``discard_ratio``, ``start_layer``;
    * chefer: ``target``, ``start_layer``;
    * gradcam: ``target``, ``layer`` (None = the model's default feature map; a block index for ViT tokens);
    * similarity: ``query`` ((row, col) or a flat index on the last feature grid; None = the centre):
      cosine similarity of every cell's last-layer features to the query's ("where else is this?").

    ``target`` is a class index (or one per image); default: each image's predicted class.
    Attention, rollout, grad-rollout and chefer start from what the head reads: the class token; the
    mean of the class and distillation tokens (distilled DeiT); the mean of the patch tokens (mean
    pooling); an attention pool's own attention over the tokens (SigLIP).
    """
    return explain_details(model, x, method, upsample=upsample, **params).maps


def explain_details(model: nn.Module, x: torch.Tensor, method: str = "rollout", *, upsample: bool = True,
                    **params: Any) -> Explanation:
    """Like :func:`explain`, but also returns the raw grid maps, logits and target of the same pass."""
    check_images(x)
    spec = get_method(method)
    allowed = dict(spec.params)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ExplainError(
            f"method {method!r} takes no parameter {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'no parameters'}."
        )
    adapter = adapter_for(model)
    why = refusal(adapter, method)
    if why is not None and spec.across_layers and adapter.stagewise_rollout and params.get("start_layer"):
        why = None  # the chosen layers may share the final tokens: checked on the captured layers
    if why is not None:
        others = methods_for(adapter)
        raise ExplainError(f"{why} Methods for this model: {', '.join(others) or 'none'}.")
    if getattr(model, "training", False):
        warnings.warn("explaining a model in training mode (dropout active); call model.eval() first.",
                      stacklevel=2)
    p = {**allowed, **params}
    res = spec.run(adapter, x, p)
    maps = upsample_maps(res.shape, x.shape[-2:], res.cell) if upsample else res.shape
    return Explanation(method=method, maps=normalize_maps(maps), grid_maps=res.raw.detach().float(),
                       logits=res.logits, target=res.target, cell=res.cell, params=p,
                       cost=spec.cost_for(p, cost_context(adapter, x)))


def cost_context(adapter: Adapter, x: torch.Tensor) -> CostContext:
    """What a method's cost depends on for this model and input: size, token cell, depth."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    cell = None
    if adapter.kind == "transformer":
        try:
            cell = adapter.final_tokens(h, w).cell
        except ExplainError:
            cell = None
    return CostContext(height=h, width=w, cell=cell, depth=adapter.depth())


def run_builtin(method: str, adapter: Adapter, x: torch.Tensor, p: dict[str, Any]) -> MapResult:
    """The registry's runner for attention, rollout, grad-rollout, chefer, gradcam and similarity."""
    return MapResult(*_run(method, adapter, x, p))


def _run(method: str, adapter: Adapter, x: torch.Tensor, p: dict[str, Any]):
    """(raw grid map, map to normalise (same up to a per-image constant), logits, target, cell)."""
    model = adapter.model
    if method == "gradcam":
        res = gradcam(model, x, target=p["target"], layer=p["layer"])
        return res.maps, res.maps, res.logits, res.target, res.cell
    if method == "similarity":
        sim, logits, cell = patch_similarity(model, x, p["query"])
        return sim, sim, logits, None, cell
    # Validate cheap parameters before running the model.
    if "head_fusion" in p:
        check_fusion(p["head_fusion"])
    if "discard_ratio" in p:
        check_discard_ratio(p["discard_ratio"])
    _precheck_indices(adapter, p)
    needs_grad = method in ("grad-rollout", "chefer")
    # Rollout with mean fusion, and raw attention of the head mean, only need each layer's head mean:
    # reduce as the layers run, so every layer's (B, heads, N, N) is never held at once.
    mean_only = (method == "rollout" and p["head_fusion"] == "mean") or (method == "attention" and
                                                                         p["head"] in (None, "mean"))
    reduce = mean_heads if mean_only else None
    only = p["layer"] if method == "attention" else None  # raw attention needs one layer: record just it
    cap = capture_attention(model, x, target=p.get("target"), with_grads=needs_grad, reduce=reduce, only_layer=only)
    if method == "attention":
        layer = cap.layers[0] if cap.only else _select(cap.layers, p["layer"], "layer")
        m = _attention_grid(cap, layer, p["head"], p["query"])
        return m, m, cap.logits, cap.target, layer.keys.cell
    raw, shape = _propagated(method, cap, p)
    return raw, shape, cap.logits, cap.target, cap.tokens.cell


def _attention_grid(cap: Capture, layer: Layer, head: int | str | None, query: Any) -> torch.Tensor:
    """One layer's attention from the readout (or a query patch) to every key cell, (B, gkh, gkw)."""
    rows = layer_query_rows(layer, cap.tokens, cap.readout, query)  # (B, heads, Nk)
    heads = rows.shape[1]
    if head is None or head in ("mean", "max", "min"):
        values = fuse_heads(rows[:, :, None], head or "mean")[:, 0]  # (B, Nk)
    elif isinstance(head, bool) or not isinstance(head, int) or not -heads <= head < heads:
        raise ExplainError(f"head {head!r} is out of range: the layer has {heads} heads (use 0..{heads - 1}, or "
                           "None/'mean'/'max'/'min' to combine them).")
    else:
        values = rows[:, head]  # (B, Nk)
    keys = layer.keys
    return values[:, keys.prefix:].reshape(values.shape[0], *keys.grid)  # (B, gkh, gkw)


def _propagated(method: str, cap: Capture, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout / grad rollout / Chefer relevance from the readout, on the final token grid."""
    start = _start(len(cap.layers), p["start_layer"])
    layers = cap.layers[start:]
    tokens = cap.tokens
    outside = [lay for lay in layers if not lay.in_final(tokens)]
    if outside:
        why = cap.adapter.refusal(method) if cap.adapter is not None else None
        first_ok = next((i for i in range(len(cap.layers)) if all(lay.in_final(tokens)
                                                                   for lay in cap.layers[i:])), None)
        hint = f" Pass start_layer={first_ok} to roll out the last layers that share the final tokens only," \
            if first_ok is not None else ""
        raise ExplainError(
            (why or f"{method} multiplies attention across layers that share one token set, and this model's tokens "
             f"change from layer to layer ({outside[0].name} works on a {outside[0].queries.grid[0]}x"
             f"{outside[0].queries.grid[1]} grid, the head on {tokens.grid[0]}x{tokens.grid[1]}).")
            + hint + " or use method='attention' or 'gradcam'."
        )
    steps = [RowStep(lay.weights, lay.gradients, lay.q_index, lay.k_index) for lay in layers]
    base, delta = propagate_row(steps, cap.readout.to(layers[0].weights.dtype), method,
                                p.get("head_fusion", "mean"), p.get("discard_ratio", 0.0),
                                tokens.prefix)
    b, g = base.shape[0], tokens.grid
    base_grid, delta_grid = base[:, tokens.prefix:], delta[:, tokens.prefix:]  # (B, P)
    raw = (base_grid + delta_grid).reshape(b, *g)
    # Normalise from the increments kept apart: a per-image constant does not change a min-max map.
    shape = (base_grid - base_grid.mean(dim=1, keepdim=True) + delta_grid).reshape(b, *g)
    return raw, shape


def _start(depth: int, start_layer: int) -> int:
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not -depth <= start_layer < depth:
        raise ExplainError(f"start_layer {start_layer!r} is out of range for a model with {depth} layers "
                           f"(use 0..{depth - 1}, or -{depth}..-1 from the end).")
    return start_layer % depth


def _select(layers: Sequence[Layer], index: int, name: str) -> Layer:
    depth = len(layers)
    if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
        raise ExplainError(f"{name} {index!r} is out of range for a model with {depth} layers "
                           f"(use 0..{depth - 1} or -{depth}..-1).")
    return layers[index]


def _precheck_indices(adapter: Adapter, p: dict[str, Any]) -> None:
    """Refuse bad layer/head values before the model runs; ranges are checked on the captured layers,
    which count token-attention layers (an adapter's depth may count blocks without any)."""
    for name in ("layer", "start_layer"):
        value = p.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ExplainError(f"{name} must be a layer index (negative counts from the end), got {value!r}.")
    head = p.get("head")
    heads = adapter.heads()
    if isinstance(head, int) and not isinstance(head, bool) and heads is not None and not -heads <= head < heads:
        raise ExplainError(f"head {head} is out of range: the model has {heads} heads per layer "
                           f"(use 0..{heads - 1}, or None for the mean).")
