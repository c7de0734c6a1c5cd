"""timm VisionTransformer variants through the adapter, each against an independent hand computation."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain import adapter_for, capture_attention, explain, explain_details, methods_for
from vitviz.explain.adapters.timm_vit import TimmViT

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def vit(name: str = "vit_tiny_patch16_224", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():  # timm zero-initialises heads and layer scales: give every weight a say
        for p in model.parameters():
            if p.ndim == 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.2)
        if isinstance(getattr(model, "head", None), nn.Linear):
            model.head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def naive_rollout_row(attentions: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """w^T (A_L+I)/2 ... (A_1+I)/2 with full matrix products in float64 (mean over heads)."""
    n = attentions[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64)
    for a in attentions:
        m = a.double().mean(dim=1)  # (B, N, N)
        m = (m + torch.eye(n, dtype=torch.float64)) / (m.sum(-1, keepdim=True) + 1)
        r = m @ r
    return (w.double()[:, None, :] @ r)[:, 0]  # (B, N)


def test_distilled_deit_reads_the_mean_of_class_and_distillation_tokens(x):
    model = vit("deit_tiny_distilled_patch16_224")
    assert isinstance(adapter_for(model), TimmViT)
    cap = capture_attention(model, x)
    # by hand: the eval logits average the heads on token 0 and token 1
    feats = model.forward_features(x)
    torch.testing.assert_close(cap.logits, (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2)
    w = torch.zeros(2, 18)
    w[:, :2] = 0.5
    torch.testing.assert_close(cap.readout, w)
    expected = naive_rollout_row(cap.attentions, w)[:, 2:].reshape(2, 4, 4)
    torch.testing.assert_close(explain_details(model, x, "rollout", upsample=False).grid_maps.double(), expected,
                               atol=1e-6, rtol=1e-5)
    # raw attention from the readout: the mean of rows 0 and 1
    a = cap.attentions[-1].mean(1)  # (B, N, N)
    torch.testing.assert_close(explain_details(model, x, "attention", upsample=False).grid_maps,
                               ((a[:, 0] + a[:, 1]) / 2)[:, 2:].reshape(2, 4, 4))


def test_attention_pool_readout_is_the_pools_own_attention(x):
    model = vit("vit_base_patch16_siglip_224", class_token=False, global_pool="map")
    kept = {}
    model.attn_pool.register_forward_pre_hook(lambda _m, inp: kept.setdefault("x", inp[0].detach()))
    cap = capture_attention(model, x)
    pool, t = model.attn_pool, kept["x"]  # (B, N, D)
    # by hand: one latent query against the pool's keys, softmax, averaged over heads
    b, n, d = t.shape
    h, hd = pool.num_heads, d // pool.num_heads
    q = pool.q(pool.latent).reshape(1, -1, h, hd).transpose(1, 2)  # (1, h, L, hd)
    k = pool.kv(t)[..., :d].reshape(b, n, h, hd).transpose(1, 2)  # (B, h, N, hd)
    attn = (q @ k.transpose(-2, -1) / hd**0.5).softmax(-1)  # (B, h, L, N)
    torch.testing.assert_close(cap.readout, attn.mean(dim=(1, 2)))
    assert not torch.allclose(cap.readout, torch.full_like(cap.readout, 1 / n), atol=1e-4), "not the patch mean"
    expected = naive_rollout_row(cap.attentions, cap.readout)
    torch.testing.assert_close(explain_details(model, x, "rollout", upsample=False).grid_maps.double(),
                               expected.reshape(2, 4, 4), atol=1e-6, rtol=1e-5)


def test_layer_scale_relevance_equals_a_float64_computation(x):
    """A 1e-6 layer scale makes relevance increments ~1e-10: float32 must give float64's map."""
    model = vit("vit_medium_patch16_gap_240", init_values=1e-6, class_token=False, global_pool="avg",
                fc_norm=False)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.fill_(1e-6)
            blk.ls2.gamma.fill_(1e-6)
    cap = capture_attention(model, x, with_grads=True)
    assert max(float(g.abs().max()) for g in cap.gradients) < 1e-4  # the increments are tiny indeed
    n = cap.attentions[0].shape[-1]
    w = torch.full((2, n), 1.0 / n, dtype=torch.float64)
    for method in ("chefer", "grad-rollout"):
        # float64 by hand: full matrices, identity and increments summed
        r = torch.eye(n, dtype=torch.float64).expand(2, n, n)
        for a, g in zip(cap.attentions, cap.gradients, strict=True):
            a, g = a.double(), g.double()
            if method == "chefer":
                r = r + (g * a).clamp(min=0).mean(1) @ r
            else:
                f = (g * a).mean(1).clamp(min=0)
                r = ((f + torch.eye(n, dtype=torch.float64)) / (f.sum(-1, keepdim=True) + 1)) @ r
        row = (w[:, None, :] @ r)[:, 0].reshape(2, 4, 4)
        lo = row.amin(dim=(1, 2), keepdim=True)
        expected = (row - lo) / (row.amax(dim=(1, 2), keepdim=True) - lo)
        got = explain(model, x, method, upsample=False)
        assert float(got.std()) > 0.1, f"{method}: the float32 map must not come out constant"
        torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=0)


