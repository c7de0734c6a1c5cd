"""timm's Pyramid Vision Transformer v2 (``PyramidVisionTransformerV2``).

PVT-v2 is hierarchical: an overlapping convolutional patch embedding (stride 4), then stages whose
first layer is another overlapping strided convolution (stride 2), so the token grid shrinks from
stage to stage. There is no class token; the head reads the mean of the last stage's tokens.

Its ``Attention`` reduces the keys: with ``sr_ratio`` r > 1 the keys and values come from the grid
pooled by an r x r strided convolution (then a LayerNorm), so the Nq = h*w queries attend to
Nk = (h/r)*(w/r) keys; the ``linear`` variant pools every stage to 7 x 7 keys (adaptive average
pool, 1x1 convolution, LayerNorm, GELU).

Recording: a forward pre-hook on each attention reads the grid it is called with (its
``feat_size`` argument) and the softmax weights are taken at ``attn_drop`` (the fused kernel is
switched off for that call): (B, heads, h*w, Nk), keys on the pooled grid with their larger cell.
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
    Layer,
    Recording,
    Reduce,
    Tokens,
    attn_drop_recorder,
    readout_vector,
    stage_blocks,
)
from vitviz.explain.adapters.timm_common import common_heads, is_timm
from vitviz.explain.adapters.timm_swin import conv_out, stage_refusal
from vitviz.explain.hooks import this_thread


def pooled_keys(attn: nn.Module, queries: Tokens) -> Tokens:
    """The keys of a spatial-reduction attention (PVT-v2, Twins' global sub-sampled attention)."""
    pool = getattr(attn, "pool", None)
    sr = getattr(attn, "sr", None)
    (h, w), (ch, cw) = queries.grid, queries.cell
    if pool is not None:  # linear PVT-v2: adaptive pool to a fixed grid (then a 1x1 conv)
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        grid = (int(size[0] or h), int(size[1] or w))
        if isinstance(sr, nn.Conv2d):
            grid = (conv_out(grid[0], sr, 0), conv_out(grid[1], sr, 1))
        cell = (max(1, math.ceil(h * ch / grid[0])), max(1, math.ceil(w * cw / grid[1])))
        return Tokens(prefix=0, grid=grid, cell=cell)
    if isinstance(sr, nn.Conv2d):
        grid = (conv_out(h, sr, 0), conv_out(w, sr, 1))
        return Tokens(prefix=0, grid=grid, cell=(ch * int(sr.stride[0]), cw * int(sr.stride[1])))
    return queries


@register
class TimmPVTv2(Adapter):
    """timm ``PyramidVisionTransformerV2``: attention with pooled keys on a shrinking grid."""

    name = "timm-pvt-v2"
    kind = "transformer"
    one_module_per_layer = True
    stagewise_rollout = True  # start_layer inside the last stage rolls out that stage
    family = "hierarchical"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.pvt_v2", "PyramidVisionTransformerV2")

    # --- tokens and readout -------------------------------------------------------------------------
    def stage_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each stage's token grid (the queries) for a ``height`` x ``width`` input."""
        conv = self.model.patch_embed.proj
        grid = (conv_out(height, conv, 0), conv_out(width, conv, 1))
        cell = (int(conv.stride[0]), int(conv.stride[1]))
        out = []
        for stage in self.model.stages:
            if stage.downsample is not None:
                conv = stage.downsample.proj
                grid = (conv_out(grid[0], conv, 0), conv_out(grid[1], conv, 1))
                cell = (cell[0] * int(conv.stride[0]), cell[1] * int(conv.stride[1]))
            out.append(Tokens(prefix=0, grid=grid, cell=cell))
        if min(out[-1].grid) < 1:
            raise ExplainError(f"an input of {height}x{width} px is smaller than one token of the last stage.")
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.stage_tokens(height, width)[-1]

    def readout_kind(self) -> str:
        return "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, "mean")

    # --- attention ----------------------------------------------------------------------------------
    def _attentions(self) -> list[tuple[str, nn.Module, int]]:
        """(module path, attention, stage) in call order."""
        return [(f"stages.{s}.blocks.{j}.attn", blk.attn, s) for s, stage in enumerate(self.model.stages)
                for j, blk in enumerate(stage.blocks)]

    def layers(self) -> list[Layer]:
        """Each stage's blocks (``stages.s.blocks.j``) on that stage's grid."""
        return stage_blocks(self.model.stages, "stages")

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """None: the head reads the last stage as a (B, C, h, w) map, not the blocks' tokens: no logit lens."""
        return None

    def depth(self) -> int:
        return len(self._attentions())

    def heads(self) -> int | None:
        return common_heads(attn for _, attn, _ in self._attentions())

    def refusal(self, method: str) -> str | None:
        if len(self.model.stages) < 2:
            return None
        return stage_refusal(self.model, method, "a strided convolution halves the token grid between stages, and "
                                                 "attention with pooled keys has fewer keys than queries")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        stages = self.stage_tokens(height, width)
        rec = Recording()
        attns = self._attentions()
        by_attn = {id(attn): (name, stage, i) for i, (name, attn, stage) in enumerate(attns)}
        grids: dict[int, tuple[int, int]] = {}  # id(attention) -> the feat_size it was called with

        def keep_grid(attn: nn.Module, inputs: tuple) -> None:
            if len(inputs) < 2:
                raise ExplainError("expected PVT-v2 attention to be called as attn(x, feat_size).")
            grids[id(attn)] = (int(inputs[1][0]), int(inputs[1][1]))

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            name, stage, index = by_attn[id(module)]
            queries = Tokens(prefix=0, grid=grids[id(module)], cell=stages[stage].cell)
            keys = pooled_keys(module, queries)
            if weights.shape[-2:] != (queries.n, keys.n):
                raise ExplainError(f"{name}: attention of shape {tuple(weights.shape)}, expected {queries.n} queries "
                                   f"and {keys.n} keys.")
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=queries,
                                               keys=keys, name=name, block=index, stage=stage))

        handles = []
        try:
            for _, attn, _ in attns:
                handles.append(attn.register_forward_pre_hook(this_thread(keep_grid)))
            with attn_drop_recorder([(name, attn) for name, attn, _ in attns], on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()
