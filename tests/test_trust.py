"""The one trust scorer (vitviz.explain.trust): ROAD against pytorch-grad-cam, deletion/insertion against
faithfulness.deletion_insertion, the cascade sanity check, bootstrap intervals, shard merging and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_explain_capture import tiny_vit
from test_explain_faithfulness import region_setup
from torch import nn

import vitviz
from vitviz.errors import ExplainError
from vitviz.explain import deletion_insertion
from vitviz.explain.registry import Cost, MapResult, Method, register, registry
from vitviz.explain.trust import (
    Protocol,
    TrustRecords,
    cascade_stages,
    impute_noisy_linear,
    is_slow,
    markdown_table,
    merge_records,
    perturbation_scores,
    protocol_for,
    score_methods,
    spearman_rows,
    summarise,
)


class Pixels(nn.Module):
    """A small convnet on 16x16 images with three classes: enough structure for ROAD to move its scores."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _images(n: int, side: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# --- ROAD against pytorch-grad-cam ----------------------------------------------------------------------

def test_noisy_linear_imputation_matches_pytorch_grad_cam():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    img = _images(1, 12)[0]  # (3, 12, 12)
    gen = torch.Generator().manual_seed(2)
    removed = torch.rand(12, 12, generator=gen) < 0.6  # scattered pixels, corners and edges included
    removed[:3, :3] = True  # and a block whose inner pixel has no known neighbour
    ours = impute_noisy_linear(img, removed, noise=0.0)
    ref = road.NoisyLinearImputer(noise=0.0)(img, (~removed).float())  # pytorch-grad-cam: 1 = kept
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[:, ~removed], img[:, ~removed])  # kept pixels are untouched
    # the filled values are means of their neighbours: a constant image stays constant
    flat = impute_noisy_linear(torch.full((3, 12, 12), 0.7), removed)
    torch.testing.assert_close(flat, torch.full((3, 12, 12), 0.7))
    noisy = impute_noisy_linear(img, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert 0 < float((noisy - ours).abs().max()) < 0.06


def test_road_curve_matches_pytorch_grad_cam_road_most_relevant_first():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric, RemoveMostRelevantFirst
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = Pixels().eval()
    x = _images(3)
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4))  # no ties
    target = model(x).argmax(-1)
    n = 16 * 16
    percentiles = (80, 50, 20)  # pytorch-grad-cam removes the pixels at or above this percentile of the map
    removed = [n - int((maps[0] < float(np.percentile(maps[0].numpy(), p))).sum()) for p in percentiles]
    protocol = Protocol(unit=1, road_fractions=(0.0, *[r / n for r in removed]), road_noise=0.0)
    got = perturbation_scores(model, x, maps, target, protocol, [0, 1, 2])
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target]
    for k, p in enumerate(percentiles, start=1):
        ref = PerturbationConfidenceMetric(RemoveMostRelevantFirst(p, NoisyLinearImputer(noise=0.0)))(
            x, maps.numpy(), targets, model)  # probability after imputation minus before
        torch.testing.assert_close(got["road"][:, k] - got["road"][:, 0], torch.from_numpy(ref), atol=1e-5, rtol=0)
    # with the default noise, pytorch-grad-cam's own ROADMostRelevantFirst agrees to the noise's effect
    noisy = perturbation_scores(model, x, maps, target, Protocol(unit=1, road_fractions=protocol.road_fractions),
                                [0, 1, 2])
    torch.manual_seed(0)
    ref = road.ROADMostRelevantFirst(percentile=50)(x, maps.numpy(), targets, model)
    diff = noisy["road"][:, 2] - noisy["road"][:, 0]
    assert float((diff - torch.from_numpy(ref)).abs().max()) < 0.05
    assert float(got["road"][:, 1:].sub(got["road"][:, :1]).abs().max()) > 1e-3  # imputation moved the scores
    assert torch.allclose(got["road_auc"], torch.trapezoid(got["road"], got["road_fractions"]) / removed[-1] * n)


# --- deletion / insertion: the same as faithfulness.deletion_insertion ---------------------------------

