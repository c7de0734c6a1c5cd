"""AttnLRP: conservation (every unit of relevance accounted for), parity with lxt's explicit rules, refusals,
and the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitviz
from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.explain.attnlrp import attnlrp, attnlrp_details, lrp_rules, refusal

# Additive parameters (pixels they are not): the relevance reaching them is absorbed, not passed on.
_ADDITIVE = ("bias", "pos_embed", "cls_token", "reg_token", "dist_token")


def randomize(model: nn.Module, seed: int = 0, bias: float = 0.1) -> nn.Module:
    """Random weights everywhere (heads start at zero; layer scale at 1e-5), additive parameters ~ N(0, bias^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if name.endswith(_ADDITIVE):
                p.copy_(noise * bias)
            elif p.ndim == 1:  # norm weights, layer scale: around 1
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)  # unit gain: attention scores of order 1
    return model.eval()


def our_vit(**kw) -> nn.Module:
    cfg = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4} | kw
    return vitviz.create_model("vit_p4_d8_32", **cfg)


def timm_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    cfg = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4,
           "qkv_bias": True} | kw
    return VisionTransformer(**cfg)


BUILDERS = {
    "ours": lambda: our_vit(),
    "ours-mean-registers-layerscale": lambda: our_vit(pooling="mean", reg_tokens=2, init_values=0.5),
    "timm-token": lambda: timm_vit(),
    "timm-mean-qknorm": lambda: timm_vit(global_pool="avg", class_token=False, qk_norm=True, init_values=0.5),
    "timm-respost-scalenorm": lambda: timm_vit(block_fn=_timm_block("ResPostBlock"), scale_attn_norm=True),
    "timm-parallel-max": lambda: timm_vit(block_fn=_timm_block("ParallelThingsBlock"), global_pool="max"),
    "timm-rmsnorm-silu": lambda: timm_vit(norm_layer=_rms_norm(), act_layer="silu", global_pool="avg"),
    "timm-distilled": lambda: _distilled(),
}


def _distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=4)


def _rms_norm() -> type:
    from timm.layers import RmsNorm

    return RmsNorm


def _timm_block(name: str) -> type:
    from timm.models import vision_transformer

    return getattr(vision_transformer, name)


