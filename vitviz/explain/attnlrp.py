"""AttnLRP (Achtibat et al., ICML 2024): layer-wise relevance propagation through attention, for plain ViTs.

Relevance starts as the explained logit and flows back to the pixels, layer by layer, by the paper's rules:

==========================================  ===============================================================
operation                                   rule, and how it is obtained here
==========================================  ===============================================================
linear layers, patch projection, head       epsilon rule (epsilon -> 0, bias absorbs): plain gradient x input
residual additions, pooling, position add   epsilon rule, as linear maps (position embeddings absorb)
LayerNorm / RMSNorm                         identity rule on the normalisation: the std is a constant
                                            (detached), the centring and affine parts stay linear (Prop. 3.4)
GELU, SiLU, ... (elementwise)               identity rule (Eq. 9): gradient scaled by f(x) / x
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
values are bit-identical to a plain forward pass, so the explained logit is the model's own.

Why not the ``lxt`` package: its efficient patches (``lxt.efficient``) replace *class* methods of
Hugging Face and torchvision modules for the whole process, with no undo, and cover neither timm's
``VisionTransformer`` nor vitviz's ViT (its torchvision ViT map uses CP-LRP, not AttnLRP, inside
attention); and ``import lxt.efficient`` fails with transformers 5 (its BERT map imports a module that
transformers 5 removed). A dashboard that explains several models at once in threads needs per-call,
per-instance rules that are always removed. The tests check this module against ``lxt``'s explicit rules
(``lxt.explicit.functional``) composed by hand into the same network.

Conservation: every rule above is conservative except where the paper says relevance is absorbed:
biases (linear, LayerNorm, head), additive embeddings (position embeddings, class and register
tokens, which are not pixels) and the softmax rule, whose Taylor expansion at x has a bias term that
keeps ``sum_i R_i - sum_i x_i (R_i - s_i sum_j R_j)`` per query row. So the relevance summed over the
pixels is the logit minus these absorbed parts, exactly (to float rounding); how far it is from the
logit depends on the model (with small attention scores, most relevance reaching the attention
weights is absorbed by the softmax).

Covered: vitviz's ``VisionTransformer`` and timm's ``VisionTransformer`` (pre-norm ``Block``,
``ResPostBlock``, ``ParallelThingsBlock``; class-token, distillation, mean and max readouts; layer
scale, registers, qk-norm). Other models are refused with the reason (:func:`refusal`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter, adapter_for
from vitviz.explain.layout import check_images, resolve_target

__all__ = ["LRPResult", "attnlrp", "attnlrp_details", "lrp_rules", "refusal"]

_ADAPTERS = ("vitviz-vit", "timm-vit")  # adapter names whose models this module can cover
# Modules that are linear maps (or identities in eval), so plain gradient x input is their LRP rule.
_LINEAR = {"Linear", "Dropout", "Identity", "DropPath", "LayerScale", "PatchDropout"}
# Containers whose forward only composes covered children with additions, concatenation and pooling.
_CONTAINERS = {"ModuleList", "Sequential", "Mlp", "PatchEmbed", "VisionTransformer", "VisionTransformerDistilled"}
# Blocks and attention by where they are defined: other timm families reuse these class names for other maths.
_BLOCKS = {"Block", "ResPostBlock", "ParallelThingsBlock"}
_HOMES = ("timm.models.vision_transformer", "timm.layers.attention", "vitviz.models.layers")
_ACTIVATIONS = {"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "ReLU", "Tanh"}
_RMS_NORMS = {"RmsNorm", "RMSNorm"}
_ALTERNATIVES = "use method='chefer' (gradient-weighted relevance) or 'gradcam'"


@dataclass
class LRPResult:
    """AttnLRP relevance of one batch with what produced it."""

    pixels: torch.Tensor  # (B, H, W) relevance per pixel, summed over channels; signed
    grid: torch.Tensor  # (B, gh, gw) relevance per token cell (sum of its pixels); signed
    logits: torch.Tensor  # (B, classes) of the same forward pass
    target: torch.Tensor  # (B,) class explained
    cell: tuple[int, int]  # pixels one grid cell covers


# --- the rules as autograd functions ------------------------------------------------------------------

class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward (the uniform rule's halving)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class _IdentityRule(torch.autograd.Function):
    """Forward: the activation's own output ``y = f(x)``; backward: gradient times ``f(x) / x``.

    Then x * dR/dx = x * (y / x) * dR/dy = y * dR/dy: all relevance passes to the input (Eq. 9).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # 0 / 0 where x is 0: relevance y * dR/dy is 0 there for every activation covered (f(0) = 0)
        ctx.save_for_backward((y / x).nan_to_num_(0.0, 0.0, 0.0))
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _NormIdentity(torch.autograd.Function):
    """LayerNorm / RMSNorm over the last axis with the normalising 1/std a constant (identity rule, Prop. 3.4).

    Forward: the module's own output. Backward: the gradient of ``w * (x - mean) / std + b`` (LayerNorm) or
    ``w * x / rms`` (RMSNorm) with std / rms held fixed: linear in x, so gradient x input is the epsilon
    rule on the centring and the affine map, and the bias absorbs its share.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None,  # type: ignore[override]
                bias: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor:
        if rms:
            mean = None
            inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        else:
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)  # (..., 1) each
            inv = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, inv, weight)
        ctx.has_bias = bias is not None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, mean, inv, weight = ctx.saved_tensors
        gw = grad if weight is None else grad * weight  # (..., D)
        gx = gw * inv if mean is None else (gw - gw.mean(-1, keepdim=True)) * inv
        d = x.shape[-1]
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[2]:
            normed = x * inv if mean is None else (x - mean) * inv  # (..., D)
            grad_w = (grad * normed).reshape(-1, d).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad.reshape(-1, d).sum(0)
        return gx, None, grad_w, grad_b, None, None


def _norm_rule(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The norm's own output, with the identity rule's gradient (:class:`_NormIdentity`)."""
    x = inputs[0]
    rms = type(module).__name__ in _RMS_NORMS
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # torch's RMSNorm default
    return _NormIdentity.apply(x, output.detach(), getattr(module, "weight", None), getattr(module, "bias", None),
                               float(eps), rms)


