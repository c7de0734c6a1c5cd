"""AttnLRP (Achtibat et al., ICML 2024): layer-wise relevance propagation through attention, for vision transformers.

Relevance starts as the explained logit and flows back to the pixels, layer by layer, by the paper's rules:

==========================================  ===============================================================
operation                                   rule, and how it is obtained here
==========================================  ===============================================================
linear layers, patch projection, head       epsilon rule (epsilon -> 0, bias absorbs): plain gradient x input;
                                            with ``gamma`` > 0 the generalised gamma rule (zennit's ``Gamma``)
convolutions, eval-mode batch norm          epsilon rule, as linear (affine) maps: plain gradient x input;
                                            with ``conv_gamma`` > 0 the gamma rule on the convolutions
residual additions, pooling, position add   epsilon rule, as linear maps (position embeddings absorb)
max pooling, ReLU                           winner takes all / identity rule: their own gradient x input
LayerNorm / RMSNorm / GroupNorm             identity rule on the normalisation: the std is a constant
                                            (detached), the centring and affine parts stay linear (Prop. 3.4)
GELU, SiLU, Hardswish, ... (elementwise)    identity rule (Eq. 9): gradient scaled by f(x) / x
sigmoid gate x signal (EVA's gated          signal-take-all (Arras et al. 2017): the gate is a constant
attention)                                  backward, all relevance goes to the signal
L2 normalisation (cosine attention, CLIP)   identity rule: the norm is a constant
softmax                                     the AttnLRP softmax rule (Prop. 3.1): x_i (R_i - s_i sum_j R_j),
                                            which *is* gradient x input of the softmax: nothing to change
q @ k^T, attn @ v                           uniform epsilon rule (Prop. 3.3): half the relevance to each
                                            factor: the gradient at q and k (after timm's qk-norm) is
                                            halved, and so is the gradient at the attention output
                                            (entering timm's scale norm, or ``proj``)
==========================================  ===============================================================

This is the "efficient" gradient x input form of the paper (relevance of a tensor t = t * dR/dt): one
forward and one backward pass. The rules are put in place for one call with forward hooks and custom
autograd functions on the model's own modules; on exit, also after an exception, every hook is removed,
so the model is unchanged (its fused attention keeps running: the gradient of fused attention equals
the explicit path's, and only q, k and the attention output's gradients are rescaled). The forward
values are a plain forward pass's (bit-identical where the model's own kernels keep running, equal to
float rounding where attention is written out for the call), so the explained logit is the model's own.

Covered: every transformer whose modules all have a rule here, reached through its adapter:

* vitviz's ``VisionTransformer``;
* timm's ``VisionTransformer`` (pre-norm ``Block``, ``ResPostBlock``, ``ParallelThingsBlock``,
  ``ParallelScalingBlock`` (one projection for q, k, v and the MLP, another for both outputs); class-token,
  distillation, mean, max and attention-pool (``AttentionPoolLatent``, SigLIP) readouts; layer scale,
  registers, qk-norm) and ``VisionTransformerDistilled`` (DeiT);
* timm's ``Eva`` (EVA, EVA-02, RoPE ViTs: rotary embeddings are a fixed linear map of q and k; SwiGLU
  and GLU MLPs, whose product of two branches gets the uniform rule, half to each) and ``Beit`` (a
  relative position bias is an additive bias on the scores);
* timm's ``SwinTransformer`` and Hugging Face's Swin (window attention: shifted windows and patch
  merging move and concatenate tokens, the shift mask and relative position bias are additive) and
  ``SwinTransformerV2`` (cosine attention: q and k are L2-normalised; the position bias comes from a small
  MLP of fixed coordinates, so it is a constant added to the scores);
* timm's ``Cait`` (talking heads mix the heads linearly before and after the softmax; class attention),
  ``Xcit`` (cross-covariance attention: cosine attention over channels; the local patch interaction is
  depthwise convolutions and batch norm), ``ConVit`` (gated positional attention: the gate and the
  positional scores do not depend on the image, and the renormalisation of the mixed rows, which already
  sum to one, is a constant), ``CrossVit`` (two branches, cross-attention of their class tokens, bicubic
  resizing is linear), ``PoolingVisionTransformer`` (PiT), ``PyramidVisionTransformerV2`` and ``Twins``
  (spatial-reduction convolutions, depthwise convolutions in the MLP or as position encoding), ``Levit``
  (linear layers followed by batch norm, heads interleaved in one projection, attention biases);
* hybrids: vitviz's ResNet stems and timm's ResNet-v2 stems (weight-standardised convolutions, group
  norm); a CNN stem passes relevance by the epsilon rule, which is gradient x input there too;
* Hugging Face ViT, DeiT, BEiT, DINOv2 (with registers, with SwiGLU), CLIP and SigLIP vision towers,
  and open_clip's ViTs, as classifiers or prompt classifiers (the L2 normalisation gets the identity rule:
  the norm is a constant). torch's ``nn.MultiheadAttention`` (open_clip's blocks, SigLIP's attention-pool head) computes
  q, k and v inside one function: for the call it runs a written-out forward with the rules (torch's own
  outside the call and in other threads).

Where q and k can be reached as modules (timm's ``q_norm`` / ``k_norm``, transformers' ``q_proj`` /
``k_proj``, ``q`` / ``kv`` projections, the fused ``qkv`` projection, LeViT's interleaved heads), their
gradient is halved and fused attention keeps running (the gradient of fused attention equals the
explicit path's). Cosine attention normalises q and k inside its forward: there a TorchFunctionMode gives
each ``F.normalize`` the identity rule and the halving, for the attention's own call. timm's BEiT
computes q and k inside its forward; there the explicit path runs for the call and the halving sits on
the softmax's output (``attn_drop``'s input), which halves the gradient at the scores and so at q and k
alike, while the relative position bias's gradient is doubled back so that it absorbs what it would
under the rule.

Other models are refused with the reason (:func:`refusal`): CNNs (use Grad-CAM), sigmoid gates other than
EVA's gated attention, an ``nn.MultiheadAttention`` with separate key/value sizes or key biases, batch norm in
training mode and anything without a classifier head. The epsilon rule in a deep CNN stem is gradient x
input, which is known to be noisy there (LRP composites use the gamma rule on convolutions); how far to
trust the maps of a hybrid is measured by the trust scorer (``vitviz trust``), not assumed.

Why not the ``lxt`` package: its efficient patches (``lxt.efficient``) replace *class* methods of
Hugging Face and torchvision modules for the whole process, with no undo, and cover neither timm's
models nor vitviz's ViT (its torchvision ViT map uses CP-LRP, not AttnLRP, inside attention); and
``import lxt.efficient`` fails with transformers 5 (its BERT map imports a module that transformers 5
removed). A dashboard that explains several models at once in threads needs per-call, per-instance
rules that are always removed. The tests check this module against ``lxt``'s explicit rules
(``lxt.explicit.functional``) composed by hand into the same network, and each family against a plain
ViT with the same weights.

Conservation: every rule above is conservative except where the paper says relevance is absorbed:
biases (linear, convolution, norm and batch-norm shifts, head, position biases), additive embeddings and
constants (position embeddings and encodings, class and register tokens, an attention pool's latent query,
positional scores, which are not pixels) and the softmax rule, whose
Taylor expansion at x has a bias term that keeps ``sum_i R_i - sum_i x_i (R_i - s_i sum_j R_j)`` per
query row. So the relevance summed over the pixels is the logit minus these absorbed parts, exactly (to
float rounding); how far it is from the logit depends on the model (with small attention scores, most
relevance reaching the attention weights is absorbed by the softmax).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter, adapter_for
from vitviz.explain.hooks import Installed, exclusive
from vitviz.explain.layout import check_images, resolve_target
from vitviz.explain.lrp_rules import (
    RMS_NORMS,
    ConstantRowSums,
    CosineAttentionRules,
    activation_rule,
    gamma_rule,
    group_norm_rule,
    halve_gradient,
    l2_rule,
    norm_rule,
    scale_input,
    scale_output,
    scale_returned,
)

__all__ = ["LRPResult", "attnlrp", "attnlrp_details", "lrp_rules", "refusal"]

_ADAPTERS = ("vitviz-vit", "open-clip-vit", "timm-vit", "timm-eva", "timm-beit", "timm-cait", "timm-swin",
             "timm-pvt-v2", "timm-twins", "timm-pit", "timm-xcit", "timm-crossvit", "timm-levit", "timm-convit",
             "hf-vit", "hf-swin", "clip-prompts")
# Modules that are linear maps (or identities or affine maps in eval), so plain gradient x input is their LRP
# rule (epsilon rule, epsilon -> 0): convolutions of any shape, eval-mode batch norm, average pooling. An
# Embedding is a lookup of additive parameters (CLIP's positions), which absorb.
_LINEAR = {"Linear", "NonDynamicallyQuantizableLinear", "Dropout", "Identity", "DropPath", "LayerScale",
           "PatchDropout", "Embedding", "Flatten", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AvgPool2d", "Conv1d",
           "Conv2d", "BatchNorm1d", "BatchNorm2d"}
# Modules whose own gradient x input already is their rule: the softmax (the AttnLRP softmax rule), ReLU
# (the identity rule: its gradient is relu(x) / x) and max pooling (winner takes all).
_AS_IS = {"Softmax", "ReLU", "MaxPool2d", "MaxPool2dSame"}
_ACTIVATIONS = {"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "Tanh", "Hardswish", "ReLU6",  # f(0) = 0
                "GELUActivation", "QuickGELUActivation", "NewGELUActivation", "PytorchGELUTanh",
                "FastGELUActivation", "SiLUActivation"}
# Classes whose forward composes covered children with additions, concatenation, pooling, fixed linear
# maps (rotary embeddings, layer scale, interpolation, constant position encodings) and the matmuls and
# softmax of attention, by where they are defined (other timm families reuse these class names for other
# maths).
_COVERED = {
    "torch.nn.modules.container": {"ModuleList", "Sequential"},
    "timm.models.vision_transformer": {"VisionTransformer", "Block", "ResPostBlock", "ParallelThingsBlock",
                                       "ParallelScalingBlock", "Attention"},
    "timm.models.deit": {"VisionTransformerDistilled"},
    "timm.layers.attention": {"Attention", "AttentionRope"},
    "timm.layers.attention_pool": {"AttentionPoolLatent"},
    "timm.layers.mlp": {"Mlp", "SwiGLU", "GluMlp"},
    "timm.layers.patch_embed": {"PatchEmbed"},
    "timm.layers.hybrid_embed": {"HybridEmbed"},
    "timm.layers.norm_act": {"GroupNormAct"},
    "timm.layers.std_conv": {"StdConv2d", "StdConv2dSame"},  # weight standardisation: linear in the input
    "timm.layers.pos_embed_sincos": {"RotaryEmbeddingCat", "RotaryEmbedding"},
    "timm.models.resnetv2": {"ResNetV2", "ResNetStage", "Bottleneck", "PreActBottleneck", "DownsampleConv",
                             "DownsampleAvg"},
    "timm.models.eva": {"Eva", "EvaBlock", "EvaBlockPostNorm", "EvaAttention"},
    "timm.models.beit": {"Beit", "Block", "Attention", "RelativePositionBias"},
    "timm.models.cait": {"Cait", "LayerScaleBlock", "LayerScaleBlockClassAttn", "TalkingHeadAttn", "ClassAttn"},
    "timm.models.swin_transformer": {"SwinTransformer", "SwinTransformerStage", "SwinTransformerBlock",
                                     "WindowAttention", "PatchMerging"},
    "timm.models.swin_transformer_v2": {"SwinTransformerV2", "SwinTransformerV2Stage", "SwinTransformerV2Block",
                                        "WindowAttention", "PatchMerging"},
    "timm.models.pvt_v2": {"PyramidVisionTransformerV2", "PyramidVisionTransformerStage", "Block", "Attention",
                           "MlpWithDepthwiseConv", "OverlapPatchEmbed"},
    "timm.models.twins": {"Twins", "Block", "LocallyGroupedAttn", "GlobalSubSampleAttn", "PosConv", "PatchEmbed"},
    "timm.models.pit": {"PoolingVisionTransformer", "SequentialTuple", "Transformer", "Pooling", "ConvEmbedding"},
    "timm.models.xcit": {"Xcit", "XCABlock", "XCA", "LPI", "ClassAttentionBlock", "ConvPatchEmbed",
                         "PositionalEncodingFourier"},
    "timm.models.crossvit": {"CrossVit", "MultiScaleBlock", "CrossAttentionBlock", "CrossAttention", "PatchEmbed"},
    "timm.models.levit": {"Levit", "LevitDistilled", "Stem16", "Stem8", "ConvNorm", "LinearNorm", "NormLinear",
                          "Downsample", "Attention", "AttentionDownsample", "LevitMlp", "LevitDownsample",
                          "LevitBlock", "LevitStage"},
    "timm.models.convit": {"ConVit", "Block", "GPSA", "MHSA"},
    "timm.layers.classifier": {"ClassifierHead"},
    "timm.layers.adaptive_avgmax_pool": {"SelectAdaptivePool2d", "FastAdaptiveAvgPool", "AdaptiveAvgPool"},
    "vitviz.models.vit": {"VisionTransformer"},
    "vitviz.models.layers": {"Block", "Attention", "Mlp", "PatchEmbed"},
    "vitviz.models.hybrid": {"HybridViT", "HybridEmbed"},
    "vitviz.models.resnet": {"ResNet", "BasicBlock", "Bottleneck"},
    "vitviz.models.clip": {"PromptClassifier", "L2Normalize"},
    "open_clip.transformer": {"VisionTransformer", "Transformer", "ResidualAttentionBlock", "LayerNorm",
                              "LayerNormFp32", "LayerScale", "QuickGELU"},
}
# Hugging Face model types whose modules (by class-name ending) are covered: flat pre-norm stacks, and Swin.
_HF_TYPES = ("vit", "deit", "beit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip",
             "siglip_vision_model", "swin")
_HF_ENDINGS = ("Model", "ForImageClassification", "ForImageClassificationWithTeacher", "WithProjection",
               "VisionTransformer", "Embeddings", "Encoder", "Layer", "EncoderLayer", "Attention", "MLP",
               "LayerScale", "Pooler", "RelativePositionBias", "DropPath", "Stage", "PatchMerging",
               "MultiheadAttentionPoolingHead", "SwiGLUFFN")
_HF_REFUSED = {"ViTPooler": "passes the class token through a dense layer and tanh that have no classifier "
                            "score behind them"}
_ALTERNATIVES = "use method='chefer' (gradient-weighted relevance) or 'gradcam'"


@dataclass
class LRPResult:
    """AttnLRP relevance of one batch with what produced it."""

    pixels: torch.Tensor  # (B, H, W) relevance per pixel, summed over channels; signed
    grid: torch.Tensor  # (B, gh, gw) relevance per token cell (sum of its pixels); signed
    logits: torch.Tensor  # (B, classes) of the same forward pass
    target: torch.Tensor  # (B,) class explained
    cell: tuple[int, int]  # pixels one grid cell covers


# --- which models ------------------------------------------------------------------------------------

def _home(m: nn.Module) -> str:
    return type(m).__module__


def _is(m: nn.Module, home: str, *names: str) -> bool:
    return _home(m) == home and type(m).__name__ in names


def _hf_attention(m: nn.Module) -> bool:
    """A transformers self-attention: q/k/v projections as modules, an output projection, and the
    matmul-softmax-matmul between them (eager or fused)."""
    return (_home(m).startswith("transformers.") and isinstance(getattr(m, "q_proj", None), nn.Linear)
            and isinstance(getattr(m, "k_proj", None), nn.Linear)
            and isinstance(getattr(m, "o_proj", None) or getattr(m, "out_proj", None), nn.Linear))


def _roots(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The parts of ``model`` its forward pass runs: a prompt classifier's image side (its text encoder
    ran once, when the prompts were set), a dual encoder's vision tower and projection."""
    kind = type(model).__name__
    if kind == "PromptClassifier":
        for name, child in model.named_children():
            if name != "text_model":
                yield from _roots(child, f"{prefix}{name}.")
    elif _hf_wrapper(model) and model.output == "image_embeds":
        yield f"{prefix}vision", model.vision
        projection = getattr(model.hf, "visual_projection", None)
        if projection is not None:
            yield f"{prefix}visual_projection", projection
    else:
        yield prefix.rstrip("."), model


