"""timm's Swin Transformer (``SwinTransformer``, v1) and Swin Transformer V2 (``SwinTransformerV2``).

Swin is hierarchical: a patch embedding, then stages of ``SwinTransformerBlock`` on a (H, W) token
grid, with patch merging (2x2 neighbouring tokens concatenated and projected) halving the grid
between stages. There is no class token; the head reads the mean of the last stage's tokens.

Each block attends within non-overlapping ws x ws windows; every other block first rolls the grid
by (-shift, -shift) (the "shifted windows") and masks the pairs that the roll brought together from
opposite image borders (a -100 logit: their weights are ~0), then rolls the result back.

Recording: a forward pre-hook on each block reads its input grid (blocks take (B, H, W, C) NHWC
tokens) and the block's ``window_size`` / ``shift_size``; the window attention's softmax weights
are taken where they pass through ``attn_drop`` (v1's fused kernel is switched off for that call).
A record's weights are windowed, (B * windows, heads, ws*ws, ws*ws); its ``densify`` puts them (or
their gradients) on the stage's whole grid, (B, heads, H*W, H*W) in row-major image order, undoing
the cyclic shift: entries outside a token's window are 0. When H or W is not a multiple of the
window, timm pads the grid with zero tokens; the weights the model gave those padding keys are not
on the grid, so rows of the windows at the bottom / right border can sum to less than 1 (in shifted
blocks timm's mask puts the padding in a region of its own, where it gets ~0).

The helpers for windowed attention (:func:`window_index`, :func:`window_densify`) and the refusal
of rollout across stages (:func:`stage_refusal`) are shared with the other hierarchical adapters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
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
    as_map,
    attn_drop_recorder,
    readout_vector,
    stage_blocks,
)
from vitviz.explain.adapters.timm_common import common_heads, is_timm, linear_patch_filters
from vitviz.explain.hooks import this_thread

ACROSS_LAYERS = ("rollout", "grad-rollout", "chefer")


# --- helpers shared by the hierarchical adapters ------------------------------------------------------

def stage_refusal(model: nn.Module, method: str, change: str) -> str | None:
    """The reason ``method`` (a product of attention across layers) is refused on a multi-stage model."""
    if method not in ACROSS_LAYERS:
        return None
    return (f"{method} composes attention from layer to layer, and {type(model).__name__}'s token grid changes "
            f"between stages ({change}), so attention of different stages does not compose; rollout, "
            "gradient rollout and Chefer relevance across stages are not defined. Use method='attention' (one "
            "layer's attention) or method='gradcam'.")


def conv_out(n: int, conv: nn.Conv2d, axis: int) -> int:
    """Output length of ``conv`` along spatial ``axis`` (0: rows, 1: cols) for an input of length ``n``."""
    k, s, d = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
    if isinstance(conv.padding, str):  # "same" (stride 1 only) / "valid"
        return n if conv.padding == "same" else (n - d * (k - 1) - 1) // s + 1
    return (n + 2 * conv.padding[axis] - d * (k - 1) - 1) // s + 1


@functools.lru_cache(maxsize=64)  # one layout per (grid, window, shift): computed once, not on every capture
def window_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(windows, wh*ww) long: the row-major grid token in each window slot, -1 for padding.

    The grid is rolled by (-shift) (``torch.roll``), padded at the bottom / right to a multiple of the
    window, and cut into row-major windows, each read row-major: the layout of Swin's and Twins'
    window partition. Slot (r, c) of the rolled, padded grid holds token ((r + sh) % H, (c + sw) % W).
    """
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    r = torch.arange(hp)[:, None].expand(hp, wp)  # (Hp, Wp)
    c = torch.arange(wp)[None, :].expand(hp, wp)  # (Hp, Wp)
    token = ((r + sh) % h) * w + (c + sw) % w  # (Hp, Wp)
    token = torch.where((r < h) & (c < w), token, torch.full_like(token, -1))
    token = token.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3)  # (nH, nW, wh, ww)
    return token.reshape(-1, wh * ww)  # (windows, wh*ww)


