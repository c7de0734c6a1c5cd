"""The model-adapter interface: what explanation code may ask of a model, answered once per kind of model.

An :class:`Adapter` wraps one model and says

* how to record its attention in the same single forward pass (:meth:`Adapter.recording`), leaving
  the model exactly as it was afterwards;
* which tokens each recorded attention's queries and keys are (:class:`Tokens`: prefix tokens, then
  a row-major grid of cells on the image; the grid may change from stage to stage);
* what the head reads (:meth:`Adapter.readout`, a weight vector over the final tokens: the class
  token; class and distillation token averaged; the patch mean; an attention pool's own attention);
* where Grad-CAM reads its feature map (:meth:`Adapter.cam_forward`);
* which methods are not defined for it, and why (:meth:`Adapter.refusal`);
* which modules' outputs are its layers' representations (:meth:`Adapter.layers`), and how one
  such output splits into a readout vector and grid tokens (:meth:`Adapter.split_layer`), for
  layer-by-layer comparisons (:mod:`vitviz.represent`).

Downstream code (rollout, relevance, Grad-CAM, Fig. 7 analyses, dashboard, CLI) asks the adapter
and never the model's class. A new family is one small module that subclasses :class:`Adapter`
and registers itself with :func:`vitviz.explain.adapters.register`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.hooks import Installed, exclusive, this_thread

__all__ = [
    "Adapter", "AttentionRecord", "CamForward", "Layer", "LayerSplit", "Recording", "Reduce", "Tokens", "as_map",
    "attn_drop_recorder", "backbone_layers", "block_index", "check_block", "feature_info_layers", "first_tensor",
    "grid_tokens_to_map", "hooked_forward", "readout_vector", "record_only", "stage_blocks",
]


Reduce = Callable[[torch.Tensor], torch.Tensor]  # (B, heads, Nq, Nk) -> (B, heads', Nq, Nk)


@dataclass(frozen=True)
class Tokens:
    """A set of tokens: ``prefix`` tokens (class, distillation, registers) then a row-major grid."""

    prefix: int
    grid: tuple[int, int]  # (rows, cols) of grid tokens
    cell: tuple[int, int]  # pixels one grid cell covers (rows, cols)

    @property
    def num_grid(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n(self) -> int:
        return self.prefix + self.num_grid


@dataclass
class AttentionRecord:
    """One attention call's softmax weights and what its rows and columns are.

    ``weights`` are as the model used them (in the autograd graph while recording with gradients):
    (B, heads, Nq, Nk), or for windowed attention (B * windows, heads, Nw, Nw) with ``densify``
    mapping them (and their gradients) onto the full token sets. ``q_index`` / ``k_index`` place the
    queries / keys in the model's *final* token set when they are a subset of it (CaiT's patch-only
    layers, ConViT's layers before the class token joins); None when the sets are the final set
    itself, or when they lie on another grid (an earlier stage).
    """

    weights: torch.Tensor
    queries: Tokens
    keys: Tokens
    name: str  # module path, e.g. "blocks.3.attn"
    block: int  # layer index; parallel branches of one block share it
    stage: int = 0
    densify: Callable[[torch.Tensor], torch.Tensor] | None = None
    q_index: torch.Tensor | None = None  # (Nq,) long
    k_index: torch.Tensor | None = None  # (Nk,) long
    token_attention: bool = True  # False for attention over channels (XCiT's cross-covariance layers)

    def dense(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the weights) as (B, heads, Nq, Nk) over the full query and key sets."""
        t = self.weights if t is None else t
        return self.densify(t) if self.densify is not None else t


@dataclass
class Recording:
    """What one recorded forward pass filled in."""

    records: list[AttentionRecord] = field(default_factory=list)
    readout: torch.Tensor | None = None  # (B, N_final) set by adapters whose readout depends on the input
    features: torch.Tensor | None = None  # last tokens the head pools, when the adapter keeps them


class Layer(NamedTuple):
    """One layer of a model for representation analyses: the module whose output is its representation."""

    label: str  # module path, e.g. "blocks.3" or "layer2.1"
    module: nn.Module
    stage: int  # layers of one stage share a token grid (or feature-map size); stages count from 0


