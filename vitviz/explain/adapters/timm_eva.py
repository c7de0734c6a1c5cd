"""timm's ``Eva``: EVA, EVA-02, and the ViTs timm builds on the same class (``vit_*_rope_*``, Perception Encoder).

Tokens: the class token (when ``class_token``), then the registers (``num_reg_tokens``), then the patch grid
row by row; ``num_prefix_tokens`` counts the first two. Positions are an absolute ``pos_embed`` (with rows
for the prefix tokens, or without them under ``no_embed_class``), rotary embeddings applied to the grid
tokens' queries and keys inside attention (EVA-02, RoPE-ViT), or both.

Attention: every block has one ``EvaAttention`` or ``AttentionRope``; both compute
``softmax(q k^T * scale [+ mask])`` after the rotary embedding and pass it through ``attn_drop`` on their
explicit path, so :func:`attn_drop_recorder` records one (B, heads, N, N) matrix per block with the fused
kernel switched off for the recorded pass. Grouped-query attention repeats the key heads first, so the
weights have all the query heads. Pre-norm ``EvaBlock`` and post-norm ``EvaBlockPostNorm`` alike.

Readout by ``global_pool``: ``token`` (class token), ``avg`` (grid mean, then ``fc_norm``), ``max`` /
``avgmax`` (per image: the fraction of channels each token wins), ``map`` (an attention pool: its own
attention over the tokens, per image).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import register
from vitviz.explain.adapters.base import (
    Adapter,
    AttentionRecord,
    CamForward,
    Recording,
    Reduce,
    Tokens,
    attn_drop_recorder,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
)
from vitviz.explain.adapters.timm_common import is_timm, linear_patch_filters, patch_grid
from vitviz.explain.adapters.timm_vit import max_readout, readout_hooks


@register
class TimmEva(Adapter):
    """timm ``Eva`` (EVA, EVA-02, RoPE ViTs with class token, registers or average pooling)."""

    name = "timm-eva"
    kind = "transformer"
    one_module_per_layer = True
    family = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.eva", "Eva")

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        m, pe = self.model, self.model.patch_embed
        grid = patch_grid(pe, height, width, dynamic=bool(getattr(m, "dynamic_img_size", False)))
        cell = (int(pe.patch_size[0]), int(pe.patch_size[1]))
        return Tokens(prefix=int(m.num_prefix_tokens), grid=grid, cell=cell)

    def readout_kind(self) -> str:
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            return "pool"
        pool = m.global_pool
        if pool == "token" or (not pool and m.cls_token is not None):
            return "token"
        return pool if pool in ("max", "avgmax") else "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        how = self.readout_kind()
        if how in ("token", "mean"):
            return readout_vector(tokens, how)
        if how == "pool":
            if recording is None or recording.readout is None:
                raise ExplainError("the attention-pool readout depends on the image; record a forward pass first.")
            return recording.readout  # (B, N)
        if recording is None or recording.features is None:
            raise ExplainError(f"the {how} readout depends on the image; record a forward pass first.")
        w_max = max_readout(recording.features, tokens.prefix)  # (B, N)
        if how == "max":
            return w_max
        return 0.5 * w_max + 0.5 * readout_vector(tokens, "mean", w_max.device, w_max.dtype)  # avgmax

    # --- attention ----------------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self.model.blocks)

    def heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        tokens = self.final_tokens(height, width)
        rec = Recording()
        modules = [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(self.model.blocks)]
        blocks = {name: i for i, (name, _) in enumerate(modules)}

        def on_record(name: str, _module: nn.Module, weights: torch.Tensor) -> None:  # weights (B, heads, N, N)
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=tokens,
                                               keys=tokens, name=name, block=blocks[name]))

        handles = readout_hooks(self.model, self.readout_kind(), rec)
        try:
            with attn_drop_recorder(modules, on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """Class-token readouts: the tokens entering attention in block ``layer`` (default: the last);
        pooled readouts with no layer: the final norm's output, the tokens the pool reads."""
        m = self.model
        index = check_block(layer, len(m.blocks))
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)  # (B, D, gh, gw)

        if layer is None and self.readout_kind() != "token":
            return hooked_forward(m, m.norm, x, to_map, tokens.cell)
        blk = m.blocks[index]
        if type(blk).__name__ == "EvaBlock":  # pre-norm: norm1's output is what attention reads
            return hooked_forward(m, blk.norm1, x, to_map, tokens.cell)
        return hooked_forward(m, blk, x, to_map, tokens.cell, pre=True)  # post-norm: the block's input

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        m = self.model
        if getattr(m, "pos_embed", None) is None:
            return None  # rotary positions only (RoPE-ViT, registers + RoPE)
        prefix = 0 if m.no_embed_class else int(m.num_prefix_tokens)
        grid = tuple(int(g) for g in m.patch_embed.grid_size)
        if m.pos_embed.shape[1] != prefix + math.prod(grid):
            return None  # not one row per base-grid token: nothing vitviz can lay out
        return m.pos_embed, grid, prefix  # type: ignore[return-value]
