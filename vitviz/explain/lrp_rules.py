"""AttnLRP's rules as autograd functions and module hooks, in the gradient x input form.

Each rule keeps the forward value of the operation it covers and changes only its backward pass, so
that ``input * modified gradient`` is the relevance the paper's rule gives (Achtibat et al., ICML 2024).
:mod:`vitviz.explain.attnlrp` decides which module of a model gets which rule, and puts them on with
:class:`vitviz.explain.hooks.Installed`, which undoes them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vitviz.errors import ExplainError

__all__ = ["ConstantRowSums", "CosineAttentionRules", "activation_rule", "gamma_rule", "group_norm_rule",
           "halve_gradient", "l2_rule", "norm_rule", "scale_input", "scale_output", "scale_returned"]

RMS_NORMS = {"RmsNorm", "RMSNorm"}


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


class _L2Identity(torch.autograd.Function):
    """``x / max(||x||, eps)`` over axis ``dim`` with the norm a constant: the gradient divided by it.

    The identity rule for an L2 normalisation (a CLIP embedding before the cosine similarity, the q and k
    of cosine attention): the relevance x * g / ||x|| = y * g passes through whole.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x.norm(dim=dim, keepdim=True).clamp_min(eps))  # x's shape, 1 along dim
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (norm,) = ctx.saved_tensors
        return grad / norm, None, None, None


class CosineAttentionRules(TorchFunctionMode):
    """Inside a cosine attention's forward (Swin-V2, XCiT): every ``F.normalize`` (of q and of k) gets the
    identity rule of the L2 normalisation, and half the gradient (the uniform rule on ``q @ k^T``).

    The forward values are ``F.normalize``'s own.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.normalize:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 2.0)
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
            eps = kwargs.get("eps", args[3] if len(args) > 3 else 1e-12)
            if p != 2:
                raise ExplainError(f"AttnLRP's rule covers the L2 normalisation of cosine attention, not p={p}.")
            out = _L2Identity.apply(x, out.detach(), float(eps), int(dim))
            out = _ScaleGradient.apply(out, torch.tensor(0.5, dtype=out.dtype, device=out.device))
        return out


class ConstantRowSums(TorchFunctionMode):
    """Inside ConViT's gated attention: the sum its mixed attention is divided by is a constant.

    Each row mixes two softmax rows, so it already sums to one; under plain gradients the division
    (homogeneous of degree 0) would absorb every unit of relevance reaching it. Held constant, it passes
    the relevance through whole (the identity rule). Forward values are unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out.detach() if func in (torch.Tensor.sum, torch.sum) else out


