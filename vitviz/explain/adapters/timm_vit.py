"""timm's ``VisionTransformer`` and its variants (DeiT, DeiT-III, DINOv2, CLIP, SigLIP, registers, hybrids).

What the head reads, by ``global_pool``:

* ``token``: the class token; a distilled DeiT averages its class and distillation heads in eval, so
  the readout is the mean of those two tokens;
* ``avg``: the mean of the grid tokens; ``max`` / ``avgmax``: each channel's max comes from one
  token, so the max readout weighs a token by the fraction of channels it wins, per image;
* ``map`` (SigLIP): an attention pool; its own attention over the tokens, averaged over heads and
  latents, per image.

Blocks: pre-norm ``Block`` and res-post-norm ``ResPostBlock`` record their one attention;
``ParallelThingsBlock`` runs k attention branches on the same input and adds them, which is one
multi-head attention with k times the heads: the branches are recorded separately and merged on
the heads axis (same ``block``). ``ParallelScalingBlock`` computes attention inline with no module
to record it at: refused by name.
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
    Layer,
    Recording,
    Reduce,
    Tokens,
    as_map,
    attn_drop_recorder,
    backbone_layers,
    block_index,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
)
from vitviz.explain.adapters.timm_common import is_timm, linear_patch_filters, patch_grid
from vitviz.explain.hooks import this_thread

_INLINE_BLOCKS = ("ParallelScalingBlock", "DiffParallelScalingBlock")


def max_readout(features: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N) weights of a max pool over the grid tokens of (B, N, D): the fraction of channels each token wins."""
    grid = features[:, prefix:]  # (B, P, D)
    winners = grid.argmax(dim=1)  # (B, D)
    w = torch.zeros(grid.shape[0], grid.shape[1], dtype=features.dtype, device=features.device)  # (B, P)
    w.scatter_add_(1, winners, torch.full_like(winners, 1.0 / grid.shape[-1], dtype=features.dtype))
    return torch.cat([w.new_zeros(w.shape[0], prefix), w], dim=1)  # (B, N)


def pool_attention(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An attention pool's (``AttentionPoolLatent``) weights over the tokens (B, heads, latents, N) for input x."""
    b, n, _ = x.shape
    if getattr(pool, "pos_embed", None) is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    q = pool.q_norm(q.transpose(1, 2))  # (B, heads, L, hd)
    k = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]  # (B, heads, N, hd)
    k = pool.k_norm(k)
    return ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, L, N)


