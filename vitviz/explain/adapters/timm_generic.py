"""Any other timm model: Grad-CAM on the last feature map that ``forward_features`` returns.

Covers every timm CNN (ConvNeXt, EfficientNet, RegNet, ResNet-D, MobileNet, ...) with no
per-family code: timm splits every model into ``forward_features`` and ``forward_head``, so the
last feature map is found without guessing a layer name. Transformers that no specific adapter
covers get Grad-CAM too (when their features lie on a grid), and a clear refusal for attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitviz.explain.adapters import register
from vitviz.explain.adapters.base import Adapter, Layer, as_map, feature_info_layers


def _looks_like_attention(model: nn.Module) -> bool:
    return any(hasattr(m, "attn_drop") or hasattr(m, "fused_attn") for m in model.modules())


@register
class TimmGeneric(Adapter):
    """The fallback for timm models: CNNs, and transformers without an adapter of their own."""

    name = "timm"
    kind = "cnn"
    family = "cnn"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and hasattr(model, "forward_features") and hasattr(
            model, "forward_head")

    def refusal(self, method: str) -> str | None:
        if method in ("attention", "rollout", "grad-rollout", "chefer"):
            if _looks_like_attention(self.model):
                return (f"vitviz has no adapter for {type(self.model).__name__}'s attention yet, so {method} is not "
                        "available; use method='gradcam' (it reads the model's last feature map).")
            what = "a raw attention map" if method == "attention" else method
            return (f"{type(self.model).__name__} is a CNN: it has no attention layers, and {what} needs attention; "
                    "use method='gradcam'.")
        return None

    def layers(self) -> list[Layer]:
        """The stages timm's ``feature_info`` names (a CNN's stage outputs), else the default (flat blocks)."""
        return feature_info_layers(self.model) or super().layers()

    def features_to_map(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:
            fmt = getattr(self.model, "output_fmt", None)
            fmt = getattr(fmt, "value", fmt)
            return feats.permute(0, 3, 1, 2) if fmt == "NHWC" else feats  # (B, C, h, w)
        if feats.ndim == 3:  # tokens (B, N, D): the trailing square block of N sits on a grid
            n = feats.shape[1]
            side = math.isqrt(n)
            for prefix in range(0, min(n, 9)):
                side = math.isqrt(n - prefix)
                if side * side == n - prefix and side > 0:
                    grid = feats[:, prefix:]  # (B, side*side, D)
                    return grid.transpose(1, 2).reshape(feats.shape[0], -1, side, side)  # (B, D, s, s)
        return as_map(feats)
