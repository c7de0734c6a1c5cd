"""AttnLRP: conservation (every unit of relevance accounted for) on every covered family, parity with lxt's
explicit rules, the same maps from timm and Hugging Face for the same network, refusals, and the model left as
it was."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import vitviz
from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.explain.attnlrp import attnlrp, attnlrp_details, lrp_rules, refusal

# Additive parameters (pixels they are not): the relevance reaching them is absorbed, not passed on. The
# last ones: a relative position bias, an attention pool's latent query, and Hugging Face's embeddings.
_ADDITIVE = ("bias", "pos_embed", "cls_token", "reg_token", "dist_token", "bias_table", "latent",
             "position_embeddings", "register_tokens", "distillation_token", "class_embedding",
             "position_embedding.weight", "positional_embedding", "probe")


def randomize(model: nn.Module, seed: int = 0, bias: float = 0.1) -> nn.Module:
    """Random weights everywhere (heads start at zero; layer scale at 1e-5), additive parameters ~ N(0, bias^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.ndim == 0:  # a scalar the logits do not read (CLIP's own logit scale)
                continue
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
    "timm-map-pool": lambda: timm_vit(global_pool="map", class_token=False),  # SigLIP's attention pool
    "timm-glu": lambda: timm_vit(mlp_layer=_glu()),
    "eva-rope-swiglu-registers": lambda: _eva(use_rot_pos_emb=True, swiglu_mlp=True, num_reg_tokens=1),
    "eva-gated-attention": lambda: _eva_gated(),
    "eva-rope-avg-glu": lambda: _eva(use_rot_pos_emb=True, use_abs_pos_emb=False, class_token=False,
                                     global_pool="avg", swiglu_mlp=True, scale_mlp=True),
    "beit-relative-bias": lambda: _beit(use_rel_pos_bias=True, init_values=0.5),
    "beit-shared-bias-token": lambda: _beit(use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
                                            global_pool="token"),
    "hf-vit": lambda: _hf("ViT"),
    "hf-deit-teacher": lambda: _hf("DeiT", head="ForImageClassificationWithTeacher"),
    "hf-beit": lambda: _hf("Beit", use_relative_position_bias=True, use_mean_pooling=True,
                           layer_scale_init_value=0.5),
    "hf-dinov2-registers": lambda: _hf("Dinov2WithRegisters", num_register_tokens=2),
    "hf-dinov2-swiglu": lambda: _hf("Dinov2", use_swiglu_ffn=True),
    "hf-clip-prompts": lambda: _dual_prompts(),
    "timm-swin": lambda: _swin(),
    "hf-swin": lambda: _hf("Swin", embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=2),
}


def _swin() -> nn.Module:
    """Two stages of two blocks: the second block of each shifts its windows (and masks across the seam)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2,
                           num_classes=4)
# Hugging Face computes its eager softmax in float32 (then casts back), so its float64 accounting holds to
# float32 rounding of the attention weights.
HF_TOL = 1e-5


def _eva(**kw) -> nn.Module:
    from timm.models.eva import Eva

    cfg = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4,
           "qkv_bias": True} | kw
    return Eva(**cfg)


def _eva_gated() -> nn.Module:
    """EVA with a sigmoid-gated attention output (and its inner norm) in the second block."""
    from timm.models.eva import EvaAttention

    model = _eva()
    model.blocks[1].attn = EvaAttention(16, 2, qkv_bias=True, gated=True, norm_layer=nn.LayerNorm,
                                        scale_norm=True)
    return model


def _beit(**kw) -> nn.Module:
    from timm.models.beit import Beit

    cfg = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4} | kw
    return Beit(**cfg)


def _hf_config(kind: str, **kw):
    import transformers

    flat = {} if kind == "Swin" else {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                      "intermediate_size": 32}  # Swin takes per-stage lists instead
    cfg = getattr(transformers, f"{kind}Config")(image_size=16, patch_size=2 if kind == "Swin" else 4, **flat, **kw)
    cfg._attn_implementation = "eager"  # the accounting reads the softmax weights (SDPA never forms them)
    return cfg


def _hf(kind: str, head: str = "ForImageClassification", **kw) -> nn.Module:
    import transformers

    from vitviz.models.hf import HFImageModel

    hf = getattr(transformers, f"{kind}{head}")(_hf_config(kind, num_labels=4, **kw))
    return HFImageModel(hf.eval(), source="test", output="logits", preprocessing={})


def _dual_prompts(kind: str = "CLIP", **extra) -> nn.Module:
    """A Hugging Face CLIP (or SigLIP) image tower (with its projection, or SigLIP's attention-pool head) as a
    prompt classifier over 4 fixed text embeddings."""
    import transformers

    from vitviz.models.clip import PromptClassifier
    from vitviz.models.hf import HFImageModel

    text = getattr(transformers, f"{kind}TextConfig")(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=32, vocab_size=50)
    vision = _hf_config(f"{kind}Vision")
    config = getattr(transformers, f"{kind}Config")(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    **({"projection_dim": 8} if kind == "CLIP" else {}))
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    encoder = HFImageModel(getattr(transformers, f"{kind}Model")(config).eval(), source="test",
                           output="image_embeds", preprocessing={})
    width = 8 if kind == "CLIP" else 16  # the projection's size, or SigLIP's hidden size
    texts = torch.randn(4, width, generator=torch.Generator().manual_seed(11))  # (prompts, E)
    return PromptClassifier(encoder, lambda prompts: texts[:len(prompts)], ["a", "b", "c", "d"], logit_scale=10.0,
                            preprocessing={}, source="test", **extra)


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

class SoftmaxOutputs(TorchFunctionMode):
    """Every softmax output of the calls inside, still in the autograd graph (appended to ``outputs``)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.softmax, torch.Tensor.softmax, F.softmax):
            self.outputs.append(out)
        return out


