"""Capture every layer's attention weights (and their gradients) in one forward pass, on any adapted model.

The model's adapter (:func:`vitviz.explain.adapters.adapter_for`) records the attention: our ViT and
hybrid return it as part of their contract; timm models take their explicit attention path for that
one call and hand the softmax weights over at ``attn_drop`` (hooks alone capture nothing once
attention is fused). The model is left exactly as it was.

A :class:`Capture` holds one :class:`Layer` per attention layer: parallel branches of one block are
merged on the heads axis (k branches of h heads added together are one attention with k*h heads),
and windowed attention is mapped onto the image's token grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter, AttentionRecord, Tokens, adapter_for
from vitviz.explain.adapters.base import Reduce, record_only
from vitviz.explain.layout import check_images, resolve_target

Densify = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Capture", "Layer", "capture_attention", "has_attention", "mean_heads"]


@dataclass
class Layer:
    """One attention layer: weights (and gradients) over its query and key tokens.

    ``weights`` and ``gradients`` are dense (B, heads, Nq, Nk) over the full query and key sets,
    formed on first use: windowed attention (Swin, Twins) stays windowed until a method asks for the
    dense form, so a capture for one layer's map never builds every layer's (stage grid)^2 matrix.
    """

    parts: list[tuple[torch.Tensor, torch.Tensor | None, Densify | None]]  # (weights, grads, densify) per branch
    queries: Tokens
    keys: Tokens
    name: str
    block: int
    stage: int = 0
    q_index: torch.Tensor | None = None  # (Nq,) positions in the final token set, when a subset of it
    k_index: torch.Tensor | None = None  # (Nk,)
    _dense: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def weights(self) -> torch.Tensor:
        """(B, heads, Nq, Nk), parallel branches concatenated on the heads axis."""
        return self._form("weights", 0)

    @property
    def gradients(self) -> torch.Tensor | None:
        """d score / d weights, same shape; None when captured without gradients."""
        if self.parts[0][1] is None:
            return None
        return self._form("gradients", 1)

    def _form(self, key: str, i: int) -> torch.Tensor:
        if key not in self._dense:
            dense = [part[i] if part[2] is None else part[2](part[i]) for part in self.parts]
            self._dense[key] = dense[0] if len(dense) == 1 else torch.cat(dense, dim=1)
        return self._dense[key]

    def in_final(self, final: Tokens) -> bool:
        """Whether queries and keys are (a subset of) the model's final tokens, placed by the indices."""
        q_ok = self.q_index is not None or self.queries == final
        k_ok = self.k_index is not None or self.keys == final
        return q_ok and k_ok


@dataclass
class Capture:
    """One forward pass's logits, attention layers and (optionally) gradients, all detached."""

    logits: torch.Tensor  # (B, classes), or (B, D) features for a headless model
    layers: list[Layer]
    tokens: Tokens  # the final tokens, which the head reads
    readout: torch.Tensor  # (B, N) weights of the final tokens in what the head reads
    target: torch.Tensor | None = None  # (B,) class whose score was differentiated (or checked)
    adapter: Adapter | None = field(default=None, repr=False)
    first: int = 0  # index of layers[0] among all the model's attention layers
    only: bool = False  # True when ``only_layer`` recorded that one layer alone

    @property
    def attentions(self) -> list[torch.Tensor]:
        """[(B, heads, Nq, Nk)] per layer."""
        return [layer.weights for layer in self.layers]

    @property
    def gradients(self) -> list[torch.Tensor] | None:
        """[(B, heads, Nq, Nk)] per layer, or None when captured without gradients."""
        if not self.layers or self.layers[0].gradients is None:
            return None
        return [layer.gradients for layer in self.layers]


def mean_heads(weights: torch.Tensor) -> torch.Tensor:
    """The head mean of one layer's weights, keeping a heads axis of 1: (B, h, Nq, Nk) -> (B, 1, Nq, Nk)."""
    return weights.mean(dim=1, keepdim=True)


def has_attention(model: nn.Module) -> bool:
    """Whether token attention can be captured from ``model``."""
    try:
        adapter = adapter_for(model)
    except ExplainError:
        return False
    return adapter.kind == "transformer" and adapter.refusal("attention") is None