def _activation_rule(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(inputs[0], output.detach())


def _qkv_rule(scale: torch.Tensor):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return _ScaleGradient.apply(output, scale.to(output.dtype))  # (B, N, 3 * attn_dim)
    return hook


def _halve_input(_module: nn.Module, inputs: tuple) -> tuple:
    half = torch.tensor(0.5, dtype=inputs[0].dtype, device=inputs[0].device)
    return (_ScaleGradient.apply(inputs[0], half),) + tuple(inputs[1:])


def _halve_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _ScaleGradient.apply(output, torch.tensor(0.5, dtype=output.dtype, device=output.device))


def _attention_rules(m: nn.Module) -> list:
    """Hooks putting the uniform rule on an attention's two matmuls, right at their factors and product.

    q @ k^T: the gradient at q and k is halved (after timm's q_norm / k_norm, whose biases then absorb
    at full strength); attn @ v: the gradient at the product is halved, which halves it at both factors.
    """
    q_norm, k_norm = getattr(m, "q_norm", None), getattr(m, "k_norm", None)
    if isinstance(q_norm, nn.Module) and isinstance(k_norm, nn.Module):  # timm: q, k leave through these
        handles = [q_norm.register_forward_hook(_halve_output), k_norm.register_forward_hook(_halve_output)]
    else:  # vitviz: q, k are the first two thirds of the qkv projection's output
        d = m.qkv.out_features // 3
        scale = torch.cat([torch.full((2 * d,), 0.5), torch.ones(d)]).to(m.qkv.weight.device)  # (3 * d,)
        handles = [m.qkv.register_forward_hook(_qkv_rule(scale))]
    # the attention output enters timm's scale norm (an Identity by default), else the projection
    after = m.norm if isinstance(getattr(m, "norm", None), nn.Module) else m.proj
    handles.append(after.register_forward_pre_hook(_halve_input))
    return handles


# --- which models ------------------------------------------------------------------------------------

def _origin(module: nn.Module) -> str:
    return type(module).__module__.split(".")[0]


def _unsupported(model: nn.Module) -> str | None:
    """The first module AttnLRP has no rule for, described, or None when every module is covered."""
    for name, m in model.named_modules():
        kind, origin = type(m).__name__, _origin(m)
        if origin not in ("torch", "timm", "vitviz"):
            return f"{name or 'the model'} ({kind}) is not a torch, timm or vitviz module"
        if kind in _LINEAR or kind in _CONTAINERS or kind in _ACTIVATIONS or kind in _RMS_NORMS:
            continue
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                return f"{name} normalises over {tuple(m.normalized_shape)}, not the channels only"
            continue
        if isinstance(m, nn.Conv2d) and name.endswith("patch_embed.proj"):
            continue  # the patch projection: a linear map of each patch
        if kind in _BLOCKS and type(m).__module__ in _HOMES:
            continue
        if kind == "Attention" and type(m).__module__ in _HOMES:
            if getattr(m, "gate", None) is not None:
                return f"{name} gates its output with a sigmoid, which has no rule here"
            if not (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)):
                return f"{name} has no fused qkv and proj projections"
            continue
        return f"{name} ({kind}) has no AttnLRP rule here"
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
    if adapter.family == "hybrid":
        return (f"{what} has a CNN stem (convolutions, batch norm, pooling): AttnLRP's rules cover the transformer, "
                f"and LRP through a CNN stem needs rules of its own; {_ALTERNATIVES}.")
    if adapter.name not in _ADAPTERS:
        return (f"AttnLRP in vitviz covers plain ViTs (vitviz's VisionTransformer and timm's VisionTransformer); "
                f"{what} ({adapter.name}) has layers without rules here; {_ALTERNATIVES}.")
    why = _unsupported(adapter.model)
    if why is not None:
        return f"AttnLRP cannot run on this {what}: {why}; {_ALTERNATIVES}."
    return None