@contextmanager
def pool_softmax(model: nn.Module, outputs: list[torch.Tensor]):
    """An attention pool's softmax weights (adapters record the blocks' attention, not the pool's own), on its
    explicit path for the call."""
    handles, pools = [], [m for m in model.modules() if type(m).__name__ == "AttentionPoolLatent"]
    for pool in pools:
        mode = SoftmaxOutputs(outputs)
        pool.fused_attn = False

        def enter(*_args, mode=mode) -> None:
            mode.__enter__()

        def leave(*_args, mode=mode) -> None:
            mode.__exit__(None, None, None)

        handles += [pool.register_forward_pre_hook(enter), pool.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for pool in pools:
            del pool.fused_attn  # back to the class's choice


def budget(model: nn.Module, x: torch.Tensor, **rules) -> dict[str, torch.Tensor]:
    """Every share of the batch's summed target logits under the AttnLRP rules (gradient x input):

    pixels (sum of input x gradient), params (additive parameters x their gradient: biases, position
    embeddings, class/register tokens) and softmax (per query row, sum_i R_i - sum_i x_i (R_i - s_i sum_j R_j),
    what Prop. 3.1's bias term keeps; computed from each softmax output s and its gradient).
    """
    adapter = adapter_for(model)
    x = x.detach().clone().requires_grad_(True)
    pooled: list[torch.Tensor] = []
    with torch.enable_grad(), lrp_rules(adapter, **rules), pool_softmax(model, pooled):
        logits, rec = adapter.record_forward(x)  # attention weights (softmax outputs) stay in the graph
    target = logits.argmax(dim=-1)
    score = logits.gather(1, target[:, None]).sum()
    additive = [p for n, p in model.named_parameters() if n.endswith(_ADDITIVE) and p.requires_grad]
    # each block's weights as its adapter records them: where the uniform rule's halving for q @ k^T sits at
    # the softmax output (timm's BEiT), the record is taken after it, as the weights enter attn @ v
    weights = [r.weights for r in rec.records] + [s for s in pooled if s.requires_grad]
    grads = torch.autograd.grad(score, [x, *additive, *weights], allow_unused=True)
    gx, gp, gs = grads[0], grads[1:1 + len(additive)], grads[1 + len(additive):]
    softmax = torch.zeros((), dtype=x.dtype)
    for s, g in zip(weights, gs, strict=True):
        if g is None:  # a softmax off the explained path
            continue
        s, g = s.detach().to(x.dtype), g.to(x.dtype)
        r_out = s * g  # (B, heads, N, N) relevance of each attention weight
        scores = s.log()  # the softmax rule is shift-invariant per row: log s stands in for the scores
        r_in = scores * (r_out - s * r_out.sum(-1, keepdim=True))
        softmax = softmax + r_out.sum() - r_in.sum()
    params = sum((p.detach() * g).sum() for p, g in zip(additive, gp, strict=True) if g is not None)
    return {"logit": score.detach(), "pixels": (x * gx).sum().detach(), "params": params, "softmax": softmax}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_relevance_is_conserved_up_to_what_biases_and_softmax_absorb(name):
    # float64: the identity holds to rounding, which is then ~1e-15 of the terms; 1e-9 leaves room for
    # the 1e-308 stabiliser of the identity rule and the log-softmax stand-in for the scores.
    model = randomize(BUILDERS[name]().double(), seed=1, bias=0.3)
    b = budget(model, images(dtype=torch.float64))
    total = b["pixels"] + b["params"] + b["softmax"]
    scale = max(abs(float(v)) for v in b.values())
    assert abs(float(total - b["logit"])) <= (HF_TOL if name.startswith("hf-") else 1e-9) * scale, b
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

SAMPLE = ["ours", "timm-token", "eva-rope-swiglu-registers", "beit-relative-bias", "timm-swin", "hf-vit",
          "hf-swin", "hf-clip-prompts"]


@pytest.mark.parametrize("name", SAMPLE)
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
    """Every instance attribute the rules may set, and each Hugging Face config's attention implementation."""
    return [(sorted(k for k in vars(m) if not k.startswith("_") or k == "_get_rel_pos_bias"),
             getattr(m, "fused_attn", None), getattr(getattr(m, "config", None), "_attn_implementation", None))
            for m in model.modules()]


def last_block(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if type(m).__name__.endswith(("Block", "Layer"))][-1]


@pytest.mark.parametrize("name", SAMPLE)
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

    handle = last_block(model).register_forward_hook(fail)
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
    cases = {
        "CNN": vitviz.create_model("resnet18_32", layers=(1, 1, 1), width=8, num_classes=5),
        "training mode": running_stats(MORE["vitviz-hybrid"][0]()).train(),
        "no classifier head": timm_vit(num_classes=0),
    }
    for words, model in cases.items():
        why = refusal(model if words == "training mode" else model.eval())
        assert why is not None and words in why, (words, why)
        with pytest.raises(ExplainError, match="AttnLRP"):
            attnlrp(model, torch.zeros(1, 3, *_size(model)))
    assert refusal(BUILDERS["ours"]()) is None and refusal(BUILDERS["timm-parallel-max"]()) is None
    assert all(refusal(build()) is None for build in BUILDERS.values())
    assert all(refusal(build().eval()) is None for build, _, _ in MORE.values())


def test_an_nn_multihead_attention_keeps_torchs_own_forward_outside_the_call_and_in_other_threads():
    import threading

    model = randomize(_open_clip_prompts(), seed=6)
    mha = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    x = images()
    seen = {}
    with lrp_rules(model):
        assert "forward" in vars(mha)  # the written-out forward, for this call
        other = threading.Thread(target=lambda: seen.update(out=mha(*(torch.randn(1, 5, 16),) * 3)[0]))
        other.start()
        other.join()
        out, weights = mha(*(torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)),) * 3)
    assert "forward" not in vars(mha) and seen["out"].shape == (1, 5, 16)
    theirs, their_weights = mha(*(torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)),) * 3)
    torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-6)  # the written-out forward is torch's
    torch.testing.assert_close(weights, their_weights, rtol=1e-5, atol=1e-6)
    assert attnlrp(model, x).shape == (2, 4, 4)


