"""timm's ``Beit``: BEiT and BEiT-v2.

Tokens: the class token, then the patch grid row by row. Positions are an absolute ``pos_embed`` (BEiT
models mostly turn it off), a relative position bias per layer (``relative_position_bias_table`` inside
each ``Attention``), or one bias shared by all layers (``rel_pos_bias``, handed to every block).

Attention: each block's ``Attention`` adds the bias(es) to ``q k^T * scale`` and passes the softmax through
``attn_drop`` on its explicit path, so :func:`attn_drop_recorder` records one (B, heads, N, N) matrix per
block, bias included, with the fused kernel switched off for the recorded pass.

Readout: ``avg`` (the default: the grid mean, then ``fc_norm``) or ``token`` (the class token, which is
present either way).
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
class TimmBeit(Adapter):
    """timm ``Beit`` (BEiT, BEiT-v2): relative position bias inside attention, mean pooling by default."""

    name = "timm-beit"
    kind = "transformer"
    one_module_per_layer = True
    family = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.beit", "Beit")

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        pe = self.model.patch_embed
        grid = patch_grid(pe, height, width)
        return Tokens(prefix=int(self.model.num_prefix_tokens), grid=grid,
                      cell=(int(pe.patch_size[0]), int(pe.patch_size[1])))

    def readout_kind(self) -> str:
        return "mean" if self.model.global_pool == "avg" else "token"  # '' keeps every token: the class token

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

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

        with attn_drop_recorder(modules, on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """Class-token readout (or a chosen layer): norm1's output, the tokens entering attention in that
        block; mean readout with no layer: the final tokens (``norm`` is an identity when ``fc_norm`` is used)."""
        m = self.model
        index = check_block(layer, len(m.blocks))
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)  # (B, D, gh, gw)

        if layer is None and self.readout_kind() == "mean":
            return hooked_forward(m, m.norm, x, to_map, tokens.cell)
        return hooked_forward(m, m.blocks[index].norm1, x, to_map, tokens.cell)

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        m = self.model
        if getattr(m, "pos_embed", None) is None:
            return None  # relative position bias only: no absolute positions to show
        return m.pos_embed, tuple(int(g) for g in m.patch_embed.grid_size), int(m.num_prefix_tokens)