def test_deletion_insertion_equal_the_faithfulness_functions_and_a_perfect_map_wins():
    model, images, perfect = region_setup()  # class 1 reads a 6x6 region of a 16x16 image
    images = images + 2 * perfect[:, None]  # brighter inside the region: imputing it from outside lowers the score
    maps = perfect + 0.01 * torch.rand(perfect.shape, generator=torch.Generator().manual_seed(0))  # no ties
    target = torch.ones(3, dtype=torch.long)
    protocol = Protocol(unit=2, steps=8, insertion_baseline="zero")
    got = perturbation_scores(model, images, maps, target, protocol, [0, 1, 2], road=False)
    ref = deletion_insertion(model, images, maps, target=target, steps=8, patch_size=2, insertion_baseline="zero")
    torch.testing.assert_close(got["deletion_auc"], ref.deletion_auc)
    torch.testing.assert_close(got["insertion_auc"], ref.insertion_auc)
    assert float(got["fractions"][0]) == 0.0 and float(got["fractions"][-1]) == 1.0  # the unperturbed point
    rand = perturbation_scores(model, images, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)),
                               target, protocol, [0, 1, 2])
    both = perturbation_scores(model, images, maps, target, protocol, [0, 1, 2])
    assert bool((both["deletion_auc"] < rand["deletion_auc"]).all())
    assert bool((both["insertion_auc"] > rand["insertion_auc"]).all())
    assert bool((both["road_auc"] < rand["road_auc"]).all())


# --- scoring methods, bootstrap, ranking, merging --------------------------------------------------------

@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit(patch_size=8)


@pytest.fixture
def input_method():
    """A method whose map is the input's brightness: it ignores the model, so the sanity check must flag it."""

    def run(_name, adapter, x, _p):
        with torch.no_grad():
            logits = adapter.model(x)
        m = x.abs().mean(1)  # (B, H, W)
        return MapResult(m, m, logits, logits.argmax(-1), (1, 1))

    import sys

    sys.modules[__name__].run_input_method = run
    register(Method("test-brightness", "Brightness", "the input itself", {}, f"{__name__}:run_input_method",
                    lambda _p, _c: Cost(1, 0), class_specific=False))
    yield "test-brightness"
    import importlib

    importlib.import_module("vitviz.explain.registry")._REGISTRY.pop("test-brightness", None)


def test_score_methods_report_sanity_and_ranking(vit, input_method):
    x = _images(6, 32, seed=3)
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:, 8:16, 8:24] = True
    protocol = protocol_for(vit, 32, 32, sanity_images=3, sanity_points=3, bootstrap=200)
    assert protocol.unit == 8  # the patch
    rec = score_methods(vit, x, methods=["rollout", "chefer", input_method], protocol=protocol, masks=masks,
                        batch_size=4)
    assert set(rec.scores) == {"rollout", "chefer", input_method, "random"}
    for name, scores in rec.scores.items():
        assert set(scores) == {"deletion_auc", "insertion_auc", "road_auc", "pointing_game", "mask_iou"}, name
        assert all(v.shape == (6,) for v in scores.values())
    assert rec.sanity_stages[0] == "head" and rec.sanity_stages[-1] == "blocks.0"  # head first, top-down
    assert rec.sanity["rollout"].shape == (3, 3)
    # rollout does not read the head: randomising only the head leaves its map exactly as it was
    np.testing.assert_allclose(rec.sanity["rollout"][:, 0], 1.0, atol=1e-6)
    assert float(rec.sanity["chefer"][:, 0].mean()) < 0.999  # chefer follows the head's gradient
    np.testing.assert_allclose(rec.sanity[input_method], 1.0, atol=1e-6)
    report = summarise(rec)
    assert report["methods"][input_method]["sanity"]["flagged"] is True
    assert report["methods"]["chefer"]["sanity"]["final"] < protocol.sanity_flag
    assert report["ranking"] == list(report["methods"]) and sorted(report["ranking"]) == sorted(rec.methods)
    for e in report["methods"].values():
        for s in e["metrics"].values():
            assert s["low"] <= s["mean"] <= s["high"] and s["random_low"] <= s["random"] <= s["random_high"]
        assert e["ms_per_image"] > 0 and e["cost"]
    md = markdown_table(report)
    assert "4x4" not in md and "8x8-px squares" in md and report["verdict"] in md
    assert md.count("\n| ") == 1 + len(rec.methods)  # header and one row per method