def test_parallel_branches_are_one_layer_with_all_heads(x):
    model = vit("vit_small_patch16_18x2_224")
    cap = capture_attention(model, x)
    assert len(cap.layers) == 2  # two blocks, not four attentions
    assert cap.attentions[0].shape == (2, 4, 17, 17)  # 2 branches x 2 heads
    kept = []
    for branch in model.blocks[0].attns:
        branch.attn.attn_drop.register_forward_hook(lambda _m, inp, _o: kept.append(inp[0].detach()))
    model.blocks[0].attns[0].attn.fused_attn = False
    model.blocks[0].attns[1].attn.fused_attn = False
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(cap.attentions[0], torch.cat(kept, dim=1))


def test_max_pool_readout_counts_the_channels_each_token_wins(x):
    model = vit(class_token=False, global_pool="max", fc_norm=False)
    cap = capture_attention(model, x)
    feats = model.forward_features(x)  # (B, 16, D)
    wins = feats.argmax(dim=1)  # (B, D)
    expected = torch.stack([torch.bincount(wins[i], minlength=16).float() / feats.shape[-1] for i in range(2)])
    torch.testing.assert_close(cap.readout, expected)


def test_headless_models_get_class_agnostic_maps_only(x):
    model = vit("vit_small_patch14_reg4_dinov2", num_classes=0, patch_size=8, reg_tokens=4)
    core = [m for m in methods_for(model) if m in ("attention", "rollout", "grad-rollout", "chefer", "gradcam",
                                                      "similarity")]
    assert core == ["attention", "rollout", "similarity"]
    assert adapter_for(model).final_tokens(32, 32).prefix == 5  # class + 4 registers
    for method in core:
        m = explain(model, x, method, upsample=False)
        assert torch.isfinite(m).all() and float(m.std()) > 0
    with pytest.raises(ExplainError, match="no classifier head"):
        explain(model, x, "chefer")


def test_inline_attention_blocks_are_refused_by_name(x):
    model = vit("vit_base_patch16_xp_224")
    for method in ("attention", "rollout", "chefer"):
        with pytest.raises(ExplainError, match="ParallelScalingBlock"):
            explain(model, x, method)
    assert torch.isfinite(explain(model, x, "gradcam")).all()


def test_res_post_norm_blocks_take_grad_cam_from_the_block_input(x):
    model = vit("vit_base_patch16_rpn_224", class_token=True, global_pool="token")
    kept = []
    model.blocks[-1].register_forward_pre_hook(lambda _m, inp: kept.append(inp[0]))
    x1 = x.clone().requires_grad_(True)
    logits = model(x1)
    (g,) = torch.autograd.grad(logits[:, 0].sum(), kept[0])
    tokens = kept[0].detach()[:, 1:]  # (B, 16, D)
    cam = (g[:, 1:].mean(1, keepdim=True) * tokens).sum(-1).clamp(min=0).reshape(2, 4, 4)
    torch.testing.assert_close(explain_details(model, x, "gradcam", target=0, upsample=False).grid_maps, cam)


def test_rollout_within_the_last_stage_of_a_hierarchical_model():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, depths=(1, 1, 2, 2),
                              window_size=2, embed_dim=24, num_heads=(1, 1, 2, 2), num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExplainError, match="patch merging"):
        explain(model, x, "rollout")
    with pytest.raises(ExplainError, match="start_layer=4"):  # layer 2 sits on the 4x4 grid of stage 3
        explain(model, x, "rollout", start_layer=2)
    cap = capture_attention(model, x)
    last = cap.attentions[4:]  # stage 4: two blocks on the final 2x2 grid
    assert all(a.shape[-1] == 4 for a in last)
    expected = naive_rollout_row(last, torch.full((1, 4), 0.25))
    got = explain_details(model, x, "rollout", start_layer=4, upsample=False).grid_maps
    torch.testing.assert_close(got.double(), expected.reshape(1, 2, 2), atol=1e-6, rtol=1e-5)


def test_raw_attention_records_only_the_layer_it_shows(x, fused_attention_calls):
    model = vit(depth=3)
    full = capture_attention(model, x)
    fused_attention_calls.clear()
    one = capture_attention(model, x, only_layer=1)
    assert len(fused_attention_calls) == 2  # layers 0 and 2 keep the fused kernel
    assert one.only and one.first == 1 and len(one.layers) == 1
    torch.testing.assert_close(one.layers[0].weights, full.attentions[1])
    torch.testing.assert_close(one.logits, full.logits, atol=1e-5, rtol=1e-5)
    fused_attention_calls.clear()
    m = explain_details(model, x, "attention", layer=-1, upsample=False).grid_maps
    assert len(fused_attention_calls) == 2
    torch.testing.assert_close(m, full.attentions[-1].mean(1)[:, 0, 1:].reshape(2, 4, 4))
    with pytest.raises(ExplainError, match="layer 3 is out of range"):
        explain(model, x, "attention", layer=3)