def _hf_wrapper(m: nn.Module) -> bool:
    """vitviz's wrapper of a transformers model (its class is named after the transformers class it wraps)."""
    return _home(m) == "vitviz.models.hf" and any(c.__name__ == "HFImageModel" for c in type(m).__mro__)


def _covered(name: str, m: nn.Module) -> str | None:
    """Why module ``m`` has no AttnLRP rule here, or None when it has."""
    kind, home = type(m).__name__, _home(m)
    if _hf_wrapper(m):
        return None  # images in, the wrapped model's logits (or embedding) out
    if kind in _LINEAR or kind in _AS_IS or kind in _ACTIVATIONS or kind in RMS_NORMS or kind in _COVERED.get(home, ()):
        if getattr(m, "gate", None) is not None and not _is(m, "timm.models.eva", "EvaAttention"):
            return f"{name} gates its output with a sigmoid, which has no rule here"
        timm_attention = _is(m, "timm.models.vision_transformer", "Attention") or _is(m, "timm.layers.attention",
                                                                                          "Attention")
        if timm_attention and not isinstance(getattr(m, "q_norm", None), nn.Module):
            return f"{name} has no q_norm / k_norm modules to reach q and k at"
        if "max" in str(getattr(m, "pool_type", "")):
            return f"{name} max-pools the features, which has no rule here"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return f"{name} is a batch norm in training mode (batch statistics); call model.eval()"
        return None
    if isinstance(m, nn.GroupNorm):
        return None
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            return f"{name} normalises over {tuple(m.normalized_shape)}, not the channels only"
        return None
    if home.startswith("transformers."):
        model_type = home.split(".")[2] if home.count(".") >= 2 else ""
        if kind.endswith(tuple(_HF_REFUSED)):
            why = next(v for k, v in _HF_REFUSED.items() if kind.endswith(k))
            return f"{name} ({kind}) {why}"
        if kind.endswith("SwiGLUFFN") and not (isinstance(getattr(m, "down_proj", None), nn.Linear)
                                              and isinstance(getattr(m, "act_fn", None), nn.Module)):
            return f"{name} ({kind}) multiplies through an activation that is no module, which has no rule here"
        if model_type in _HF_TYPES and kind.endswith(_HF_ENDINGS):
            return None
        return f"{name} ({kind}) is a transformers module with no AttnLRP rule here"
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return f"{name} is an nn.MultiheadAttention with separate key/value sizes or added key biases"
        return None
    return f"{name} ({kind}) has no AttnLRP rule here"


