"""LeGrad against a hand computation: explicit attention, each layer's tokens read by the head, ReLU of the
gradient, mean over heads and queries (or the attention pool's first latent), summed over layers."""

from __future__ import annotations

import pytest
import torch
from test_explain_capture import randomize, tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_hybrid, tiny_resnet

from vitviz.errors import ExplainError
from vitviz.explain import explain, explain_details, legrad, refusal
from vitviz.explain.legrad import pool_forward


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))


def _explicit_attention(attn: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention written out: (output (B, N, D), softmax weights (B, heads, N, N))."""
    b, n, d = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
    a = (q @ k.transpose(-2, -1) / (d // heads) ** 0.5).softmax(dim=-1)  # (B, heads, N, N)
    return attn.proj((a @ v).transpose(1, 2).reshape(b, n, d)), a


def _hand_legrad_vit(model, x, target):
    """LeGrad of our (pre-norm, class-token) ViT by hand."""
    z = model._embed(x)  # (B, 1 + P, D)
    scores, attns = [], []
    for blk in model.blocks:
        y, a = _explicit_attention(blk.attn, blk.norm1(z))
        z = z + y
        z = z + blk.mlp(blk.norm2(z))
        attns.append(a)
        logits = model.head(model.norm(z)[:, 0])  # the head reads this layer's class token
        scores.append(logits.gather(1, target[:, None]).sum())
    total = 0
    for s, a in zip(scores, attns, strict=True):
        (g,) = torch.autograd.grad(s, a, retain_graph=True)
        total = total + g.clamp(min=0).mean(dim=1).mean(dim=1)[:, 1:]  # (B, P)
    return total.reshape(x.shape[0], 4, 4), logits


@pytest.mark.parametrize("depth", [1, 3])
def test_legrad_of_our_vit_matches_a_hand_computation(x, depth):
    model = tiny_vit(depth=depth)
    target = torch.tensor([0, 3])
    with torch.enable_grad():
        expected, last_logits = _hand_legrad_vit(model, x, target)
    res = legrad(model, x, target=target)
    torch.testing.assert_close(res.maps, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.logits, last_logits.detach(), atol=1e-5, rtol=1e-5)  # last layer = the model
    assert res.per_layer.shape == (depth, 2, 4, 4) and float(res.maps.max()) > 0
    torch.testing.assert_close(res.per_layer.sum(dim=0), res.maps)


def test_timm_vit_with_the_same_weights_gives_the_same_map(x):
    ours, theirs = tiny_vit(), tiny_timm_vit()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    if not torch.allclose(ours(x), theirs(x), atol=1e-5):
        pytest.fail("the tiny models were expected to share weights and forward")
    torch.testing.assert_close(legrad(ours, x).maps, legrad(theirs, x).maps, atol=1e-6, rtol=1e-5)


def test_start_layer_keeps_the_last_layers(x):
    model = tiny_vit(depth=3)
    full = legrad(model, x)
    last = legrad(model, x, start_layer=-1)
    torch.testing.assert_close(last.maps, full.per_layer[-1])
    res = explain_details(model, x, "legrad", start_layer=1)
    torch.testing.assert_close(res.grid_maps, full.per_layer[1:].sum(dim=0))
    assert res.cost.backward == 2  # one partial backward for each of the 2 layers used
    with pytest.raises(ExplainError, match="start_layer 3 is out of range"):
        legrad(model, x, start_layer=3)


def _siglip_like():
    from timm.models.vision_transformer import VisionTransformer

    return randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                       global_pool="map", class_token=False), seed=5)


def test_pool_forward_is_the_pools_own_forward():
    model = _siglip_like()
    z = torch.randn(2, 16, 32)
    out, attn = pool_forward(model.attn_pool, z)
    torch.testing.assert_close(out, model.attn_pool(z), atol=1e-5, rtol=1e-4)  # its fused kernel rounds otherwise
    assert attn.shape == (2, 2, 1, 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 1))


def test_attention_pool_variant_matches_a_hand_computation(x):
    """SigLIP-style map pooling: per layer, the gradient w.r.t. the pool's own attention over that layer's tokens."""
    model = _siglip_like()
    pool = model.attn_pool
    outputs = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in model.blocks]
    with torch.enable_grad():
        logits = model(x)
        for h in handles:
            h.remove()
        t = logits.argmax(-1)
        total = 0
        for z in outputs:
            zn = model.norm(z)  # (B, 16, D)
            b, n, d = zn.shape
            q = pool.q(pool.latent).reshape(1, 1, 2, 16).transpose(1, 2)  # (1, heads, 1, hd)
            k, v = pool.kv(zn + pool.pos_embed[None] if pool.pos_embed is not None else zn).reshape(
                b, n, 2, 2, 16).permute(2, 0, 3, 1, 4)  # (B, heads, N, hd) each
            a = (q @ k.transpose(-2, -1) / 4.0).softmax(-1)  # (B, heads, 1, N)
            pooled = pool.proj((a @ v).transpose(1, 2).reshape(b, 1, d))
            pooled = (pooled + pool.mlp(pool.norm(pooled)))[:, 0]
            score = model.head(model.fc_norm(pooled)).gather(1, t[:, None]).sum()
            (g,) = torch.autograd.grad(score, a, retain_graph=True)
            total = total + g.clamp(min=0).mean(dim=1)[:, 0]  # (B, N): first latent, mean of heads
    res = explain_details(model, x, "legrad")
    torch.testing.assert_close(res.grid_maps, total.reshape(2, 4, 4), atol=1e-6, rtol=1e-5)
    assert res.target.tolist() == t.tolist()


def test_batch_equals_singles_and_refusals(x):
    model = tiny_hybrid()
    batch = explain_details(model, x, "legrad")
    singles = torch.cat([explain_details(model, x[i:i + 1], "legrad").grid_maps for i in range(2)])
    torch.testing.assert_close(batch.grid_maps, singles, atol=1e-6, rtol=1e-5)
    assert "CNN" in refusal(tiny_resnet(), "legrad")
    with pytest.raises(ExplainError, match="CNN"):
        explain(tiny_resnet(), x, "legrad")
