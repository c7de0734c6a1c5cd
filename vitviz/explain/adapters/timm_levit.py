"""timm's LeViT (``Levit``, ``LevitDistilled``): a convolutional stem, then attention stages on a shrinking grid.

A stride-16 (or 8) convolution stem gives the first token grid; each stage is a stack of
``LevitBlock`` (``Attention`` with a learned bias per relative offset), and between stages
``AttentionDownsample`` attends from a subsampled grid of queries (every second token in each
direction, ceil(h/2) x ceil(w/2)) to the full grid of keys. There is no class token: the head reads
the mean of the last tokens (the distilled model averages two heads on that same mean). The
``use_conv`` variants keep (B, C, H, W) maps instead of (B, N, C) tokens; the attention is the same.

Recording: LeViT's attention has no ``attn_drop`` and computes its softmax inline, so for the
recorded call each attention module gets an explicit ``forward`` (an instance attribute, removed
afterwards) that performs the module's own computation step by step and records the softmax
weights, in the graph: (B, heads, Nq, Nk) with Nq = Nk = h*w in a block and Nq < Nk in a
downsampling attention (queries on the subsampled grid, keys on the previous stage's grid).
The explicit forward gathers the relative-position biases afresh (as timm does in training) rather
than from timm's eval-mode cache: the values are the same, gradients reach the biases, and a cache
made by an earlier pass with gradients (whose graph is freed after its backward) is not reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    as_map,
    readout_vector,
    stage_blocks,
)
from vitviz.explain.adapters.timm_common import common_heads, is_timm
from vitviz.explain.adapters.timm_swin import stage_refusal


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    stage: int
    queries: Tokens
    keys: Tokens


def _attention_forward(m: nn.Module, keep: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """LeViT ``Attention``'s computation, handing its softmax weights (B, heads, N, N) to ``keep``."""
    kd, vd, heads = m.key_dim, m.val_dim, m.num_heads

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = m.attention_biases[:, m.attention_bias_idxs]  # (heads, N, N)
        if m.use_conv:
            b, _, h, w = x.shape
            q, k, v = m.qkv(x).view(b, heads, -1, h * w).split([kd, kd, vd], dim=2)  # (B, heads, d, N) each
            attn = keep(((q.transpose(-2, -1) @ k) * m.scale + bias).softmax(dim=-1))  # (B, heads, N, N)
            return m.proj((v @ attn.transpose(-2, -1)).view(b, -1, h, w))  # (B, C, H, W)
        b, n, _ = x.shape
        q, k, v = m.qkv(x).view(b, n, heads, -1).split([kd, kd, vd], dim=3)  # (B, N, heads, d) each
        q = q.permute(0, 2, 1, 3)  # (B, heads, N, kd)
        k = k.permute(0, 2, 3, 1)  # (B, heads, kd, N)
        v = v.permute(0, 2, 1, 3)  # (B, heads, N, vd)
        attn = keep((q @ k * m.scale + bias).softmax(dim=-1))  # (B, heads, N, N)
        return m.proj((attn @ v).transpose(1, 2).reshape(b, n, m.val_attn_dim))  # (B, N, C)

    return forward


