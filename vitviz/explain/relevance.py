"""Chefer et al. 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers": gradient-weighted relevance propagated through self-attention.

For self-attention only (a ViT), relevance starts as the identity and each layer adds
``Ā · R`` with ``Ā = E_h[(∇A ⊙ A)+]``: the gradient of the target score weights each head's
attention, negative contributions are dropped per head, heads are averaged. The class-token row of
``R`` over patch columns is the map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitviz.explain.rollout import _check_pairs, _start_index

__all__ = ["chefer_relevance"]


def chefer_relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor],
                     start_layer: int = 0) -> torch.Tensor:
    """Relevance matrix R (B, N, N) from attentions and their gradients [(B, heads, N, N)] * depth."""
    _check_pairs(attentions, gradients)
    start = _start_index(len(attentions), start_layer)
    batch, _, n, _ = attentions[0].shape
    relevance = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, n, n)  # (B, N, N)
    for a, g in zip(attentions[start:], gradients[start:], strict=True):
        a_bar = (g * a).clamp(min=0).mean(dim=1)  # (B, N, N): clamp per head, then average heads
        relevance = relevance + a_bar @ relevance  # (B, N, N)
    return relevance