@dataclass
class LayerSplit:
    """One layer's output for a batch, as tokens: ``prefix`` tokens then a row-major ``grid``.

    A CNN's (B, C, h, w) map becomes (B, h*w, C) grid tokens with no prefix; ``readout`` is what the
    layer offers a head: the class token (or class and distillation tokens averaged) where the model's
    head reads it, else the mean of the grid tokens (a CNN's global average pool).
    """

    tokens: torch.Tensor  # (B, N, D)
    prefix: int
    grid: tuple[int, int]
    readout: torch.Tensor  # (B, D)

    @property
    def patches(self) -> torch.Tensor:
        return self.tokens[:, self.prefix:]  # (B, gh*gw, D)


@dataclass
class CamForward:
    """One forward pass with the Grad-CAM feature map kept in the graph."""

    logits: torch.Tensor  # (B, classes)
    activations: torch.Tensor  # as the layer returned it, in the graph
    reshape: Callable[[torch.Tensor], torch.Tensor]  # activations -> (B, C, h, w)
    cell: tuple[int, int]  # pixels one map cell covers; (-1, -1): measure from the map size


class Adapter:
    """What vitviz knows about one kind of model; subclasses override what differs.

    ``kind`` is "transformer" (token attention) or "cnn". ``family`` is what the dashboard and the
    comparison pages group by: "vit", "hybrid", "resnet" for ours, "vit", "hybrid", "hierarchical",
    "cnn" for others.
    """

    name: str = "base"
    kind: str = "cnn"
    family: str = "cnn"
    # Whether rollout / relevance may run over the layers that share the final token set (the last
    # stage of a hierarchical model, chosen with start_layer) although the whole model refuses them.
    stagewise_rollout: bool = False
    # Whether the modules handed to attn_drop_recorder are exactly the attention layers, one each, in
    # call order: then a method that needs one layer (raw attention) records only that one, and every
    # other layer keeps its fused kernel (see ``record_only``).
    one_module_per_layer: bool = False
    # Whether the 4-d outputs of the modules :meth:`layers` names are channels-last (B, h, w, C), as
    # Swin's blocks; otherwise they are read as (B, C, h, w).
    layers_channels_last: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # Query sets with no grid (``Tokens(prefix=1, grid=(0, 0))``) are a lone class token as the only
    # query (CaiT's and XCiT's class attention, CrossViT's cross-attention). Records with
    # ``token_attention=False`` attend over something other than tokens (XCiT's channels); their
    # ``queries``/``keys`` name the tokens the layer runs over, and capture leaves them out.

    # --- which models ------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - overridden
        return False

    # --- tokens and readout -----------------------------------------------------------------------
    def final_tokens(self, height: int, width: int) -> Tokens:
        """The tokens the head pools, for an input of ``height`` x ``width`` pixels."""
        raise ExplainError(f"{type(self.model).__name__} has no tokens: it is a CNN. Use method='gradcam'.")

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        """Weights over the final tokens that the head reads, (N,) or (B, N) when input-dependent."""
        return readout_vector(tokens, "mean")

    def readout_kind(self) -> str:
        """A short word for what the head reads: "token", "dist", "mean", "max", "pool" or "none"."""
        return "mean"

    @property
    def has_head(self) -> bool:
        """Whether the model has a classifier (logits) rather than returning pooled features."""
        return int(getattr(self.model, "num_classes", 1) or 0) > 0

    # --- attention ----------------------------------------------------------------------------------
    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        """Record every attention call of the forward passes inside the block (none for CNNs).

        ``reduce`` (e.g. the mean over heads) is applied to each layer's weights as the layer runs,
        so that a capture without gradients never holds every layer's full (B, heads, N, N) at once.
        """
        raise ExplainError(f"{type(self.model).__name__} has no attention to record; use method='gradcam'.")
        yield Recording()  # pragma: no cover

    def record_forward(self, x: torch.Tensor, reduce: Reduce | None = None) -> tuple[torch.Tensor, Recording]:
        """Logits of one forward pass of ``x`` and what it recorded."""
        with self.recording(x.shape[-2], x.shape[-1], reduce) as rec:
            logits = self.model(x)
        return logits, rec

    def depth(self) -> int | None:
        """Number of attention layers (blocks), or None when unknown before a forward pass."""
        return None

    def heads(self) -> int | None:
        """Heads per attention layer when every layer has the same number, else None."""
        return None

    # --- methods ------------------------------------------------------------------------------------
    def refusal(self, method: str) -> str | None:
        """Why ``method`` is not defined on this model (and what to use), or None when it is."""
        if self.kind == "cnn" and method in ("attention", "rollout", "grad-rollout", "chefer"):
            what = "a raw attention map" if method == "attention" else method
            return (f"{type(self.model).__name__} is a CNN: it has no attention layers, and {what} needs attention; "
                    "use method='gradcam'.")
        return None

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        """Run the model once keeping the Grad-CAM feature map; default: ``forward_features`` output."""
        if layer is not None:
            raise ExplainError(f"{type(self.model).__name__}'s Grad-CAM reads its last feature map; leave layer "
                               "unset (None).")
        feats = self.model.forward_features(x)
        logits = self.model.forward_head(feats)
        return CamForward(logits=logits, activations=feats, reshape=self.features_to_map, cell=(-1, -1))

    def features_to_map(self, feats: torch.Tensor) -> torch.Tensor:
        """The model's last features as a map (B, C, h, w)."""
        return as_map(feats)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """Last-layer features on the image grid (B, h, w, D), the pixels one cell covers, and the logits.

        One forward pass, split as ``forward_features`` then ``forward_head`` (every timm model and
        ours); a transformer's grid tokens are placed on its final token grid.
        """
        with torch.no_grad():
            raw = self.model.forward_features(x)
            logits = self.model.forward_head(raw)
        if raw.ndim == 3 and self.kind == "transformer":
            tokens = self.final_tokens(x.shape[-2], x.shape[-1])
            fmap, cell = grid_tokens_to_map(raw, tokens), tokens.cell  # (B, D, gh, gw)
        else:
            fmap = self.features_to_map(raw)  # (B, D, h, w)
            cell = (math.ceil(x.shape[-2] / fmap.shape[-2]), math.ceil(x.shape[-1] / fmap.shape[-1]))
        return fmap.permute(0, 2, 3, 1), cell, logits

    # --- layers, for representation analyses ----------------------------------------------------------
    def layers(self) -> list[Layer]:
        """Every block's (transformer) or stage's (CNN) representation, in forward order.

        Default: each module of a flat ``model.blocks`` list, all in stage 0. Multi-stage families
        override it (stage s's blocks in stage s; a hybrid's CNN stages before its transformer blocks).
        """
        blocks = getattr(self.model, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return [Layer(f"blocks.{i}", blk, 0) for i, blk in enumerate(blocks)]
        raise ExplainError(f"vitviz does not know the layers of {type(self.model).__name__}; layer-by-layer "
                           "analyses need a vitviz, timm or Hugging Face model with an adapter.")

    def layer_tokens(self, stage: int, height: int, width: int) -> Tokens | None:
        """The tokens of a ``stage`` layer's output for a ``height`` x ``width`` input; None: read the shape.

        Default: each stage's own grid where the adapter knows it (``stage_tokens``), the final
        tokens for a transformer's last stage, and None (a feature map) for anything else.
        """
        per_stage = getattr(self, "stage_tokens", None)
        if callable(per_stage):
            tokens = per_stage(height, width)
            if 0 <= stage < len(tokens):
                return tokens[stage]
        if self.kind == "transformer" and stage == self.layers()[-1].stage:
            return self.final_tokens(height, width)
        return None

    def split_layer(self, output: object, stage: int, height: int, width: int) -> LayerSplit:
        """A ``stage`` layer's output (as its module returned it) as tokens, prefix, grid and readout.

        Handles (B, N, D) tokens, (B, C, h, w) and (B, h, w, C) maps, and tuples whose first item is
        the tensor (blocks that also return attention, Hugging Face layers).
        """
        t = first_tensor(output)
        known = self.layer_tokens(stage, height, width)
        if t.ndim == 4:
            if self._channels_last():
                t = t.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
            grid = (int(t.shape[2]), int(t.shape[3]))
            tokens, prefix = t.flatten(2).transpose(1, 2), 0  # (B, h*w, C)
        elif t.ndim == 3:
            tokens = t
            prefix, grid = _token_layout(int(t.shape[1]), known)
        else:
            raise ExplainError(f"a layer output of shape {tuple(t.shape)} is neither tokens (B, N, D) nor a "
                               "feature map (B, C, h, w).")
        how = self.readout_kind() if prefix > 0 else "mean"
        if how == "token":
            readout = tokens[:, 0]  # (B, D)
        elif how == "dist" and prefix >= 2:
            readout = tokens[:, :2].mean(dim=1)  # (B, D)
        elif how == "cls+mean":  # a head on [class token, patch mean] (Hugging Face DINOv2) reads both
            readout = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)  # (B, 2D)
        else:  # mean, and pooled readouts (max, attention pool), which an inner layer does not have
            readout = tokens[:, prefix:].mean(dim=1)  # (B, D)
        return LayerSplit(tokens=tokens, prefix=prefix, grid=grid, readout=readout)

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """A logit lens: the layer's output through the final norm and the head (B, classes), or None.

        Defined for a transformer's last-stage layers when the model is ``norm`` then ``forward_head``
        after its blocks; callers check that the last layer gives the model's own logits.
        """
        head = getattr(self.model, "forward_head", None)
        if self.kind != "transformer" or not self.has_head or head is None or stage != self.layers()[-1].stage:
            return None
        t = first_tensor(output)
        norm = getattr(self.model, "norm", None)
        return head(norm(t) if isinstance(norm, nn.Module) else t)

    def _channels_last(self) -> bool:
        """Whether 4-d layer outputs are (B, h, w, C): ``layers_channels_last`` (Swin) or timm's NHWC models."""
        if self.layers_channels_last:
            return True
        fmt = getattr(self.model, "output_fmt", None)
        return getattr(fmt, "value", fmt) == "NHWC"

    # --- what a ViT learned (Fig. 7) ---------------------------------------------------------------
    def patch_embedding_weight(self) -> torch.Tensor | None:
        """Patch projection filters (D, C, p, p) when the stem is a linear patch projection, else None."""
        return None

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        """Learned absolute positions: ((1, prefix + gh*gw, D), base grid, prefix), or None."""
        return None

    def describe(self) -> str:
        return f"{self.name} adapter for {type(self.model).__name__}"


