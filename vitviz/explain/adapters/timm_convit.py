"""timm's ``ConVit`` (gated positional self-attention).

Two stages. Blocks before ``local_up_to_layer`` use ``GPSA`` over the patch tokens only: each head mixes
content attention softmax(q k^T * scale) with positional attention softmax(pos_proj(relative offsets)),
gated per head by sigmoid(``gating_param``), and renormalises the rows. Then the class token is prepended
and the remaining blocks use plain ``MHSA`` over [class, patches], the final tokens.

Recording: GPSA and MHSA both pass their final weights through ``attn_drop`` (neither has a fused path),
where :func:`attn_drop_recorder` takes them: for GPSA the gated, renormalised mixture, the matrix that
multiplies V. GPSA records are (B, heads, N, N) over the patches, placed in the final token set by
``q_index = k_index = 1..N``; MHSA records are (B, heads, 1 + N, 1 + N) over the final tokens.

Note that GPSA rebuilds its ``rel_indices`` buffer on the first forward at a new token count: timm's own
forward does that, recorded or not.
"""

from __future__ import annotations

import math
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
    as_map,
    attn_drop_recorder,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
)
from vitviz.explain.adapters.timm_common import is_timm, linear_patch_filters, patch_grid


@register
class TimmConvit(Adapter):
    """timm ``ConVit``: GPSA over the patches, then MHSA over [class, patches]."""

    name = "timm-convit"
    kind = "transformer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.convit", "ConVit")

    @property
    def family(self) -> str:  # type: ignore[override]
        return "hybrid" if hasattr(self.model.patch_embed, "backbone") else "vit"

    def _num_local(self) -> int:
        return min(int(self.model.local_up_to_layer), len(self.model.blocks))

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        m, pe = self.model, self.model.patch_embed
        grid = patch_grid(pe, height, width)
        if hasattr(pe, "backbone"):  # hybrid: a cell is the backbone stride times the feature patch
            cell = (math.ceil(height / grid[0]), math.ceil(width / grid[1]))
        else:
            cell = (int(pe.patch_size[0]), int(pe.patch_size[1]))
        # the class token joins before block local_up_to_layer, so never when every block is GPSA
        joins = m.cls_token is not None and m.local_up_to_layer < len(m.blocks)
        return Tokens(prefix=1 if joins else 0, grid=grid, cell=cell)

    def readout_kind(self) -> str:
        return "mean" if self.model.global_pool == "avg" else "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        """What ``forward_head`` reads: token 0, or the mean past ``num_prefix_tokens`` (1 even when the class
        token never joined, in which case timm reads the first patch, or skips it in the mean)."""
        v = torch.zeros(tokens.n)
        if self.readout_kind() == "token":
            v[0] = 1.0
        else:
            skip = int(self.model.num_prefix_tokens)
            v[skip:] = 1.0 / (tokens.n - skip)
        return v

    # --- attention ----------------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self.model.blocks)

    def heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        final = self.final_tokens(height, width)
        patches = Tokens(prefix=0, grid=final.grid, cell=final.cell)
        n_local = self._num_local()
        modules = [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(self.model.blocks)]
        blocks = {name: i for i, (name, _) in enumerate(modules)}
        rec = Recording()

        def on_record(name: str, _module: nn.Module, weights: torch.Tensor) -> None:
            w = reduce(weights) if reduce else weights
            block = blocks[name]
            if block < n_local and final.prefix:  # GPSA over the patches: (B, heads, N, N)
                index = torch.arange(final.prefix, final.n, device=weights.device)  # (N,)
                rec.records.append(AttentionRecord(weights=w, queries=patches, keys=patches, name=name, block=block,
                                                   q_index=index, k_index=index))
            else:  # the final tokens: (B, heads, 1 + N, 1 + N), or GPSA when no class token ever joins
                rec.records.append(AttentionRecord(weights=w, queries=final, keys=final, name=name, block=block))

        with attn_drop_recorder(modules, on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """norm1's output in block ``layer`` (default: the last), the tokens entering its attention (patches
        only in a GPSA block). A mean readout with no layer reads the final norm; a hybrid with no layer,
        its CNN backbone's feature map."""
        m = self.model
        if self.family == "hybrid" and layer is None:
            return hooked_forward(m, m.patch_embed.backbone, x, as_map, (-1, -1))
        index = check_block(layer, len(m.blocks)) % len(m.blocks)
        final = self.final_tokens(x.shape[-2], x.shape[-1])
        if layer is None and self.readout_kind() == "mean":
            module, tokens = m.norm, final
        elif index < self._num_local():
            module, tokens = m.blocks[index].norm1, Tokens(prefix=0, grid=final.grid, cell=final.cell)
        else:
            module, tokens = m.blocks[index].norm1, final

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)  # (B, D, gh, gw)

        return hooked_forward(m, module, x, to_map, final.cell)

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        m = self.model  # one row per patch: the class token joins later
        if not m.use_pos_embed:
            return None
        return m.pos_embed, tuple(int(g) for g in m.patch_embed.grid_size), 0