def _unsupported(model: nn.Module) -> str | None:
    """The first module AttnLRP has no rule for, described, or None when every module is covered."""
    for root_name, root in _roots(model):
        for name, m in root.named_modules():
            full = ".".join(p for p in (root_name, name) if p) or "the model"
            why = _covered(full, m)
            if why is not None:
                return why
    return None


def refusal(model: nn.Module | Adapter) -> str | None:
    """Why AttnLRP is not defined for ``model`` (with what to use instead), or None when it is."""
    adapter = adapter_for(model)
    what = type(adapter.model).__name__
    if adapter.kind != "transformer":
        return f"AttnLRP propagates relevance through attention, and {what} is a CNN; use method='gradcam'."
    if not adapter.has_head:
        return (f"AttnLRP explains a class score, and {what} has no classifier head (it returns features); use "
                "'attention', 'rollout' or 'similarity'.")
    if adapter.name not in _ADAPTERS:
        return (f"AttnLRP in vitviz covers the transformers of timm (ViT, DeiT, EVA, BEiT, CaiT, Swin, PVT-v2, Twins, "
                f"PiT, XCiT, CrossViT, LeViT, ConViT), vitviz, Hugging Face and open_clip; {what} ({adapter.name}) "
                f"has layers with no rule here; {_ALTERNATIVES}.")
    why = _unsupported(adapter.model)
    if why is not None:
        return f"AttnLRP cannot run on this {what}: {why}; {_ALTERNATIVES}."
    return None