def images(b: int = 2, seed: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def explained(res) -> torch.Tensor:
    return res.logits.gather(1, res.target[:, None])[:, 0]  # (B,)


# --- conservation: the relevance at the pixels + what the rules absorb = the logit -------------------------

def budget(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every share of the batch's summed target logits under the AttnLRP rules (gradient x input):

    pixels (sum of input x gradient), params (additive parameters x their gradient: biases, position
    embeddings, class/register tokens) and softmax (per query row, sum_i R_i - sum_i x_i (R_i - s_i sum_j R_j),
    what Prop. 3.1's bias term keeps; computed from the recorded softmax output s and its gradient).
    """
    adapter = adapter_for(model)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), lrp_rules(adapter):
        logits, rec = adapter.record_forward(x)  # attention weights (softmax outputs) stay in the graph
        target = logits.argmax(dim=-1)
        score = logits.gather(1, target[:, None]).sum()
        additive = [p for n, p in model.named_parameters() if n.endswith(_ADDITIVE)]
        weights = [r.weights for r in rec.records]
        grads = torch.autograd.grad(score, [x, *additive, *weights])
    gx, gp, gs = grads[0], grads[1:1 + len(additive)], grads[1 + len(additive):]
    softmax = torch.zeros((), dtype=x.dtype)
    for s, g in zip(weights, gs, strict=True):
        s = s.detach()
        r_out = s * g  # (B, heads, N, N) relevance of each attention weight
        scores = s.log()  # the softmax rule is shift-invariant per row: log s stands in for the scores
        r_in = scores * (r_out - s * r_out.sum(-1, keepdim=True))
        softmax = softmax + r_out.sum() - r_in.sum()
    return {"logit": score.detach(), "pixels": (x * gx).sum().detach(),
            "params": sum((p.detach() * g).sum() for p, g in zip(additive, gp, strict=True)), "softmax": softmax}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_relevance_is_conserved_up_to_what_biases_and_softmax_absorb(name):
    # float64: the identity holds to rounding, which is then ~1e-15 of the terms; 1e-9 leaves room for
    # the 1e-308 stabiliser of the identity rule and the log-softmax stand-in for the scores.
    model = randomize(BUILDERS[name]().double(), seed=1, bias=0.3)
    b = budget(model, images(dtype=torch.float64))
    total = b["pixels"] + b["params"] + b["softmax"]
    scale = max(abs(float(v)) for v in b.values())
    assert abs(float(total - b["logit"])) <= 1e-9 * scale, b
    # a test of the accounting: each share is a real part of the logit here
    assert abs(float(b["params"])) > 1e-3 * abs(float(b["logit"])) and abs(float(b["softmax"])) > 1e-6


@pytest.mark.parametrize("name", ["ours", "timm-token"])
def test_without_biases_only_the_softmax_absorbs(name):
    # Biases, position embeddings and the class token zero: nothing additive is left, so the pixels carry
    # the logit except the softmax rule's share (which AttnLRP does not conserve by design, Prop. 3.1).
    model = randomize(BUILDERS[name]().double(), seed=2, bias=0.0)
    b = budget(model, images(dtype=torch.float64))
    assert float(b["params"]) == 0.0
    assert abs(float(b["pixels"] + b["softmax"] - b["logit"])) <= 1e-9 * abs(float(b["logit"]))


@pytest.mark.parametrize("name", ["ours", "timm-token"])
def test_float32_relevance_matches_float64_and_the_bound(name):
    # What users run: float32. The pixels' sum sits within the absorbed shares of the logit (float64
    # accounting of the same weights); 1e-4 relative covers float32 rounding over two blocks.
    model = randomize(BUILDERS[name](), seed=1, bias=0.3)
    x = images()
    res = attnlrp_details(model, x)
    b = budget(model.double(), x.double())
    assert abs(float(res.pixels.sum()) - float(b["pixels"])) <= 1e-4 * max(abs(float(b["pixels"])), 1.0)
    gap = abs(float(res.pixels.sum() - explained(res).sum()))
    assert gap <= abs(float(b["params"])) + abs(float(b["softmax"])) + 1e-4 * abs(float(b["logit"]))
    model.float()


# --- parity with lxt's explicit rules on a hand-built two-block ViT ---------------------------------------

def lxt_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel relevance (B, C, H, W) from lxt's explicit AttnLRP rules, composed by hand into the same ViT
    (vitviz and timm share parameter names), float64, stabilisers at 1e-30 so that they do not matter."""
    from lxt.explicit import functional as lf
    from lxt.explicit.rules import identity

    eps = 1e-30

    def linear(t, layer):
        return lf.linear_epsilon_fn.apply(t, layer.weight, layer.bias, eps)

    def norm(t, layer):
        return lf.layer_norm_grad_fn.apply(t, layer.weight, layer.bias, layer.eps, eps)

    def add(a, b):
        return lf.add2_tensors_fn.apply(a, b, False, eps)

    x = x.detach().clone().requires_grad_(True)
    b, p = x.shape[0], model.patch_embed.proj.kernel_size[0]
    conv = model.patch_embed.proj
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, C*p*p), each pixel in one patch
    t = lf.linear_epsilon_fn.apply(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias, eps)
    prefix = getattr(model, "num_prefix_tokens", 1)
    t = torch.cat([model.cls_token.expand(b, -1, -1), t], dim=1)  # (B, 1+N, D)
    t = add(t, model.pos_embed.expand(b, -1, -1))
    for blk in model.blocks:
        a = blk.attn
        h = norm(t, blk.norm1)
        n = h.shape[1]
        qkv = linear(h, a.qkv).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
        scores = lf.matmul_fn.apply(lf.mul2(q, a.scale), k.transpose(-2, -1), False, eps)
        o = lf.matmul_fn.apply(lf.softmax(scores, -1), v, False, eps)  # (B, heads, N, hd)
        t = add(t, linear(o.transpose(1, 2).reshape(b, n, -1), a.proj))
        m = blk.mlp
        t = add(t, linear(identity(m.act, linear(norm(t, blk.norm2), m.fc1)), m.fc2))
    t = norm(t, model.norm)
    logits = linear(t[:, 0], model.head) if prefix else None  # class-token readout
    (relevance,) = torch.autograd.grad(logits, x, F.one_hot(target, logits.shape[-1]).to(logits) * logits)
    return relevance.detach()


@pytest.mark.parametrize("name", ["ours", "timm-token"])
def test_matches_lxt_explicit_rules(name):
    model = randomize(BUILDERS[name]().double(), seed=4, bias=0.3)
    x = images(dtype=torch.float64)
    ours = attnlrp(model, x, per="pixel")  # (B, H, W)
    target = model(x).argmax(-1)
    theirs = lxt_relevance(model, x, target).sum(1)  # (B, H, W)
    assert theirs.abs().max() > 1e-3  # a comparison of zeros would prove nothing
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9 * float(theirs.abs().max()))


# --- maps, targets, batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ours", "timm-token"])
def test_maps_vary_and_follow_the_target(name):
    model = randomize(BUILDERS[name](), seed=5)
    x = images(b=3)
    res = attnlrp_details(model, x)
    assert res.grid.shape == (3, 4, 4) and res.pixels.shape == (3, 16, 16) and res.cell == (4, 4)
    assert bool((res.grid.flatten(1).std(dim=1) > 1e-3 * res.grid.abs().flatten(1).max(dim=1).values).all())
    torch.testing.assert_close(res.grid.sum((1, 2)), res.pixels.sum((1, 2)), rtol=1e-5, atol=1e-6)
    other = (res.target + 1) % 4
    grid_other = attnlrp(model, x, target=other)
    assert not torch.allclose(grid_other, res.grid, rtol=1e-3, atol=1e-6)  # a class-specific map
    # images are independent: one image alone gets the map it gets in the batch
    torch.testing.assert_close(attnlrp(model, x[1:2], target=int(res.target[1])), res.grid[1:2], rtol=1e-4,
                               atol=1e-6)
    with torch.no_grad():  # works where the caller turned gradients off
        torch.testing.assert_close(attnlrp(model, x), res.grid)


def test_fused_and_explicit_attention_give_the_same_relevance():
    model = randomize(BUILDERS["timm-token"](), seed=6)
    x = images()
    fused = attnlrp(model, x, per="pixel")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    explicit = attnlrp(model, x, per="pixel")
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-6 * float(fused.abs().max()))