def test_shards_merge_to_the_single_run(vit):
    x = _images(4, 32, seed=8)
    protocol = protocol_for(vit, 32, 32, sanity_images=2, sanity_points=2, bootstrap=100)
    kw = {"methods": ["chefer", "gradcam"], "protocol": protocol, "batch_size": 2}
    whole = score_methods(vit, x, **kw)
    sanity = [0, 3]
    assert list(whole.sanity_indices) == sanity
    parts = [score_methods(vit, x[2:], indices=[2, 3], sanity_indices=sanity, **kw),
             score_methods(vit, x[:2], indices=[0, 1], sanity_indices=sanity, **kw)]
    merged = merge_records(parts)
    assert list(merged.indices) == [0, 1, 2, 3]
    for name in whole.scores:
        for k, v in whole.scores[name].items():
            np.testing.assert_allclose(merged.scores[name][k], v, atol=1e-6, err_msg=f"{name}/{k}")
    for name in whole.sanity:
        np.testing.assert_allclose(merged.sanity[name], whole.sanity[name], atol=1e-6)
    a, b = summarise(whole), summarise(merged)
    assert a["ranking"] == b["ranking"] and a["verdict"] == b["verdict"]


def test_bootstrap_interval_and_beating_random():
    n = 40
    rng = np.random.default_rng(0)
    rec = TrustRecords(protocol=Protocol(unit=4, bootstrap=500), indices=np.arange(n))
    base = {"deletion_auc": rng.uniform(0.4, 0.6, n), "insertion_auc": rng.uniform(0.4, 0.6, n),
            "road_auc": rng.uniform(0.4, 0.6, n)}
    rec.scores = {
        "good": {k: v + (-0.2 if k != "insertion_auc" else 0.2) for k, v in base.items()},
        "same": {k: v + rng.normal(0, 0.01, n) for k, v in base.items()},
        "random": base,
    }
    report = summarise(rec, labels={"good": "Good", "same": "Same"})
    good, same = report["methods"]["good"]["metrics"], report["methods"]["same"]["metrics"]
    assert all(good[k]["beats_random"] for k in good) and not any(same[k]["beats_random"] for k in same)
    assert report["ranking"] == ["good", "same"] and report["verdict"].startswith("Trust Good for this model")
    s = good["deletion_auc"]
    width = s["high"] - s["low"]
    se = base["deletion_auc"].std() / np.sqrt(n)
    assert 2.5 * se < width < 5.5 * se  # a 95 % interval spans about 3.9 standard errors
    rec.scores = {"same": rec.scores["same"], "random": base}
    assert summarise(rec)["verdict"].startswith("Trust none of these maps")


def test_spearman_and_cascade_stages(vit):
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_allclose(spearman_rows(a, b), [1.0, 0.0])  # a constant map: no correlation
    np.testing.assert_allclose(spearman_rows(a[:1], -b[:1]), [-1.0])
    names = [name for name, _ in cascade_stages(vit)]
    assert names == ["head", "blocks.1", "blocks.0"]
    resnet = vitviz.create_model("resnet18_32", layers=(1, 1, 1), width=8, num_classes=5)
    assert [name for name, _ in cascade_stages(resnet)] == ["head", "layer3.0", "layer2.0", "layer1.0"]
    assert protocol_for(resnet, 32, 32).unit == 4 and protocol_for(resnet, 224, 224).unit == 28


def test_slow_methods_come_from_the_registry():
    assert not is_slow("chefer") and not is_slow("gradcam")
    if "rise" in registry():
        assert is_slow("rise")
    if "scorecam" in registry():
        assert is_slow("scorecam")  # one forward per channel


def test_bad_input_is_refused(vit):
    x = _images(2, 32)
    with pytest.raises(ExplainError, match="masks must be"):
        score_methods(vit, x, methods=["rollout"], masks=torch.zeros(2, 16, 16, dtype=torch.bool))
    with pytest.raises(ExplainError, match="unknown method"):
        score_methods(vit, x, methods=["no-such-method"])
    with pytest.raises(ExplainError, match="no classifier head"):
        score_methods(tiny_vit(num_classes=0), x, methods=["rollout"])
    with pytest.raises(ExplainError, match="road_fractions"):
        Protocol(unit=4, road_fractions=(0.0, 0.5, 1.0))
    with pytest.raises(ExplainError, match="unit"):
        perturbation_scores(vit, x, torch.rand(2, 32, 32), torch.zeros(2, dtype=torch.long), Protocol(unit=5), [0, 1])
    with pytest.raises(ExplainError, match="every pixel"):
        impute_noisy_linear(x[0], torch.ones(32, 32, dtype=torch.bool))
