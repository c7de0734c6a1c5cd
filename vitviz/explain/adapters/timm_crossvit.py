"""timm's CrossViT (``CrossVit``): two ViT branches on different patch sizes that talk through class tokens.

The image is embedded twice (branch b: patches of ``patch_size[b]`` px on the image resized to
``img_size_scaled[b]``), each branch with its own class token and learned position embedding. Each
``MultiScaleBlock`` runs both branches' ViT ``Block`` s separately, then fuses them by cross
attention: branch b's class token, projected to the other branch's width, is the single query of a
``CrossAttention`` over itself and the other branch's patch tokens, and the result (projected
back) becomes branch b's class token. The eval logits average the two branches' heads, each reading
its own class token (or, with ``global_pool='avg'``, the mean of its own patch tokens).

Tokens and stages: ``stage`` is the branch whose token grid a record's keys lie on. A branch
block's queries and keys are that branch's tokens (prefix 1, its grid, its cell). A cross attention
``fusion.b`` is recorded with ``stage`` = the other branch b' = (b + 1) % 2: queries are the one
class token of branch b (``Tokens(prefix=1, grid=(0, 0))``, Nq = 1), keys are that class token then
branch b''s grid (prefix 1, b''s grid and cell). ``block`` counts layers as timm's drop-path
schedule does: within a multi-scale block, branch block j of every branch is layer j, and the
fusion layers follow.

Readout: the final tokens are branch 0's (its class token, then its grid), and the readout is its
class token (``global_pool='token'``) or its patch mean (``'avg'``). Branch 1's half of the logits
reads branch 1's class token, which has no place in that set; its information reaches branch 0
only through the cross attentions. Cells of the grid are in pixels of the input: a branch whose
image is rescaled (``img_scale``) has cells of ``patch_size * input / scaled`` px, rounded.

Recording: the branch blocks' timm ``Attention`` takes its explicit path for the call; they and
``CrossAttention`` hand their softmax weights over at ``attn_drop``. Rollout and relevance are
refused: the two branches exchange information only through their class tokens, so there is no one
token set to compose attention over.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
from vitviz.explain.adapters.timm_common import common_heads, is_timm, linear_patch_filters
from vitviz.explain.adapters.timm_swin import ACROSS_LAYERS


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    block: int
    stage: int
    queries: Tokens
    keys: Tokens
    q_index: torch.Tensor | None = None


def _fusion_blocks(fusion: nn.Module) -> list[nn.Module]:
    """The cross-attention blocks of one fusion (a Sequential, or a single block in old configs)."""
    return list(fusion) if isinstance(fusion, nn.Sequential) else [fusion]


@register
class TimmCrossViT(Adapter):
    """timm ``CrossVit``: two branches fused by class-token cross attention; reads branch 0's tokens."""

    name = "timm-crossvit"
    kind = "transformer"
    family = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.crossvit", "CrossVit")

    # --- tokens and readout -------------------------------------------------------------------------
    def branch_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each branch's tokens (its class token, then its grid) for a ``height`` x ``width`` input."""
        m = self.model
        out = []
        for b, embed in enumerate(m.patch_embed):
            sh, sw = (int(v) for v in m.img_size_scaled[b])
            ph, pw = (int(v) for v in embed.patch_size)
            cell = (max(1, round(ph * height / sh)), max(1, round(pw * width / sw)))
            out.append(Tokens(prefix=1, grid=(sh // ph, sw // pw), cell=cell))
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.branch_tokens(height, width)[0]

    def readout_kind(self) -> str:
        return "mean" if self.model.global_pool == "avg" else "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

    # --- attention ----------------------------------------------------------------------------------
    def _layers(self, height: int, width: int) -> list[_Layer]:
        """Every attention module in call order with its tokens, layer index and branch."""
        branches = self.branch_tokens(height, width)
        nb = len(branches)
        out: list[_Layer] = []
        offset = 0
        for k, msb in enumerate(self.model.blocks):
            depth = 0
            for b, seq in enumerate(msb.blocks or []):
                for j, blk in enumerate(seq):
                    out.append(_Layer(f"blocks.{k}.blocks.{b}.{j}.attn", blk.attn, offset + j, b, branches[b],
                                      branches[b]))
                depth = max(depth, len(seq))
            fusion_depth = 0
            for b, fusion in enumerate(msb.fusion):
                other = (b + 1) % nb
                query = Tokens(prefix=1, grid=(0, 0), cell=branches[b].cell)  # branch b's class token
                index = torch.zeros(1, dtype=torch.long) if b == 0 else None  # branch 0's class token is final 0
                for j, cab in enumerate(_fusion_blocks(fusion)):
                    path = f"blocks.{k}.fusion.{b}.{j}.attn" if isinstance(fusion, nn.Sequential) \
                        else f"blocks.{k}.fusion.{b}.attn"
                    out.append(_Layer(path, cab.attn, offset + depth + j, other, query, branches[other], index))
                fusion_depth = max(fusion_depth, len(_fusion_blocks(fusion)))
            offset += depth + fusion_depth
        return out

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """None: the head averages both branches' class tokens; one block's output is one branch, so no logit lens."""
        return None

    def depth(self) -> int:
        layers = self._layers(*self.model.img_size)
        return max(layer.block for layer in layers) + 1 if layers else 0

    def heads(self) -> int | None:
        return common_heads(layer.module for layer in self._layers(*self.model.img_size))

    def refusal(self, method: str) -> str | None:
        if method in ACROSS_LAYERS:
            return (f"{method} composes attention over one set of tokens from layer to layer, and CrossViT has two "
                    "branches (two patch sizes, two token grids) that exchange information only through their class "
                    "tokens' cross attention, so there is no one token set to compose over. Use method='attention' "
                    "or method='gradcam'.")
        return None

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        layers = self._layers(height, width)
        by_attn = {id(layer.module): layer for layer in layers}
        rec = Recording()

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            layer = by_attn[id(module)]
            if weights.shape[-2:] != (layer.queries.n, layer.keys.n):
                raise ExplainError(f"{layer.name}: attention of shape {tuple(weights.shape)}, expected "
                                   f"{layer.queries.n} queries and {layer.keys.n} keys.")
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=layer.queries,
                                               keys=layer.keys, name=layer.name, block=layer.block,
                                               stage=layer.stage, q_index=layer.q_index))

        with attn_drop_recorder([(layer.name, layer.module) for layer in layers], on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def _branch0_blocks(self) -> list[nn.Module]:
        return [blk for msb in self.model.blocks for blk in (msb.blocks[0] if msb.blocks else [])]

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """Branch 0's tokens: the final ones under a mean readout, else those entering a block's attention.

        ``layer`` indexes branch 0's ViT blocks (default: the last). With the class-token readout the
        final patch tokens get no gradient, the tokens entering the last attention do.
        """
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        to_map = lambda t: grid_tokens_to_map(t, tokens)  # noqa: E731
        if layer is None and self.readout_kind() == "mean":
            return hooked_forward(self.model, self.model.norm[0], x, to_map, tokens.cell)
        blocks = self._branch0_blocks()
        index = check_block(layer, len(blocks))
        return hooked_forward(self.model, blocks[index].norm1, x, to_map, tokens.cell)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """Branch 0's final tokens on its grid (B, h, w, D), the cell, and the logits (one pass)."""
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        cam = hooked_forward(self.model, self.model.norm[0], x.detach(), lambda t: t, tokens.cell, grad=False)
        fmap = grid_tokens_to_map(cam.activations, tokens)  # (B, D, h, w)
        return fmap.permute(0, 2, 3, 1), tokens.cell, cam.logits

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed[0].proj)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int]:
        return self.model.pos_embed_0, self.branch_tokens(*self.model.img_size)[0].grid, 1
