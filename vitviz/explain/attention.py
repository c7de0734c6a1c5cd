"""Raw attention: one layer's weights from the model's readout (or a chosen query patch) to every patch.

The readout is what the head reads: the class token for class-token pooling, the mean of the patch
tokens for mean pooling (then the map is the mean of the patch queries' rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.rollout import HEAD_FUSIONS, fuse_heads

if TYPE_CHECKING:
    from vitviz.explain.adapters import Tokens
    from vitviz.explain.capture import Layer

__all__ = ["Query", "attention_heads", "attention_map", "heads_map", "layer_query_rows", "query_rows", "query_token",
           "select_layer"]

Query = int | tuple[int, int] | None  # None: the readout; (row, col) or a flat index: a patch


def select_layer(attentions: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """Layer ``layer`` (negative counts from the end) of captured attentions, (B, heads, N, N)."""
    return attentions[_layer_index(len(attentions), layer)]


def query_token(query: Query, grid: tuple[int, int], num_prefix_tokens: int = 1) -> int:
    """Token index of a query: the class token for None, else a patch given as (row, col) or flat index."""
    gh, gw = grid
    if query is None:
        if num_prefix_tokens == 0:
            raise ExplainError("this model has no class token; pass query=(row, col) to pick a query patch.")
        return 0
    if isinstance(query, bool):
        raise ExplainError(f"query must be (row, col) or a flat patch index, got {query!r}.")
    if isinstance(query, int):
        if not 0 <= query < gh * gw:
            raise ExplainError(f"query patch index {query} is out of range for a {gh}x{gw} grid (0..{gh * gw - 1}).")
        return num_prefix_tokens + query
    try:
        row, col = (int(v) for v in query)
    except (TypeError, ValueError) as err:
        raise ExplainError(f"query must be (row, col) or a flat patch index, got {query!r}.") from err
    if not (0 <= row < gh and 0 <= col < gw):
        raise ExplainError(f"query patch ({row}, {col}) is outside the {gh}x{gw} grid (rows 0..{gh - 1}, "
                           f"cols 0..{gw - 1}).")
    return num_prefix_tokens + row * gw + col


def query_rows(a: torch.Tensor, query: Query, grid: tuple[int, int], num_prefix_tokens: int = 1,
               readout: str = "token") -> torch.Tensor:
    """Each head's attention row (B, heads, N) of a query in one layer's attention (B, heads, N, N).

    ``query`` None is the readout: the class token's row (``readout="token"``), or the mean of the
    patch tokens' rows (``readout="mean"``, and always for models without prefix tokens).
    """
    if readout not in ("token", "mean"):
        raise ExplainError(f"readout must be 'token' or 'mean', got {readout!r}.")
    if query is None and (readout == "mean" or num_prefix_tokens == 0):
        return a[:, :, num_prefix_tokens:].mean(dim=2)  # (B, heads, N)
    return a[:, :, query_token(query, grid, num_prefix_tokens)]  # (B, heads, N)


def _check_head(head: int | str | None, heads: int) -> None:
    if head is None or head in HEAD_FUSIONS:
        return
    if isinstance(head, bool) or not isinstance(head, int) or not -heads <= head < heads:
        raise ExplainError(
            f"head {head!r} is out of range: the layer has {heads} heads (use 0..{heads - 1}, or "
            f"None/'mean'/'max'/'min' to combine them)."
        )


def attention_map(attentions: Sequence[torch.Tensor], grid: tuple[int, int], layer: int = -1,
                  head: int | str | None = None, query: Query = None, num_prefix_tokens: int = 1,
                  readout: str = "token") -> torch.Tensor:
    """Attention of one query to every patch, (B, gh, gw).

    ``head``: a head index (negative ok), or None/"mean" for the head mean ("max"/"min" also fuse).
    ``query``: None for the model's readout (see :func:`query_rows`), else (row, col) or a flat patch index.
    """
    a = select_layer(attentions, layer)  # (B, heads, N, N)
    _check_head(head, a.shape[1])
    _check_tokens(a, grid, num_prefix_tokens)
    rows = query_rows(a, query, grid, num_prefix_tokens, readout)  # (B, heads, N)
    if isinstance(head, int):
        rows = rows[:, head]  # (B, N)
    else:
        rows = fuse_heads(rows[:, :, None], head or "mean")[:, 0]  # (B, N)
    return rows[:, num_prefix_tokens:].reshape(a.shape[0], *grid)  # (B, gh, gw)


def heads_map(attentions: Sequence[torch.Tensor], grid: tuple[int, int], layer: int = -1, query: Query = None,
              num_prefix_tokens: int = 1, readout: str = "token") -> torch.Tensor:
    """Every head's attention of one query (None: the readout) to every patch, (B, heads, gh, gw)."""
    a = select_layer(attentions, layer)  # (B, heads, N, N)
    _check_tokens(a, grid, num_prefix_tokens)
    rows = query_rows(a, query, grid, num_prefix_tokens, readout)  # (B, heads, N)
    return rows[:, :, num_prefix_tokens:].reshape(a.shape[0], a.shape[1], *grid)  # (B, heads, gh, gw)