# --- the uniform rule on attention's two matmuls -------------------------------------------------------

def _split_scale(parts: Sequence[tuple[int, float]], repeat: int = 1) -> torch.Tensor:
    """A per-channel gradient scale over a projection's output laid out as ``parts`` (width, scale), the
    whole pattern repeated ``repeat`` times (once per head where heads interleave q, k and v)."""
    one = torch.cat([torch.full((width,), scale) for width, scale in parts])
    return one.repeat(repeat)  # (sum of widths * repeat,)


def _levit_rules(m: nn.Module, rules: Installed) -> None:
    """LeViT: q, k (and v) come out of a Linear + BatchNorm (or conv + BatchNorm) with the heads interleaved."""
    kd, vd, heads = m.key_dim, m.val_dim, m.num_heads
    rules.set(m, "attention_bias_cache", {})  # eval mode caches the biases: a fresh one keeps them in this graph
    conv = bool(getattr(m, "use_conv", False))
    if hasattr(m, "qkv"):
        source, scale = m.qkv, _split_scale([(kd, 0.5), (kd, 0.5), (vd, 1.0)], heads)
    else:  # AttentionDownsample: q from the subsampled tokens, k and v from all of them
        rules.forward(m.q, scale_output(0.5))
        source, scale = m.kv, _split_scale([(kd, 0.5), (vd, 1.0)], heads)
    rules.forward(source, scale_output(scale[:, None, None] if conv else scale))  # channels first in a conv
    rules.pre(m.proj, scale_input(0.5))


