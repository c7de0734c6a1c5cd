"""The paper's hybrid (Sec. 3.1): ViT tokens are the cells of a CNN feature map.

The backbone is our own ResNet, cut after a chosen stage and trained from scratch together with the
transformer, or a timm CNN kept as it is (how timm's R50+ViT-B/16 and R26+ViT-S/32 load).
"""

from __future__ import annotations

import torch
from torch import nn

from vitviz.config import HybridConfig, ResNetConfig
from vitviz.errors import ConfigError
from vitviz.models.resnet import ResNet
from vitviz.models.vit import VisionTransformer


class HybridEmbed(nn.Module):
    """CNN feature map -> (patch_size x patch_size cells per token) -> 1x1-style projection -> tokens."""

    def __init__(self, backbone: nn.Module, feature_dim: int, reduction: int, patch_size: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.reduction = reduction
        self.patch_size = patch_size
        self.proj = nn.Conv2d(feature_dim, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input of this size (padded convs round each stride up)."""
        r, p = self.reduction, self.patch_size
        return -(-height // r) // p, -(-width // r) // p

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map, (B, C, h, w)."""
        f = self.backbone(x)
        return f[-1] if isinstance(f, (list, tuple)) else f  # timm feature extractors return lists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.features(x))  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)


def _timm_backbone(config: HybridConfig) -> nn.Module:
    import timm

    name = config.backbone.removeprefix("timm:")
    if name not in timm.list_models():
        raise ConfigError(f"unknown timm model {name!r} as hybrid backbone; see timm.list_models().")
    kwargs = dict(config.timm_kwargs)
    if "vit_" in name:  # a timm hybrid ViT: keep its own backbone (e.g. vit_base_r50_s16_224's ResNetV2)
        kwargs.setdefault("depth", 1)  # only the backbone is kept: skip building a deep encoder
        full = timm.create_model(name, pretrained=False, num_classes=0, in_chans=config.vit.in_chans,
                                 img_size=config.vit.img_size, **kwargs)
        backbone = getattr(getattr(full, "patch_embed", None), "backbone", None)
        if backbone is None:
            raise ConfigError(f"timm model {name!r} is not a hybrid ViT (it has no CNN backbone).")
        return backbone
    return timm.create_model(name, pretrained=False, features_only=True, in_chans=config.vit.in_chans,
                             out_indices=(config.timm_out_index,), **kwargs)


class HybridViT(VisionTransformer):
    """A VisionTransformer whose patch embedding is a CNN feature map (family "hybrid")."""

    family = "hybrid"

    def __init__(self, config: HybridConfig) -> None:
        v = config.vit
        if config.backbone == "resnet":
            backbone = ResNet(
                ResNetConfig(layers=config.backbone_layers, block=config.backbone_block, stem=config.backbone_stem,
                             width=config.backbone_width, in_chans=v.in_chans, num_classes=0, img_size=v.img_size),
                features_only=True,
            )
            feature_dim, reduction = backbone.num_features, config.backbone_reduction
        else:
            backbone = _timm_backbone(config)
            feature_dim, reduction = _measure(backbone, v.in_chans, v.img_size)
        feat = -(-v.img_size // reduction)
        if feat % v.patch_size:
            raise ConfigError(
                f"the backbone's {feat}x{feat} feature map does not tile into {v.patch_size}x{v.patch_size} "
                f"tokens; choose patch_size dividing {feat} or another img_size."
            )
        embed = HybridEmbed(backbone, feature_dim, reduction, v.patch_size, v.embed_dim)
        super().__init__(v, patch_embed=embed)
        self.config = config

    @property
    def gradcam_layer(self) -> nn.Module:
        """The CNN backbone: Grad-CAM reads its last feature map (a list for timm extractors: take [-1])."""
        return self.patch_embed.backbone


@torch.no_grad()
def _measure(backbone: nn.Module, in_chans: int, img_size: int) -> tuple[int, int]:
    """Channels and stride of a backbone's feature map, from one dry run (the most reliable way)."""
    was_training = backbone.training
    backbone.eval()
    try:
        f = backbone(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        backbone.train(was_training)
    f = f[-1] if isinstance(f, (list, tuple)) else f  # (1, C, h, w)
    return int(f.shape[1]), img_size // int(f.shape[-1])
