"""CLIP: the prompt classifier, and open_clip's own image tower.

:class:`PromptAdapter` adapts a :class:`~vitviz.models.clip.PromptClassifier` by handing everything
about tokens and attention to the adapter of its image tower (an open_clip ``VisionTransformer``, a
timm trunk, or a Hugging Face tower), while the logits are the classifier's: the image embedding
the tower returns goes through the prompt similarity. Grad-CAM, rollout and relevance of a class
therefore explain the similarity of that prompt.

:class:`OpenClipViT` adapts open_clip's ``VisionTransformer``: a class token then the patch grid,
pre-norm ``ResidualAttentionBlock``s whose attention is torch's ``nn.MultiheadAttention``, and a
head on the class token (``pool_type='tok'``) or on the patch mean (``'avg'``). torch's module only
returns softmax weights that are not on the autograd path to the output, so for a recorded call
each attention module runs an explicit forward (same projections, scaled dot product, softmax,
output projection) that keeps its weights in the graph; the instance attribute is removed after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for, register
from vitviz.explain.adapters.base import (
    _RECORD_ONLY,
    Adapter,
    AttentionRecord,
    CamForward,
    Layer,
    Recording,
    Reduce,
    Tokens,
    check_block,
    first_tensor,
    grid_tokens_to_map,
    hooked_forward,
    readout_vector,
)
from vitviz.explain.hooks import exclusive, this_thread


def _is_prompt_classifier(model: nn.Module) -> bool:
    from vitviz.models.clip import PromptClassifier

    return isinstance(model, PromptClassifier)


@register
class PromptAdapter(Adapter):
    """A prompt classifier: its tower's adapter for tokens and attention, the prompt similarity for logits."""

    name = "clip-prompts"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_prompt_classifier(model)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        encoder = model.encoder
        trunk = getattr(encoder, "trunk", None)  # open_clip's TimmModel: a timm trunk, then a projection head
        self.tower = trunk if isinstance(trunk, nn.Module) else encoder
        self.project = encoder.head if trunk is not None else (lambda e: e)
        self.inner = adapter_for(self.tower)

    def _logits(self, tower_out: torch.Tensor) -> torch.Tensor:
        return self.model.similarity(self.project(tower_out))  # (B, prompts)

    # what the tower's adapter knows
    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.inner.family

    @property
    def stagewise_rollout(self) -> bool:  # type: ignore[override]
        return self.inner.stagewise_rollout

    @property
    def one_module_per_layer(self) -> bool:  # type: ignore[override]
        return self.inner.one_module_per_layer

    @property
    def has_head(self) -> bool:
        return True  # the prompts are the classes

    def final_tokens(self, height: int, width: int) -> Tokens:
        return self.inner.final_tokens(height, width)

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return self.inner.readout(tokens, recording)

    def readout_kind(self) -> str:
        return self.inner.readout_kind()

    def recording(self, height: int, width: int, reduce: Reduce | None = None):  # noqa: ANN201
        return self.inner.recording(height, width, reduce)

    def depth(self) -> int | None:
        return self.inner.depth()

    def heads(self) -> int | None:
        return self.inner.heads()

    def refusal(self, method: str) -> str | None:
        return self.inner.refusal(method)

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        cam = self.inner.cam_forward(x, layer)  # the tower's output is the image embedding, in the graph
        return CamForward(logits=self._logits(cam.logits), activations=cam.activations, reshape=cam.reshape,
                          cell=cam.cell)

    def features_to_map(self, feats: torch.Tensor) -> torch.Tensor:
        return self.inner.features_to_map(feats)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        feats, cell, out = self.inner.grid_features(x)
        with torch.no_grad():
            return feats, cell, self._logits(out)

    def layers(self) -> list[Layer]:
        return self.inner.layers()

    def split_layer(self, output: object, stage: int, height: int, width: int):  # noqa: ANN201
        return self.inner.split_layer(output, stage, height, width)

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """The logit lens of a prompt classifier: a layer's tokens made into an image embedding the way the tower
        makes its last layer's, then scored against the prompts."""
        embed = getattr(self.inner, "embedding_from_tokens", None)
        if embed is None or stage != self.inner.layers()[-1].stage:
            return None
        return self._logits(embed(first_tensor(output)))

    def patch_embedding_weight(self) -> torch.Tensor | None:
        return self.inner.patch_embedding_weight()

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        return self.inner.position_embedding()

    def describe(self) -> str:
        return f"{self.name} adapter over {self.inner.describe()}"


# --- open_clip's VisionTransformer ---------------------------------------------------------------------