def _attention_rules(m: nn.Module, rules: Installed) -> None:
    """Put the uniform rule on an attention's q @ k^T and attn @ v, at their factors and product.

    q @ k^T: the gradient at q and k is halved; attn @ v: the gradient at the product is halved,
    which halves it at both factors. Where q and k are modules' outputs the halving sits there
    (after timm's q_norm / k_norm, whose biases then absorb at full strength).
    """
    half = scale_output(0.5)
    if isinstance(m, nn.MultiheadAttention):
        rules.set(m, "forward", _mha_forward(m))
    elif _hf_attention(m):
        rules.forward(m.q_proj, half)
        rules.forward(m.k_proj, half)
        rules.pre(getattr(m, "o_proj", None) or m.out_proj, scale_input(0.5))
    elif _is(m, "timm.models.beit", "Attention"):
        rules.set(m, "fused_attn", False)  # q and k never leave the forward: halve at the softmax's output
        rules.pre(m.attn_drop, scale_input(0.5))
        if m.relative_position_bias_table is not None:  # its share, as if the halving sat at q and k
            rules.set(m, "_get_rel_pos_bias", scale_returned(m._get_rel_pos_bias, 2.0))
        rules.pre(m.proj, scale_input(0.5))
    elif _is(m, "timm.models.levit", "Attention", "AttentionDownsample"):
        _levit_rules(m, rules)
    elif _is(m, "timm.models.eva", "EvaAttention") and m.gate is not None:
        # a sigmoid gate times the attention output: the signal-take-all rule for multiplicative gates
        # (Arras et al. 2017) gives the gate no relevance, so it is a constant for the backward pass
        rules.forward(m.gate, lambda _m, _i, out: out.detach())
        rules.forward(m.q_norm, half)
        rules.forward(m.k_norm, half)
        rules.pre(m.norm if isinstance(getattr(m, "norm", None), nn.Module) else m.proj, scale_input(0.5))
    elif _is(m, "timm.models.vision_transformer", "ParallelScalingBlock"):
        rules.forward(m.q_norm, half)  # q, k, v and the MLP's hidden units come out of one projection
        rules.forward(m.k_norm, half)
        if m.out_proj is not None:  # attention output and MLP hidden units enter one projection side by side
            d = m.num_heads * m.head_dim
            hidden = m.out_proj.in_features - d
            rules.pre(m.out_proj, scale_input(_split_scale([(d, 0.5), (hidden, 1.0)]).to(m.out_proj.weight.device)))
        else:
            rules.pre(m.attn_out_proj, scale_input(0.5))
    elif _is(m, "timm.models.swin_transformer_v2", "WindowAttention") or _is(m, "timm.models.xcit", "XCA"):
        rules.around(m, CosineAttentionRules)  # q and k are L2-normalised inside the forward: the rules sit there
        rules.pre(m.proj, scale_input(0.5))
    elif isinstance(getattr(m, "q_norm", None), nn.Module) and isinstance(getattr(m, "k_norm", None), nn.Module):
        rules.forward(m.q_norm, half)
        rules.forward(m.k_norm, half)
        # the attention output enters timm's scale norm (an Identity by default), else the projection;
        # an attention pool's ``norm`` comes after its projection
        pool = _is(m, "timm.layers.attention_pool", "AttentionPoolLatent")
        after = m.norm if isinstance(getattr(m, "norm", None), nn.Module) and not pool else m.proj
        rules.pre(after, scale_input(0.5))
    else:
        q, k = (getattr(m, "q", None) or getattr(m, "wq", None)), (getattr(m, "k", None) or getattr(m, "wk", None))
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):  # CaiT's class attention, CrossViT
            rules.forward(q, half)
            rules.forward(k, half)
        elif isinstance(q, nn.Linear) and isinstance(getattr(m, "kv", None), nn.Linear):  # PVT-v2, Twins (global)
            rules.forward(q, half)
            d = m.kv.out_features // 2
            rules.forward(m.kv, scale_output(_split_scale([(d, 0.5), (d, 1.0)]).to(m.kv.weight.device)))
        elif isinstance(getattr(m, "qk", None), nn.Linear):  # ConViT's gated positional attention
            rules.forward(m.qk, half)
            rules.around(m, ConstantRowSums)
        else:  # vitviz, Swin, CaiT's talking heads, Twins (local): q, k are the first two thirds of qkv's output
            d = m.qkv.out_features // 3
            rules.forward(m.qkv, scale_output(_split_scale([(2 * d, 0.5), (d, 1.0)]).to(m.qkv.weight.device)))
        rules.pre(m.proj, scale_input(0.5))


