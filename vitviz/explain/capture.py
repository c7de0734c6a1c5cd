"""Capture every layer's attention weights (and their gradients) in one forward pass.

Our ViT and hybrid return attention as part of their contract (``model(x, return_attention=True)``:
the explicit path for that call only, weights in the autograd graph). timm ViTs are taken as they
come, fused attention on: for one call, :func:`timm_attention_recorder` gives each timm
``Attention`` instance an explicit-path ``forward`` that records the softmax weights, and removes it
afterwards. Hooks on ``attn_drop`` are not used: once attention is fused, ``attn_drop`` never sees
the weights, which is why hook-based tools silently capture nothing on recent timm.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.layout import check_images, is_timm_vit, model_family, resolve_target

__all__ = ["Capture", "capture_attention", "has_attention", "timm_attention_recorder"]


@dataclass
class Capture:
    """One forward pass's logits, attention weights and (optionally) their gradients, all detached."""

    logits: torch.Tensor  # (B, classes)
    attentions: list[torch.Tensor]  # [(B, heads, N, N)] * depth, softmax weights before attention dropout
    gradients: list[torch.Tensor] | None = None  # d score[target] / d attention, same shapes; None unless asked
    target: torch.Tensor | None = None  # (B,) class whose score was differentiated


def has_attention(model: nn.Module) -> bool:
    """Whether attention can be captured from ``model`` (our ViT/hybrid or a timm ViT)."""
    try:
        return model_family(model) in ("vit", "hybrid")
    except ExplainError:
        return False


def capture_attention(model: nn.Module, x: torch.Tensor, *, target: int | Sequence[int] | torch.Tensor | None = None,
                      with_grads: bool = False) -> Capture:
    """Run ``model`` once on ``x`` (B, C, H, W) and return its logits and every layer's attention.

    ``with_grads=True`` also differentiates the score (logit) of ``target`` (default: each image's
    predicted class) with respect to each layer's attention weights; the model still runs once.
    The model's train/eval mode is left as it is (explanations normally want ``model.eval()``).
    """
    check_images(x)
    family = model_family(model)  # refuses models we know nothing about
    if family not in ("vit", "hybrid"):
        raise ExplainError(
            f"{type(model).__name__} ({family}) has no attention to capture; attention methods need a ViT or "
            "hybrid. Use method='gradcam' for CNNs."
        )
    if with_grads:
        # The input joins the graph so that a model with frozen weights still has one to differentiate.
        x = x.detach().requires_grad_(True)
    with torch.enable_grad() if with_grads else torch.no_grad():
        if is_timm_vit(model):
            with timm_attention_recorder(model) as records:
                logits = model(x)  # (B, classes)
            attentions = list(records)
        else:
            logits, attentions = model(x, return_attention=True)  # [(B, heads, N, N)] * depth
        if not attentions:
            raise ExplainError(f"{type(model).__name__} returned no attention weights; it has no attention layers.")
        if not with_grads:  # a target given anyway is checked and recorded, not differentiated
            t = None if target is None else resolve_target(target, logits)
            return Capture(logits=logits, attentions=attentions, target=t)
        t = resolve_target(target, logits)  # (B,)
        # Images in a batch do not interact in eval mode, so the summed score gives each its own gradient.
        score = logits.gather(1, t[:, None]).sum()
        gradients = torch.autograd.grad(score, attentions)
    return Capture(
        logits=logits.detach(),
        attentions=[a.detach() for a in attentions],
        gradients=[g.detach() for g in gradients],
        target=t,
    )


# --- timm ------------------------------------------------------------------------------------------

@contextmanager
def timm_attention_recorder(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """For the calls inside the ``with`` block, record the attention weights of a timm model.

    Yields a list that fills with one (B, heads, N, N) tensor per attention call, in call order. Each
    timm ``Attention`` instance gets an instance-level ``forward`` that takes the explicit path; on
    exit (also on an exception) the instance attribute is deleted, so the class's fused ``forward``
    applies again and ``fused_attn`` is never touched.
    """
    from timm.layers.attention import Attention as TimmAttention

    modules = [m for m in model.modules() if isinstance(m, TimmAttention)]
    if not modules:
        raise ExplainError(f"{type(model).__name__} has no timm Attention layers to record.")
    unsupported = sorted({type(m).__name__ for m in modules if type(m).forward is not TimmAttention.forward})
    if unsupported:
        raise ExplainError(
            f"timm attention classes {unsupported} override forward; vitviz records timm's Attention only. "
            "Try vitviz.from_timm(model) if the architecture converts."
        )
    records: list[torch.Tensor] = []
    missing = object()
    saved: list[tuple[nn.Module, object]] = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("forward", missing)))
            m.forward = types.MethodType(_make_explicit_forward(records), m)
        yield records
    finally:
        for m, previous in saved:
            if previous is missing:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous


def _make_explicit_forward(records: list[torch.Tensor]):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # timm 1.0.31 Attention.forward with fused_attn=False, plus recording of the softmax weights.
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N); q is N x hd, cheaper to scale
        bias = _additive_mask(N, scores, attn_mask, is_causal)
        if bias is not None:
            scores = scores + bias
        attn = scores.softmax(dim=-1)  # (B, heads, N, N)
        records.append(attn)
        x = self.attn_drop(attn) @ v  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))  # (B, N, D)

    return forward


def _additive_mask(n: int, scores: torch.Tensor, attn_mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor | None:
    """The additive bias ``scaled_dot_product_attention`` would apply (causal wins over a mask)."""
    if is_causal:
        return scores.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask

