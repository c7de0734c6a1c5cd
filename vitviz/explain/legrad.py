"""LeGrad (Bousselham et al. 2024, "LeGrad: An Explainability Method for Vision Transformers via Feature
Formation Sensitivity").

Every layer's output tokens ``z_l`` are read by the model's own head (final norm, pooling, classifier),
which gives a class score ``s_l`` per layer; the last layer's is the model's logit. Per layer:

* self-attention readout (class token, mean pool, ...): ``E_l = mean_queries(mean_heads(ReLU(d s_l / d A_l)))``,
  with ``A_l`` that layer's attention weights (B, heads, N, N), so ``E_l`` has one value per key token;
* attention-pool readout (SigLIP's ``map`` pooling): ``z_l`` goes through the model's attention pool,
  and ``E_l = mean_heads(ReLU(d s_l / d P_l))[first latent]`` with ``P_l`` the pool's own attention over
  the tokens (B, heads, latents, N), as in the authors' SigLIP code.

The map is ``sum_l E_l`` over the grid tokens (the authors sum, then min-max normalise). The authors'
text-prompt correction for SigLIP (subtracting an empty prompt's map) needs a text tower and is left
out: a classifier's score has no empty prompt. One forward pass; one partial backward per layer
(through the head and that layer only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import Adapter, adapter_for
from vitviz.explain.hooks import this_thread
from vitviz.explain.layout import check_images, resolve_target
from vitviz.explain.registry import MapResult

__all__ = ["LeGradResult", "legrad", "pool_forward", "refusal", "run_legrad"]

# Adapters whose models run blocks -> norm -> forward_head (our ViT; timm ViT, EVA, BEiT): a layer's
# tokens can be read by the head as the last layer's are.
_ADAPTERS = ("vitviz-vit", "timm-vit", "timm-eva", "timm-beit")
# Adapters of one flat stack of layers whose logit lens (``layer_logits``) is the model's own head on any
# layer's tokens: Hugging Face ViT-style classifiers and CLIP over prompts (the tower's pooling, projection
# and the prompt similarity).
_LENS_ADAPTERS = ("hf-vit", "clip-prompts")


@dataclass
class LeGradResult:
    """LeGrad maps of one batch with what produced them."""

    maps: torch.Tensor  # (B, gh, gw) sum over layers of the positive gradients, not normalised
    logits: torch.Tensor  # (B, classes)
    target: torch.Tensor  # (B,)
    cell: tuple[int, int]
    per_layer: torch.Tensor  # (L, B, gh, gw) each layer's E_l, layers from start_layer on


def refusal(model: nn.Module | Adapter) -> str | None:
    """Why LeGrad is not defined for ``model`` (with what to use instead), or None."""
    adapter = adapter_for(model)
    m, what = adapter.model, type(adapter.model).__name__
    if adapter.kind != "transformer":
        return f"LeGrad differentiates attention, and {what} is a CNN; use method='gradcam'."
    if adapter.name in _LENS_ADAPTERS and adapter.readout_kind() != "pool":
        return None
    if adapter.name not in _ADAPTERS or not all(hasattr(m, a) for a in ("blocks", "norm", "forward_head")):
        return (f"LeGrad reads every layer's tokens through the model's head, which vitviz does for plain ViTs "
                f"(blocks, then norm, then head); {what} ({adapter.name}) changes its tokens between stages or "
                "reads them otherwise; use method='chefer' or 'gradcam'.")
    return None


def run_legrad(_method: str, adapter: Adapter, x: torch.Tensor, p: dict[str, Any]) -> MapResult:
    """The registry's runner for LeGrad."""
    res = legrad(adapter, x, target=p["target"], start_layer=p["start_layer"])
    return MapResult(res.maps, res.maps, res.logits, res.target, res.cell)