def _mha_forward(mha: nn.MultiheadAttention):  # noqa: ANN202
    """torch's ``nn.MultiheadAttention`` forward written out (it computes q, k and v inside one function),
    with the uniform rule on q @ k^T and attn @ v, for the thread that installs it (others get torch's own)."""
    heads, owner, half = mha.num_heads, threading.get_ident(), 0.5

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,  # noqa: ANN001
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if threading.get_ident() != owner:
            return type(mha).forward(mha, query, key, value, key_padding_mask=key_padding_mask,
                                     need_weights=need_weights, attn_mask=attn_mask,
                                     average_attn_weights=average_attn_weights, is_causal=is_causal)
        if key_padding_mask is not None or is_causal:
            raise ExplainError("AttnLRP in vitviz covers nn.MultiheadAttention without padding or causal masks.")
        q_in, k_in, v_in = ((t if mha.batch_first else t.transpose(0, 1)) for t in (query, key, value))  # (B, N, D)
        w, b = mha.in_proj_weight.chunk(3), (mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None
                                             else (None, None, None))
        d, hd = mha.embed_dim, mha.embed_dim // heads
        split = [F.linear(t, wi, bi) for t, wi, bi in zip((q_in, k_in, v_in), w, b, strict=True)]  # (B, N*, D) each
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, hd).transpose(1, 2) for t in split)  # (B, heads, N*, hd)
        scale = torch.tensor(half, dtype=q.dtype, device=q.device)
        scores = (halve_gradient(q, scale) * hd ** -0.5) @ halve_gradient(k, scale).transpose(-2, -1)  # (B, h, Nq, Nk)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        weights = scores.softmax(dim=-1)  # (B, heads, Nq, Nk)
        out = (weights @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], d)  # (B, Nq, D)
        out = mha.out_proj(halve_gradient(out, scale))
        if need_weights:  # what torch's forward returns: averaged over heads unless asked otherwise
            weights = weights.mean(dim=1) if average_attn_weights else weights
        return (out if mha.batch_first else out.transpose(0, 1)), (weights if need_weights else None)

    return forward


