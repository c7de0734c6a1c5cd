"""timm's ``Xcit`` (cross-covariance image transformers).

Two stages. ``blocks`` (``XCABlock``): cross-covariance attention (``XCA``) over the patch tokens, which
attends over *channels*: per head, softmax(normalised q^T k * temperature) is a (d, d) matrix mixing a
token's channels, the same for every token; a local patch interaction (depth-wise convolutions) is what
moves information between neighbouring tokens. Then ``forward_cls`` prepends the class token and
``cls_attn_blocks`` (``ClassAttentionBlock`` with CaiT's ``ClassAttn``) let the class token query
[class, patches]. The final tokens are [class, patches]. The stem is a stack of stride-2 3x3 convolutions
(no linear patch projection); positions come from a Fourier encoding module, projected by a learned 1x1
convolution and added to the patches before the first block.

Recording (:func:`attn_drop_recorder`, fused kernels switched off for the recorded pass): every XCA layer
gives a channel record, ``token_attention=False``, weights (B, heads, d, d) with queries and keys naming
the patch tokens the layer runs over; every class-attention layer gives a token record (B, heads, 1, 1 + N)
with ``q_index = [0]`` and the final tokens as keys. Rollout and relevance propagation need token
attention in every layer and are refused; ``attention`` uses the class-attention layers.

Block numbering: XCA blocks 0..L1-1, class-attention blocks L1..L1+L2-1; Grad-CAM's ``layer`` the same.
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
    Recording,
    Reduce,
    Tokens,
    attn_drop_recorder,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
)
from vitviz.explain.adapters.timm_common import is_timm

_CHANNEL_REFUSED = ("XCiT's cross-covariance layers attend over channels, not tokens, so attention cannot be rolled "
                    "out through them; use method='attention' (the class-attention layers) or 'gradcam'")


@register
class TimmXcit(Adapter):
    """timm ``Xcit``: channel attention (XCA) over the patches, then class attention."""

    name = "timm-xcit"
    kind = "transformer"
    family = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.xcit", "Xcit")

    def _class_blocks(self) -> list[nn.Module]:
        return list(self.model.cls_attn_blocks or [])

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        """Any size whose sides are multiples of the patch size: the stem is convolutional and the
        Fourier positions are computed for the grid at hand."""
        p = int(self.model.patch_embed.patch_size)
        if height % p or width % p or height < p or width < p:
            raise ExplainError(f"this XCiT takes images whose sides are multiples of {p} px (its stem halves the size "
                               f"until one cell is {p} px), got {height}x{width}; resize or crop the image.")
        prefix = 0 if self.model.cls_attn_blocks is None else 1  # forward_cls prepends the class token
        return Tokens(prefix=prefix, grid=(height // p, width // p), cell=(p, p))

    def readout_kind(self) -> str:
        if self.model.global_pool == "avg" or self.model.cls_attn_blocks is None:
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

    def refusal(self, method: str) -> str | None:
        if method in ("rollout", "grad-rollout", "chefer"):
            return f"{method} is not defined for XCiT: {_CHANNEL_REFUSED}."
        return None

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        final = self.final_tokens(height, width)
        patches = Tokens(prefix=0, grid=final.grid, cell=final.cell)
        cls_query = Tokens(prefix=1, grid=(0, 0), cell=final.cell)
        n_xca = len(self.model.blocks)
        modules = [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(self.model.blocks)]
        modules += [(f"cls_attn_blocks.{j}.attn", blk.attn) for j, blk in enumerate(self._class_blocks())]
        blocks = {name: i for i, (name, _) in enumerate(modules)}
        rec = Recording()

        def on_record(name: str, _module: nn.Module, weights: torch.Tensor) -> None:
            w = reduce(weights) if reduce else weights
            block = blocks[name]
            if block < n_xca:  # channels: (B, heads, d, d)
                rec.records.append(AttentionRecord(weights=w, queries=patches, keys=patches, name=name, block=block,
                                                   token_attention=False))
            else:  # the class token over [class, patches]: (B, heads, 1, 1 + N)
                rec.records.append(AttentionRecord(weights=w, queries=cls_query, keys=final, name=name, block=block,
                                                   q_index=torch.zeros(1, dtype=torch.long, device=weights.device)))

        with attn_drop_recorder(modules, on_record):
            yield rec

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """norm1's output in block ``layer`` (default: the last class-attention block): the patches in an XCA
        block, [class, patches] in a class-attention block. A mean readout with no layer reads the final norm."""
        m = self.model
        n_xca = len(m.blocks)
        index = check_block(layer, self.depth()) % self.depth()
        final = self.final_tokens(x.shape[-2], x.shape[-1])
        if layer is None and self.readout_kind() == "mean":
            module, tokens = m.norm, final
        elif index < n_xca:
            module, tokens = m.blocks[index].norm1, Tokens(prefix=0, grid=final.grid, cell=final.cell)
        else:
            module, tokens = self._class_blocks()[index - n_xca].norm1, final

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)  # (B, D, gh, gw)

        return hooked_forward(m, module, x, to_map, final.cell)

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        """The Fourier position encoding (after its learned projection) on the model's default grid, prefix 0."""
        m = self.model
        if m.pos_embed is None:
            return None
        p = int(m.patch_embed.patch_size)
        gh, gw = int(m.patch_embed.img_size[0]) // p, int(m.patch_embed.img_size[1]) // p
        with torch.no_grad():
            pos = m.pos_embed(1, gh, gw)  # (1, D, gh, gw)
        return pos.flatten(2).transpose(1, 2), (gh, gw), 0  # (1, gh*gw, D)
