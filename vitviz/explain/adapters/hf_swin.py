"""Hugging Face Swin Transformer (``SwinForImageClassification``, ``SwinModel``).

Like timm's Swin (:mod:`vitviz.explain.adapters.timm_swin`): shifted-window attention on a token
grid that patch merging halves between stages, no class token, and a head on the mean of the last
stage's tokens. In transformers the merging closes a stage rather than opening the next, so stage
``s`` runs on the patch grid halved ``s`` times. A block shrinks its window to the grid (and drops
its shift) when the grid is no larger than the window; the recorder reads the window and shift the
block actually used, and the grid from the block's ``input_dimensions``.

The window layout (roll by -shift, pad bottom/right, row-major windows) is the one timm uses, so the
records are densified with the same :func:`~vitviz.explain.adapters.timm_swin.window_index`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import register
from vitviz.explain.adapters.base import (
    Adapter,
    CamForward,
    Layer,
    Recording,
    Reduce,
    Tokens,
    first_tensor,
    hooked_forward,
    readout_vector,
)
from vitviz.explain.adapters.hf_common import eager_recorder, is_hf
from vitviz.explain.adapters.timm_swin import stage_refusal, window_record
from vitviz.explain.hooks import this_thread


def _pair(v: object) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@register
class HFSwin(Adapter):
    """A :class:`~vitviz.models.hf.HFImageModel` of a transformers Swin."""

    name = "hf-swin"
    kind = "transformer"
    family = "hierarchical"
    one_module_per_layer = True
    stagewise_rollout = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_hf(model) and model.model_type == "swin"

    @property
    def has_head(self) -> bool:
        return self.model.has_head

    def _stages(self) -> nn.ModuleList:
        return self.model.hf.swin.encoder.layers if hasattr(self.model.hf, "swin") else self.model.hf.encoder.layers

    def _blocks(self) -> list[tuple[str, nn.Module, int]]:
        return [(f"layers.{s}.blocks.{j}", blk, s) for s, stage in enumerate(self._stages())
                for j, blk in enumerate(stage.blocks)]

    # --- tokens and readout -------------------------------------------------------------------------
    def stage_tokens(self, height: int, width: int) -> list[Tokens]:
        """Each stage's token grid for a ``height`` x ``width`` input."""
        p = self.model.patch_size
        grid, cell, out = (math.ceil(height / p[0]), math.ceil(width / p[1])), p, []
        for s in range(len(self._stages())):
            if s:  # the previous stage's patch merging: 2x2 tokens -> 1
                grid, cell = ((grid[0] + 1) // 2, (grid[1] + 1) // 2), (cell[0] * 2, cell[1] * 2)
            out.append(Tokens(prefix=0, grid=grid, cell=cell))
        return out

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.stage_tokens(height, width)[-1]

    def readout_kind(self) -> str:
        return "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, "mean")

    # --- attention ----------------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self._blocks())

    def heads(self) -> int | None:
        heads = {int(h) for h in self.model.hf.config.num_heads}
        return heads.pop() if len(heads) == 1 else None

    def refusal(self, method: str) -> str | None:
        if len(self._stages()) < 2:
            return None
        return stage_refusal(self.model.hf, method, "patch merging halves the token grid after each stage")

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        stages = self.stage_tokens(height, width)
        rec = Recording()
        blocks = self._blocks()
        by_attn = {id(blk.attention): (name, blk, stage, i) for i, (name, blk, stage) in enumerate(blocks)}
        grids: dict[int, tuple[int, int]] = {}
        layouts: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}

        def keep_grid(blk: nn.Module, args: tuple, kwargs: dict) -> None:
            dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
            grids[id(blk.attention)] = (int(dims[0]), int(dims[1]))

        def on_record(_name: str, module: nn.Module, weights: torch.Tensor) -> None:
            name, blk, stage, index = by_attn[id(module)]
            grid = grids[id(module)]
            window, shift = _pair(blk.window_size), _pair(blk.shift_size)  # as the block used them in this call
            rec.records.append(window_record(weights, f"{name}.attention", grid, window, shift,
                                             stages[stage].cell, index, stage, layouts, reduce))

        handles = []
        try:
            for _, blk, _ in blocks:
                handles.append(blk.register_forward_pre_hook(this_thread(keep_grid), with_kwargs=True))
            with eager_recorder([(f"{n}.attention", blk.attention) for n, blk, _ in blocks], on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()

    # --- layers, for representation analyses ------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """Every block, in its stage (its output is on the stage's grid, before the stage's patch merging)."""
        return [Layer(name, blk, stage) for name, blk, stage in self._blocks()]

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        if not self.has_head or stage != len(self._stages()) - 1:
            return None
        z = self._final_norm()(first_tensor(output))  # (B, L, C)
        base = self.model.hf.swin
        pooled = base.pooler(z.transpose(1, 2)).flatten(1)  # (B, C): the mean of the last stage's tokens
        return self.model.hf.classifier(pooled)

    # --- Grad-CAM and features ----------------------------------------------------------------------
    def _last_stage_map(self, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, int]]:
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        gh, gw = tokens.grid

        def to_map(t: torch.Tensor) -> torch.Tensor:  # (B, gh*gw, C) -> (B, C, gh, gw)
            return t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)

        return to_map, tokens.cell

    def _final_norm(self) -> nn.Module:
        """The norm over the last stage's tokens, which the pooler averages."""
        base = self.model.hf.swin if hasattr(self.model.hf, "swin") else self.model.hf
        return base.layernorm

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        if layer is not None:
            raise ExplainError("a Swin's Grad-CAM reads its last stage; leave layer unset (None).")
        to_map, cell = self._last_stage_map(x)
        return hooked_forward(self.model, self._final_norm(), x, to_map, cell)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        to_map, cell = self._last_stage_map(x)
        cam = hooked_forward(self.model, self._final_norm(), x, to_map, cell, grad=False)
        return to_map(cam.activations).permute(0, 2, 3, 1), cell, cam.logits

    def patch_embedding_weight(self) -> torch.Tensor | None:
        for module in self.model.hf.modules():
            if isinstance(module, nn.Conv2d):
                return module.weight  # (D, C, p, p): the first conv is the patch projection
        return None