# --- one network, two implementations: the same relevance ---------------------------------------------------

def hf_vit_from_timm(model: nn.Module) -> nn.Module:
    """A Hugging Face ViTForImageClassification (SDPA attention) carrying a timm ViT's weights."""
    import transformers

    from vitviz.models.hf import HFImageModel

    d = model.embed_dim
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=d, num_hidden_layers=len(model.blocks),
                                 num_attention_heads=model.blocks[0].attn.num_heads, intermediate_size=4 * d,
                                 num_labels=model.num_classes, layer_norm_eps=1e-6, qkv_bias=True)
    hf = transformers.ViTForImageClassification(cfg).to(torch.float64).eval()
    t = model.state_dict()
    state = {"vit.embeddings.cls_token": t["cls_token"], "vit.embeddings.position_embeddings": t["pos_embed"],
             "vit.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
             "vit.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
             "vit.layernorm.weight": t["norm.weight"], "vit.layernorm.bias": t["norm.bias"],
             "classifier.weight": t["head.weight"], "classifier.bias": t["head.bias"]}
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for p in ("weight", "bias"):
            state[f"{dst}layernorm_before.{p}"] = t[f"{src}norm1.{p}"]
            state[f"{dst}layernorm_after.{p}"] = t[f"{src}norm2.{p}"]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{dst}attention.{name}.{p}"] = t[f"{src}attn.qkv.{p}"][j * d:(j + 1) * d]
            state[f"{dst}attention.o_proj.{p}"] = t[f"{src}attn.proj.{p}"]
            state[f"{dst}mlp.fc1.{p}"] = t[f"{src}mlp.fc1.{p}"]
            state[f"{dst}mlp.fc2.{p}"] = t[f"{src}mlp.fc2.{p}"]
    hf.load_state_dict(state, strict=True)
    return HFImageModel(hf, source="test", output="logits", preprocessing={})


