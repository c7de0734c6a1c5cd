"""cka_matrix: the streamed (layers_a x layers_b) grid, its symmetries, and agreement with whole-sample CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_explain_capture import tiny_vit
from test_explain_methods import tiny_resnet

from vitviz.errors import ConfigError
from vitviz.represent import cka, unbiased_hsic
from vitviz.represent.cka import MinibatchCKA, hsic_grid
from vitviz.represent.features import layer_features
from vitviz.represent.matrix import cka_matrix
from vitviz.represent.subjects import Subject, prepare


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (96, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.fixture(scope="module")
def vit() -> Subject:
    return Subject("vit", tiny_vit(depth=3), img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def resnet() -> Subject:
    return Subject("resnet", tiny_resnet(), img_size=32, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))


def test_hsic_grid_equals_the_pairwise_estimator():
    rng = np.random.default_rng(1)
    ka = [torch.as_tensor((f := rng.normal(size=(9, 4))) @ f.T) for _ in range(3)]
    kb = [torch.as_tensor((f := rng.normal(size=(9, 6))) @ f.T) for _ in range(2)]
    cross, self_a, self_b = hsic_grid(torch.stack(ka), torch.stack(kb))
    for i, k in enumerate(ka):
        assert float(self_a[i]) == pytest.approx(float(unbiased_hsic(k, k)), rel=1e-10)
        for j, l_ in enumerate(kb):
            assert float(cross[i, j]) == pytest.approx(float(unbiased_hsic(k, l_)), rel=1e-10)
    assert float(self_b[1]) == pytest.approx(float(unbiased_hsic(kb[1], kb[1])), rel=1e-10)


def test_a_model_against_itself_is_one_on_the_diagonal_and_symmetric(vit, images):
    res = cka_matrix(vit, vit, images, batch_size=32)
    assert res.grid.shape == (3, 3) and res.labels_a == res.labels_b == ["blocks.0", "blocks.1", "blocks.2"]
    np.testing.assert_allclose(np.diag(res.grid), 1.0, atol=1e-9)
    np.testing.assert_allclose(res.grid, res.grid.T, atol=1e-9)
    assert res.examples == 96 and res.batches == 3


def test_swapping_the_models_transposes_the_grid(vit, resnet, images):
    ab = cka_matrix(vit, resnet, images, batch_size=48, rep="readout")
    ba = cka_matrix(resnet, vit, images, batch_size=48, rep="readout")
    assert ab.grid.shape == (3, 3) and ab.stages_b == [0, 1, 2]
    np.testing.assert_allclose(ab.grid, ba.grid.T, atol=1e-9)


def test_streamed_grid_is_the_minibatch_estimate_of_each_batch_features(vit, resnet, images):
    """The same numbers as feeding every batch's features to MinibatchCKA by hand, tail batch included."""
    res = cka_matrix(vit, resnet, images[:70], batch_size=32, rep="mean")
    acc = MinibatchCKA(3, 3)
    for start in (0, 32, 64):
        batch = images[:70][start:start + 32]
        fa = layer_features(vit.model, prepare(vit, batch)).layers
        fb = layer_features(resnet.model, prepare(resnet, batch)).layers
        acc.update([f.patches.mean(1).double().numpy() for f in fa], [f.patches.mean(1).double().numpy() for f in fb])
    np.testing.assert_allclose(res.grid, acc.value(), rtol=1e-5, atol=1e-6)
    assert res.batches == 3 and res.examples == 70


def test_float32_features_with_a_large_mean_keep_their_precision():
    """The Gram of float32 features is formed after centring: a common offset of 1e4 changes nothing."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 20)), rng.normal(size=(64, 8))
    y[:, :4] += x[:, :4]
    exact, shifted = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    exact.update([x], [y])  # float64 numpy: the reference
    shifted.update([torch.tensor(x + 1e4, dtype=torch.float32)], [torch.tensor(y + 1e4, dtype=torch.float32)])
    assert shifted.value()[0, 0] == pytest.approx(exact.value()[0, 0], abs=1e-4)


def test_streaming_estimates_the_one_batch_value(vit, resnet, images):
    """Small batches and one batch of everything estimate the same CKA (both unbiased)."""
    streamed = cka_matrix(vit, resnet, images, batch_size=24, rep="readout").grid
    whole = cka_matrix(vit, resnet, images, batch_size=96, rep="readout").grid
    assert np.abs(streamed - whole).max() < 0.15
    fa = layer_features(vit.model, prepare(vit, images)).layers
    fb = layer_features(resnet.model, prepare(resnet, images)).layers
    biased = np.array([[cka(a.readout, b.readout) for b in fb] for a in fa])
    assert (biased > whole - 0.02).all()  # the biased whole-sample value sits above the unbiased one


def test_progress_callback_and_bad_input(vit, images):
    seen: list[tuple[int, int]] = []
    cka_matrix(vit, vit, images[:40], batch_size=16, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # the 8-image tail batch counts too
    with pytest.raises(ConfigError, match="at least 4"):
        cka_matrix(vit, vit, images[:3], batch_size=16)
    with pytest.raises(ConfigError, match="batch_size"):
        cka_matrix(vit, vit, images, batch_size=2)
    with pytest.raises(ConfigError, match="unknown representation"):
        cka_matrix(vit, vit, images, rep="cls")
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        cka_matrix(vit, vit, images[0])


def test_an_iterable_of_batches_is_read_lazily_and_gives_the_tensor_grid(vit, resnet, images):
    pulled: list[int] = []

    def loader():  # (images, labels) pairs, as a DataLoader yields them
        for k, start in enumerate(range(0, 96, 16)):
            pulled.append(k)
            yield images[start:start + 16], torch.zeros(16, dtype=torch.long)

    seen: list[tuple[int, int, int | None]] = []
    res = cka_matrix(vit, resnet, loader(), batch_size=16, rep="mean",
                     progress=lambda done, total: seen.append((len(pulled), done, total)))
    assert seen[0] == (1, 1, None)  # one batch pulled when the first is done; a generator has no length
    assert [s[:2] for s in seen] == [(k, k) for k in range(1, 7)]
    assert res.examples == 96 and res.batches == 6 and res.world_size == 1 and res.rank_batches == [6]
    np.testing.assert_allclose(res.grid, cka_matrix(vit, resnet, images, batch_size=16, rep="mean").grid, atol=1e-12)


def test_a_dataset_uses_its_test_split_and_a_loader_its_length(vit):
    from vitviz.data.splits import DatasetSplits, Split

    def split(seed: int, n: int) -> Split:
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        return Split(images=x, labels=torch.zeros(n, dtype=torch.long))

    data = DatasetSplits(name="made up", train=split(1, 40), val=split(2, 8), test=split(3, 24), class_names=["a"],
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    res = cka_matrix(vit, vit, data, batch_size=8)
    assert res.examples == 24 and res.batches == 3  # the 24 test images, not the 40 training ones
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.test.images), batch_size=8)
    seen: list[tuple[int, int | None]] = []
    cka_matrix(vit, vit, loader, batch_size=8, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # a DataLoader knows its number of batches
    with pytest.raises(ConfigError, match=r"batch 1 is not a \(B, C, H, W\) tensor"):
        cka_matrix(vit, vit, iter([data.test.images[:8], data.test.images[0]]), batch_size=8)
