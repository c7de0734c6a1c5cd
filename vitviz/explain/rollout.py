"""Attention rollout (Abnar & Zuidema 2020) and its gradient-weighted variant.

Pure functions of captured attention tensors. Each layer's (fused) attention ``W`` becomes
``Â = norm_rows(W + I)``: the identity stands for the residual connection, and normalising rows
after adding it keeps ``Â`` row-stochastic (for mean-fused rows summing to 1 this is the paper's
``0.5 W + 0.5 I``). The rollout is the product ``Â_L ⋯ Â_start``; its readout row over the patch
columns is the saliency map: the class token's row for class-token pooling, the mean of the patch
tokens' rows for mean pooling (the head reads that mean; the class token is never read then).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitviz.errors import ExplainError

__all__ = ["HEAD_FUSIONS", "attention_rollout", "fuse_heads", "grad_rollout", "readout_vector", "rollout_layer",
           "rollout_row", "token_row_to_grid"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """Combine heads of one layer's attention (B, heads, N, N) into (B, N, N)."""
    check_fusion(fusion)
    if fusion == "mean":
        return attention.mean(dim=1)  # (B, N, N)
    if fusion == "max":
        return attention.amax(dim=1)  # (B, N, N)
    return attention.amin(dim=1)  # (B, N, N)


def rollout_layer(fused: torch.Tensor, discard_ratio: float = 0.0, num_prefix_tokens: int = 1) -> torch.Tensor:
    """One layer's rollout matrix Â (B, N, N) from fused attention (B, N, N).

    ``discard_ratio`` zeroes, in each row, that fraction of the patch columns with the lowest
    weights (``floor(ratio * patches)`` of them); prefix-token columns are never discarded, so the
    class token keeps its own attention. Then the identity is added and rows are renormalised.
    """
    check_discard_ratio(discard_ratio)
    a = fused
    n_patch = a.shape[-1] - num_prefix_tokens
    k = int(discard_ratio * n_patch)
    if k > 0:
        patch = a[..., num_prefix_tokens:]  # (B, N, P)
        lowest = patch.topk(k, dim=-1, largest=False).indices  # (B, N, k)
        patch = patch.scatter(-1, lowest, 0.0)
        a = torch.cat([a[..., :num_prefix_tokens], patch], dim=-1)  # (B, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (N, N)
    a = a + eye  # the residual path
    return a / a.sum(dim=-1, keepdim=True)  # (B, N, N), rows sum to 1


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Rollout matrix (B, N, N) of attentions [(B, heads, N, N)] * depth, from ``start_layer`` on.

    Row i says how much token i at the output draws on each input token through attention and
    residual paths; rows sum to 1. ``start_layer`` may be negative (counted from the end).
    """
    layers = _layers_from(attentions, start_layer)
    return _multiply([rollout_layer(fuse_heads(a, head_fusion), discard_ratio, num_prefix_tokens) for a in layers])


def grad_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], discard_ratio: float = 0.0,
                 start_layer: int = 0, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Gradient-weighted rollout (B, N, N), as in jacobgil's vit-explain "grad rollout".

    Per layer the heads of ``grad * attn`` are averaged and negative values clamped to 0 (mean
    first, then clamp: that is what distinguishes it from Chefer et al., who clamp per head), then
    the same discard / identity / normalise / multiply steps as :func:`attention_rollout`.
    """
    return _multiply([rollout_layer(f, discard_ratio, num_prefix_tokens)
                      for f in _grad_fused(attentions, gradients, start_layer)])


def token_row_to_grid(matrix: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                      row: int | str = 0) -> torch.Tensor:
    """Row ``row`` of a (B, N, N) token matrix over the patch columns, as (B, gh, gw).

    ``row``: a token index (0: the class token), or "mean" for the mean of the patch tokens' rows
    (the readout of mean-pooled models). Models without prefix tokens have no class token: row 0
    means "mean" there.
    """
    batch, n, _ = matrix.shape
    if n != num_prefix_tokens + grid[0] * grid[1]:
        raise ExplainError(
            f"{n} tokens do not match a {grid[0]}x{grid[1]} grid plus {num_prefix_tokens} prefix tokens."
        )
    values = matrix[:, num_prefix_tokens:].mean(dim=1) if _is_mean(row, num_prefix_tokens) else matrix[:, row]
    return values[:, num_prefix_tokens:].reshape(batch, grid[0], grid[1])  # (B, gh, gw)


