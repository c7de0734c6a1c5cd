"""explain(): every method on every family, batches, parameters and errors."""

from __future__ import annotations

import pytest
import torch
from test_explain_capture import randomize, tiny_timm_vit, tiny_vit

import vitviz
from vitviz.errors import ExplainError
from vitviz.explain import (
    METHOD_PARAMS,
    METHODS,
    attention_heads,
    capture_attention,
    explain,
    explain_details,
    gradcam,
    methods_for,
    upsample_maps,
)


def tiny_hybrid() -> torch.nn.Module:
    return randomize(vitviz.create_model("hybrid_r18_vit_32", backbone_layers=(1, 1, 1), backbone_width=8,
                                         embed_dim=32, depth=2, num_heads=2, num_classes=5), seed=1)


def tiny_resnet() -> torch.nn.Module:
    return randomize(vitviz.create_model("resnet18_32", layers=(1, 1, 1), width=8, num_classes=5), seed=2)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"vit": tiny_vit(), "hybrid": tiny_hybrid(), "resnet": tiny_resnet(), "timm": tiny_timm_vit()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


GRIDS = {"vit": (4, 4), "timm": (4, 4), "hybrid": (8, 8)}
# The attention methods, Grad-CAM and similarity: this file's subject. The baselines, the CAM family, LeGrad
# and AttnLRP have their own test files (test_explain_baselines.py, ..._cam_family.py, ..._legrad.py, ...).
CORE = ("attention", "rollout", "grad-rollout", "chefer", "gradcam", "similarity")
ATTENTION = ("attention", "rollout", "grad-rollout", "chefer")


def core(model) -> list[str]:
    return [m for m in methods_for(model) if m in CORE]


def test_methods_for(models):
    assert core(models["resnet"]) == ["gradcam", "similarity"]
    assert not set(ATTENTION) & set(methods_for(models["resnet"]))  # a CNN has no attention to show
    for name in ("vit", "hybrid", "timm"):
        assert core(models[name]) == list(CORE)
    assert set(METHOD_PARAMS) == set(METHODS) and set(CORE) <= set(METHODS)


@pytest.mark.parametrize("name", ["vit", "hybrid", "timm", "resnet"])
def test_maps_have_the_right_shapes_and_range(models, x, name):
    model = models[name]
    for method in core(model):
        maps = explain(model, x, method)
        assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
        grid = explain(model, x, method, upsample=False)
        expected = GRIDS.get(name, (8, 8)) if method != "gradcam" else grid.shape[1:]
        assert tuple(grid.shape[1:]) == tuple(expected)
        # each image's map normalised on its own: max 1 (or 0 for a constant map, e.g. an all-negative Grad-CAM)
        assert all(float(v) in (0.0, 1.0) for v in grid.amax(dim=(1, 2)))


@pytest.mark.parametrize("name", ["vit", "hybrid", "timm", "resnet"])
def test_a_batch_of_two_equals_two_singles(models, x, name):
    model = models[name]
    params = {"attention": {"query": (1, 2), "head": 1}, "rollout": {"discard_ratio": 0.3, "head_fusion": "max"}}
    for method in core(model):
        p = params.get(method, {})
        batch = explain_details(model, x, method, **p)
        singles = [explain_details(model, x[i:i + 1], method, **p) for i in range(2)]
        torch.testing.assert_close(batch.grid_maps, torch.cat([s.grid_maps for s in singles]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch.maps, torch.cat([s.maps for s in singles]), atol=1e-4, rtol=1e-4)


def test_gradcam_of_resnet_and_hybrid(models, x):
    res = gradcam(models["resnet"], x)
    assert res.maps.shape == (2, 8, 8) and bool((res.maps >= 0).all()) and res.cell == (4, 4)
    hyb = gradcam(models["hybrid"], x, target=[1, 2])
    assert hyb.maps.shape == (2, 8, 8) and bool((hyb.maps >= 0).all()) and hyb.target.tolist() == [1, 2]
    tokens = gradcam(models["hybrid"], x, layer=0)  # a hybrid's transformer tokens, on request
    assert tokens.maps.shape == (2, 8, 8)
    vit = [gradcam(models["vit"], x, target=t) for t in range(5)]
    assert all(v.maps.shape == (2, 4, 4) and bool((v.maps >= 0).all()) for v in vit)
    assert any(float(v.maps.sum()) > 0 for v in vit)


def test_raw_attention_reads_the_chosen_layer_head_and_query(models, x):
    model = models["vit"]
    cap = capture_attention(model, x)
    d = explain_details(model, x, "attention", layer=0, head=1)
    torch.testing.assert_close(d.grid_maps, cap.attentions[0][:, 1, 0, 1:].reshape(2, 4, 4))
    d = explain_details(model, x, "attention", layer=-1, head=-1, query=(2, 3))
    torch.testing.assert_close(d.grid_maps, cap.attentions[-1][:, 1, 1 + 2 * 4 + 3, 1:].reshape(2, 4, 4))
    flat = explain_details(model, x, "attention", layer=-1, head=-1, query=11)
    torch.testing.assert_close(flat.grid_maps, d.grid_maps)
    mean = explain_details(model, x, "attention")
    torch.testing.assert_close(mean.grid_maps, cap.attentions[-1][:, :, 0, 1:].mean(1).reshape(2, 4, 4))
    heads = attention_heads(model, x, layer=0)
    assert heads.shape == (2, 2, 4, 4)
    torch.testing.assert_close(heads[:, 1], cap.attentions[0][:, 1, 0, 1:].reshape(2, 4, 4))


def test_mean_pooled_models_are_explained_from_the_patch_mean(x):
    """With mean pooling the head never reads the class token: maps start from the patch tokens' mean row."""
    from timm.models.vision_transformer import VisionTransformer

    from vitviz.explain import attention_rollout, chefer_relevance, token_layout

    ours = tiny_vit(pooling="mean")
    theirs = randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                         num_classes=5, global_pool="avg"))
    assert token_layout(ours, 32, 32).readout == "mean" and token_layout(theirs, 32, 32).readout == "mean"
    assert token_layout(tiny_vit(), 32, 32).readout == "token"
    for model in (ours, theirs):
        cap = capture_attention(model, x, with_grads=True)
        full = attention_rollout(cap.attentions)  # (B, N, N)
        rollout = explain_details(model, x, "rollout", upsample=False).grid_maps
        torch.testing.assert_close(rollout, full[:, 1:, 1:].mean(1).reshape(2, 4, 4))
        assert not torch.allclose(rollout, full[:, 0, 1:].reshape(2, 4, 4), atol=1e-4)  # not the class row
        attention = explain_details(model, x, "attention", layer=0, upsample=False).grid_maps
        torch.testing.assert_close(attention, cap.attentions[0][:, :, 1:, 1:].mean(dim=(1, 2)).reshape(2, 4, 4))
        heads = attention_heads(model, x, layer=-1)
        torch.testing.assert_close(heads, cap.attentions[-1][:, :, 1:, 1:].mean(2).reshape(2, 2, 4, 4))
        chefer = explain_details(model, x, "chefer", upsample=False).grid_maps
        relevance = chefer_relevance(cap.attentions, cap.gradients)
        torch.testing.assert_close(chefer, relevance[:, 1:, 1:].mean(1).reshape(2, 4, 4))
        # Grad-CAM reads the tokens the mean pool reads: CAM on the final features, by hand
        feats = model.forward_features(x).detach().requires_grad_(True)  # (B, N, D)
        logits = model.forward_head(feats)
        (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), feats)
        cam = (grad[:, 1:].mean(1, keepdim=True) * feats[:, 1:]).sum(-1).clamp(min=0).reshape(2, 4, 4)
        torch.testing.assert_close(explain_details(model, x, "gradcam", upsample=False).grid_maps, cam.detach())
        # a chosen query patch is still that patch's row
        one = explain_details(model, x, "attention", layer=0, head=0, query=5, upsample=False).grid_maps
        torch.testing.assert_close(one, cap.attentions[0][:, 0, 6, 1:].reshape(2, 4, 4))