_ATTENTIONS = {
    "vitviz.models.layers": ("Attention",),
    "timm.models.vision_transformer": ("Attention", "ParallelScalingBlock"),
    "timm.layers.attention": ("Attention", "AttentionRope"),
    "timm.layers.attention_pool": ("AttentionPoolLatent",),
    "timm.models.eva": ("EvaAttention",),
    "timm.models.beit": ("Attention",),
    "timm.models.cait": ("ClassAttn", "TalkingHeadAttn"),
    "timm.models.swin_transformer": ("WindowAttention",),
    "timm.models.swin_transformer_v2": ("WindowAttention",),
    "timm.models.pvt_v2": ("Attention",),
    "timm.models.twins": ("LocallyGroupedAttn", "GlobalSubSampleAttn"),
    "timm.models.xcit": ("XCA",),
    "timm.models.crossvit": ("CrossAttention",),
    "timm.models.levit": ("Attention", "AttentionDownsample"),
    "timm.models.convit": ("GPSA", "MHSA"),
}


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or _hf_attention(m) or type(m).__name__ in _ATTENTIONS.get(_home(m), ())


# --- the rules in place for one call -------------------------------------------------------------------

def _check_gammas(gamma: float, conv_gamma: float) -> None:
    for name, value in (("gamma", gamma), ("conv_gamma", conv_gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ExplainError(f"{name} must be a number >= 0 (0: the epsilon rule), got {value!r}.")


@contextmanager
def lrp_rules(model: nn.Module | Adapter, *, gamma: float = 0.0, conv_gamma: float = 0.0) -> Iterator[None]:
    """Inside the block, a backward pass of ``model`` computes AttnLRP (gradient x input = relevance).

    ``gamma`` / ``conv_gamma``: the LRP-gamma rule on the Linear layers / convolutions (0: the epsilon rule,
    the paper's rule for them); a small gamma on the linear layers takes noise out of ViT maps, as lxt's
    examples do with zennit's ``Gamma``. ExplainError (with the reason) for a model :func:`refusal`
    refuses. On exit, also after an exception, every hook and instance attribute is removed: the model is
    as it was.
    """
    adapter = adapter_for(model)
    why = refusal(adapter)
    if why is not None:
        raise ExplainError(why)
    _check_gammas(gamma, conv_gamma)
    rules = Installed()
    with exclusive():  # its attribute switches (timm BEiT) and another call's would undo each other
        try:
            modules = [m for _, root in _roots(adapter.model) for m in root.modules()]
            for m in modules:
                kind = type(m).__name__
                if gamma and isinstance(m, nn.Linear):  # first: the rules below act on the output it rebuilds
                    rules.forward(m, gamma_rule(float(gamma)))
                elif conv_gamma and isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    rules.forward(m, gamma_rule(float(conv_gamma)))
                if isinstance(m, nn.LayerNorm) or kind in RMS_NORMS:
                    rules.forward(m, norm_rule)
                elif isinstance(m, nn.GroupNorm):  # timm's GroupNormAct included (its activation after it)
                    rules.forward(m, group_norm_rule)
                elif kind in _ACTIVATIONS:
                    rules.forward(m, activation_rule)
                elif _is(m, "vitviz.models.clip", "L2Normalize"):
                    rules.forward(m, l2_rule)
                elif _is(m, "timm.layers.mlp", "SwiGLU", "GluMlp"):  # act(a) * b: the uniform rule, half to each
                    rules.pre(m.drop1, scale_input(0.5))
                elif _home(m).startswith("transformers.") and kind.endswith("SwiGLUFFN"):  # the same, in DINOv2
                    rules.pre(m.down_proj, scale_input(0.5))
                elif _is(m, "timm.models.beit", "RelativePositionBias"):  # shared by every block: see _attention_rules
                    rules.forward(m, scale_output(2.0))
            # after the norm rules: a norm rule rebuilds its output from its input, so a hook on the same
            # module (timm's q_norm) must run after it to act on the rebuilt output
            for m in modules:
                if _is_attention(m):
                    _attention_rules(m, rules)
            yield
        finally:
            rules.undo()


def attnlrp_details(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                    *, gamma: float = 0.0, conv_gamma: float = 0.0) -> LRPResult:
    """AttnLRP relevance of ``target`` (default: the predicted class) per pixel and per token cell
    (``gamma``, ``conv_gamma``: see :func:`lrp_rules`)."""
    check_images(x)
    adapter = adapter_for(model)
    why = refusal(adapter)
    if why is not None:
        raise ExplainError(why)
    _check_gammas(gamma, conv_gamma)
    tokens = adapter.final_tokens(x.shape[-2], x.shape[-1])  # refuses sizes the model does not take
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), lrp_rules(adapter, gamma=gamma, conv_gamma=conv_gamma):
        logits = adapter.model(x)  # (B, classes)
        if isinstance(logits, (tuple, list)):
            raise ExplainError(f"{type(adapter.model).__name__} returned {len(logits)} outputs; call model.eval().")
        t = resolve_target(target, logits)  # (B,)
        score = logits.gather(1, t[:, None]).sum()  # images are independent in eval mode
        (grad,) = torch.autograd.grad(score, x)
    pixels = (x.detach() * grad).sum(dim=1)  # (B, H, W): relevance = input x modified gradient
    (gh, gw), (ch, cw) = tokens.grid, tokens.cell
    cells = pixels[:, :gh * ch, :gw * cw].reshape(x.shape[0], gh, ch, gw, cw)  # pixels past the grid get none
    return LRPResult(pixels=pixels, grid=cells.sum(dim=(2, 4)), logits=logits.detach(), target=t,
                     cell=(int(ch), int(cw)))


def attnlrp(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None, *,
            per: str = "token", gamma: float = 0.0, conv_gamma: float = 0.0) -> torch.Tensor:
    """AttnLRP relevance of ``target``'s logit on images ``x`` (B, C, H, W), signed, not normalised.

    ``per="token"``: (B, gh, gw), the relevance of each token cell (the sum over its pixels);
    ``per="pixel"``: (B, H, W), summed over channels. Summed over the image it is the logit minus
    what biases, embeddings and the softmax rule absorb (see the module docs). ``gamma`` /
    ``conv_gamma``: the LRP-gamma rule on linear layers / convolutions (see :func:`lrp_rules`).
    """
    if per not in ("token", "pixel"):
        raise ExplainError(f"per must be 'token' or 'pixel', got {per!r}.")
    res = attnlrp_details(model, x, target, gamma=gamma, conv_gamma=conv_gamma)
    return res.grid if per == "token" else res.pixels