def readout_vector(n: int, row: int | str, num_prefix_tokens: int, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """The (N,) weights that pick a row of a token matrix: one-hot for a token, uniform over patches for "mean"."""
    v = torch.zeros(n, dtype=dtype, device=device)
    if _is_mean(row, num_prefix_tokens):
        v[num_prefix_tokens:] = 1.0 / (n - num_prefix_tokens)
    elif isinstance(row, int) and not isinstance(row, bool) and -n <= row < n:
        v[row] = 1.0
    else:
        raise ExplainError(f"row must be a token index in 0..{n - 1} or 'mean', got {row!r}.")
    return v


def _is_mean(row: int | str, num_prefix_tokens: int) -> bool:
    return row == "mean" or (num_prefix_tokens == 0 and isinstance(row, int) and row == 0)


# --- validation and helpers ------------------------------------------------------------------------

def check_fusion(fusion: str) -> None:
    if fusion not in HEAD_FUSIONS:
        raise ExplainError(f"unknown head fusion {fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}.")


def check_discard_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ExplainError(
            f"discard_ratio must be a number in [0, 1) (the fraction of weakest weights to drop), got {ratio!r}."
        )


def _start_index(depth: int, start_layer: int) -> int:
    if depth == 0:
        raise ExplainError("no attention layers were given.")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not -depth <= start_layer < depth:
        raise ExplainError(f"start_layer {start_layer!r} is out of range for a model with {depth} layers "
                           f"(use 0..{depth - 1}, or -{depth}..-1 from the end).")
    return start_layer % depth


def _layers_from(attentions: Sequence[torch.Tensor], start_layer: int) -> list[torch.Tensor]:
    start = _start_index(len(attentions), start_layer)
    layers = list(attentions)[start:]
    for a in layers:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ExplainError(f"attention must be (B, heads, N, N) per layer, got shape {tuple(a.shape)}.")
    return layers


def _check_pairs(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor] | None) -> None:
    if gradients is None or len(gradients) != len(attentions):
        raise ExplainError("gradient methods need one gradient per attention layer; capture with with_grads=True.")
    _layers_from(attentions, 0)


def rollout_row(attentions: Sequence[torch.Tensor], row: int | str = 0, head_fusion: str = "mean",
                discard_ratio: float = 0.0, start_layer: int = 0, num_prefix_tokens: int = 1,
                gradients: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Row ``row`` (B, N) of the rollout (or, with ``gradients``, of the grad rollout), without the full product.

    ``row``: a token index (0: the class token) or "mean" (the mean of the patch tokens' rows, the
    readout of a mean-pooled model; also what row 0 means for a model without prefix tokens).

    ``e_row^T Â_L ⋯ Â_1`` is computed right to left as vector-matrix products: N^2 work per layer
    instead of N^3, which is what keeps rollout within a few percent of a plain forward pass.
    """
    if gradients is None:
        layers = _layers_from(attentions, start_layer)
        if head_fusion == "mean" and int(discard_ratio * (layers[0].shape[-1] - num_prefix_tokens)) == 0:
            check_discard_ratio(discard_ratio)
            return _mean_rollout_row(layers, row, num_prefix_tokens)
        mats = [rollout_layer(fuse_heads(a, head_fusion), discard_ratio, num_prefix_tokens) for a in layers]
    else:
        mats = [rollout_layer(f, discard_ratio, num_prefix_tokens)
                for f in _grad_fused(attentions, gradients, start_layer)]
    last = mats[-1]
    r = readout_vector(last.shape[-1], row, num_prefix_tokens, last.dtype, last.device) @ last  # (B, N)
    r = r[:, None]  # (B, 1, N)
    for a in reversed(mats[:-1]):
        r = r @ a  # (B, 1, N)
    return r[:, 0]  # (B, N)


def _mean_rollout_row(layers: list[torch.Tensor], row: int | str, num_prefix_tokens: int) -> torch.Tensor:
    """Row of the mean-fused rollout (no discard) without ever forming a fused (N, N) matrix.

    With W = mean_h A_h and Â = D^-1 (W + I), D = diag(row sums of W + I):
    r Â = s W + s with s = r D^-1, and s W = mean_h (s A_h). Every step is a batched
    vector-matrix product or a contiguous reduction over the last axis: a reduction across the
    heads axis of (B, heads, N, N) is strided, and costs more than the rest of rollout together.
    """
    a0 = layers[0]
    r = readout_vector(a0.shape[-1], row, num_prefix_tokens, a0.dtype, a0.device).expand(a0.shape[0], -1)  # (B, N)
    for a in reversed(layers):
        row_sums = a.sum(dim=-1).mean(dim=1) + 1.0  # (B, N): row sums of W + I
        s = r / row_sums  # (B, N)
        r = (s[:, None, None, :] @ a).mean(dim=1)[:, 0] + s  # (B, heads, 1, N) -> (B, N)
    return r


def _grad_fused(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor] | None,
                start_layer: int) -> list[torch.Tensor]:
    """Per layer from ``start_layer``: heads of grad * attn averaged, then clamped at 0, (B, N, N)."""
    _check_pairs(attentions, gradients)
    start = _start_index(len(attentions), start_layer)
    return [(g * a).mean(dim=1).clamp(min=0) for a, g in zip(attentions[start:], gradients[start:], strict=True)]


def _multiply(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Â_L ⋯ Â_1 for matrices given in layer order [Â_1, ..., Â_L]."""
    result = matrices[0]
    for a in matrices[1:]:
        result = a @ result  # (B, N, N)
    return result
