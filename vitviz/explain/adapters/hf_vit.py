"""Hugging Face ViT-style image models: ViT, DeiT, BEiT, DINOv2 (with registers), CLIP and SigLIP towers.

All are one flat stack of pre-norm layers over ``prefix + gh*gw`` tokens. The prefix, by model type:
the class token; DeiT's class and distillation tokens; DINOv2's class token then its registers;
none for SigLIP. What the head reads, by model class:

* the class token: ViT, DeiT without teacher, DINOv2's and CLIP's bare models (their pooler reads it);
* the mean of the class and distillation tokens: ``DeiTForImageClassificationWithTeacher`` (it
  averages its two heads' logits);
* the patch mean: BEiT with ``use_mean_pooling``, CLIP/SigLIP classifiers (``CLIPForImageClassification``,
  ``SiglipForImageClassification``);
* half the class token and half the patch mean: ``Dinov2ForImageClassification`` concatenates both;
* SigLIP's attention-pooling head: its own attention over the tokens, per image.

Recording: :func:`~vitviz.explain.adapters.hf_common.eager_recorder` switches the configs to the
eager path for the call and takes each layer's softmax weights from its attention module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import register
from vitviz.explain.adapters.base import (
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
from vitviz.explain.adapters.hf_common import attention_layers, eager_recorder, first_layernorm, is_hf
from vitviz.explain.hooks import this_thread

_SIGLIP = ("siglip", "siglip_vision_model")
_POOLED_READOUTS = ("mean", "pool", "cls+mean")


@register
class HFViT(Adapter):
    """A :class:`~vitviz.models.hf.HFImageModel` of a ViT-style transformers model."""

    name = "hf-vit"
    kind = "transformer"
    family = "vit"
    one_module_per_layer = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_hf(model) and model.model_type != "swin"

    @property
    def has_head(self) -> bool:
        return self.model.has_head

    def _layers(self) -> list[tuple[str, nn.Module, nn.Module]]:
        return attention_layers(self.model.vision)

    # --- tokens and readout -------------------------------------------------------------------------
    def prefix(self) -> int:
        m = self.model
        if m.model_type in _SIGLIP:
            return 0
        return (2 if m.model_type == "deit" else 1) + int(getattr(m.vision_config, "num_register_tokens", 0) or 0)

    def final_tokens(self, height: int, width: int) -> Tokens:
        p = self.model.patch_size
        if height % p[0] or width % p[1]:
            raise ExplainError(f"a {height}x{width} px input does not split into {p[0]}x{p[1]} px patches; resize it "
                               f"to a multiple of {p[0]}.")
        return Tokens(prefix=self.prefix(), grid=(height // p[0], width // p[1]), cell=p)

    def readout_kind(self) -> str:
        m = self.model
        cls_name = type(m.hf).__name__
        if m.model_type in _SIGLIP:
            # the bare tower pools with its attention head; a classifier averages the tokens
            return "pool" if m.output != "logits" and getattr(m.vision_config, "vision_use_head", True) else "mean"
        if "WithTeacher" in cls_name:
            return "dist"
        if m.model_type == "beit" and getattr(m.vision_config, "use_mean_pooling", True):
            return "mean"
        if m.output == "logits" and m.model_type.startswith("dinov2"):
            return "cls+mean"
        if m.output == "logits" and m.model_type in ("clip", "clip_vision_model"):
            return "mean"
        return "token"

    def readout(self, tokens: Tokens, recording: Recording | None = None) -> torch.Tensor:
        how = self.readout_kind()
        if how == "cls+mean":  # Dinov2ForImageClassification: head on [class token, patch mean]
            return 0.5 * readout_vector(tokens, "token") + 0.5 * readout_vector(tokens, "mean")
        if how == "pool":
            if recording is None or recording.readout is None:
                raise ExplainError("the attention-pool readout depends on the image; record a forward pass first.")
            return recording.readout
        return readout_vector(tokens, how)

    # --- attention ----------------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self._layers())

    def heads(self) -> int | None:
        return int(self.model.vision_config.num_attention_heads)

    @contextmanager
    def recording(self, height: int, width: int, reduce: Reduce | None = None) -> Iterator[Recording]:
        tokens = self.final_tokens(height, width)
        rec = Recording()
        layers = self._layers()
        index = {id(attn): i for i, (_, _, attn) in enumerate(layers)}

        def on_record(name: str, module: nn.Module, weights: torch.Tensor) -> None:
            rec.records.append(AttentionRecord(weights=reduce(weights) if reduce else weights, queries=tokens,
                                               keys=tokens, name=name, block=index[id(module)]))

        handles = self._pool_hooks(rec) if self.readout_kind() == "pool" else []
        try:
            with eager_recorder([(f"{path}.attn", attn) for path, _, attn in layers], on_record):
                yield rec
        finally:
            for h in handles:
                h.remove()

    def _pool_hooks(self, rec: Recording) -> list:
        """SigLIP's pooling head: its probe's attention over the tokens, averaged over heads, as the readout."""
        head = self.model.vision.head if hasattr(self.model.vision, "head") else self.model.vision.vision_model.head

        def keep_pool(_m: nn.Module, inputs: tuple) -> None:
            hidden = inputs[0]  # (B, N, D)
            with torch.no_grad():
                probe = head.probe.expand(hidden.shape[0], -1, -1)  # (B, 1, D)
                _, weights = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
            rec.readout = weights[:, 0]  # (B, N)

        return [head.register_forward_pre_hook(this_thread(keep_pool))]

    # --- layers, for representation analyses ------------------------------------------------------------
    def layers(self) -> list[Layer]:
        return [Layer(path, layer, 0) for path, layer, _ in self._layers()]

    def layer_logits(self, output: object, stage: int) -> torch.Tensor | None:
        """A layer's tokens through the model's own final norm and classifier (the logit lens); None without one."""
        if not self.has_head:
            return None
        return self.head_from_tokens(first_tensor(output))

    def head_from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """What a ``*ForImageClassification`` head computes from the last layer's tokens (B, N, D) -> (B, classes).

        The same steps as the transformers classes' own forward (checked by ``tests/test_hf_models.py``
        against the model's logits on its last layer).
        """
        hf, kind = self.model.hf, self.model.model_type
        if kind in ("clip", "siglip"):  # CLIP / SigLIP classifiers: the tower's tokens averaged (SigLIP post-norm)
            vision = self.model.vision
            z = vision.post_layernorm(t) if kind == "siglip" else t  # (B, N, D)
            return hf.classifier(z[:, self.prefix():].mean(dim=1))
        base = getattr(hf, hf.base_model_prefix)
        z = base.layernorm(t) if hasattr(base, "layernorm") else t  # (B, N, D)
        if "WithTeacher" in type(hf).__name__:  # DeiT: the mean of its two heads
            return (hf.cls_classifier(z[:, 0]) + hf.distillation_classifier(z[:, 1])) / 2
        if kind == "beit":
            return hf.classifier(base.pooler(z) if base.pooler is not None else z[:, 0])
        if kind.startswith("dinov2"):  # [class token, mean of the patch tokens after the registers]
            return hf.classifier(torch.cat([z[:, 0], z[:, self.prefix():].mean(dim=1)], dim=1))
        if self.readout_kind() == "mean":
            return hf.classifier(z[:, self.prefix():].mean(dim=1))
        return hf.classifier(z[:, 0])

    def embedding_from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A CLIP / SigLIP tower's image embedding from a layer's tokens (B, N, D) -> (B, E), as its forward."""
        vision = self.model.vision
        if self.model.model_type in _SIGLIP:  # post-norm on every token, then the attention-pooling head
            z = vision.post_layernorm(t) if hasattr(vision, "post_layernorm") else t
            head = getattr(vision, "head", None)
            return head(z) if head is not None else z.mean(dim=1)
        pooled = vision.post_layernorm(t[:, 0])  # CLIP: the class token, then its norm  (B, D)
        projection = getattr(self.model.hf, "visual_projection", None)
        return projection(pooled) if projection is not None and self.model.output == "image_embeds" else pooled

    # --- Grad-CAM and features ----------------------------------------------------------------------
    def cam_forward(self, x: torch.Tensor, layer: int | None) -> CamForward:
        layers = self._layers()
        index = check_block(layer, len(layers))
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return grid_tokens_to_map(t, tokens)

        if layer is None and self.readout_kind() in _POOLED_READOUTS:
            # a pooled readout reads the last layer's tokens (through the final norm)
            return hooked_forward(self.model, layers[-1][1], x, to_map, tokens.cell)
        # the tokens entering the layer's attention: only these reach a class token from the grid
        return hooked_forward(self.model, first_layernorm(layers[index][1]), x, to_map, tokens.cell)

    def grid_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """The last layer's grid tokens (B, gh, gw, D), the patch size, and the outputs, from one forward pass."""
        tokens = self.final_tokens(x.shape[-2], x.shape[-1])
        cam = hooked_forward(self.model, self._layers()[-1][1], x, lambda t: grid_tokens_to_map(t, tokens),
                             tokens.cell, grad=False)
        return cam.reshape(cam.activations).permute(0, 2, 3, 1), tokens.cell, cam.logits

    # --- Fig. 7 -------------------------------------------------------------------------------------
    def _embeddings(self) -> nn.Module:
        for name, module in self.model.vision.named_modules():
            if name.endswith("embeddings") and not name.endswith("patch_embeddings"):
                return module
        raise ExplainError(f"{type(self.model.hf).__name__} has no embeddings module.")

    def patch_embedding_weight(self) -> torch.Tensor | None:
        for module in self._embeddings().modules():
            if isinstance(module, nn.Conv2d):
                return module.weight  # (D, C, p, p)
        return None

    def position_embedding(self) -> tuple[torch.Tensor, tuple[int, int], int] | None:
        emb = self._embeddings()
        pos = getattr(emb, "position_embeddings", None)
        if pos is None and isinstance(getattr(emb, "position_embedding", None), nn.Embedding):
            pos = emb.position_embedding.weight.unsqueeze(0)  # (1, N, D)
        if not isinstance(pos, torch.Tensor) or pos.ndim != 3:
            return None  # BEiT's relative position bias, or no learned absolute positions
        (h, w), (ph, pw) = self.model.image_size, self.model.patch_size
        grid = (h // ph, w // pw)
        prefix = pos.shape[1] - grid[0] * grid[1]
        return (pos, grid, prefix) if prefix >= 0 else None
