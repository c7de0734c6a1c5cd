"""``create_model``: one entry point for presets and timm models."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from vitviz.errors import ConfigError
from vitviz.models.registry import build_model, preset_config
from vitviz.models.timm_interop import create_timm_model

TIMM_PREFIX = "timm:"


def create_model(name: str, *, pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                 convert: bool | None = None, progress: Callable[[str], None] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a model by preset name (``vitviz.list_models()``) or ``"timm:<name>"``.

    Overrides (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes, in_chans,
    pooling, dropout, reg_tokens, init_values, ...) replace preset fields; for timm names they go to
    ``timm.create_model``. ``pretrained``/``pretrained_file``/``progress`` apply to timm names only:
    presets are trained from scratch.

    A timm name gives our own model when the architecture converts (``from_timm``) and timm's model
    itself otherwise; ``convert=True`` requires our model, ``convert=False`` always gives timm's.
    """
    if name.startswith(TIMM_PREFIX):
        return create_timm_model(name[len(TIMM_PREFIX):], pretrained=pretrained, pretrained_file=pretrained_file,
                                 convert=convert, progress=progress, **overrides)
    if convert is False:
        raise ConfigError(f"{name!r} is a vitviz preset, always a vitviz model; convert=False is for 'timm:<name>'.")
    if pretrained or pretrained_file is not None:
        raise ConfigError(
            f"{name!r} is a vitviz preset, trained from scratch: it has no pretrained weights. Use "
            f"'timm:<name>' for timm's pretrained models, or vitviz.load_checkpoint for a trained checkpoint."
        )
    family, config = preset_config(name, **overrides)
    return build_model(family, config)