def gamma_rule(gamma: float, eps: float = 1e-6) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    """Forward hook for a Linear or convolution: the generalised LRP-gamma rule (Montavon et al. 2019; in the
    form of Andeol et al. 2021 for inputs of either sign, as zennit's ``Gamma`` computes it).

    Outputs z > 0 share their relevance by ``x+ (w + gamma w+) + x- (w + gamma w-)`` (bias ``b + gamma b+``),
    outputs z < 0 by ``x+ (w + gamma w-) + x- (w + gamma w+)`` (bias ``b + gamma b-``): contributions of the
    output's sign are favoured, which takes noise out of the maps. Each denominator is stabilised by ``eps``
    with its sign. gamma = 0 is the epsilon rule. Forward: the module's own output.
    """
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        w, b = module.weight, module.bias
        up, down = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        b_up = None if b is None else b + gamma * b.clamp(min=0)
        b_down = None if b is None else b + gamma * b.clamp(max=0)
        pos, neg = x.clamp(min=0), x.clamp(max=0)
        apply = _layer_op(module)
        z_pos = apply(pos, up, b_up) + apply(neg, down, None)  # the output's shape: shares of z > 0
        z_neg = apply(pos, down, b_down) + apply(neg, up, None)  # shares of z < 0
        z = output.detach()

        def ratio(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            d = d.detach()
            return (z * keep / (d + eps * torch.where(d >= 0, 1.0, -1.0))).to(z.dtype)

        share = z_pos * ratio(z_pos, z > 0) + z_neg * ratio(z_neg, z < 0)
        return z + (share - share.detach())  # value z; gradient x input = the gamma rule's relevance
    return hook


def _layer_op(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The module's own linear map with other parameters: F.linear, or the convolution with its stride,
    padding, dilation and groups."""
    if isinstance(module, nn.Linear):
        return F.linear
    if type(module) in (nn.Conv1d, nn.Conv2d):  # subclasses (weight standardisation, 'same' padding) compute more
        return module._conv_forward
    raise ExplainError(f"the gamma rule covers Linear layers and plain convolutions, not {type(module).__name__}; "
                       "set its gamma to 0 for this model.")


def group_norm_rule(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook for a GroupNorm (timm's ``GroupNormAct`` included: group norm, then an activation).

    The identity rule on the normalisation, as for LayerNorm: the centring over each group and the affine map
    stay linear, the group's 1/std is a constant; an activation after it gets the identity rule too
    (its gradient is scaled by act(z) / z). Forward: the module's own output.
    """
    x = inputs[0]  # (B, C, ...)
    b, c, groups = x.shape[0], x.shape[1], module.num_groups
    grouped = x.reshape(b, groups, -1)  # (B, G, C/G * spatial)
    var, mean = torch.var_mean(grouped.detach(), dim=-1, keepdim=True, correction=0)  # (B, G, 1) each
    centred = (grouped - grouped.mean(-1, keepdim=True)) * torch.rsqrt(var + module.eps)  # (B, G, C/G * spatial)
    shape = (1, c) + (1,) * (x.ndim - 2)
    z = centred.reshape(x.shape)  # (B, C, ...)
    if module.weight is not None:
        z = z * module.weight.reshape(shape) + module.bias.reshape(shape)
    ratio = (output.detach() / z.detach()).nan_to_num_(0.0, 0.0, 0.0)  # the activation's act(z) / z, 1 if none
    return output.detach() + (z - z.detach()) * ratio


def norm_rule(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the norm's own output, with the identity rule's gradient (:class:`_NormIdentity`)."""
    x = inputs[0]
    rms = type(module).__name__ in RMS_NORMS
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or torch.finfo(x.dtype).eps
    return _NormIdentity.apply(x, output.detach(), getattr(module, "weight", None), getattr(module, "bias", None),
                               float(eps), rms)


def activation_rule(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: an elementwise activation's output, with the identity rule's gradient."""
    return _IdentityRule.apply(inputs[0], output.detach())


def l2_rule(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook for an L2-normalising module: its output, with the norm held constant backward."""
    return _L2Identity.apply(inputs[0], output.detach(), float(getattr(module, "eps", 1e-12)))


def halve_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x``, its gradient times ``scale`` (a 0-dim tensor): the uniform rule's halving inside a forward."""
    return _ScaleGradient.apply(x, scale)


def scale_output(scale: float | torch.Tensor) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    """Forward hook: the module's output, its gradient times ``scale`` (a number or a (D,) vector)."""
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(scale, dtype=output.dtype, device=output.device)
        return _ScaleGradient.apply(output, s)
    return hook


def scale_input(scale: float | torch.Tensor) -> Callable[[nn.Module, tuple], tuple]:
    """Forward pre-hook: the module's first input, its gradient times ``scale`` (a number or a (D,) vector)."""
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        s = torch.as_tensor(scale, dtype=inputs[0].dtype, device=inputs[0].device)
        return (_ScaleGradient.apply(inputs[0], s),) + tuple(inputs[1:])
    return hook


def scale_returned(fn: Callable[[], torch.Tensor], scale: float) -> Callable[[], torch.Tensor]:
    """``fn`` (a method taking no arguments) whose returned tensor's gradient is times ``scale``, when called in
    the current thread (another thread sharing the model gets ``fn``'s own tensor)."""
    owner = threading.get_ident()

    def wrapped() -> torch.Tensor:
        out = fn()
        if threading.get_ident() != owner:
            return out
        return _ScaleGradient.apply(out, torch.tensor(scale, dtype=out.dtype, device=out.device))
    return wrapped