def test_target_changes_gradient_methods(models, x):
    model = models["vit"]
    for method in ("chefer", "grad-rollout", "gradcam"):
        a = explain_details(model, x, method, target=0)
        assert a.target.tolist() == [0, 0]
        b = explain_details(model, x, method)
        assert b.target.tolist() == b.logits.argmax(-1).tolist()


def test_bad_parameters_raise_clear_errors(models, x):
    vit, resnet = models["vit"], models["resnet"]
    cases = [
        (vit, "attention", {"layer": 2}, "layer 2 is out of range"),
        (vit, "attention", {"layer": -3}, "out of range"),
        (vit, "attention", {"head": 2}, "head 2 is out of range"),
        (vit, "attention", {"head": "median"}, "head"),
        (vit, "attention", {"query": (4, 0)}, "outside the 4x4 grid"),
        (vit, "attention", {"query": 16}, "out of range"),
        (vit, "rollout", {"discard_ratio": 1.0}, r"\[0, 1\)"),
        (vit, "rollout", {"discard_ratio": -0.5}, r"\[0, 1\)"),
        (vit, "rollout", {"head_fusion": "median"}, "head fusion"),
        (vit, "rollout", {"start_layer": 5}, "start_layer"),
        (vit, "rollout", {"target": 1}, "takes no parameter target"),
        (vit, "chefer", {"target": 5}, "target class 5 is out of range"),
        (vit, "grad-rollout", {"target": -1}, "out of range"),
        (vit, "gradcam", {"target": 99}, "out of range"),
        (vit, "gradcam", {"layer": 7}, "out of range"),
        (vit, "saliency", {}, "unknown method"),
        (resnet, "attention", {}, "needs attention"),
        (resnet, "chefer", {}, "needs attention"),
        (resnet, "gradcam", {"layer": 1}, "last stage"),
    ]
    for model, method, params, message in cases:
        with pytest.raises(ExplainError, match=message):
            explain(model, x, method, **params)
    with pytest.raises(vitviz.VitvizError):
        explain(vit, x[0], "rollout")


def test_upsampling_respects_the_pixels_a_grid_covers():
    grid = torch.arange(4.0).reshape(1, 2, 2)  # (B, gh, gw)
    plain = upsample_maps(grid, (16, 16))
    assert plain.shape == (1, 16, 16)
    # a 2x2 grid of 8-px cells on a 20-px input: cells cover 16 px, the last 4 px repeat the edge
    out = upsample_maps(grid, (20, 20), cell=(8, 8))
    assert out.shape == (1, 20, 20)
    torch.testing.assert_close(out[:, :16, :16], plain)
    torch.testing.assert_close(out[:, :, 16:], out[:, :, 15:16].expand(1, 20, 4))
    # a grid overhanging the input (padded CNN): cropped
    assert upsample_maps(grid, (12, 12), cell=(8, 8)).shape == (1, 12, 12)


def test_vit_on_another_input_size(models):
    x = torch.randn(1, 3, 40, 48)
    maps = explain(models["vit"], x, "rollout", upsample=False)
    assert maps.shape == (1, 5, 6)
    assert explain(models["vit"], x, "chefer").shape == (1, 40, 48)
