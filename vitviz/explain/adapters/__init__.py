"""Model adapters: one small module per kind of model, found by :func:`adapter_for`.

Each adapter module defines an :class:`~vitviz.explain.adapters.base.Adapter` subclass and
decorates it with :func:`register`. Adapters are tried in registration order, most specific
first; the generic timm adapter comes last and gives Grad-CAM to any timm model.
"""

from __future__ import annotations

import importlib

from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters.base import Adapter, AttentionRecord, CamForward, Recording, Tokens

__all__ = ["Adapter", "AttentionRecord", "CamForward", "Recording", "Tokens", "adapter_for", "adapters", "register"]

_ADAPTERS: list[type[Adapter]] = []
# The modules that register adapters, in the order they are tried (specific families before generic ones).
_MODULES = (
    "vitviz.explain.adapters.ours",
    "vitviz.explain.adapters.timm_vit",
    "vitviz.explain.adapters.timm_eva",
    "vitviz.explain.adapters.timm_beit",
    "vitviz.explain.adapters.timm_cait",
    "vitviz.explain.adapters.timm_xcit",
    "vitviz.explain.adapters.timm_convit",
    "vitviz.explain.adapters.timm_swin",
    "vitviz.explain.adapters.timm_pit",
    "vitviz.explain.adapters.timm_levit",
    "vitviz.explain.adapters.timm_pvt",
    "vitviz.explain.adapters.timm_twins",
    "vitviz.explain.adapters.timm_crossvit",
    "vitviz.explain.adapters.hf_vit",
    "vitviz.explain.adapters.hf_swin",
    "vitviz.explain.adapters.clip",
    "vitviz.explain.adapters.timm_generic",
)
_loaded = False


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` one of the adapters :func:`adapter_for` tries."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:  # a family module not written (yet) must not break the others
            if err.name != name:
                raise
    _loaded = True


def adapters() -> list[type[Adapter]]:
    """Every registered adapter class, in the order they are tried."""
    _load()
    return list(_ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``; ExplainError for a model no adapter knows."""
    if isinstance(model, Adapter):
        return model
    if not isinstance(model, nn.Module):
        raise ExplainError(f"expected a torch model (nn.Module), got {type(model).__name__}.")
    for cls in adapters():
        if cls.matches(model):
            return cls(model)
    raise ExplainError(
        f"vitviz cannot explain a {type(model).__name__}: pass a vitviz model (create_model / load_checkpoint) "
        "or a timm, Hugging Face or open_clip model (vitviz.create_model('timm:<name>' | 'hf:<id or folder>' | "
        "'open_clip:<arch>'))."
    )
