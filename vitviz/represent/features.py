"""Every layer's representation in one forward pass, through the model adapters.

:func:`layer_features` hooks the modules :meth:`Adapter.layers` names (each transformer block, each
CNN stage or residual block), runs the model once and returns each layer's output split as the
adapter says: transformers give their tokens, the readout (class token, or the patch mean) and the
patch tokens separately; CNNs give their map as grid tokens and its spatial mean as the readout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitviz.errors import ConfigError, ExplainError
from vitviz.explain.adapters import Adapter, adapter_for
from vitviz.explain.adapters.base import Layer, LayerSplit
from vitviz.explain.hooks import this_thread

__all__ = [
    "REPRESENTATIONS", "FeaturePass", "LayerFeatures", "Readouts", "collect_readouts", "layer_features", "layer_labels",
]

# How a layer's output becomes one vector per example for CKA, probes and embedding maps.
REPRESENTATIONS = {
    "flat": "every token (or map cell) flattened, as Kornblith et al. and Raghu et al. compare layers",
    "readout": "what a head would read: the class token where the model reads it, else the mean over cells",
    "mean": "the mean over grid tokens (a CNN's global average pool)",
}


@dataclass
class LayerFeatures:
    """One layer's output for a batch (see :class:`~vitviz.explain.adapters.base.LayerSplit`)."""

    label: str
    stage: int
    split: LayerSplit
    lens_logits: torch.Tensor | None = None  # (B, classes) through the final norm and head, when asked

    @property
    def readout(self) -> torch.Tensor:
        return self.split.readout  # (B, D)

    @property
    def patches(self) -> torch.Tensor:
        return self.split.patches  # (B, gh*gw, D)

    @property
    def grid(self) -> tuple[int, int]:
        return self.split.grid

    def vector(self, rep: str = "flat") -> torch.Tensor:
        """One row per example (B, d) for the representation ``rep`` (see :data:`REPRESENTATIONS`)."""
        if rep == "flat":
            return self.split.tokens.flatten(1)  # (B, N*D)
        if rep == "readout":
            return self.readout
        if rep == "mean":
            return self.patches.mean(dim=1)  # (B, D)
        raise ConfigError(f"unknown representation {rep!r}; use one of {', '.join(REPRESENTATIONS)}.")


@dataclass
class FeaturePass:
    """What one forward pass gave: the model's output (logits) and every layer's features, in order."""

    logits: torch.Tensor  # (B, classes), or the model's features when it has no head
    layers: list[LayerFeatures]

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self.layers]


def layer_labels(model: nn.Module | Adapter) -> list[str]:
    """The names of the layers :func:`layer_features` returns, in order, without running the model."""
    return [layer.label for layer in _layers(adapter_for(model))]


def layer_features(model: nn.Module | Adapter, x: torch.Tensor, *, lens: bool = False,
                   select: list[int] | None = None) -> FeaturePass:
    """Every layer's output for the batch ``x`` (B, C, H, W) in one forward pass, without gradients.

    ``lens``: also pass each layer through the final norm and head where the adapter defines it
    (a logit lens). ``select``: indices of the layers to keep (default all), to save memory.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ConfigError(f"x must be a batch of images (B, C, H, W), got {getattr(x, 'shape', type(x))}.")
    adapter = adapter_for(model)
    layers = _layers(adapter)
    keep = range(len(layers)) if select is None else select
    for i in keep:
        if not -len(layers) <= i < len(layers):
            raise ConfigError(f"layer index {i} is out of range for a model with {len(layers)} layers.")
    chosen = [layers[i] for i in keep]
    height, width = int(x.shape[-2]), int(x.shape[-1])
    found: dict[int, LayerFeatures] = {}
    handles = []

    def hook_for(k: int, layer: Layer):
        def hook(_m: nn.Module, _inputs: object, output: object) -> None:
            split = adapter.split_layer(output, layer.stage, height, width)
            logits = adapter.layer_logits(output, layer.stage) if lens else None
            found[k] = LayerFeatures(layer.label, layer.stage, _detached(split), logits)
        return hook

    try:
        for k, layer in enumerate(chosen):
            handles.append(layer.module.register_forward_hook(this_thread(hook_for(k, layer))))
        with torch.no_grad():
            out = adapter.model(x)  # (B, classes)
    finally:
        for h in handles:
            h.remove()
    missing = [layer.label for k, layer in enumerate(chosen) if k not in found]
    if missing:
        raise ExplainError(f"layers {', '.join(missing)} were not called in the forward pass; the adapter's "
                           "layers() does not match this model.")
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return FeaturePass(logits=logits, layers=[found[k] for k in range(len(chosen))])


def _layers(adapter: Adapter) -> list[Layer]:
    layers = adapter.layers()
    if not layers:
        raise ExplainError(f"{adapter.describe()} lists no layers.")
    return layers


def _detached(split: LayerSplit) -> LayerSplit:
    # copies: a later in-place op of the model (an inplace ReLU, ``x += shortcut``) must not change them
    return LayerSplit(tokens=split.tokens.detach().clone(), prefix=split.prefix, grid=split.grid,
                      readout=split.readout.detach().clone())


@dataclass
class Readouts:
    """Each layer's readout over a dataset (one pass, batched), with the lens and final predictions."""

    labels: list[str]
    stages: list[int]
    features: list[torch.Tensor]  # per layer (N, D_l), float32 on the CPU
    lens_pred: list[torch.Tensor | None]  # per layer (N,) argmax of the logit lens, None where undefined
    pred: torch.Tensor  # (N,) the model's own prediction
    lens_error: float = 0.0  # max |lens(last layer) - logits|: 0 up to rounding where the lens is the model


def collect_readouts(model: nn.Module, batches: list[torch.Tensor] | Any, *, lens: bool = True,
                     rep: str = "readout") -> Readouts:
    """Every layer's ``rep`` vector (:data:`REPRESENTATIONS`; not "flat", which is too large to keep) for
    each batch of prepared inputs, concatenated; with ``lens`` each layer's logit-lens prediction."""
    if rep == "flat":
        raise ConfigError("collect_readouts keeps every example: use rep='readout' or 'mean', not 'flat'.")
    feats: list[list[torch.Tensor]] = []
    preds: list[list[torch.Tensor | None]] = []
    final: list[torch.Tensor] = []
    labels: list[str] = []
    stages: list[int] = []
    error = 0.0
    for x in batches:
        fp = layer_features(model, x, lens=lens)
        if not feats:
            labels, stages = fp.labels, [f.stage for f in fp.layers]
            feats, preds = [[] for _ in fp.layers], [[] for _ in fp.layers]
        for k, f in enumerate(fp.layers):
            feats[k].append(f.vector(rep).float().cpu())
            preds[k].append(None if f.lens_logits is None else f.lens_logits.argmax(-1).cpu())
        final.append(fp.logits.argmax(-1).cpu())
        last = fp.layers[-1].lens_logits
        if last is not None:
            error = max(error, float((last - fp.logits).abs().max()))
    if not feats:
        raise ConfigError("no images to read out.")
    lens_pred = [torch.cat(p) if all(t is not None for t in p) else None for p in preds]  # type: ignore[arg-type]
    return Readouts(labels=labels, stages=stages, features=[torch.cat(f) for f in feats], lens_pred=lens_pred,
                    pred=torch.cat(final), lens_error=error)
