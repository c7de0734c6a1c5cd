"""Models written here: ViT, ResNet and the hybrid, plus presets and timm interoperability."""

from vitviz.models.hybrid import HybridViT
from vitviz.models.registry import PRESETS, build_model, describe_model, list_models, preset_config
from vitviz.models.resnet import ResNet
from vitviz.models.timm_interop import create_timm_model, from_timm, timm_config, to_timm, to_timm_state_dict
from vitviz.models.vit import VisionTransformer

__all__ = [
    "PRESETS", "HybridViT", "ResNet", "VisionTransformer", "build_model", "create_timm_model", "describe_model",
    "from_timm", "list_models", "preset_config", "timm_config", "to_timm", "to_timm_state_dict",
]