def window_densify(index: torch.Tensor, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping windowed (B * windows, heads, Nw, Nw) onto the dense (B, heads, n, n) grid.

    ``index`` is :func:`window_index`'s layout. Pairs of tokens in different windows are 0; pairs
    with a padding token are dropped. Linear in its input, so it maps gradients the same way.
    """
    windows, size = index.shape
    places: list[torch.Tensor] = []  # (source, target), computed on first use: most captures never densify

    def layout() -> tuple[torch.Tensor, torch.Tensor]:
        if not places:
            valid = index >= 0  # (windows, Nw)
            pairs = (valid[:, :, None] & valid[:, None, :]).reshape(-1)  # (windows*Nw*Nw,)
            places.append(pairs.nonzero().squeeze(1))  # (P,) positions in the flattened windows
            places.append((index[:, :, None] * n + index[:, None, :]).reshape(-1)[pairs])  # (P,) in the n*n grid
        return places[0], places[1]

    def densify(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 4 or t.shape[0] % windows or t.shape[-2:] != (size, size):
            raise ExplainError(f"expected windowed attention (B * {windows}, heads, {size}, {size}), got "
                               f"{tuple(t.shape)}.")
        b, heads = t.shape[0] // windows, t.shape[1]
        source, target = layout()
        flat = t.reshape(b, windows, heads, size * size).transpose(1, 2).reshape(b, heads, -1)  # (B, h, win*Nw*Nw)
        values = flat.index_select(2, source.to(t.device))  # (B, h, P)
        dense = t.new_zeros(b, heads, n * n).index_copy(2, target.to(t.device), values)  # (B, h, n*n)
        return dense.view(b, heads, n, n)

    return densify


def window_record(weights: torch.Tensor, name: str, grid: tuple[int, int], window: tuple[int, int],
                  shift: tuple[int, int], cell: tuple[int, int], block: int, stage: int,
                  layouts: dict[tuple, Callable[[torch.Tensor], torch.Tensor]],
                  reduce: Reduce | None) -> AttentionRecord:
    """One shifted-window attention call (B * windows, heads, Nw, Nw) as a record on its stage's whole grid.

    ``layouts`` caches one densify per (grid, window, shift) for the recording it belongs to.
    """
    if weights.shape[-1] != window[0] * window[1]:
        raise ExplainError(f"{name}: attention over {weights.shape[-1]} tokens, expected windows of "
                           f"{window[0]}x{window[1]}.")
    key = (grid, window, shift)
    if key not in layouts:
        layouts[key] = window_densify(window_index(grid, window, shift), grid[0] * grid[1])
    tokens = Tokens(prefix=0, grid=grid, cell=cell)
    return AttentionRecord(weights=reduce(weights) if reduce else weights, queries=tokens, keys=tokens, name=name,
                           block=block, stage=stage, densify=layouts[key])


# --- Swin ---------------------------------------------------------------------------------------------

@register
class TimmSwin(Adapter):
    """timm ``SwinTransformer`` and ``SwinTransformerV2``: shifted-window attention on a shrinking grid."""

    name = "timm-swin"
    kind = "transformer"
    one_module_per_layer = True
    stagewise_rollout = True  # start_layer inside the last stage rolls out that stage
    family = "hierarchical"
    layers_channels_last = True  # the blocks return (B, h, w, C)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_timm(model, "timm.models.swin_transformer", "SwinTransformer") or is_timm(
            model, "timm.models.swin_transformer_v2", "SwinTransformerV2")

    # --- tokens and readout -------------------------------------------------------------------------
    def stage_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each stage's token grid for a ``height`` x ``width`` input."""
        pe = self.model.patch_embed
        img = getattr(pe, "img_size", None)
        if getattr(pe, "strict_img_size", False) and img is not None and (height, width) != tuple(img):
            raise ExplainError(
                f"this Swin takes {img[0]}x{img[1]} px images, got {height}x{width}; resize the image, or create the "
                f"model with img_size={height} (or strict_img_size=False).")
        p = tuple(int(v) for v in pe.patch_size)
        if hasattr(pe, "dynamic_feat_size"):
            grid = tuple(int(g) for g in pe.dynamic_feat_size((height, width)))
        else:
            grid = (height // p[0], width // p[1])
        cell, out = p, []
        for layer in self.model.layers:
            if not isinstance(layer.downsample, nn.Identity):  # patch merging: 2x2 tokens -> 1
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
                cell = (cell[0] * 2, cell[1] * 2)
            out.append(Tokens(prefix=0, grid=grid, cell=cell))
        if min(out[-1].grid) < 1:
            raise ExplainError(f"an input of {height}x{width} px is smaller than one token of the last stage.")
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.stage_tokens(height, width)[-1]

    def readout_kind(self) -> str:
        pool = getattr(self.model, "global_pool", "avg")
        return "mean" if pool in ("avg", "") else str(pool)

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        how = self.readout_kind()
        if how != "mean":
            raise ExplainError(f"vitviz reads a Swin's head as the mean of its last tokens; global_pool={how!r} is "
                               "not supported. Create the model with global_pool='avg'.")
        return readout_vector(tokens, "mean")

    # --- attention ----------------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[str, nn.Module, int]]:
        """(module path, block, stage) of every block in call order."""
        return [(f"layers.{s}.blocks.{j}", blk, s) for s, layer in enumerate(self.model.layers)
                for j, blk in enumerate(layer.blocks)]

    def layers(self) -> list[Layer]:
        """Each stage's blocks (``layers.s.blocks.j``) in stage s; their outputs are (B, h, w, C) maps."""
        return stage_blocks(self.model.layers, "layers")

    def depth(self) -> int:
        return len(self._blocks())

    def heads(self) -> int | None:
        return common_heads(blk.attn for _, blk, _ in self._blocks())

    def refusal(self, method: str) -> str | None:
        if len(self.model.layers) < 2:
            return None
        return stage_refusal(self.model, method, "patch merging halves the token grid after each stage")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        stages = self.stage_tokens(height, width)
        rec = Recording()
        blocks = self._blocks()
        by_attn = {id(blk.attn): (name, blk, stage, i) for i, (name, blk, stage) in enumerate(blocks)}
        grids: dict[int, tuple[int, int]] = {}  # id(block.attn) -> the (H, W) of the block's current input
        layouts: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}

        def keep_grid(blk: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if x.ndim != 4:
                raise ExplainError(f"expected a Swin block to take (B, H, W, C) tokens, got {tuple(x.shape)}.")
            grids[id(blk.attn)] = (int(x.shape[1]), int(x.shape[2]))

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            name, blk, stage, index = by_attn[id(module)]
            grid = grids[id(module)]
            window = tuple(int(v) for v in blk.window_size)
            shift = tuple(int(v) for v in blk.shift_size)
            rec.records.append(window_record(weights, f"{name}.attn", grid, window, shift, stages[stage].cell,
                                             index, stage, layouts, reduce))

        handles = []
        try:
            for _, blk, _ in blocks:
                handles.append(blk.register_forward_pre_hook(this_thread(keep_grid)))
            with attn_drop_recorder([(f"{n}.attn", blk.attn) for n, blk, _ in blocks], on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def features_to_map(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:
            return feats.permute(0, 3, 1, 2)  # (B, H, W, C) NHWC -> (B, C, H, W)
        return as_map(feats)

    def patch_embedding_weight(self) -> torch.Tensor | None:
        return linear_patch_filters(getattr(self.model.patch_embed, "proj", None))