def test_a_hugging_face_vit_with_a_timm_vits_weights_gets_the_same_relevance():
    # timm's rules sit at q_norm / k_norm and the fused kernel; Hugging Face's at q_proj / k_proj under SDPA
    timm_model = randomize(BUILDERS["timm-token"]().double(), seed=12, bias=0.3)
    hf_model = hf_vit_from_timm(timm_model)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x), timm_model(x), rtol=1e-10, atol=1e-12)  # one network
    ours, theirs = attnlrp(hf_model, x, per="pixel"), attnlrp(timm_model, x, per="pixel")
    assert theirs.abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10 * float(theirs.abs().max()))


def test_timms_beit_halving_at_the_softmax_equals_halving_at_q_and_k():
    # BEiT without position biases is a ViT: its explicit-path rule must give the ViT's relevance
    beit = randomize(_beit(use_abs_pos_emb=True, global_pool="token").double(), seed=13, bias=0.3)
    vit = timm_vit(global_pool="token", init_values=1.0).double().eval()
    t = beit.state_dict()
    state = {k: v for k, v in t.items() if not k.endswith(("q_bias", "v_bias", "k_bias", "gamma_1", "gamma_2"))
             and "relative_position" not in k}
    for i in range(len(beit.blocks)):
        attn = beit.blocks[i].attn
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias]) if attn.q_bias is not None \
            else torch.zeros(3 * 16, dtype=torch.float64)
        state[f"blocks.{i}.attn.qkv.bias"] = bias
        state[f"blocks.{i}.ls1.gamma"] = t[f"blocks.{i}.gamma_1"] if f"blocks.{i}.gamma_1" in t else torch.ones(16)
        state[f"blocks.{i}.ls2.gamma"] = t[f"blocks.{i}.gamma_2"] if f"blocks.{i}.gamma_2" in t else torch.ones(16)
    vit.load_state_dict(state, strict=True)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(beit(x), vit(x), rtol=1e-10, atol=1e-12)  # one network
    ours, theirs = attnlrp(beit, x, per="pixel"), attnlrp(vit, x, per="pixel")
    assert theirs.abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10 * float(theirs.abs().max()))


def _glu() -> type:
    from timm.layers import GluMlp

    return GluMlp


def _coverage_model(family: str) -> nn.Module:
    from vitviz.coverage import COVERAGE_MODELS, build

    return build(next(e for e in COVERAGE_MODELS if e.family == family))


