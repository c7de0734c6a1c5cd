"""timm's ``Cait`` (class-attention image transformers).

Two stages. ``blocks``: self-attention (``TalkingHeadAttn``) over the patch tokens only; the class token
does not exist yet. ``blocks_token_only``: class attention (``ClassAttn``), where the class token alone
queries [class, patches] and only the class token changes. The final tokens are [class, patches].

Recording: both attentions pass their weights through ``attn_drop`` (ClassAttn on its explicit path, the
fused kernel switched off for the recorded pass), where :func:`attn_drop_recorder` takes them.

* Self-attention records are (B, heads, N, N) over the patches, placed in the final token set by
  ``q_index = k_index = 1..N``. Talking heads mix the heads twice: ``proj_l`` before the softmax and
  ``proj_w`` after it, before ``attn_drop``. The recorded matrix is the one that multiplies V, after
  ``proj_w``: its rows are not a softmax (they may hold negative entries, and each head's rows sum to
  ``proj_w.weight.sum(1) + N * proj_w.bias``, not to 1).
* Class-attention records are (B, heads, 1, 1 + N), softmax rows: ``q_index = [0]``, the keys the final set.

Block numbering: self-attention blocks 0..L1-1, then class-attention blocks L1..L1+L2-1; Grad-CAM's
``layer`` counts the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

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


@register
class TimmCait(Adapter):
    """timm ``Cait``: patch-only talking-heads self-attention, then class attention."""

    name = "timm-cait"
    kind = "transformer"
    family = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.cait", "Cait")

    def _class_blocks(self) -> list[nn.Module]:
        return list(self.model.blocks_token_only or [])

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        pe = self.model.patch_embed
        grid = patch_grid(pe, height, width)
        prefix = 0 if self.model.blocks_token_only is None else 1  # forward_cls prepends the class token
        return Tokens(prefix=prefix, grid=grid, cell=(int(pe.patch_size[0]), int(pe.patch_size[1])))

    def readout_kind(self) -> str:
        if self.model.global_pool == "avg" or self.model.blocks_token_only is None:
            return "mean"
        return "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

    # --- attention ----------------------------------------------------------------------------------
    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """None: the class-attention blocks run between these layers and the head, so no logit lens."""
        return None

    def depth(self) -> int:
        return len(self.model.blocks) + len(self._class_blocks())

    def heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        final = self.final_tokens(height, width)
        patches = Tokens(prefix=0, grid=final.grid, cell=final.cell)
        cls_query = Tokens(prefix=1, grid=(0, 0), cell=final.cell)
        n_sa = len(self.model.blocks)
        modules = [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(self.model.blocks)]
        modules += [(f"blocks_token_only.{j}.attn", blk.attn) for j, blk in enumerate(self._class_blocks())]
        blocks = {name: i for i, (name, _) in enumerate(modules)}
        rec = Recording()

        def on_record(name: str, _module: nn.Module, weights: torch.Tensor) -> None:
            w = reduce(weights) if reduce else weights
            block = blocks[name]
            if block < n_sa:  # talking-heads self-attention over the patches: (B, heads, N, N)
                index = torch.arange(final.prefix, final.n, device=weights.device)  # (N,)
                rec.records.append(AttentionRecord(weights=w, queries=patches, keys=patches, name=name,
                                                   block=block, q_index=index, k_index=index))
            else:  # class attention, the class token over [class, patches]: (B, heads, 1, 1 + N)
                rec.records.append(AttentionRecord(weights=w, queries=cls_query, keys=final, name=name, block=block,
                                                   q_index=torch.zeros(1, dtype=torch.long, device=weights.device)))

        with attn_drop_recorder(modules, on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """norm1's output in block ``layer`` (default: the last class-attention block), the tokens entering
        its attention: the patches in a self-attention block, [class, patches] in a class-attention block.
        A mean readout with no layer reads the final norm's output instead."""
        m = self.model
        n_sa = len(m.blocks)
        index = check_block(layer, self.depth()) % self.depth()
        final = self.final_tokens(x.shape[-2], x.shape[-1])
        if layer is None and self.readout_kind() == "mean":
            blk, tokens = m.norm, final
        elif index < n_sa:
            blk, tokens = m.blocks[index].norm1, Tokens(prefix=0, grid=final.grid, cell=final.cell)
        else:
            blk, tokens = self._class_blocks()[index - n_sa].norm1, final

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)  # (B, D, gh, gw)

        return hooked_forward(m, blk, x, to_map, final.cell)

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        m = self.model  # one row per patch: the class token joins after the positions are added
        return m.pos_embed, tuple(int(g) for g in m.patch_embed.grid_size), 0
