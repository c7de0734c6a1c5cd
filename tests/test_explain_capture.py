"""Capturing attention: our models, timm ViTs as they come, and cleanup after failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitviz
from vitviz.errors import ExplainError
from vitviz.explain import adapter_for, capture_attention, explain, gradcam, has_attention


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights (our heads start at zero, which would make every gradient zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.05) + (1.0 if p.ndim == 1 else 0))
    return model.eval()


def tiny_vit(**kw) -> nn.Module:
    cfg = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5} | kw
    return randomize(vitviz.create_model("vit_p8_d8_32", **cfg))


def tiny_timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_capture_returns_every_layer_in_order(x):
    model = tiny_vit(depth=3)
    cap = capture_attention(model, x)
    assert len(cap.attentions) == 3 and cap.gradients is None
    for a in cap.attentions:
        assert a.shape == (2, 2, 17, 17)  # (B, heads, 1 + 4*4, 1 + 4*4)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))
    # layer order: the first layer's weights are those of block 0 run on the embedded tokens
    tokens = model._embed(x)
    _, w0 = model.blocks[0].attn(model.blocks[0].norm1(tokens), need_weights=True)
    torch.testing.assert_close(cap.attentions[0], w0)


def test_explicit_and_fused_paths_give_the_same_logits(x):
    model = tiny_vit()
    with torch.no_grad():
        fused = model(x)
    torch.testing.assert_close(capture_attention(model, x).logits, fused, atol=1e-5, rtol=1e-5)


def test_gradients_are_captured_for_the_target(x):
    model = tiny_vit()
    cap = capture_attention(model, x, target=3, with_grads=True)
    assert cap.target.tolist() == [3, 3]
    assert len(cap.gradients) == 2
    assert all(g.shape == a.shape for g, a in zip(cap.gradients, cap.attentions, strict=True))
    assert any(float(g.abs().sum()) > 0 for g in cap.gradients)
    default = capture_attention(model, x, with_grads=True)
    assert default.target.tolist() == cap.logits.argmax(-1).tolist()


@pytest.mark.parametrize("make", [tiny_vit, tiny_timm_vit])
def test_capture_runs_the_model_once(x, make):
    model = make()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        capture_attention(model, x, with_grads=True)
        explain(model, x, "chefer")
    finally:
        handle.remove()
    assert len(calls) == 2


def test_timm_vit_keeps_fused_attention_and_matches_from_timm(x):
    tm = tiny_timm_vit()
    attns = [b.attn for b in tm.blocks]
    assert all(a.fused_attn for a in attns)
    with torch.no_grad():
        fused_logits = tm(x)
    cap = capture_attention(tm, x, with_grads=True)
    assert all(a.fused_attn for a in attns), "capture must leave fused attention on"
    assert not any(a.attn_drop._forward_hooks for a in attns), "the recording hooks must be removed"
    torch.testing.assert_close(cap.logits, fused_logits, atol=1e-5, rtol=1e-5)

    ours = vitviz.from_timm(tm)
    ref = capture_attention(ours, x, with_grads=True)
    for a, b in zip(cap.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(cap.gradients, ref.gradients, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for method in ("rollout", "chefer", "gradcam"):
        torch.testing.assert_close(explain(tm, x, method), explain(ours, x, method), atol=1e-5, rtol=1e-4)


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected failure")


def test_timm_forward_is_restored_after_a_failure(x):
    tm = tiny_timm_vit()
    attns = [b.attn for b in tm.blocks]
    tm.blocks[1].mlp = Boom()  # fails after block 0's attention (and block 1's) already ran explicitly
    with pytest.raises(RuntimeError, match="injected"):
        capture_attention(tm, x)
    assert all("forward" not in a.__dict__ for a in attns)
    assert all(a.fused_attn for a in attns)
    assert not any(a.attn_drop._forward_hooks for a in attns)
    with pytest.raises(RuntimeError, match="injected"), adapter_for(tm).recording(32, 32):
        tm(x)
    assert all(a.fused_attn for a in attns)
    assert not any(a.attn_drop._forward_hooks for a in attns)


def test_timm_bad_target_after_forward_still_restores(x):
    tm = tiny_timm_vit()
    with pytest.raises(ExplainError, match="out of range"):
        capture_attention(tm, x, target=7, with_grads=True)
    assert all("forward" not in b.attn.__dict__ for b in tm.blocks)


def test_gradcam_hooks_are_removed_after_a_failure(x):
    resnet = randomize(vitviz.create_model("resnet18_32", layers=(1, 1), width=8, num_classes=5))
    layer = resnet.gradcam_layer
    with pytest.raises(ExplainError, match="out of range"):
        gradcam(resnet, x, target=9)
    assert not layer._forward_hooks
    resnet.fc = Boom()
    with pytest.raises(RuntimeError, match="injected"):
        gradcam(resnet, x)
    assert not layer._forward_hooks
    vit = tiny_vit()
    vit.head = Boom()
    with pytest.raises(RuntimeError, match="injected"):
        gradcam(vit, x)
    assert not vit.blocks[-1].norm1._forward_hooks


def test_a_model_without_attention_is_refused(x):
    resnet = randomize(vitviz.create_model("resnet18_32", layers=(1, 1), width=8, num_classes=5))
    assert not has_attention(resnet)
    with pytest.raises(ExplainError, match="no attention"):
        capture_attention(resnet, x)
    with pytest.raises(ExplainError, match="gradcam"):
        explain(resnet, x, "rollout")
    with pytest.raises(ExplainError, match="cannot explain"):
        capture_attention(nn.Linear(3, 3), x)


def test_bad_inputs_are_refused():
    model = tiny_vit()
    with pytest.raises(ExplainError, match="batch"):
        capture_attention(model, torch.randn(3, 32, 32))
    with pytest.raises(ExplainError, match="out of range"):
        capture_attention(model, torch.randn(1, 3, 32, 32), target=5, with_grads=True)
    with pytest.raises(ExplainError, match="one per image"):
        capture_attention(model, torch.randn(2, 3, 32, 32), target=[1, 2, 3], with_grads=True)