# --- helpers shared by adapters --------------------------------------------------------------------

def readout_vector(tokens: Tokens, how: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) weights of a fixed readout: "token" (first token), "dist" (mean of the first two), "mean" (grid)."""
    v = torch.zeros(tokens.n, dtype=dtype, device=device)
    if how == "token" and tokens.prefix >= 1:
        v[0] = 1.0
    elif how == "dist" and tokens.prefix >= 2:
        v[:2] = 0.5  # a distilled DeiT averages its class and distillation heads
    else:
        v[tokens.prefix:] = 1.0 / tokens.num_grid
    return v


def first_tensor(output: object) -> torch.Tensor:
    """The tensor a module returned: itself, or the first item of a tuple or list (blocks that also return
    attention weights, Hugging Face layers)."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ExplainError(f"a layer returned {type(output).__name__}, not a tensor of features.")
    return output


def _token_layout(n: int, known: Tokens | None) -> tuple[int, tuple[int, int]]:
    """(prefix, grid) of n tokens: the known set, the same grid without its prefix (patch-only layers),
    or else the largest square grid after at most 8 prefix tokens."""
    if known is not None and n == known.n:
        return known.prefix, known.grid
    if known is not None and n == known.num_grid:
        return 0, known.grid
    for prefix in range(0, min(n, 9)):
        side = math.isqrt(n - prefix)
        if side > 0 and side * side == n - prefix:
            return prefix, (side, side)
    raise ExplainError(f"cannot place {n} tokens on a grid; the adapter must say this layer's tokens "
                       "(Adapter.layer_tokens).")