# --- the rules in place for one call -------------------------------------------------------------------

@contextmanager
def lrp_rules(model: nn.Module | Adapter) -> Iterator[None]:
    """Inside the block, a backward pass of ``model`` computes AttnLRP (gradient x input = relevance).

    ExplainError (with the reason) for a model :func:`refusal` refuses. On exit, also after an
    exception, every hook is removed: the model is as it was.
    """
    adapter = adapter_for(model)
    why = refusal(adapter)
    if why is not None:
        raise ExplainError(why)
    handles = []
    try:
        modules = list(adapter.model.modules())
        for m in modules:
            kind = type(m).__name__
            if isinstance(m, nn.LayerNorm) or kind in _RMS_NORMS:
                handles.append(m.register_forward_hook(_norm_rule))
            elif kind in _ACTIVATIONS:
                handles.append(m.register_forward_hook(_activation_rule))
        # after the norm rules: a norm rule rebuilds its output from its input, so a hook on the same
        # module (timm's q_norm) must run after it to act on the rebuilt output
        for m in modules:
            if type(m).__name__ == "Attention" and type(m).__module__ in _HOMES:
                handles += _attention_rules(m)
        yield
    finally:
        for h in handles:
            h.remove()


def attnlrp_details(model: nn.Module, x: torch.Tensor,
                    target: int | Sequence[int] | torch.Tensor | None = None) -> LRPResult:
    """AttnLRP relevance of ``target`` (default: the predicted class) per pixel and per token cell."""
    check_images(x)
    adapter = adapter_for(model)
    why = refusal(adapter)
    if why is not None:
        raise ExplainError(why)
    tokens = adapter.final_tokens(x.shape[-2], x.shape[-1])  # refuses sizes the model does not take
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), lrp_rules(adapter):
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
            per: str = "token") -> torch.Tensor:
    """AttnLRP relevance of ``target``'s logit on images ``x`` (B, C, H, W), signed, not normalised.

    ``per="token"``: (B, gh, gw), the relevance of each token cell (the sum over its pixels);
    ``per="pixel"``: (B, H, W), summed over channels. Summed over the image it is the logit minus
    what biases, embeddings and the softmax rule absorb (see the module docs).
    """
    if per not in ("token", "pixel"):
        raise ExplainError(f"per must be 'token' or 'pixel', got {per!r}.")
    res = attnlrp_details(model, x, target)
    return res.grid if per == "token" else res.pixels