def _downsample_forward(m: nn.Module, keep: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """LeViT ``AttentionDownsample``'s computation, handing its weights (B, heads, Nq, Nk) to ``keep``."""
    kd, vd, heads = m.key_dim, m.val_dim, m.num_heads

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = m.attention_biases[:, m.attention_bias_idxs]  # (heads, Nq, Nk)
        if m.use_conv:
            b, _, h, w = x.shape
            hq, wq = (h - 1) // m.stride + 1, (w - 1) // m.stride + 1
            k, v = m.kv(x).view(b, heads, -1, h * w).split([kd, vd], dim=2)  # (B, heads, d, Nk) each
            q = m.q(x).view(b, heads, kd, -1)  # (B, heads, kd, Nq)
            attn = keep(((q.transpose(-2, -1) @ k) * m.scale + bias).softmax(dim=-1))  # (B, heads, Nq, Nk)
            return m.proj((v @ attn.transpose(-2, -1)).reshape(b, m.val_attn_dim, hq, wq))  # (B, C', Hq, Wq)
        b, n, _ = x.shape
        k, v = m.kv(x).view(b, n, heads, -1).split([kd, vd], dim=3)  # (B, Nk, heads, d) each
        k = k.permute(0, 2, 3, 1)  # (B, heads, kd, Nk)
        v = v.permute(0, 2, 1, 3)  # (B, heads, Nk, vd)
        q = m.q(x).view(b, -1, heads, kd).permute(0, 2, 1, 3)  # (B, heads, Nq, kd)
        attn = keep((q @ k * m.scale + bias).softmax(dim=-1))  # (B, heads, Nq, Nk)
        return m.proj((attn @ v).transpose(1, 2).reshape(b, -1, m.val_attn_dim))  # (B, Nq, C')

    return forward


@register
class TimmLevit(Adapter):
    """timm ``Levit`` / ``LevitDistilled``: attention stages joined by attention downsampling, mean readout."""

    name = "timm-levit"
    kind = "transformer"
    stagewise_rollout = True  # start_layer inside the last stage rolls out that stage
    family = "hierarchical"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.levit", "Levit")

    # --- layers -------------------------------------------------------------------------------------
    def _layers(self) -> list[_Layer]:
        """Every attention module in call order, with its query and key tokens (LeViT's sizes are fixed)."""
        from timm.models.levit import AttentionDownsample

        m = self.model
        reductions = [int(info["reduction"]) for info in m.feature_info]  # pixels per cell, per stage
        out: list[_Layer] = []
        for s, stage in enumerate(m.stages):
            cell = (reductions[s], reductions[s])
            down = getattr(stage.downsample, "attn_downsample", None)
            if isinstance(down, AttentionDownsample):
                r = tuple(int(v) for v in down.resolution)
                grid = (math.ceil(r[0] / down.stride), math.ceil(r[1] / down.stride))
                prev = (reductions[s - 1], reductions[s - 1]) if s > 0 else cell
                out.append(_Layer(f"stages.{s}.downsample.attn_downsample", down, s,
                                  Tokens(prefix=0, grid=grid, cell=cell), Tokens(prefix=0, grid=r, cell=prev)))
            for j, blk in enumerate(stage.blocks):
                tokens = Tokens(prefix=0, grid=tuple(int(v) for v in blk.attn.resolution), cell=cell)
                out.append(_Layer(f"stages.{s}.blocks.{j}.attn", blk.attn, s, tokens, tokens))
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        layers = self._layers()
        if not layers:
            raise ExplainError("this LeViT has no attention layers.")
        first = layers[0].keys
        expected = (first.grid[0] * first.cell[0], first.grid[1] * first.cell[1])
        if (height, width) != expected:
            raise ExplainError(f"this LeViT takes {expected[0]}x{expected[1]} px images (its attention biases are "
                               f"fixed to that grid), got {height}x{width}; resize the image.")
        return layers[-1].queries

    def readout_kind(self) -> str:
        return "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, "mean")  # both heads of the distilled model read the same mean

    def layers(self) -> list[Layer]:
        """Each stage's blocks (``stages.s.blocks.j``) on that stage's grid."""
        return stage_blocks(self.model.stages, "stages")

    def depth(self) -> int:
        return len(self._layers())

    def heads(self) -> int | None:
        return common_heads(layer.module for layer in self._layers())

    def refusal(self, method: str) -> str | None:
        if len(self.model.stages) < 2:
            return None
        return stage_refusal(self.model, method, "attention downsampling keeps every second query, so each stage's "
                                                 "grid is half the previous one")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        from timm.models.levit import Attention, AttentionDownsample

        self.final_tokens(height, width)  # refuses an input of the wrong size
        rec = Recording()
        patched: list[nn.Module] = []
        try:
            for i, layer in enumerate(self._layers()):
                module = layer.module
                if type(module) not in (Attention, AttentionDownsample):
                    raise ExplainError(f"{layer.name} is a {type(module).__name__}, whose attention vitviz cannot "
                                       "record; use method='gradcam'.")
                if "forward" in module.__dict__:
                    raise ExplainError(f"{layer.name} already has a forward of its own (is it being recorded "
                                       "already?); vitviz records one forward pass at a time.")

                def keep(weights: torch.Tensor, layer: _Layer = layer, index: int = i) -> torch.Tensor:
                    if weights.shape[-2:] != (layer.queries.n, layer.keys.n):
                        raise ExplainError(f"{layer.name}: attention of shape {tuple(weights.shape)}, expected "
                                           f"{layer.queries.n} queries and {layer.keys.n} keys.")
                    rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights,
                                                       queries=layer.queries, keys=layer.keys, name=layer.name,
                                                       block=index, stage=layer.stage))
                    return weights

                make = _attention_forward if type(module) is Attention else _downsample_forward
                module.forward = make(module, keep)  # an instance attribute: the class's forward is untouched
                patched.append(module)
            yield rec
        finally:
            for module in patched:
                module.__dict__.pop("forward", None)

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def features_to_map(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 3:  # (B, N, C) tokens on the last grid
            gh, gw = self._layers()[-1].queries.grid
            return feats.transpose(1, 2).reshape(feats.shape[0], -1, gh, gw)  # (B, C, gh, gw)
        return as_map(feats)
