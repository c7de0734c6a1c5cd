"""Frozen configuration dataclasses, one per architecture family.

A checkpoint carries ``asdict(config)`` plus the family name, so ``load_checkpoint`` rebuilds the
model with no code (as nanoGPT's checkpoints carry ``model_args``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vitviz.errors import ConfigError

POOLINGS = ("token", "mean")
FAMILIES = ("vit", "hybrid", "resnet")


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer as in Dosovitskiy et al. 2021 (pre-norm, class token, learned positions).

    Two later additions are optional and off by default: register tokens (Darcet et al. 2024, as in
    DINOv2 with registers) and layer scale (Touvron et al. 2021, as in CaiT, DeiT-III and DINOv2).
    """

    img_size: int = 224  # input side in pixels (square inputs; other sizes interpolate positions)
    patch_size: int = 16  # side of one patch; the grid is img_size // patch_size per side
    in_chans: int = 3  # input channels
    num_classes: int = 1000  # 0 gives a model with no head (features only)
    embed_dim: int = 768  # token width D
    depth: int = 12  # number of encoder blocks
    num_heads: int = 12  # attention heads; embed_dim must divide evenly
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    qkv_bias: bool = True  # bias on the fused q/k/v projection (the paper and timm use one)
    pooling: str = "token"  # "token": class token; "mean": mean of patch tokens (then fc_norm, as timm)
    dropout: float = 0.0  # dropout after embeddings, in MLPs and after the attention projection
    attn_dropout: float = 0.0  # dropout on attention weights
    drop_path: float = 0.0  # stochastic depth rate, linearly increasing with depth
    norm_eps: float = 1e-6  # LayerNorm epsilon (timm's ViTs use 1e-6)
    reg_tokens: int = 0  # register tokens after the class token; prefix tokens = 1 + reg_tokens
    init_values: float | None = None  # layer scale: per-channel gains on each residual branch, starting here

    def __post_init__(self) -> None:
        _positive(self, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or self.reg_tokens < 0:
            raise ConfigError(f"reg_tokens must be an integer >= 0, got {self.reg_tokens!r}.")
        if self.init_values is not None and not _positive_number(self.init_values):
            raise ConfigError(
                f"init_values must be a positive number (layer scale's starting gain, e.g. 1e-5) or None "
                f"for no layer scale, got {self.init_values!r}."
            )
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}.")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                f"choose an img_size that is a multiple of {self.patch_size}."
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the width."
            )
        _check_pooling(self.pooling)
        _check_rates(self, "dropout", "attn_dropout", "drop_path")


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet (He et al. 2016) with basic or bottleneck blocks."""

    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    block: str = "basic"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+)
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + max-pool; "small": 3x3/1 conv, no pool (32-px inputs)
    width: int = 64  # channels after the stem; stage i has width * 2**i (times 4 for bottlenecks)
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int = 224  # nominal input size (CNNs take any size; recorded for preprocessing)
    dropout: float = 0.0  # dropout before the classifier
    drop_path: float = 0.0  # stochastic depth on residual branches

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        _positive(self, "width", "in_chans", "img_size")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ConfigError(f"layers must be a non-empty list of positive block counts, got {self.layers}.")
        if self.block not in ("basic", "bottleneck"):
            raise ConfigError(f"block must be 'basic' or 'bottleneck', got {self.block!r}.")
        if self.stem not in ("imagenet", "small"):
            raise ConfigError(f"stem must be 'imagenet' or 'small', got {self.stem!r}.")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}.")
        _check_rates(self, "dropout", "drop_path")

    @property
    def reduction(self) -> int:
        """Total stride of the last stage relative to the input."""
        stem = 4 if self.stem == "imagenet" else 1
        return stem * 2 ** (len(self.layers) - 1)


@dataclass(frozen=True)
class HybridConfig:
    """A ViT whose tokens are cells of a CNN feature map (the paper's "hybrid", Sec. 3.1).

    ``backbone`` is either a ResNet trained here from scratch with the transformer
    (``backbone="resnet"`` with ``backbone_layers``/``backbone_block``/``backbone_stem``), or
    ``"timm:<name>"``: a timm CNN whose feature extractor is kept as it is (that is how timm's
    R50+ViT-B/16 loads).
    """

    vit: ViTConfig = field(default_factory=lambda: ViTConfig(patch_size=1))  # patch_size: cells per token side
    backbone: str = "resnet"  # "resnet" (ours, trained with the transformer) or "timm:<name>"
    backbone_layers: tuple[int, ...] = (3, 4, 6)  # blocks per kept ResNet stage; the cut is after the last
    backbone_block: str = "bottleneck"  # "basic" or "bottleneck"
    backbone_stem: str = "imagenet"  # "imagenet" (stride 4) or "small" (stride 1)
    backbone_width: int = 64  # channels after the stem
    timm_out_index: int = 3  # for a timm CNN name: which feature stage to tokenise
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments

    def __post_init__(self) -> None:
        if isinstance(self.vit, dict):
            object.__setattr__(self, "vit", ViTConfig(**self.vit))
        object.__setattr__(self, "backbone_layers", tuple(int(n) for n in self.backbone_layers))
        if self.backbone != "resnet" and not self.backbone.startswith("timm:"):
            raise ConfigError(f"backbone must be 'resnet' or 'timm:<name>', got {self.backbone!r}.")
        if self.backbone == "resnet":
            ResNetConfig(layers=self.backbone_layers, block=self.backbone_block, stem=self.backbone_stem,
                         width=self.backbone_width, in_chans=self.vit.in_chans)  # validates the backbone
            step = self.backbone_reduction * self.vit.patch_size
            if self.vit.img_size % step:
                raise ConfigError(
                    f"img_size {self.vit.img_size} does not tile into tokens: the backbone's stride is "
                    f"{self.backbone_reduction} and patch_size {self.vit.patch_size}; use a multiple of {step}."
                )

    @property
    def backbone_reduction(self) -> int:
        """Stride of our ResNet backbone's feature map (timm backbones are measured when built)."""
        stem = 4 if self.backbone_stem == "imagenet" else 1
        return stem * 2 ** (len(self.backbone_layers) - 1)

    @property
    def img_size(self) -> int:
        return self.vit.img_size

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return _jsonable(asdict(config))


def config_from_dict(family: str, data: dict[str, Any]) -> ViTConfig | ResNetConfig | HybridConfig:
    """Rebuild a config dataclass from ``config_to_dict`` output; unknown keys are an error."""
    cls = {"vit": ViTConfig, "resnet": ResNetConfig, "hybrid": HybridConfig}.get(family)
    if cls is None:
        raise ConfigError(f"unknown model family {family!r}; expected one of {FAMILIES}.")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {family} config fields {sorted(unknown)}; known: {sorted(known)}.")
    data = dict(data)
    if family == "hybrid" and isinstance(data.get("vit"), dict):
        data["vit"] = ViTConfig(**data["vit"])
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"bad {family} config: {err}") from err


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


def _check_rates(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}.")