def capture_attention(model: nn.Module, x: torch.Tensor, *, target: int | Sequence[int] | torch.Tensor | None = None,
                      with_grads: bool = False, reduce: Reduce | None = None,
                      only_layer: int | None = None) -> Capture:
    """Run ``model`` once on ``x`` (B, C, H, W) and return its logits and every layer's attention.

    ``with_grads=True`` also differentiates the score (logit) of ``target`` (default: each image's
    predicted class) with respect to each layer's attention weights; the model still runs once.
    ``reduce`` (e.g. :func:`mean_heads`) is applied to each layer as it runs, without gradients only:
    a rollout then never holds every layer's full (B, heads, N, N) at once. ``only_layer`` (an index,
    negative from the end) asks for that one layer: where the adapter records one module per layer,
    the others keep their fused kernel and the capture holds just it (``Capture.first`` says which).
    The model's train/eval mode is left as it is (explanations normally want ``model.eval()``).
    """
    check_images(x)
    adapter = adapter_for(model)
    why = adapter.refusal("attention")
    if adapter.kind != "transformer" or why is not None:
        raise ExplainError(why or f"{type(model).__name__} has no attention to capture; use method='gradcam'.")
    if with_grads and not adapter.has_head:
        raise ExplainError(
            f"{type(model).__name__} has no classifier head (it returns features), so there is no class score to "
            "differentiate; use a class-agnostic method ('attention', 'rollout', 'similarity')."
        )
    if with_grads and reduce is not None:
        raise ExplainError("reduce applies to captures without gradients only.")
    if with_grads:
        # The input joins the graph so that a model with frozen weights still has one to differentiate.
        x = x.detach().requires_grad_(True)
    tokens = adapter.final_tokens(x.shape[-2], x.shape[-1])
    first, only = 0, contextlib.nullcontext()
    restricted = only_layer is not None and adapter.one_module_per_layer and bool(adapter.depth())
    if restricted:
        depth = int(adapter.depth())
        if isinstance(only_layer, bool) or not isinstance(only_layer, int) or not -depth <= only_layer < depth:
            raise ExplainError(f"layer {only_layer!r} is out of range for a model with {depth} layers "
                               f"(use 0..{depth - 1} or -{depth}..-1).")
        first = only_layer % depth
        only = record_only(frozenset({first}))
    with torch.enable_grad() if with_grads else torch.no_grad(), only:
        logits, rec = adapter.record_forward(x, reduce)
        logits = _logits(logits, model)
        records = [r for r in rec.records if r.token_attention]
        if not records:
            raise ExplainError(f"{type(model).__name__} returned no attention weights; it has no attention layers.")
        grads: Sequence[torch.Tensor | None] = [None] * len(records)
        t = None
        if with_grads:
            t = resolve_target(target, logits)  # (B,)
            # Images in a batch do not interact in eval mode, so the summed score gives each its own gradient.
            score = logits.gather(1, t[:, None]).sum()
            grads = torch.autograd.grad(score, [r.weights for r in records], allow_unused=True)
        elif target is not None:  # a target given anyway is checked and recorded, not differentiated
            t = resolve_target(target, logits)
    readout = adapter.readout(tokens, rec)
    readout = readout.detach().to(logits.dtype)
    if readout.ndim == 1:
        readout = readout.expand(x.shape[0], -1)  # (B, N)
    return Capture(logits=logits.detach(), layers=_merge(records, grads), tokens=tokens, readout=readout,
                   target=t, adapter=adapter, first=first, only=restricted)


def _logits(out: object, model: nn.Module) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # e.g. a distilled model in training mode returns two heads
        raise ExplainError(f"{type(model).__name__} returned {len(out)} outputs; call model.eval() first.")
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExplainError(f"{type(model).__name__} returned {shape}, not (B, classes) logits or (B, D) features.")
    return out


def _merge(records: list[AttentionRecord], grads: Sequence[torch.Tensor | None]) -> list[Layer]:
    """One :class:`Layer` per block; parallel branches (same block, same tokens) become one layer."""
    layers: list[Layer] = []
    want_grads = grads[0] is not None if grads else False
    for rec, g in zip(records, grads, strict=True):
        w = rec.weights.detach()
        if g is None and want_grads:
            g = torch.zeros_like(w)  # an attention the score does not depend on
        part = (w, None if g is None else g.detach(), rec.densify)
        prev = layers[-1] if layers else None
        if prev is not None and prev.block == rec.block and prev.block >= 0 and prev.queries == rec.queries \
                and prev.keys == rec.keys:
            prev.parts.append(part)
            continue
        layers.append(Layer(parts=[part], queries=rec.queries, keys=rec.keys, name=rec.name, block=rec.block,
                            stage=rec.stage, q_index=rec.q_index, k_index=rec.k_index))
    return layers
