"""What the Hugging Face adapters share: finding a model's attention layers and recording them eagerly.

transformers picks an attention implementation per config (``_attn_implementation``: "sdpa",
"flash_attention_2", "eager", ...) and looks it up in its ``AttentionInterface``; only an explicit
path computes the softmax weights, and the attention modules return them as their second output,
still in the autograd graph. For the calls inside :func:`eager_recorder` every config the attention
modules read is switched to :data:`RECORDING`, transformers' eager attention as vitviz registers it
(:func:`recording_attention`; the plain "eager" where this transformers has no interface to register
in). When only some layers are recorded, only their modules read a switched copy of the config. A
forward hook hands each module's weights over; on exit (also after an exception) every config gets its
own implementation back, so a model loaded with SDPA keeps SDPA for every other call.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters.base import _RECORD_ONLY
from vitviz.explain.hooks import Installed, exclusive

__all__ = ["RECORDING", "attention_layers", "eager_recorder", "first_layernorm", "is_hf", "recording_attention"]

RECORDING = "vitviz_recording"  # the name :func:`recording_attention` has in transformers' AttentionInterface


def recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **_kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (same inputs, outputs and softmax precision), with the scale applied to q.

    Scaling q (B, heads, N, d) instead of the scores (B, heads, N, N), and (without gradients) the softmax
    written over the scores, leave one N x N tensor per layer where the eager path makes three; with every
    layer's weights kept, that is what recording costs over a plain forward pass
    (``benchmarks/bench_capture.py``, ``hf-vit`` beside ``hf-eager``).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(2, 3))  # (B, heads, N, N)
    if attention_mask is not None:
        scores = scores + attention_mask
    if query.dtype != torch.float32:  # half precision: the softmax in float32, as transformers' eager path does
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    elif scores.requires_grad:
        weights = scores.softmax(dim=-1)
    else:  # no gradients: the weights take the scores' memory (one N x N tensor per layer, not two)
        weights = torch.softmax(scores, dim=-1, out=scores)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, N, heads, d)
    return out, weights


@functools.cache
def _implementation() -> str:
    """:data:`RECORDING`, registered in transformers' AttentionInterface once; "eager" without one."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return "eager"
    AttentionInterface.register(RECORDING, recording_attention)
    return RECORDING


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is vitviz's wrapper of a transformers image model."""
    from vitviz.models.hf import HFImageModel  # transformers itself is imported only when such a model exists

    return isinstance(model, HFImageModel)


def attention_layers(root: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, layer, attention module) of every self-attention layer under ``root``, in call order.

    An attention module is one with q/k/v projections and a config to switch (every transformers
    self-attention); its layer is its parent module. torch's ``nn.MultiheadAttention`` (SigLIP's
    pooling head) has neither and is not a layer.
    """
    modules = dict(root.named_modules())
    out = []
    for name, module in modules.items():
        if hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "config") and "." in name:
            parent = name.rsplit(".", 1)[0]
            out.append((parent, modules[parent], module))
    if not out:
        raise ExplainError(f"found no attention layers in {type(root).__name__}.")
    return out


def first_layernorm(layer: nn.Module) -> nn.Module:
    """The layer's first LayerNorm child: the norm in front of attention in a pre-norm block."""
    for child in layer.children():
        if isinstance(child, nn.LayerNorm):
            return child
    raise ExplainError(f"{type(layer).__name__} has no LayerNorm in front of its attention.")


@contextmanager
def eager_recorder(modules: Sequence[tuple[str, nn.Module]],
                   on_record: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Record the softmax weights of transformers attention modules (each returns ``(output, weights)``).

    ``record_only`` (see :mod:`vitviz.explain.adapters.base`) limits the hooks, and the eager path, to
    those positions: the other layers keep the model's own (fused) implementation.
    """
    only = _RECORD_ONLY.get()
    hooked = [m for i, m in enumerate(modules) if only is None or i in only]
    installed = Installed()
    with exclusive():  # the config switches of two calls at once would undo each other
        try:
            if only is None:  # every layer: switch the configs they share
                for config in {id(m.config): m.config for _, m in modules}.values():
                    # the private field behind the ``_attn_implementation`` property: its setter would also
                    # rewrite sub-configs, which the attention modules of a vision tower do not read
                    installed.set(config, "_attn_implementation_internal", _implementation())
            else:  # some layers: each recorded module reads an eager copy of its config, the others the original
                for _, module in hooked:
                    eager = copy.copy(module.config)  # shallow: the copy shares every other field
                    eager._attn_implementation_internal = _implementation()
                    installed.set(module, "config", eager)
            for name, module in hooked:
                def hook(_m: nn.Module, _inputs: object, output: object, name: str = name,
                         module: nn.Module = module) -> None:
                    weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                    if not isinstance(weights, torch.Tensor):
                        raise ExplainError(f"{name} ({type(module).__name__}) returned no attention weights on "
                                           "its eager path; this transformers version is not supported for "
                                           "attention methods.")
                    on_record(name, module, weights)

                installed.forward(module, hook)
            yield
        finally:
            installed.undo()
