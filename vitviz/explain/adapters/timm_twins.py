"""timm's Twins (``Twins``): Twins-SVT (local windows and global sub-sampling) and Twins-PCPVT.

Twins is hierarchical: each stage starts with a non-overlapping patch embedding (4 x 4 px, then
2 x 2 tokens), so the token grid shrinks between stages; a convolutional position generator
(``PosConv``) follows each stage's first block. There is no class token; the head reads the mean of
the last stage's tokens.

Two attentions:

* ``GlobalSubSampleAttn`` (GSA; every block of PCPVT, every second block of SVT): the keys and
  values come from the grid pooled by an r x r strided convolution (then a LayerNorm), so the h*w
  queries attend to (h/r)*(w/r) keys on a coarser grid (r = ``sr_ratio``; all tokens when r = 1).
* ``LocallyGroupedAttn`` (LSA; the other SVT blocks): attention within non-overlapping ws x ws
  windows; the grid is padded with zero tokens at the bottom / right to a multiple of ws.

Recording: a forward pre-hook on each attention reads the grid it is called with (its ``size``
argument) and the softmax weights are taken at ``attn_drop`` (the fused kernel is switched off for
that call). GSA records are (B, heads, h*w, Nk). LSA computes its windowed weights as (B, windows,
heads, ws*ws, ws*ws); the recorder hands ``attn_drop`` those weights as (B * windows, heads, Nw, Nw)
(a reshaped view that the model then uses, so gradients reach it) and the record's ``densify`` maps
them onto the stage's grid, (B, heads, h*w, h*w), as Swin's without a shift. Padding tokens are not
on the grid: rows of the windows at the bottom / right border then sum to less than 1 (the rest is
what the model gave the zero padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import register
from vitviz.explain.adapters.base import (
    Adapter,
    AttentionRecord,
    CamForward,
    Layer,
    Recording,
    Reduce,
    Tokens,
    attn_drop_recorder,
    grid_tokens_to_map,
    readout_vector,
    stage_blocks,
)
from vitviz.explain.adapters.timm_common import common_heads, is_timm, linear_patch_filters
from vitviz.explain.adapters.timm_pvt import pooled_keys
from vitviz.explain.adapters.timm_swin import (
    conv_out,
    stage_refusal,
    window_densify,
    window_index,
)
from vitviz.explain.hooks import this_thread


@register
class TimmTwins(Adapter):
    """timm ``Twins`` (SVT and PCPVT): windowed and sub-sampled attention on a shrinking grid."""

    name = "timm-twins"
    kind = "transformer"
    stagewise_rollout = True  # start_layer inside the last stage rolls out that stage
    family = "hierarchical"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.twins", "Twins")

    # --- tokens and readout -------------------------------------------------------------------------
    def stage_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each stage's token grid for a ``height`` x ``width`` input."""
        grid, cell, out = (height, width), (1, 1), []
        for embed in self.model.patch_embeds:
            conv = embed.proj
            grid = (conv_out(grid[0], conv, 0), conv_out(grid[1], conv, 1))
            cell = (cell[0] * int(conv.stride[0]), cell[1] * int(conv.stride[1]))
            out.append(Tokens(prefix=0, grid=grid, cell=cell))
        if not out or min(out[-1].grid) < 1:
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
        return [(f"blocks.{s}.{j}.attn", blk.attn, s) for s, blocks in enumerate(self.model.blocks)
                for j, blk in enumerate(blocks)]

    def layers(self) -> list[Layer]:
        """Each stage's blocks (``blocks.s.j``) on that stage's grid."""
        return stage_blocks(self.model.blocks, "blocks", blocks="")

    def depth(self) -> int:
        return len(self._attentions())

    def heads(self) -> int | None:
        return common_heads(attn for _, attn, _ in self._attentions())

    def refusal(self, method: str) -> str | None:
        if len(self.model.blocks) < 2:
            return None
        return stage_refusal(self.model, method, "a strided patch embedding halves the token grid between stages, "
                                                 "and sub-sampled attention has fewer keys than queries")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

        stages = self.stage_tokens(height, width)
        rec = Recording()
        attns = self._attentions()
        for name, attn, _ in attns:
            if not isinstance(attn, (GlobalSubSampleAttn, LocallyGroupedAttn)):
                raise ExplainError(f"{name} is a {type(attn).__name__}, whose attention vitviz cannot record in "
                                   "Twins; use method='gradcam'.")
        by_attn = {id(attn): (name, stage, i) for i, (name, attn, stage) in enumerate(attns)}
        by_drop = {id(attn.attn_drop): attn for _, attn, _ in attns if isinstance(attn, LocallyGroupedAttn)}
        grids: dict[int, tuple[int, int]] = {}  # id(attention) -> the size it was called with

        def keep_grid(attn: nn.Module, inputs: tuple) -> None:
            if len(inputs) < 2:
                raise ExplainError("expected Twins attention to be called as attn(x, size).")
            grids[id(attn)] = (int(inputs[1][0]), int(inputs[1][1]))

        def add(module: nn.Module, weights: torch.Tensor) -> None:
            name, stage, index = by_attn[id(module)]
            queries = Tokens(prefix=0, grid=grids[id(module)], cell=stages[stage].cell)
            densify = None
            if isinstance(module, LocallyGroupedAttn):
                ws = int(module.ws)
                densify = window_densify(window_index(queries.grid, (ws, ws)), queries.n)
                keys = queries
            else:
                keys = pooled_keys(module, queries)
                if weights.shape[-2:] != (queries.n, keys.n):
                    raise ExplainError(f"{name}: attention of shape {tuple(weights.shape)}, expected {queries.n} "
                                       f"queries and {keys.n} keys.")
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=queries,
                                               keys=keys, name=name, block=index, stage=stage, densify=densify))

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            if not isinstance(module, LocallyGroupedAttn):  # windowed weights are recorded by as_windows
                add(module, weights)

        def as_windows(drop: nn.Module, inputs: tuple, _out: torch.Tensor) -> torch.Tensor:
            # (B, windows, heads, Nw, Nw) -> (B * windows, heads, Nw, Nw), which the model then uses
            weights = inputs[0]
            flat = weights.flatten(0, 1)  # (B*windows, heads, Nw, Nw)
            add(by_drop[id(drop)], flat)
            return F.dropout(flat, drop.p, drop.training).view(weights.shape)  # attn_drop's output, from ``flat``

        handles = []
        try:
            for _, attn, _ in attns:
                handles.append(attn.register_forward_pre_hook(this_thread(keep_grid)))
            with attn_drop_recorder([(name, attn) for name, attn, _ in attns], on_record):
                for _, attn, _ in attns:
                    if isinstance(attn, LocallyGroupedAttn):
                        handles.append(attn.attn_drop.register_forward_hook(this_thread(as_windows)))
                yield rec
        finally:
            for h in handles:
                h.remove()

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        if layer is not None:
            raise ExplainError("Twins' Grad-CAM reads its last feature map; leave layer unset (None).")
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        feats = self.model.forward_features(x)  # (B, h*w, C): the last stage's tokens
        return CamForward(logits=self.model.forward_head(feats), activations=feats,
                          reshape=lambda t: grid_tokens_to_map(t, tokens), cell=tokens.cell)

    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embeds[0].proj)