def readout_hooks(model: nn.Module, how: str, rec: Recording) -> list:
    """Hooks that fill ``rec`` with what an input-dependent readout needs, for timm's ViT-style models.

    "pool": the attention pool's own weights over the tokens, averaged over heads (and latents, unless
    the pool reads its first latent only) into ``rec.readout`` (B, N); "max" / "avgmax": the tokens the
    pool reads (the final norm's output) into ``rec.features``. Remove the returned handles afterwards.
    """
    if how == "pool":
        pool = model.attn_pool

        def keep_pool(_m: nn.Module, inputs: tuple) -> None:
            with torch.no_grad():
                a = pool_attention(pool, inputs[0])  # (B, heads, L, N)
                a = a[:, :, :1] if getattr(pool, "pool", "token") == "token" else a
                rec.readout = a.mean(dim=(1, 2))  # (B, N)

        return [pool.register_forward_pre_hook(this_thread(keep_pool))]
    if how in ("max", "avgmax"):
        def keep_features(_m: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            rec.features = output.detach()  # (B, N, D): what the pool reads

        return [model.norm.register_forward_hook(this_thread(keep_features))]
    return []


@register
class TimmViT(Adapter):
    """timm ``VisionTransformer`` (and ``VisionTransformerDistilled``), plain or hybrid."""

    name = "timm-vit"
    kind = "transformer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.vision_transformer", "VisionTransformer")

    @property
    def family(self) -> str:  # type: ignore[override]
        return "hybrid" if hasattr(self.model.patch_embed, "backbone") else "vit"

    @property
    def one_module_per_layer(self) -> bool:  # type: ignore[override]
        """True unless parallel blocks record k branches per layer."""
        return not any(hasattr(blk, "attns") for blk in self.model.blocks)

    @property
    def has_head(self) -> bool:
        """False for ``num_classes=0`` and for a CLIP image tower, whose outputs are its image embedding
        (the projection into the text space, 512 numbers for ViT-B/16) rather than class scores."""
        n = int(getattr(self.model, "num_classes", 0) or 0)
        if n == 0:
            return False
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        arch, tag = str(cfg.get("architecture", "")), str(cfg.get("tag", ""))
        # the tower's own projection (not a classifier the user asked for, nor a fine-tuned one)
        return not ("clip" in arch and "ft" not in tag and n == int(cfg.get("num_classes") or -1))

    # --- tokens and readout -------------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        m, pe = self.model, self.model.patch_embed
        grid = patch_grid(pe, height, width, dynamic=bool(getattr(m, "dynamic_img_size", False)))
        if hasattr(pe, "backbone"):  # hybrid: a cell is the backbone stride times the feature patch
            cell = (math.ceil(height / grid[0]), math.ceil(width / grid[1]))
        else:
            cell = (int(pe.patch_size[0]), int(pe.patch_size[1]))
        return Tokens(prefix=int(m.num_prefix_tokens), grid=grid, cell=cell)

    def readout_kind(self) -> str:
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            return "pool"
        pool = m.global_pool
        if pool == "token" and m.num_prefix_tokens > 0:
            return "dist" if getattr(m, "dist_token", None) is not None else "token"
        if pool in ("max", "avgmax"):
            return pool
        if not pool:  # no pooling (num_classes=0, global_pool=''): the class token if any, else the mean
            return "token" if getattr(m, "cls_token", None) is not None else "mean"
        return "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        how = self.readout_kind()
        if how in ("token", "dist", "mean"):
            return readout_vector(tokens, how)
        if recording is None or (how == "pool" and recording.readout is None) or (
                how != "pool" and recording.features is None):
            raise ExplainError(f"the {how} readout depends on the image; record a forward pass first.")
        if how == "pool":
            return recording.readout
        w_max = max_readout(recording.features, tokens.prefix)  # (B, N)
        if how == "max":
            return w_max
        return 0.5 * w_max + 0.5 * readout_vector(tokens, "mean", w_max.device, w_max.dtype)  # avgmax

    # --- attention ----------------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The blocks; a hybrid's CNN backbone stages come first (stages 0..k-1), its blocks in stage k."""
        backbone = getattr(self.model.patch_embed, "backbone", None)
        cnn = backbone_layers(backbone, "patch_embed.backbone") if backbone is not None else []
        first = cnn[-1].stage + 1 if cnn else 0
        return cnn + [Layer(f"blocks.{i}", blk, first) for i, blk in enumerate(self.model.blocks)]

    def depth(self) -> int:
        return len(self.model.blocks)

    def heads(self) -> int | None:
        blk = self.model.blocks[0]
        attn = getattr(blk, "attn", None)
        if attn is not None:
            return int(attn.num_heads)
        attns = getattr(blk, "attns", None)
        return int(sum(a.attn.num_heads for a in attns)) if attns is not None else None

    def _unsupported_block(self) -> str | None:
        for blk in self.model.blocks:
            kind = type(blk).__name__
            if kind in _INLINE_BLOCKS or not (hasattr(blk, "attn") or hasattr(blk, "attns")):
                return kind
            attn = getattr(blk, "attn", None)
            if attn is not None and not isinstance(getattr(attn, "attn_drop", None), nn.Module):
                return f"{kind} with {type(attn).__name__}"
        return None

    def refusal(self, method: str) -> str | None:
        if method in ("attention", "rollout", "grad-rollout", "chefer"):
            kind = self._unsupported_block()
            if kind is not None:
                return (f"{method} needs the attention weights, and this ViT's {kind} blocks compute attention "
                        "inline where vitviz cannot record it; use method='gradcam'.")
        return None

    def _attention_modules(self) -> list[tuple[str, nn.Module]]:
        kind = self._unsupported_block()
        if kind is not None:
            raise ExplainError(self.refusal("attention"))
        out = []
        for i, blk in enumerate(self.model.blocks):
            if hasattr(blk, "attns"):  # ParallelThingsBlock: Sequential(norm, attn, ls, drop_path) per branch
                out += [(f"blocks.{i}.attns.{j}.attn", branch.attn) for j, branch in enumerate(blk.attns)]
            else:
                out.append((f"blocks.{i}.attn", blk.attn))
        return out

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        tokens = self.final_tokens(height, width)
        rec = Recording()

        def on_record(name: str, _module: nn.Module, weights: torch.Tensor) -> None:
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=tokens,
                                               keys=tokens, name=name, block=block_index(name)))

        handles = readout_hooks(self.model, self.readout_kind(), rec)
        try:
            with attn_drop_recorder(self._attention_modules(), on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        m = self.model
        if self.family == "hybrid" and layer is None:
            return hooked_forward(m, m.patch_embed.backbone, x, as_map, (-1, -1))
        index = check_block(layer, len(m.blocks))
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)

        if layer is None and self.readout_kind() not in ("token", "dist"):
            # A pooled readout reads the final tokens, which the final norm returns (as our mean-pooled ViT).
            return hooked_forward(m, m.norm, x, to_map, tokens.cell)
        blk = m.blocks[index]
        norm1 = getattr(blk, "norm1", None)
        if type(blk).__name__ == "Block" and isinstance(norm1, nn.Module):
            return hooked_forward(m, norm1, x, to_map, tokens.cell)  # the tokens entering attention
        # other block types (res-post-norm, parallel branches): the tokens entering the block
        return hooked_forward(m, blk, x, to_map, tokens.cell, pre=True)

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(self.model.patch_embed)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        m = self.model
        if getattr(m, "pos_embed", None) is None:
            return None
        prefix = 0 if getattr(m, "no_embed_class", False) else int(m.num_prefix_tokens)
        return m.pos_embed, tuple(int(g) for g in m.patch_embed.grid_size), prefix