def stage_blocks(stages: Sequence[nn.Module], path: str, blocks: str = "blocks", first_stage: int = 0) -> list[Layer]:
    """Layers ``{path}.{s}.{blocks}.{j}`` of a multi-stage model: each stage's blocks, in stage s."""
    out = []
    for s, stage in enumerate(stages):
        for j, blk in enumerate(getattr(stage, blocks) if blocks else stage):
            label = f"{path}.{s}.{blocks}.{j}" if blocks else f"{path}.{s}.{j}"
            out.append(Layer(label, blk, first_stage + s))
    return out


def backbone_layers(backbone: nn.Module, path: str) -> list[Layer]:
    """A CNN's layers: our ResNet's residual blocks (stage = ResNet stage); a timm network's ``stages``
    or ``feature_info`` modules; else the whole network as one layer."""
    dot = f"{path}." if path else ""
    names = getattr(backbone, "stage_names", None)
    if names:
        return [Layer(f"{dot}{name}.{j}", blk, s) for s, name in enumerate(names)
                for j, blk in enumerate(getattr(backbone, name))]
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, (nn.ModuleList, nn.Sequential)) and len(stages) > 0:
        return [Layer(f"{dot}stages.{s}", stage, s) for s, stage in enumerate(stages)]
    layers = feature_info_layers(backbone, path)
    if layers:
        return layers
    return [Layer(path or "backbone", backbone, 0)]