def test_bad_arguments_raise_explain_error():
    model = randomize(BUILDERS["ours"](), seed=7)
    with pytest.raises(ExplainError, match="per must be"):
        attnlrp(model, images(), per="patch")
    with pytest.raises(ExplainError, match="target"):
        attnlrp(model, images(), target=9)
    with pytest.raises(ExplainError, match="float batch"):
        attnlrp(model, images()[0])


# --- the model is left as it was --------------------------------------------------------------------------

def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def flags(model: nn.Module) -> list:
    return [(dict(m.__dict__).get("fused_attn", "class"), getattr(m, "fused_attn", None)) for m in model.modules()
            if type(m).__name__ == "Attention"]


@pytest.mark.parametrize("name", ["ours", "timm-token"])
def test_model_unchanged_after_a_call_and_after_a_failure(name):
    model = randomize(BUILDERS[name](), seed=8)
    x = images()
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags0, hooks0 = flags(model), hooks(model)
    attnlrp(model, x)
    assert hooks(model) == hooks0 and flags(model) == flags0
    assert all(p.grad is None for p in model.parameters())  # relevance is taken by autograd.grad, not .backward
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)

    def fail(*_args) -> None:
        raise RuntimeError("boom in block 1")

    handle = model.blocks[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attnlrp(model, x)
    finally:
        handle.remove()
    assert hooks(model) == hooks0 and flags(model) == flags0
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_forward_values_under_the_rules_are_the_models_own():
    model = randomize(BUILDERS["timm-mean-qknorm"](), seed=9)
    x = images()
    with torch.no_grad():
        plain = model(x)
    res = attnlrp_details(model, x)
    assert torch.equal(res.logits, plain)


# --- refusals ---------------------------------------------------------------------------------------------

def test_refuses_models_it_does_not_cover_with_the_reason():
    import timm

    cases = {
        "CNN": vitviz.create_model("resnet18_32", layers=(1, 1, 1), width=8, num_classes=5),
        "CNN stem": vitviz.create_model("hybrid_r18_vit_32", backbone_layers=(1, 1, 1), backbone_width=8,
                                        embed_dim=16, depth=1, num_heads=2, num_classes=5),
        "plain ViTs": timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                                        depths=(1, 1), num_heads=(1, 2), window_size=2, num_classes=3),
        "AttentionPoolLatent": timm_vit(global_pool="map", class_token=False),
        "no classifier head": timm_vit(num_classes=0),
        "GluMlp": timm_vit(mlp_layer=_glu()),
    }
    for words, model in cases.items():
        why = refusal(model.eval())
        assert why is not None and words in why, (words, why)
        with pytest.raises(ExplainError, match="AttnLRP"):
            attnlrp(model, torch.zeros(1, 3, 32 if words in ("CNN", "CNN stem", "plain ViTs") else 16,
                                       32 if words in ("CNN", "CNN stem", "plain ViTs") else 16))
    assert refusal(BUILDERS["ours"]()) is None and refusal(BUILDERS["timm-parallel-max"]()) is None


def _glu() -> type:
    from timm.layers import GluMlp

    return GluMlp
