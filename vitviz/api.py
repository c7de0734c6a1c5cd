"""``create_model``: one entry point for presets, timm, Hugging Face and open_clip models."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from vitviz.errors import ConfigError
from vitviz.models.registry import build_model, preset_config
from vitviz.models.timm_interop import create_timm_model

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
OPEN_CLIP_PREFIX = "open_clip:"


def create_model(name: str, *, pretrained: bool | str | None = None, pretrained_file: str | os.PathLike | None = None,
                 convert: bool | None = None, progress: Callable[[str], None] | None = None,
                 prompts: Sequence[str] | None = None, **overrides: Any) -> nn.Module:
    """Build a model by preset name (``vitviz.list_models()``), ``"timm:<name>"``, ``"hf:<hub id or folder>"``
    or ``"open_clip:<arch>"``.

    ``hf:`` loads a transformers image model (ViT, DeiT, BEiT, DINOv2, Swin, CLIP / SigLIP towers) with
    its weights (unless ``pretrained=False``: random weights from its config). ``open_clip:`` builds a CLIP whose
    classes are ``prompts``; ``pretrained`` is an open_clip tag ("openai") and ``pretrained_file`` a
    weights file (neither: random weights). ``prompts`` also turn an ``hf:`` CLIP / SigLIP into a
    classifier over those texts.

    Overrides (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes, in_chans,
    pooling, dropout, reg_tokens, init_values, ...) replace preset fields; for timm names they go to
    ``timm.create_model`` (for ``hf:``, to its config; for ``open_clip:``, to ``open_clip.create_model``).
    Presets are trained from scratch: they take no ``pretrained``.

    A timm name gives our own model when the architecture converts (``from_timm``) and timm's model
    itself otherwise; ``convert=True`` requires our model, ``convert=False`` always gives timm's.
    """
    if name.startswith(HF_PREFIX):
        from vitviz.models.hf import load_hf_model

        if pretrained_file is not None or convert is not None:
            raise ConfigError("hf: models load from their folder or hub id; pretrained_file and convert are for "
                              "timm names.")
        return load_hf_model(name[len(HF_PREFIX):], prompts=prompts, pretrained=pretrained is not False,
                             progress=progress, **overrides)
    if name.startswith(OPEN_CLIP_PREFIX):
        from vitviz.models.clip import load_open_clip

        if convert is not None:
            raise ConfigError("convert is for timm names; open_clip models stay open_clip models.")
        weights = pretrained_file if pretrained_file is not None else (pretrained or None)
        if weights is True:
            raise ConfigError("open_clip: pass pretrained as a tag, e.g. pretrained=\"openai\" (see "
                              "open_clip.list_pretrained_tags_by_model), or pretrained_file=PATH.")
        return load_open_clip(name[len(OPEN_CLIP_PREFIX):], pretrained=weights, prompts=prompts, progress=progress,
                              **overrides)
    if prompts is not None:
        raise ConfigError("prompts are for CLIP models: open_clip:<arch> or an hf: CLIP / SigLIP.")
    if name.startswith(TIMM_PREFIX):
        return create_timm_model(name[len(TIMM_PREFIX):], pretrained=bool(pretrained), pretrained_file=pretrained_file,
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
