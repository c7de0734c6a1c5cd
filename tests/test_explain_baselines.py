"""Occlusion, RISE, Integrated Gradients and SmoothGrad against captum called directly and hand computations."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency
from test_explain_capture import tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_resnet

from vitviz.errors import ExplainError
from vitviz.explain import adapter_for, explain_details
from vitviz.explain.baselines import rise_masks


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"vit": tiny_vit(), "timm": tiny_timm_vit(), "resnet": tiny_resnet()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _score(model, x, t):
    with torch.no_grad():
        return model(x).gather(1, t[:, None])[:, 0]  # (B,)


@pytest.mark.parametrize("name", ["vit", "timm"])
def test_occlusion_is_patch_aligned_on_transformers_and_matches_captum(models, x, name):
    model = models[name]
    res = explain_details(model, x, "occlusion", target=[1, 3])
    assert res.cell == (8, 8) and res.grid_maps.shape == (2, 4, 4)  # one window per 8-px patch
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=0.0,
                                     target=torch.tensor([1, 3]))  # (B, 3, 32, 32)
    torch.testing.assert_close(res.grid_maps, ref[:, 0, ::8, ::8], atol=1e-5, rtol=1e-5)
    # by hand: blank patch (2, 1) and measure the drop of the class score
    t = torch.tensor([1, 3])
    blank = x.clone()
    blank[:, :, 16:24, 8:16] = 0.0
    torch.testing.assert_close(res.grid_maps[:, 2, 1], _score(model, x, t) - _score(model, blank, t),
                               atol=1e-5, rtol=1e-5)


def test_overlapping_occlusion_on_a_cnn_matches_captum_per_pixel(models, x):
    model = models["resnet"]
    res = explain_details(model, x, "occlusion", window=8, stride=4, baseline=0.5, batch=5)
    assert res.cell == (1, 1) and res.grid_maps.shape == (2, 32, 32)
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.5,
                                     target=res.target)
    torch.testing.assert_close(res.grid_maps, ref[:, 0], atol=1e-5, rtol=1e-5)
    default = explain_details(model, x, "occlusion")
    assert default.cell == (4, 4) and default.grid_maps.shape == (2, 8, 8)  # a CNN: 1/8 of each side


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_integrated_gradients_match_captum_and_are_complete(models, x, name):
    model = models[name]
    res = explain_details(model, x, "integrated-gradients", steps=32, sign="all")
    ref = IntegratedGradients(model).attribute(x, baselines=0.0, target=res.target, n_steps=32)  # (B, 3, H, W)
    torch.testing.assert_close(res.grid_maps, ref.sum(dim=1), atol=1e-5, rtol=1e-4)
    pos = explain_details(model, x, "integrated-gradients", steps=32)  # default sign: positive evidence only
    torch.testing.assert_close(pos.grid_maps, ref.sum(dim=1).clamp(min=0), atol=1e-5, rtol=1e-4)
    # completeness (Sundararajan et al.): attributions sum to f(x) - f(baseline), up to the path integral's error
    gap = _score(model, x, res.target) - _score(model, torch.zeros_like(x), res.target)
    torch.testing.assert_close(res.grid_maps.sum(dim=(1, 2)), gap, atol=0.03 * float(gap.abs().max()), rtol=0.03)


def test_smoothgrad_matches_captum_with_the_same_noise(models, x):
    model = models["timm"]
    res = explain_details(model, x, "smoothgrad", samples=6, noise=0.2, sign="all", seed=4)
    for i in range(2):
        xi = x[i:i + 1]
        torch.manual_seed(4)
        ref = NoiseTunnel(Saliency(model)).attribute(xi, nt_type="smoothgrad", nt_samples=6,
                                                     stdevs=0.2 * float(xi.max() - xi.min()),
                                                     target=res.target[i:i + 1], abs=False)
        torch.testing.assert_close(res.grid_maps[i], ref[0].sum(dim=0), atol=1e-5, rtol=1e-4)
    # without noise it is the plain input gradient, summed over channels in absolute value
    plain = explain_details(model, x, "smoothgrad", samples=2, noise=0.0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, plain.target[:, None]).sum(), xg)
    torch.testing.assert_close(plain.grid_maps, g.abs().sum(dim=1), atol=1e-6, rtol=1e-5)


def test_rise_is_the_probability_weighted_mean_of_its_masks(models, x):
    model = models["resnet"]
    res = explain_details(model, x, "rise", n_masks=20, grid=4, p_keep=0.3, batch=6, seed=9, target=2)
    gen = torch.Generator().manual_seed(9)
    masks = torch.cat([rise_masks(k, (32, 32), 4, 0.3, gen) for k in (6, 6, 6, 2)])  # drawn batch by batch
    expected = torch.zeros(2, 32, 32)
    for m in masks:
        with torch.no_grad():
            p = model(x * m).softmax(-1)[:, 2]  # (B,)
        expected += p[:, None, None] * m
    torch.testing.assert_close(res.grid_maps, expected / (20 * 0.3), atol=1e-5, rtol=1e-5)
    assert res.cell == (1, 1) and res.target.tolist() == [2, 2]


def test_rise_masks_are_smooth_shifted_grids_with_the_keep_rate():
    masks = rise_masks(400, (32, 40), 5, 0.25, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 32, 40) and float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.25) < 0.03
    assert len(torch.unique(masks)) > 10  # bilinear, not binary
    again = rise_masks(400, (32, 40), 5, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


@pytest.mark.parametrize("method,params", [("occlusion", {}), ("rise", {"n_masks": 12}),
                                           ("integrated-gradients", {"steps": 5}), ("smoothgrad", {"samples": 3})])
def test_a_batch_equals_its_singles(models, x, method, params):
    model = models["vit"]
    batch = explain_details(model, x, method, **params)
    singles = torch.cat([explain_details(model, x[i:i + 1], method, **params).grid_maps for i in range(2)])
    torch.testing.assert_close(batch.grid_maps, singles, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,params,match", [
    ("occlusion", {"window": 64}, "must be positive and fit"),
    ("occlusion", {"window": "big"}, "pixel counts"),
    ("occlusion", {"baseline": "mean"}, "baseline must be a number"),
    ("rise", {"n_masks": 0}, "n_masks must be an integer >= 1"),
    ("rise", {"p_keep": 1.0}, "p_keep must be a probability"),
    ("integrated-gradients", {"steps": 1}, "steps must be an integer >= 2"),
    ("integrated-gradients", {"sign": "neg"}, "sign must be one of positive, absolute, all"),
    ("smoothgrad", {"noise": -1.0}, "noise must be a non-negative"),
])
def test_bad_parameters_raise_explain_errors(models, x, method, params, match):
    with pytest.raises(ExplainError, match=match):
        explain_details(models["resnet"], x, method, **params)


def test_occlusion_default_window_is_the_adapters_token_cell(models):
    adapter = adapter_for(models["timm"])
    assert adapter.final_tokens(32, 32).cell == (8, 8)
    res = explain_details(models["timm"], torch.randn(1, 3, 32, 32), "occlusion")
    assert res.cost.forward == 2 + 16  # prediction + captum's reference pass + one per patch
