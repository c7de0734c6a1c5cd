"""vitviz's own ViT, hybrid and ResNet: they return attention as part of their contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    backbone_layers,
    check_block,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
)


def _is_ours(model: nn.Module) -> bool:
    return type(model).__module__.startswith("vitviz.") and getattr(model, "family", None) in ("vit", "hybrid",
                                                                                                 "resnet")


@register
class OurTransformer(Adapter):
    """Our VisionTransformer and HybridViT (``model(x, return_attention=True)``)."""

    name = "vitviz-vit"
    kind = "transformer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_ours(model) and model.family in ("vit", "hybrid")

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.model.family

    def final_tokens(self, height: int, width: int) -> Tokens:
        pe = self.model.patch_embed
        grid = tuple(int(g) for g in self.model.patch_grid(height, width))
        step = int(pe.patch_size) * int(getattr(pe, "reduction", 1))  # hybrid cells cover reduction * p px
        if grid[0] < 1 or grid[1] < 1:
            raise ExplainError(f"an input of {height}x{width} px is smaller than one token cell ({step} px).")
        return Tokens(prefix=int(self.model.num_prefix_tokens), grid=grid, cell=(step, step))

    def readout_kind(self) -> str:
        pooling = getattr(getattr(self.model, "vit_config", None), "pooling", "token")
        return "token" if pooling == "token" and self.model.num_prefix_tokens > 0 else "mean"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

    def depth(self) -> int:
        return len(self.model.blocks)

    def layers(self) -> list[Layer]:
        """The blocks (stage 0); a hybrid's CNN stages come first (stages 0..k-1), its blocks in stage k."""
        backbone = getattr(self.model.patch_embed, "backbone", None)
        cnn = backbone_layers(backbone, "patch_embed.backbone") if backbone is not None else []
        first = cnn[-1].stage + 1 if cnn else 0
        return cnn + [Layer(f"blocks.{i}", blk, first) for i, blk in enumerate(self.model.blocks)]

    def heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        raise ExplainError("our models record through record_forward (model(x, return_attention=True)).")
        yield Recording()  # pragma: no cover

    def record_forward(self, x: torch.Tensor, reduce: Reduce | None = None) -> tuple[torch.Tensor, Recording]:
        logits, attentions = self.model(x, return_attention=True)  # [(B, heads, N, N)] * depth
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        rec = Recording()
        for i, a in enumerate(attentions):
            rec.records.append(AttentionRecord(weights=reduce(a) if reduce else a, queries=tokens, keys=tokens,
                                               name=f"blocks.{i}.attn", block=i))
        return logits, rec

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        model = self.model
        if self.family == "hybrid" and layer is None:
            step = int(model.patch_embed.reduction)
            return hooked_forward(model, model.gradcam_layer, x, as_map, (step, step))
        blocks = model.blocks
        index = check_block(layer, len(blocks))
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        to_map: Callable[[torch.Tensor], torch.Tensor] = lambda t: grid_tokens_to_map(t, tokens)  # noqa: E731
        if layer is None and self.readout_kind() == "mean":
            # Mean pooling reads the last block's patch tokens: ``model.norm`` (an Identity under mean
            # pooling) sees exactly those. With class-token pooling they get no gradient, so Grad-CAM
            # reads the tokens entering the last block's attention instead (its ``norm1`` output).
            return hooked_forward(model, model.norm, x, to_map, tokens.cell)
        return hooked_forward(model, blocks[index].norm1, x, to_map, tokens.cell)

    def patch_embedding_weight(self) -> torch.Tensor | None:
        return self.model.patch_embed_weight if self.family == "vit" else None

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int]:
        return self.model.pos_embed, tuple(self.model.grid_size), int(self.model.num_prefix_tokens)


@register
class OurResNet(Adapter):
    """Our ResNet: Grad-CAM on its last stage."""

    name = "vitviz-resnet"
    kind = "cnn"
    family = "resnet"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_ours(model) and model.family == "resnet"

    def layers(self) -> list[Layer]:
        """Every residual block, in the stage it belongs to."""
        return backbone_layers(self.model, "")

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        if layer is not None:
            raise ExplainError("a ResNet's Grad-CAM reads its last stage; leave layer unset (None).")
        step = int(self.model.reduction)
        return hooked_forward(self.model, self.model.gradcam_layer, x, as_map, (step, step))