def _size(model: nn.Module) -> tuple[int, int]:
    """An input size the model takes: its own when it says, else the tiny builds' 16 px (32 for our CNNs)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    if size is None:
        return (32, 32) if type(model).__module__.startswith("vitviz") else (16, 16)
    return (size, size) if isinstance(size, int) else tuple(size)


# --- families with convolutions, cosine attention, talking heads, gated attention ----------------------------
# Each is built tiny in float64 with the size it takes. Their budget reads every softmax (and, for Swin-V2, the
# sigmoid of its continuous position bias) as the model calls it, with every fused kernel off for the call.

def _timm(name: str, **kw) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=4, **kw)


def _cls(module: str, name: str, **kw) -> nn.Module:
    import importlib

    return getattr(importlib.import_module(f"timm.models.{module}"), name)(num_classes=4, **kw)


MORE = {  # name: (builder, input side, absorbing function outputs besides softmax)
    "timm-parallel-scaling": (lambda: timm_vit(block_fn=_timm_block("ParallelScalingBlock"), qk_norm=True), 16, ()),
    "cait-talking-heads": (lambda: _cls("cait", "Cait", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                        depth_token_only=1), 16, ()),
    "swin-v2-cosine": (lambda: _cls("swin_transformer_v2", "SwinTransformerV2", img_size=16, patch_size=2,
                                    embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2), 16, ("sigmoid",)),
    "pvt-v2-spatial-reduction": (lambda: _cls("pvt_v2", "PyramidVisionTransformerV2", depths=(1, 1),
                                              embed_dims=(16, 32), num_heads=(1, 2), sr_ratios=(2, 1),
                                              mlp_ratios=(2, 2)), 16, ()),
    "pvt-v2-linear": (lambda: _cls("pvt_v2", "PyramidVisionTransformerV2", depths=(1, 1), embed_dims=(16, 32),
                                   num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2), linear=True), 16, ()),
    "twins-svt": (lambda: _timm("twins_svt_small", img_size=16, patch_size=2, embed_dims=(16, 32), num_heads=(1, 2),
                                depths=(2, 1), sr_ratios=(2, 1), wss=(2, 2), mlp_ratios=(2, 2)), 16, ()),
    "twins-pcpvt": (lambda: _timm("twins_pcpvt_small", img_size=16, patch_size=2, embed_dims=(16, 32),
                                  num_heads=(1, 2), depths=(1, 1), sr_ratios=(2, 1), mlp_ratios=(2, 2)), 16, ()),
    "pit": (lambda: _cls("pit", "PoolingVisionTransformer", img_size=16, patch_size=4, stride=2, base_dims=[8, 8],
                         depth=[1, 1], heads=[2, 4], mlp_ratio=2), 16, ()),
    "xcit": (lambda: _cls("xcit", "Xcit", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          cls_attn_layers=1), 16, ()),
    "convit-gated": (lambda: _cls("convit", "ConVit", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=4,
                                  local_up_to_layer=1), 16, ()),
    "crossvit": (lambda: _cls("crossvit", "CrossVit", img_size=(16, 24), img_scale=(1.0, 1.0), patch_size=(8, 12),
                              embed_dim=(16, 24), depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1)), 24, ()),
    "levit": (lambda: _cls("levit", "Levit", img_size=64, embed_dim=(16, 24), key_dim=4, num_heads=(2, 3),
                           depth=(1, 1)), 64, ()),
    "vitviz-hybrid": (lambda: vitviz.create_model("hybrid_r18_vit_32", backbone_layers=(1, 1, 1), backbone_width=8,
                                                  embed_dim=16, depth=2, num_heads=2, num_classes=4), 32, ()),
    "timm-hybrid-groupnorm": (lambda: _timm("vit_tiny_r_s16_p8_224", img_size=32, patch_size=4, depth=1), 32, ()),
    "open-clip-prompts": (lambda: _open_clip_prompts(), 16, ()),  # torch's nn.MultiheadAttention
    # SigLIP's attention-pool head is an nn.MultiheadAttention too
    "hf-siglip-prompts": (lambda: _dual_prompts("Siglip", logit_bias=-2.0), 16, ()),
}


def _open_clip_prompts() -> nn.Module:
    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 2, "width": 16, "head_width": 8, "patch_size": 4},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    return vitviz.create_model("open_clip:ViT-B-32", prompts=["a", "b", "c", "d"], **cfg)


# Parameters behind an absorbing constant (a position bias MLP, positional scores, a Fourier position encoding):
# their share is counted once, at the constant.
_BEHIND_CONSTANTS = ("cpb_mlp.", "pos_proj.", "pos_embed.token_projection.")


def _home(model: nn.Module) -> str:
    return ".".join(type(model).__module__.split(".")[:2]) if "clip" not in type(model).__module__ else "clip"


def running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with running means off zero and variances off one: their effective bias is real."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64))
    return model


class Outputs(TorchFunctionMode):
    """The outputs of the named functions (softmax, sigmoid) of the calls inside, still in the autograd graph."""

    NAMES = {"softmax": (torch.softmax, torch.Tensor.softmax, F.softmax),
             "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid)}

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.funcs = {f: n for n in names for f in self.NAMES[n]}
        self.outputs: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.funcs and out.requires_grad:
            self.outputs.append((self.funcs[func], out))
        return out


def budget_called(model: nn.Module, x: torch.Tensor, absorbing: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """:func:`budget` for models whose softmax is read where it is called (explicit attention for the call).

    Shares: pixels; additive parameters; batch norms' running-mean part of their effective bias
    (-mean * weight / std, times the output's gradient); constants that do not depend on the image (a
    position-bias sigmoid, positional softmax scores, a Fourier position encoding: value x gradient); and
    each image-dependent softmax's rule term.
    """
    x = x.detach().clone().requires_grad_(True)
    fused = [(m, m.__dict__.get("fused_attn")) for m in model.modules() if hasattr(m, "fused_attn")]
    norms, fourier, handles = [], [], []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def keep(mod, _inputs, out):  # the original, passed on as a copy: an in-place ReLU after it would change it
                norms.append((mod, out))
                return out.clone()

            handles.append(m.register_forward_hook(keep))
        if type(m).__name__ == "PositionalEncodingFourier":
            handles.append(m.register_forward_hook(lambda _m, _i, out: fourier.append(out)))
    mode = Outputs(("softmax", *absorbing))
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.enable_grad(), lrp_rules(model), mode:
            # vitviz's attention forms its softmax only on its recorded path
            logits = adapter_for(model).record_forward(x)[0] if _home(model) == "vitviz.models" else model(x)
    finally:
        for h in handles:
            h.remove()
        for m, before in fused:
            if before is None:
                del m.fused_attn
            else:
                m.fused_attn = before
    score = logits.gather(1, logits.argmax(-1)[:, None]).sum()
    additive = [p for n, p in model.named_parameters()  # CrossViT numbers its branches' tokens: cls_token_0
                if n.rstrip("_0123456789").endswith(_ADDITIVE + ("attention_biases",))
                and not n.startswith(_BEHIND_CONSTANTS) and not any(f".{c}" in n for c in _BEHIND_CONSTANTS)]
    outs = [t for _, t in mode.outputs]
    depends = [torch.autograd.grad(o.sum(), x, retain_graph=True, allow_unused=True)[0] is not None for o in outs]
    tensors = [x, *additive, *[o for _, o in norms], *fourier, *outs]
    grads = torch.autograd.grad(score, tensors, allow_unused=True)
    gx, rest = grads[0], list(grads[1:])
    gp = [rest.pop(0) for _ in additive]
    gn = [rest.pop(0) for _ in norms]
    gf = [rest.pop(0) for _ in fourier]
    params = sum((p.detach() * g).sum() for p, g in zip(additive, gp, strict=True) if g is not None)
    for (bn, _), g in zip(norms, gn, strict=True):
        if g is not None:
            weight = bn.weight if bn.weight is not None else 1.0
            shift = -bn.running_mean * weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
            params = params + (g * shift.detach().reshape((1, -1) + (1,) * (g.ndim - 2))).sum()
    constants = sum((f.detach() * g).sum() for f, g in zip(fourier, gf, strict=True) if g is not None)
    constants = constants + (getattr(model, "logit_bias", None) or 0.0) * x.shape[0]  # SigLIP's logit bias
    softmax = torch.zeros((), dtype=x.dtype)
    for (kind, s), g, on_image in zip(mode.outputs, rest, depends, strict=True):
        if g is None:
            continue
        if kind == "sigmoid" or not on_image:  # a constant added to the scores (times a constant gate)
            constants = constants + (s.detach() * g).sum()
            continue
        r_out = s.detach() * g
        r_in = s.detach().log() * (r_out - s.detach() * r_out.sum(-1, keepdim=True))
        softmax = softmax + r_out.sum() - r_in.sum()
    return {"logit": score.detach(), "pixels": (x * gx).sum().detach(), "params": params,
            "constants": constants, "softmax": softmax}


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_conserve_relevance_up_to_what_they_absorb(name):
    build, size, absorbing = MORE[name]
    model = running_stats(randomize(build().double(), seed=1, bias=0.3))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = budget_called(model, x, absorbing)
    total = b["pixels"] + b["params"] + b["constants"] + b["softmax"]
    scale = max(abs(float(v)) for v in b.values())
    assert abs(float(total - b["logit"])) <= (HF_TOL if name.startswith("hf-") else 1e-9) * scale, b
    assert abs(float(b["pixels"])) > 1e-3 * scale  # the pixels carry a real part of it
    res = attnlrp_details(model, x)  # the public call gives the same pixel relevance
    assert abs(float(res.pixels.sum() - b["pixels"])) <= 1e-9 * scale


@pytest.mark.parametrize("name", ["swin-v2-cosine", "xcit", "convit-gated", "levit", "vitviz-hybrid",
                                  "open-clip-prompts", "hf-siglip-prompts"])
def test_more_families_maps_vary_follow_the_target_and_leave_the_model_as_it_was(name):
    build, size, _ = MORE[name]
    model = running_stats(randomize(build(), seed=5))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(x)
    flags0, hooks0 = flags(model), hooks(model)
    res = attnlrp_details(model, x)
    # the model's own forward values (written-out attention where torch computes it in one function: rounding)
    torch.testing.assert_close(res.logits, before, rtol=1e-5, atol=1e-6)
    assert bool((res.grid.flatten(1).std(dim=1) > 1e-3 * res.grid.abs().flatten(1).max(dim=1).values).all())
    assert not torch.allclose(attnlrp(model, x, target=(res.target + 1) % 4), res.grid, rtol=1e-3, atol=1e-6)
    assert hooks(model) == hooks0 and flags(model) == flags0
    with torch.no_grad():
        assert torch.equal(model(x), before)


# --- the gamma rule on linear layers and convolutions ----------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("gamma", [0.05, 0.25, 100.0])
def test_the_gamma_rule_matches_zennits(kind, gamma):
    """Relevance through one layer: ours (gradient x input through the hook) against zennit's Gamma rule."""
    from zennit.rules import Gamma

    from vitviz.explain.lrp_rules import gamma_rule

    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(12, 7).double(), torch.randn(5, 3, 12, generator=gen, dtype=torch.float64)
    else:
        layer = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
        x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
        z = layer(x)
    relevance_out = torch.randn(z.shape, generator=gen, dtype=torch.float64)  # any relevance at the output

    x_ours = x.clone().requires_grad_(True)
    handle = layer.register_forward_hook(gamma_rule(gamma))
    try:
        out = layer(x_ours)
    finally:
        handle.remove()
    torch.testing.assert_close(out, z, rtol=0, atol=1e-12)  # the forward value is the layer's own
    (g,) = torch.autograd.grad(out, x_ours, relevance_out / z)  # gradient x input: R_out = z * g
    ours = x * g

    x_theirs = x.clone().requires_grad_(True)
    handle = Gamma(gamma=gamma).register(layer)
    try:
        (theirs,) = torch.autograd.grad(layer(x_theirs), x_theirs, relevance_out)  # zennit passes relevance
    finally:
        handle.remove()
    assert theirs.abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_gamma_on_a_vit_conserves_relevance_without_biases_and_sharpens_the_map():
    model = randomize(BUILDERS["timm-token"]().double(), seed=2, bias=0.0)  # no biases: nothing absorbs there
    x = images(dtype=torch.float64)
    plain = attnlrp_details(model, x)
    sharp = attnlrp_details(model, x, gamma=0.25, conv_gamma=0.25)
    for res, rules in ((plain, {}), (sharp, {"gamma": 0.25, "conv_gamma": 0.25})):
        b = budget(model, x, **rules)
        assert float(b["params"]) == 0.0
        torch.testing.assert_close(res.pixels.sum(), b["pixels"])  # the public call: the same relevance
        # the gamma rule's stabiliser (1e-6 added to each output's denominator) keeps a little: 1e-4 of the logit
        # bounds it here, while a rule that lost or doubled a share would be off by a tenth or more
        assert abs(float(b["pixels"] + b["softmax"] - b["logit"])) <= 1e-4 * abs(float(b["logit"]))
    assert not torch.allclose(plain.grid, sharp.grid, rtol=1e-3, atol=1e-6)  # a different rule, a different map
    torch.testing.assert_close(sharp.logits, plain.logits)


def test_gamma_is_checked_and_refused_on_convolutions_it_does_not_cover():
    model = randomize(BUILDERS["ours"](), seed=3)
    for bad in (-0.1, float("nan"), "0.2", True):
        with pytest.raises(ExplainError, match="gamma must be a number"):
            attnlrp(model, images(), gamma=bad)
    hybrid = randomize(MORE["timm-hybrid-groupnorm"][0](), seed=3)  # weight-standardised convolutions
    with pytest.raises(ExplainError, match="plain convolutions"):
        attnlrp(hybrid, torch.randn(1, 3, 32, 32), conv_gamma=0.25)
    assert attnlrp(hybrid, torch.randn(1, 3, 32, 32), gamma=0.25).shape == (1, 2, 2)  # its linear layers are fine