def _is_open_clip_vit(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ == "VisionTransformer" and cls.__module__ == "open_clip.transformer"


def _explicit_mha(mha: nn.MultiheadAttention, keep: list[torch.Tensor]):  # noqa: ANN202
    """An ``nn.MultiheadAttention.forward`` for self-attention that keeps its softmax weights in the graph.

    Only in the thread that installs it: other threads sharing the model run torch's own forward.
    """
    heads = mha.num_heads
    owner = threading.get_ident()

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object,
                attn_mask: torch.Tensor | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
        if threading.get_ident() != owner:
            return type(mha).forward(mha, query, key, value, *args, attn_mask=attn_mask, **kwargs)
        if not (query is key is value):
            raise ExplainError("vitviz records self-attention only; this block attends across two inputs.")
        x = query if mha.batch_first else query.transpose(0, 1)  # (B, N, D)
        b, n, d = x.shape
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        scores = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = scores.softmax(dim=-1)  # (B, heads, N, N)
        keep.append(weights)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        out = mha.out_proj(out)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return forward


@register
class OpenClipViT(Adapter):
    """open_clip's ``VisionTransformer`` image tower (its output is the projected image embedding)."""

    name = "open-clip-vit"
    kind = "transformer"
    family = "vit"
    one_module_per_layer = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_open_clip_vit(model)

    @property
    def has_head(self) -> bool:
        return False  # an image embedding, not class scores (a PromptClassifier adds the classes)

    def _blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def final_tokens(self, height: int, width: int) -> Tokens:
        m = self.model
        if (height, width) != tuple(m.image_size):
            raise ExplainError(f"this CLIP takes {m.image_size[0]}x{m.image_size[1]} px images, got {height}x{width}.")
        p = tuple(int(v) for v in m.patch_size)
        return Tokens(prefix=1, grid=tuple(int(g) for g in m.grid_size), cell=p)

    def readout_kind(self) -> str:
        return "mean" if getattr(self.model, "pool_type", "tok") == "avg" else "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        return readout_vector(tokens, self.readout_kind())

    def depth(self) -> int:
        return len(self._blocks())

    def heads(self) -> int | None:
        return int(self._blocks()[0].attn.num_heads)

    def layers(self) -> list[Layer]:
        return [Layer(f"transformer.resblocks.{i}", blk, 0) for i, blk in enumerate(self._blocks())]

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        return None  # an image embedding, not class scores (a PromptClassifier's adapter scores the prompts)

    def embedding_from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The image embedding from a layer's tokens (B, N, D) -> (B, E), as the tower's own pooling does it."""
        m = self.model
        if getattr(m, "final_ln_after_pool", False):
            pooled, _ = m._global_pool(t)
            pooled = m.ln_post(pooled)
        else:
            pooled, _ = m._global_pool(m.ln_post(t))  # (B, D)
        return pooled @ m.proj if m.proj is not None else pooled

    def refusal(self, method: str) -> str | None:
        if method in ("attention", "rollout", "grad-rollout", "chefer"):
            if getattr(self.model, "attn_pool", None) is not None:
                return (f"{method} needs to know what the head reads, and this CLIP pools with an attention pooler "
                        "vitviz does not model; use method='gradcam'.")
            if any(not isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in self._blocks()):
                return (f"{method} needs the attention weights, and this CLIP's custom blocks compute attention "
                        "where vitviz cannot record it; use method='gradcam'.")
        return None

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        why = self.refusal("attention")
        if why is not None:
            raise ExplainError(why)
        tokens = self.final_tokens(height, width)
        rec = Recording()
        only = _RECORD_ONLY.get()
        patched: list[nn.Module] = []
        handles = []
        with exclusive():  # it replaces each attention's forward for the call
            try:
                for i, blk in enumerate(self._blocks()):
                    if only is not None and i not in only:
                        continue
                    keep: list[torch.Tensor] = []
                    blk.attn.forward = _explicit_mha(blk.attn, keep)  # an instance attribute, deleted below
                    patched.append(blk.attn)

                    def on_forward(_m: nn.Module, _inputs: object, _out: object, i: int = i,
                                   keep: list[torch.Tensor] = keep) -> None:
                        w = keep.pop()
                        rec.records.append(AttentionRecord(
                            weights=reduce(w) if reduce else w, queries=tokens, keys=tokens,
                            name=f"transformer.resblocks.{i}.attn", block=i))

                    handles.append(blk.attn.register_forward_hook(this_thread(on_forward)))
                yield rec
            finally:
                for handle in handles:
                    handle.remove()
                for mha in patched:
                    mha.__dict__.pop("forward", None)

    def _to_map(self, x: torch.Tensor):  # noqa: ANN202
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        return (lambda t: grid_tokens_to_map(t, tokens)), tokens.cell

    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        blocks = self._blocks()
        index = check_block(layer, len(blocks))
        to_map, cell = self._to_map(x)
        if layer is None and self.readout_kind() == "mean":
            return hooked_forward(self.model, self.model.transformer, x, to_map, cell)
        return hooked_forward(self.model, blocks[index].ln_1, x, to_map, cell)  # the tokens entering attention

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        to_map, cell = self._to_map(x)
        cam = hooked_forward(self.model, self.model.transformer, x, to_map, cell, grad=False)
        return to_map(cam.activations).permute(0, 2, 3, 1), cell, cam.logits

    def patch_embedding_weight(self) -> torch.Tensor | None:
        return self.model.conv1.weight  # (D, 3, p, p)

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        pos = getattr(self.model, "positional_embedding", None)
        if not isinstance(pos, torch.Tensor):
            return None
        return pos.unsqueeze(0), tuple(int(g) for g in self.model.grid_size), 1  # (1, 1 + gh*gw, D)