def layer_query_rows(layer: Layer, final: Tokens, readout: torch.Tensor, query: Query = None) -> torch.Tensor:
    """Each head's attention row (B, heads, Nk) of one captured layer, for a query.

    ``query`` None is the readout (B, N) over the final tokens: on a layer whose queries are the final
    tokens (or placed in them), the readout-weighted mean of its rows; on a layer whose queries lie
    elsewhere (an earlier stage's grid), or hold none of the readout's weight, the mean of its grid
    queries' rows. Otherwise (row, col) or a flat index on the layer's query grid picks one row.
    """
    a, queries = layer.weights, layer.queries  # (B, heads, Nq, Nk)
    if query is not None:
        if queries.num_grid == 0:
            raise ExplainError(f"layer {layer.name}'s queries are only its {queries.prefix} prefix token(s); "
                               "leave query unset.")
        return a[:, :, query_token(query, queries.grid, queries.prefix)]  # (B, heads, Nk)
    w = None
    if layer.q_index is not None:
        w = readout[:, layer.q_index.to(readout.device)]  # (B, Nq)
    elif queries == final:
        w = readout
    if w is not None:
        total = w.sum(dim=1, keepdim=True)  # (B, 1)
        if bool((total > 0).all()):
            return torch.einsum("bq,bhqk->bhk", (w / total).to(a.dtype), a)  # (B, heads, Nk)
    if queries.num_grid == 0:  # the layer's only queries are prefix tokens (a lone class token)
        return a.mean(dim=2)  # (B, heads, Nk)
    return a[:, :, queries.prefix:].mean(dim=2)  # (B, heads, Nk)


def attention_heads(model: nn.Module, x: torch.Tensor, layer: int = -1, query: Query = None) -> torch.Tensor:
    """Per-head attention grid (B, heads, gh, gw) of ``model`` on ``x``: raw weights, not normalised.

    ``query`` None reads from the model's readout (class token, the patch mean for mean pooling, ...).
    The grid is the layer's key grid.
    """
    from vitviz.explain.capture import capture_attention

    cap = capture_attention(model, x, only_layer=layer)  # records just that layer where the adapter can
    lay = cap.layers[0] if cap.only else cap.layers[_layer_index(len(cap.layers), layer)]
    rows = layer_query_rows(lay, cap.tokens, cap.readout, query)  # (B, heads, Nk)
    keys = lay.keys
    return rows[:, :, keys.prefix:].reshape(rows.shape[0], rows.shape[1], *keys.grid)  # (B, heads, gkh, gkw)


def _layer_index(depth: int, layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
        raise ExplainError(
            f"layer {layer!r} is out of range for a model with {depth} layers (use 0..{depth - 1} or -{depth}..-1)."
        )
    return layer


def _check_tokens(a: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> None:
    if a.shape[-1] != num_prefix_tokens + grid[0] * grid[1]:
        raise ExplainError(
            f"attention over {a.shape[-1]} tokens does not match a {grid[0]}x{grid[1]} grid plus "
            f"{num_prefix_tokens} prefix tokens."
        )
