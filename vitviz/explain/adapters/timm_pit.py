"""timm's Pooling-based Vision Transformer (``PoolingVisionTransformer``, PiT).

PiT is a ViT whose token grid shrinks between stages: an overlapping convolutional patch embedding
(kernel ``patch_size``, step ``stride``) plus a learned position embedding, then stages of timm ViT
``Block`` s. Between stages a strided depthwise convolution pools the grid (about halving it) and a
linear layer widens the class token(s), which are carried through every stage. The distilled PiT
carries a class and a distillation token and averages their two heads in eval; the head reads the
class token(s) only, the final patch tokens are not read.

Recording: each block's ``Attention`` takes its explicit path for the call and hands its softmax
weights over at ``attn_drop``; a record is (B, heads, T + h*w, T + h*w) over its stage's tokens
(T = 1 or 2 class tokens, then that stage's grid), with the stage index in ``stage``.
"""

from __future__ import annotations

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
    Layer,
    Recording,
    Reduce,
    Tokens,
    attn_drop_recorder,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
    stage_blocks,
)
from vitviz.explain.adapters.timm_common import common_heads, is_timm
from vitviz.explain.adapters.timm_swin import conv_out, stage_refusal


@register
class TimmPiT(Adapter):
    """timm ``PoolingVisionTransformer``: a ViT whose grid is pooled between stages, class token(s) carried."""

    name = "timm-pit"
    kind = "transformer"
    stagewise_rollout = True  # start_layer inside the last stage rolls out that stage
    family = "hierarchical"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.pit", "PoolingVisionTransformer")

    # --- tokens and readout -------------------------------------------------------------------------
    def stage_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each stage's tokens (class token(s), then its grid) for a ``height`` x ``width`` input."""
        m = self.model
        conv = m.patch_embed.conv
        grid = (conv_out(height, conv, 0), conv_out(width, conv, 1))
        base = tuple(int(v) for v in m.pos_embed.shape[-2:])
        if grid != base:
            size = getattr(m.patch_embed, "img_size", None)
            raise ExplainError(
                f"this PiT's position embedding is a {base[0]}x{base[1]} grid, which a {height}x{width} px input "
                f"does not give ({grid[0]}x{grid[1]}); resize the image"
                + (f" to {size[0]}x{size[1]} px." if size is not None else "."))
        cell = (int(conv.stride[0]), int(conv.stride[1]))  # overlapping patches: a cell is one step
        out = []
        for stage in m.transformers:
            if stage.pool is not None:
                pool = stage.pool.conv
                grid = (conv_out(grid[0], pool, 0), conv_out(grid[1], pool, 1))
                cell = (cell[0] * int(pool.stride[0]), cell[1] * int(pool.stride[1]))
            out.append(Tokens(prefix=int(m.num_tokens), grid=grid, cell=cell))
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.stage_tokens(height, width)[-1]

    def readout_kind(self) -> str:
        return "dist" if self.model.num_tokens > 1 and getattr(self.model, "head_dist", None) is not None else "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

    # --- attention ----------------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[str, nn.Module, int]]:
        """(module path, block, stage) of every block in call order."""
        return [(f"transformers.{s}.blocks.{j}", blk, s) for s, stage in enumerate(self.model.transformers)
                for j, blk in enumerate(stage.blocks)]

    def layers(self) -> list[Layer]:
        """Each stage's blocks (``transformers.s.blocks.j``) over the class token(s) and that stage's grid."""
        return stage_blocks(self.model.transformers, "transformers")

    def depth(self) -> int:
        return len(self._blocks())

    def heads(self) -> int | None:
        return common_heads(blk.attn for _, blk, _ in self._blocks())

    def refusal(self, method: str) -> str | None:
        if len(self.model.transformers) < 2:
            return None
        return stage_refusal(self.model, method, "a strided convolution pools the token grid between stages")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        stages = self.stage_tokens(height, width)
        rec = Recording()
        blocks = self._blocks()
        by_attn = {id(blk.attn): (name, stage, i) for i, (name, blk, stage) in enumerate(blocks)}

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            name, stage, index = by_attn[id(module)]
            tokens = stages[stage]
            if weights.shape[-1] != tokens.n:
                raise ExplainError(f"{name}: attention over {weights.shape[-1]} tokens, expected {tokens.n} "
                                   f"({tokens.prefix} class tokens and a {tokens.grid[0]}x{tokens.grid[1]} grid).")
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=tokens,
                                               keys=tokens, name=f"{name}.attn", block=index, stage=stage))

        with attn_drop_recorder([(f"{n}.attn", blk.attn) for n, blk, _ in blocks], on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """The tokens entering a block's attention (its ``norm1`` output); default: the last block.

        The head reads the class token(s) only, so the last block's output patch tokens get no
        gradient; the tokens entering its attention do.
        """
        blocks = self._blocks()
        index = check_block(layer, len(blocks))
        _, blk, stage = blocks[index]
        tokens = self.stage_tokens(x.shape[-2], x.shape[-1])[stage]
        return hooked_forward(self.model, blk.norm1, x, lambda t: grid_tokens_to_map(t, tokens), tokens.cell)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """The last block's output tokens on the last grid (B, h, w, D), the cell, and the logits (one pass)."""
        _, blk, stage = self._blocks()[-1]
        tokens = self.stage_tokens(x.shape[-2], x.shape[-1])[stage]
        cam = hooked_forward(self.model, blk, x.detach(), lambda t: t, tokens.cell, grad=False)
        fmap = grid_tokens_to_map(cam.activations, tokens)  # (B, D, h, w)
        return fmap.permute(0, 2, 3, 1), tokens.cell, cam.logits

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int]:
        pos = self.model.pos_embed  # (1, D, h, w): grid positions only, the class tokens have none
        return pos.flatten(2).transpose(1, 2), (int(pos.shape[-2]), int(pos.shape[-1])), 0
