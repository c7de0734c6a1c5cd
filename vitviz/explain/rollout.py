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

__all__ = ["HEAD_FUSIONS", "RowStep", "attention_rollout", "fuse_heads", "grad_rollout", "propagate_row",
           "readout_vector", "rollout_layer", "rollout_row", "token_row_to_grid"]

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
    a = _discard(fused, discard_ratio, num_prefix_tokens)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (N, N)
    a = a + eye  # the residual path
    return a / a.sum(dim=-1, keepdim=True)  # (B, N, N), rows sum to 1


def _discard(fused: torch.Tensor, discard_ratio: float, num_prefix_tokens: int) -> torch.Tensor:
    """Zero, per row, the ``floor(ratio * patches)`` weakest patch columns of (B, Nq, Nk); prefix columns stay."""
    n_patch = fused.shape[-1] - num_prefix_tokens
    k = int(discard_ratio * n_patch)
    if k <= 0:
        return fused
    patch = fused[..., num_prefix_tokens:]  # (B, Nq, P)
    lowest = patch.topk(k, dim=-1, largest=False).indices  # (B, Nq, k)
    patch = patch.scatter(-1, lowest, 0.0)
    return torch.cat([fused[..., :num_prefix_tokens], patch], dim=-1)  # (B, Nq, Nk)


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
    See :func:`propagate_row` for how it is computed.
    """
    layers = _layers_from(attentions, start_layer)
    if gradients is not None:
        _check_pairs(attentions, gradients)
    grads = None if gradients is None else list(gradients)[_start_index(len(attentions), start_layer):]
    a0 = layers[0]
    w = readout_vector(a0.shape[-1], row, num_prefix_tokens, a0.dtype, a0.device).expand(a0.shape[0], -1)
    steps = [RowStep(a, None if grads is None else grads[i]) for i, a in enumerate(layers)]
    mode = "rollout" if gradients is None else "grad-rollout"
    base, delta = propagate_row(steps, w, mode, head_fusion, discard_ratio, num_prefix_tokens)
    return base + delta


class RowStep:
    """One layer for :func:`propagate_row`: weights (and gradients) (B, heads, Nq, Nk) and where they sit.

    ``q_index`` / ``k_index`` place the layer's queries / keys in the propagated token set (None: all
    of it). Tokens a layer does not update keep their value through it (an identity row), as tokens
    that skip a layer do (CaiT's patches in its class-attention stage, the class token before
    ConViT appends it).
    """

    __slots__ = ("weights", "gradients", "q_index", "k_index")

    def __init__(self, weights: torch.Tensor, gradients: torch.Tensor | None = None,
                 q_index: torch.Tensor | None = None, k_index: torch.Tensor | None = None) -> None:
        self.weights, self.gradients, self.q_index, self.k_index = weights, gradients, q_index, k_index


def propagate_row(steps: Sequence[RowStep], readout: torch.Tensor, mode: str = "rollout",
                  head_fusion: str = "mean", discard_ratio: float = 0.0,
                  num_prefix_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout's row of a rollout / grad rollout / Chefer relevance, as ``(base, delta)`` (B, N) each.

    ``readout``: (B, N) weights over the tokens the head reads (one-hot for a class token, uniform
    over patches for a mean pool, an attention pool's own weights). ``steps`` in layer order.

    ``w^T M_L ⋯ M_1`` is computed right to left as vector-matrix products (N^2 work per layer, not N^3).
    The row is kept as ``base + delta`` with ``base = w``: every layer maps ``w`` to itself plus an
    increment, and when the increments are tiny (a layer scale of 1e-6 makes gradients ~1e-10) adding
    them to ``w`` in float32 would round them away; kept apart they stay exact to float rounding of
    their own size. The map is then ``delta`` plus ``w`` (constant over the patches for a mean pool).

    * rollout / grad-rollout (``M = norm_rows(F + I)``): with ``eps`` the row sums of ``F`` and
      ``t = eps / (1 + eps)``, ``r M = r - (r t) + (r (1 - t)) F`` on the rows the layer updates.
    * chefer (``M = I + Ā``): ``r M = r + r Ā``.
    """
    if mode not in ("rollout", "grad-rollout", "chefer"):
        raise ExplainError(f"unknown propagation mode {mode!r}.")
    check_fusion(head_fusion)
    check_discard_ratio(discard_ratio)
    base = readout
    delta = torch.zeros_like(readout)  # (B, N)
    for step in reversed(steps):
        a, g = step.weights, step.gradients
        if mode != "rollout" and g is None:
            raise ExplainError("gradient methods need one gradient per attention layer; capture with with_grads=True.")
        r = base + delta
        rq = r if step.q_index is None else r[:, step.q_index]  # (B, Nq)
        if mode == "chefer":
            a_bar = (g * a).clamp(min=0).mean(dim=1)  # (B, Nq, Nk): clamp per head, then average heads
            contrib = (rq[:, None, :] @ a_bar)[:, 0]  # (B, Nk)
        else:
            contrib, shrink = _normalised_step(a, g, rq, head_fusion, discard_ratio, num_prefix_tokens, step)
            delta = _index_add(delta, step.q_index, -shrink)
        delta = _index_add(delta, step.k_index, contrib)
    return base, delta


def _normalised_step(a: torch.Tensor, g: torch.Tensor | None, rq: torch.Tensor, fusion: str, discard: float,
                     prefix: int, step: RowStep) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r (1 - t)) F`` (B, Nk) and ``r t`` (B, Nq) for one row-normalised rollout layer."""
    key_prefix = prefix if step.k_index is None else 0
    if g is None and fusion == "mean" and int(discard * (a.shape[-1] - key_prefix)) == 0:
        # Mean of heads without forming it: s F = mean_h(s A_h); a reduction across the heads axis of
        # (B, heads, N, N) is strided and costs more than the rest of rollout together.
        eps = a.sum(dim=-1).mean(dim=1)  # (B, Nq)
        t = eps / (1.0 + eps)
        s = rq * (1.0 - t)  # (B, Nq)
        contrib = (s[:, None, None, :] @ a).mean(dim=1)[:, 0]  # (B, heads, 1, Nk) -> (B, Nk)
        return contrib, rq * t
    f = fuse_heads(a, fusion) if g is None else (g * a).mean(dim=1).clamp(min=0)  # (B, Nq, Nk)
    f = _discard(f, discard, key_prefix)
    eps = f.sum(dim=-1)  # (B, Nq)
    t = eps / (1.0 + eps)
    s = rq * (1.0 - t)
    return (s[:, None, :] @ f)[:, 0], rq * t  # (B, Nk), (B, Nq)


def _index_add(target: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    if index is None:
        return target + values
    return target.index_add(1, index.to(target.device), values)


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
