"""vitviz: train, explain and compare Vision Transformers, hybrids and ResNets.

Public API (imported lazily so that ``import vitviz`` stays light):
``create_model``, ``list_models``, ``from_timm``, ``to_timm``, ``save_checkpoint``, ``load_checkpoint``,
``open_image``, ``preprocess``, ``ood_score``, and the exceptions in ``vitviz.errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitviz.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ExplainError,
    InvalidImageError,
    TrainingError,
    VitvizError,
    WeightsUnavailableError,
)

__version__ = "0.1.0"

_LAZY = {
    "create_model": "vitviz.api",
    "list_models": "vitviz.models.registry",
    "describe_model": "vitviz.models.registry",
    "build_model": "vitviz.models.registry",
    "from_timm": "vitviz.models.timm_interop",
    "to_timm": "vitviz.models.timm_interop",
    "save_checkpoint": "vitviz.checkpoint",
    "load_checkpoint": "vitviz.checkpoint",
    "read_checkpoint_meta": "vitviz.checkpoint",
    "CheckpointMeta": "vitviz.checkpoint",
    "open_image": "vitviz.images",
    "fit_image": "vitviz.images",
    "preprocess": "vitviz.images",
    "ood_score": "vitviz.ood",
}

__all__ = [
    "CheckpointError", "ConfigError", "DatasetError", "ExplainError", "InvalidImageError", "TrainingError",
    "VitvizError", "WeightsUnavailableError", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitviz' has no attribute {name!r}")