def feature_info_layers(model: nn.Module, path: str = "") -> list[Layer]:
    """The modules timm's ``feature_info`` names (each stage's output), one stage each; [] when it has none."""
    info = getattr(model, "feature_info", None)
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    names = [e.get("module") for e in entries] if isinstance(entries, list) else []
    if not names or not all(names):
        return []
    dot, out = f"{path}." if path else "", []
    for s, name in enumerate(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a features_only wrapper keeps "stages.0" as the attribute "stages_0"
            module = model.get_submodule(name.replace(".", "_"))
        out.append(Layer(f"{dot}{name}", module, s))
    return out


def grid_tokens_to_map(tokens: torch.Tensor, set_: Tokens) -> torch.Tensor:
    """Grid tokens of (B, N, D) as a feature map (B, D, gh, gw)."""
    gh, gw = set_.grid
    patches = tokens[:, set_.prefix:]  # (B, gh*gw, D)
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)  # (B, D, gh, gw)


def block_index(name: str, container: str = "blocks") -> int:
    """The index after ``container`` in a module path ("blocks.3.attn" -> 3); -1 when absent."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == container and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


_RECORD_ONLY: ContextVar[frozenset[int] | None] = ContextVar("vitviz_record_only", default=None)


@contextmanager
def record_only(layers: frozenset[int]) -> Iterator[None]:
    """Inside the block, :func:`attn_drop_recorder` records only these positions of its module list."""
    token = _RECORD_ONLY.set(layers)
    try:
        yield
    finally:
        _RECORD_ONLY.reset(token)


@contextmanager
def attn_drop_recorder(modules: Sequence[tuple[str, nn.Module]],
                       on_record: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Record attention weights where timm-style attention modules pass them through ``attn_drop``.

    For the calls inside the block, each module whose class offers ``fused_attn`` takes its explicit
    path (an instance attribute, deleted afterwards), and a forward hook on its ``attn_drop`` hands
    the softmax weights, still in the autograd graph, to ``on_record(name, module, weights)``. The
    fused kernel never exposes the weights, which is why hooks alone capture nothing on recent timm.
    On exit, also after an exception, every hook is removed and every instance attribute restored.
    """
    only = _RECORD_ONLY.get()
    if only is not None:  # the other layers keep their fused kernel and are not recorded
        modules = [m for i, m in enumerate(modules) if i in only]
    installed = Installed()
    with exclusive():  # the fused_attn switches of two calls at once would undo each other
        try:
            for name, module in modules:
                drop = getattr(module, "attn_drop", None)
                if not isinstance(drop, nn.Module):
                    raise ExplainError(f"{name} ({type(module).__name__}) has no attn_drop to record attention at.")
                if hasattr(module, "fused_attn"):
                    installed.set(module, "fused_attn", False)

                def hook(_m: nn.Module, inputs: tuple, _out: object, name: str = name,
                         module: nn.Module = module) -> None:
                    on_record(name, module, inputs[0])

                installed.forward(drop, hook)
            yield
        finally:
            installed.undo()


def as_map(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 4:
        raise ExplainError(f"Grad-CAM needs a (B, C, h, w) feature map, got shape {tuple(features.shape)}.")
    return features


def check_block(layer: int | None, depth: int) -> int:
    index = -1 if layer is None else layer
    if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
        raise ExplainError(
            f"layer {layer!r} is out of range for Grad-CAM on a model with {depth} blocks "
            f"(use 0..{depth - 1} or -{depth}..-1)."
        )
    return index


def hooked_forward(model: nn.Module, module: nn.Module, x: torch.Tensor,
                   reshape: Callable[[torch.Tensor], torch.Tensor], cell: tuple[int, int], pre: bool = False,
                   grad: bool = True) -> CamForward:
    """Run ``model`` once, keeping ``module``'s output (or, with ``pre``, its first input)."""
    captured: list[torch.Tensor] = []

    def keep_output(_m: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[-1] if isinstance(output, (list, tuple)) else output)

    def keep_input(_m: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0])

    handle = module.register_forward_pre_hook(this_thread(keep_input)) if pre else \
        module.register_forward_hook(this_thread(keep_output))
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            logits = model(x)  # (B, classes)
    finally:
        handle.remove()
    if not captured:
        raise ExplainError(f"the Grad-CAM layer {type(module).__name__} was not called in forward.")
    return CamForward(logits=logits, activations=captured[-1], reshape=reshape, cell=cell)