def pool_forward(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``AttentionPoolLatent`` on tokens x (B, N, D) with its attention kept: (output, (B, heads, L, N)).

    The same computation as the pool's own forward on its explicit path, so the attention the score is
    differentiated by is the one the output was made with.
    """
    b, n, c = x.shape
    if getattr(pool, "pos_embed", None) is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    q = pool.q_norm(q.transpose(1, 2))  # (B, heads, L, hd)
    k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    k = pool.k_norm(k)  # (B, heads, N, hd)
    attn = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, L, N)
    out = (attn @ v).transpose(1, 2).reshape(b, pool.latent_len, c)  # (B, L, D)
    out = pool.proj_drop(pool.proj(out))
    if getattr(pool, "mlp", None) is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        out = out[:, 0]
    elif pool.pool == "avg":
        out = out.mean(1)
    return out, attn


def _block_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # our blocks return (tokens, weights)


def _pooled_head(m: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]:
    """Tokens -> (logits, pool attention, prefix columns in it) through a timm ViT's attention pool."""
    prefix = int(m.num_prefix_tokens)

    def head(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        z = m.norm(z)  # (B, N, D)
        drop = 0 if getattr(m, "pool_include_prefix", False) else prefix
        pooled, attn = pool_forward(m.attn_pool, z[:, drop:])  # (B, D), (B, heads, L, N - drop)
        logits = m.head(m.head_drop(m.fc_norm(pooled)))  # (B, classes)
        return logits, attn, prefix - drop

    return head


def legrad(model: nn.Module | Adapter, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
           start_layer: int = 0) -> LeGradResult:
    """LeGrad of ``target`` (default: the predicted class) over the layers from ``start_layer`` on."""
    check_images(x)
    adapter = adapter_for(model)
    why = refusal(adapter) or adapter.refusal("chefer")
    if why is not None:
        raise ExplainError(why)
    if not adapter.has_head:
        raise ExplainError(f"LeGrad explains a class score, and {type(adapter.model).__name__} has no classifier "
                           "head (it returns features); use 'attention', 'rollout' or 'similarity'.")
    m = adapter.model
    modules, head = _layers_and_head(adapter)
    depth = len(modules)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not -depth <= start_layer < depth:
        raise ExplainError(f"start_layer {start_layer!r} is out of range for a model with {depth} layers "
                           f"(use 0..{depth - 1}, or -{depth}..-1 from the end).")
    start = start_layer % depth
    tokens = adapter.final_tokens(x.shape[-2], x.shape[-1])
    pooled = adapter.readout_kind() == "pool"
    outputs: dict[int, torch.Tensor] = {}
    keep = [this_thread(lambda _m, _i, out, i=i: outputs.__setitem__(i, _block_output(out)))
            for i in range(len(modules))]
    handles = [blk.register_forward_hook(keep[i]) for i, blk in enumerate(modules) if i >= start]
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    try:
        with torch.enable_grad():
            if pooled:  # the pool's attention is recomputed per layer; the blocks keep their fused kernel
                logits, records = m(x), []
            else:
                logits, rec = adapter.record_forward(x)
                records = rec.records
            if isinstance(logits, (tuple, list)):
                raise ExplainError(f"{type(m).__name__} returned {len(logits)} outputs; call model.eval() first.")
            t = resolve_target(target, logits)  # (B,)
            attn = {r.block: r.weights for r in records if r.token_attention}
            per_layer = []
            for i in range(start, depth):
                per_layer.append(_layer_map(m, head, outputs[i], attn.get(i), t, tokens.prefix, pooled))
    finally:
        for h in handles:
            h.remove()
    stacked = torch.stack(per_layer)  # (L, B, P)
    b = x.shape[0]
    stacked = stacked.reshape(len(per_layer), b, *tokens.grid)  # (L, B, gh, gw)
    return LeGradResult(maps=stacked.sum(dim=0), logits=logits.detach(), target=t, cell=tokens.cell,
                        per_layer=stacked)


def _layers_and_head(adapter: Adapter) -> tuple[list[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """The modules whose outputs are the layers' tokens (one per attention layer, in order), and the head that
    reads a layer's tokens (B, N, D) as the model reads its last layer's, giving (B, classes)."""
    m = adapter.model
    if adapter.name in _LENS_ADAPTERS:
        return [layer.module for layer in adapter.layers()], lambda z: adapter.layer_logits(z, 0)
    return list(m.blocks), lambda z: m.forward_head(m.norm(z))


def _layer_map(m: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
               weights: torch.Tensor | None, t: torch.Tensor, prefix: int, pooled: bool) -> torch.Tensor:
    """E_l over the grid tokens (B, P) for one layer's output tokens z (B, N, D)."""
    if pooled:
        logits, attn, pool_prefix = _pooled_head(m)(z)
        score = logits.gather(1, t[:, None]).sum()  # images are independent in eval mode
        (g,) = torch.autograd.grad(score, attn, retain_graph=True)  # (B, heads, L, N')
        return g.clamp(min=0).mean(dim=1)[:, 0, pool_prefix:].detach()  # (B, P): first latent's row
    if weights is None:
        raise ExplainError("LeGrad found a block without recorded attention; use method='chefer' or 'gradcam'.")
    logits = head(z)  # (B, classes): the head reads this layer's tokens
    score = logits.gather(1, t[:, None]).sum()
    (g,) = torch.autograd.grad(score, weights, retain_graph=True, allow_unused=True)  # (B, heads, N, N)
    if g is None:
        g = torch.zeros_like(weights)
    return g.clamp(min=0).mean(dim=1).mean(dim=1)[:, prefix:].detach()  # (B, P): mean over heads, then queries
