"""Named presets and the one way to build a model from a family and a config."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from vitviz.config import HybridConfig, ResNetConfig, ViTConfig, config_from_dict
from vitviz.errors import ConfigError
from vitviz.models.hybrid import HybridViT
from vitviz.models.resnet import ResNet
from vitviz.models.vit import VisionTransformer

ModelConfig = ViTConfig | ResNetConfig | HybridConfig


def _vit(**kw: Any) -> ViTConfig:
    return ViTConfig(**kw)


def _small_vit(patch: int, depth: int) -> ViTConfig:
    # The reference student project's CIFAR-10 study: 32-px inputs, patch 4 or 8, depth 8 or 12.
    return ViTConfig(img_size=32, patch_size=patch, depth=depth, embed_dim=192, num_heads=3, num_classes=10)


PRESETS: dict[str, tuple[str, ModelConfig, str]] = {
    # name: (family, config, one-line description)
    "vit_tiny_patch16_224": ("vit", _vit(embed_dim=192, depth=12, num_heads=3), "ViT-Ti/16 at 224 px"),
    "vit_small_patch16_224": ("vit", _vit(embed_dim=384, depth=12, num_heads=6), "ViT-S/16 at 224 px"),
    "vit_base_patch16_224": ("vit", _vit(embed_dim=768, depth=12, num_heads=12), "ViT-B/16 at 224 px"),
    "vit_p4_d8_32": ("vit", _small_vit(4, 8), "small-image ViT: patch 4, 8 blocks, 32 px"),
    "vit_p4_d12_32": ("vit", _small_vit(4, 12), "small-image ViT: patch 4, 12 blocks, 32 px"),
    "vit_p8_d8_32": ("vit", _small_vit(8, 8), "small-image ViT: patch 8, 8 blocks, 32 px"),
    "vit_p8_d12_32": ("vit", _small_vit(8, 12), "small-image ViT: patch 8, 12 blocks, 32 px"),
    "hybrid_r50_vit_base_224": (
        "hybrid",
        HybridConfig(vit=ViTConfig(patch_size=1), backbone_layers=(3, 4, 6), backbone_block="bottleneck"),
        "R50 (3 stages, stride 16) + ViT-B at 224 px, ResNet trained from scratch with it",
    ),
    "hybrid_r18_vit_small_224": (
        "hybrid",
        HybridConfig(vit=ViTConfig(patch_size=1, embed_dim=384, num_heads=6), backbone_layers=(2, 2, 2),
                     backbone_block="basic"),
        "R18 (3 stages, stride 16) + ViT-S at 224 px",
    ),
    "hybrid_r18_vit_32": (
        "hybrid",
        HybridConfig(vit=ViTConfig(img_size=32, patch_size=1, embed_dim=192, num_heads=3, depth=6, num_classes=10),
                     backbone_layers=(2, 2, 2), backbone_block="basic", backbone_stem="small"),
        "small-image hybrid: 3-stage ResNet-18 stem (stride 4 -> 8x8 tokens) + 6-block ViT, 32 px",
    ),
    "resnet18": ("resnet", ResNetConfig(layers=(2, 2, 2, 2), block="basic"), "ResNet-18, ImageNet stem"),
    "resnet34": ("resnet", ResNetConfig(layers=(3, 4, 6, 3), block="basic"), "ResNet-34, ImageNet stem"),
    "resnet50": ("resnet", ResNetConfig(layers=(3, 4, 6, 3), block="bottleneck"), "ResNet-50, ImageNet stem"),
    "resnet18_32": ("resnet", ResNetConfig(layers=(2, 2, 2, 2), stem="small", img_size=32, num_classes=10),
                    "ResNet-18 with the small-image stem (3x3/1, no pool), 32 px"),
    "resnet34_32": ("resnet", ResNetConfig(layers=(3, 4, 6, 3), stem="small", img_size=32, num_classes=10),
                    "ResNet-34 with the small-image stem, 32 px"),
}

_VIT_FIELDS = {f.name for f in dataclasses.fields(ViTConfig)}


def list_models(family: str | None = None) -> list[str]:
    """Names of the presets (optionally of one family); ``timm:<name>`` takes any timm model too."""
    return sorted(n for n, (fam, _, _) in PRESETS.items() if family in (None, fam))


def describe_model(name: str) -> str:
    """One-line description of a preset."""
    return _preset(name)[2]


def preset_config(name: str, **overrides: Any) -> tuple[str, ModelConfig]:
    """(family, config) of a preset with ``overrides`` applied; unknown settings are a ConfigError."""
    family, config, _ = _preset(name)
    return family, apply_overrides(family, config, overrides)


def apply_overrides(family: str, config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Return ``config`` with fields replaced; for hybrids, ViT fields go to the inner ViT config."""
    if not overrides:
        return config
    if family == "hybrid":
        vit_kw = {k: v for k, v in overrides.items() if k in _VIT_FIELDS}
        top_kw = {k: v for k, v in overrides.items() if k not in _VIT_FIELDS}
        _check_fields(family, HybridConfig, top_kw)
        vit = dataclasses.replace(config.vit, **vit_kw) if vit_kw else config.vit
        return dataclasses.replace(config, vit=vit, **top_kw)
    _check_fields(family, type(config), overrides)
    return dataclasses.replace(config, **overrides)


def build_model(family: str, config: ModelConfig | dict[str, Any]) -> nn.Module:
    """Build a fresh model of ``family`` ("vit" | "hybrid" | "resnet") from a config or its dict."""
    if isinstance(config, dict):
        config = config_from_dict(family, config)
    if family == "vit" and isinstance(config, ViTConfig):
        return VisionTransformer(config)
    if family == "resnet" and isinstance(config, ResNetConfig):
        return ResNet(config)
    if family == "hybrid" and isinstance(config, HybridConfig):
        return HybridViT(config)
    raise ConfigError(f"config of type {type(config).__name__} does not build a {family!r} model.")


def _preset(name: str) -> tuple[str, ModelConfig, str]:
    if name not in PRESETS:
        close = [n for n in PRESETS if name.split("_")[0] in n][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}.{hint} Known presets: {', '.join(list_models())}; "
            "or 'timm:<name>' for any timm model."
        )
    return PRESETS[name]


def _check_fields(family: str, cls: type, overrides: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | (_VIT_FIELDS if family == "hybrid" else set())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"{family} models have no setting {', '.join(unknown)}; settings they take: {', '.join(sorted(known))}."
        )
