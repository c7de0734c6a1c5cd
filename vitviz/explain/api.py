"""``explain(model, x, method=...)``: one call for every saliency method, on batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.attention import attention_map
from vitviz.explain.capture import capture_attention
from vitviz.explain.gradcam import gradcam
from vitviz.explain.layout import check_images, model_family, token_layout
from vitviz.explain.maps import normalize_maps, upsample_maps
from vitviz.explain.relevance import chefer_relevance
from vitviz.explain.rollout import (
    check_discard_ratio,
    check_fusion,
    rollout_row,
    token_row_to_grid,
)

__all__ = ["METHODS", "METHOD_PARAMS", "Explanation", "explain", "explain_details", "methods_for"]

METHODS: tuple[str, ...] = ("attention", "rollout", "grad-rollout", "chefer", "gradcam")

# The parameters each method takes (and their defaults); anything else is refused, not ignored.
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "attention": {"layer": -1, "head": None, "query": None},
    "rollout": {"head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0},
    "grad-rollout": {"target": None, "discard_ratio": 0.0, "start_layer": 0},
    "chefer": {"target": None, "start_layer": 0},
    "gradcam": {"target": None, "layer": None},
}

METHOD_LABELS: dict[str, str] = {
    "attention": "Raw attention",
    "rollout": "Attention rollout (Abnar & Zuidema 2020)",
    "grad-rollout": "Gradient-weighted rollout",
    "chefer": "Relevance (Chefer et al. 2021)",
    "gradcam": "Grad-CAM (Selvaraju et al. 2017)",
}


@dataclass
class Explanation:
    """Saliency maps of one batch with what produced them."""

    method: str
    maps: torch.Tensor  # (B, H, W) float32 in [0, 1] (or (B, gh, gw) when not upsampled)
    grid_maps: torch.Tensor  # (B, gh, gw) raw values on the method's grid, not normalised
    logits: torch.Tensor  # (B, classes) from the same forward pass
    target: torch.Tensor | None  # (B,) class explained; None for class-agnostic methods (attention, rollout)
    cell: tuple[int, int]  # pixels one grid cell covers
    params: dict[str, Any] = field(default_factory=dict)  # the parameters used, defaults filled in


def methods_for(model: nn.Module) -> list[str]:
    """Methods that apply to ``model``: all of :data:`METHODS` for ViTs and hybrids, Grad-CAM for ResNets."""
    return ["gradcam"] if model_family(model) == "resnet" else list(METHODS)


def explain(model: nn.Module, x: torch.Tensor, method: str = "rollout", *, upsample: bool = True,
            **params: Any) -> torch.Tensor:
    """Saliency maps (B, H, W), float32, each image's map min-max normalised to [0, 1].

    ``method``: one of :data:`METHODS`; ``upsample=False`` returns the grid maps (B, gh, gw), also
    normalised. Parameters per method (see :data:`METHOD_PARAMS`):

    * attention: ``layer`` (-1), ``head`` (None = mean, an index, or "max"/"min"), ``query``
      (None = the readout: the class token, or the mean of the patch tokens for mean-pooled models;
      (row, col) or a flat patch index for one patch);
    * rollout: ``head_fusion`` ("mean" | "max" | "min"), ``discard_ratio`` in [0, 1), ``start_layer``;
    * grad-rollout: ``target``, ``discard_ratio``, ``start_layer``;
    * chefer: ``target``, ``start_layer``;
    * gradcam: ``target``, ``layer`` (None = family default; a block index for ViT tokens).

    ``target`` is a class index (or one per image); default: each image's predicted class.
    Attention, rollout, grad-rollout and chefer read the row of the model's readout: the class
    token for class-token pooling, the mean of the patch tokens' rows for mean pooling.
    """
    return explain_details(model, x, method, upsample=upsample, **params).maps


def explain_details(model: nn.Module, x: torch.Tensor, method: str = "rollout", *, upsample: bool = True,
                    **params: Any) -> Explanation:
    """Like :func:`explain`, but also returns the raw grid maps, logits and target of the same pass."""
    check_images(x)
    if method not in METHODS:
        raise ExplainError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    allowed = METHOD_PARAMS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ExplainError(
            f"method {method!r} takes no parameter {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'no parameters'}."
        )
    family = model_family(model)
    if method not in methods_for(model):
        raise ExplainError(
            f"method {method!r} needs attention, and this {family} model has none; "
            f"methods for it: {', '.join(methods_for(model))}."
        )
    if getattr(model, "training", False):
        warnings.warn("explaining a model in training mode (dropout active); call model.eval() first.",
                      stacklevel=2)
    p = {**allowed, **params}
    grid_maps, logits, target, cell = _run(method, model, x, p)
    maps = upsample_maps(grid_maps, x.shape[-2:], cell) if upsample else grid_maps
    return Explanation(method=method, maps=normalize_maps(maps), grid_maps=grid_maps.detach().float(),
                       logits=logits, target=target, cell=cell, params=p)


def _run(method: str, model: nn.Module, x: torch.Tensor,
         p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    if method == "gradcam":
        res = gradcam(model, x, target=p["target"], layer=p["layer"])
        return res.maps, res.logits, res.target, res.cell
    lay = token_layout(model, x.shape[-2], x.shape[-1])
    prefix, grid = lay.num_prefix_tokens, lay.grid
    row = 0 if lay.readout == "token" else "mean"  # the token(s) the head reads: where every map starts
    # Validate cheap parameters before running the model.
    if "head_fusion" in p:
        check_fusion(p["head_fusion"])
    if "discard_ratio" in p:
        check_discard_ratio(p["discard_ratio"])
    _precheck_indices(model, p)
    needs_grad = method in ("grad-rollout", "chefer")
    cap = capture_attention(model, x, target=p.get("target"), with_grads=needs_grad)
    if method == "attention":
        m = attention_map(cap.attentions, grid, p["layer"], p["head"], p["query"], prefix, lay.readout)
    elif method == "rollout":
        m = _readout_row(cap.attentions, None, grid, prefix, row, p)
    elif method == "grad-rollout":
        m = _readout_row(cap.attentions, cap.gradients, grid, prefix, row, p)
    else:
        m = token_row_to_grid(chefer_relevance(cap.attentions, cap.gradients, p["start_layer"]), grid, prefix, row)
    return m, cap.logits, cap.target, lay.cell


def _readout_row(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor] | None,
                 grid: tuple[int, int], prefix: int, row: int | str, p: dict[str, Any]) -> torch.Tensor:
    """The readout's row of the (grad) rollout as a grid (B, gh, gw)."""
    fusion = p.get("head_fusion", "mean")
    r = rollout_row(attentions, row, fusion, p["discard_ratio"], p["start_layer"], prefix, gradients)  # (B, N)
    return r[:, prefix:].reshape(r.shape[0], *grid)  # (B, gh, gw)


def _precheck_indices(model: nn.Module, p: dict[str, Any]) -> None:
    """Refuse out-of-range layer/head indices before the model runs (the captured tensors re-check)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return
    depth = len(blocks)
    for name in ("layer", "start_layer"):
        value = p.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not -depth <= value < depth):
            raise ExplainError(f"{name} {value!r} is out of range for a model with {depth} layers "
                               f"(use 0..{depth - 1}, or -{depth}..-1 from the end).")
    head = p.get("head")
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
    if isinstance(head, int) and not isinstance(head, bool) and heads is not None and not -heads <= head < heads:
        raise ExplainError(f"head {head} is out of range: the model has {heads} heads per layer "
                           f"(use 0..{heads - 1}, or None for the mean).")
