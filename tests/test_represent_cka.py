"""Linear CKA and the unbiased minibatch estimator, against hand computations and their invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vitviz.errors import ConfigError
from vitviz.represent import MinibatchCKA, cka, unbiased_hsic


def features(n: int = 200, p: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, p))


def test_a_hand_computed_pair():
    # one feature each: linear CKA is the squared correlation; x = [1, 2, 3], y = [1, 2, 4]:
    # centred x = [-1, 0, 1], y = [-4/3, -1/3, 5/3]; (Σxy)² / (Σx² Σy²) = 3² / (2 · 14/3) = 27/28
    assert cka(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [4.0]])) == pytest.approx(27 / 28)


def test_equals_the_kernel_form_with_a_centring_matrix():
    x, y = features(30, 5, 1), features(30, 7, 2)
    h = np.eye(30) - 1 / 30
    def hsic(k, l_):
        return np.trace(k @ h @ l_ @ h)
    k, l_ = x @ x.T, y @ y.T
    assert cka(x, y) == pytest.approx(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)), rel=1e-10)


def test_identity_invariances_and_what_breaks_them():
    x = features()
    assert cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(12, 12)))  # orthogonal
    assert cka(x, x @ q) == pytest.approx(1.0)
    assert cka(x, 7.5 * x) == pytest.approx(1.0)
    y = features(200, 6, 4)
    assert cka(x @ q * 3.0, y) == pytest.approx(cka(x, y))
    skew = np.eye(12) + np.diag(np.linspace(0, 20, 12))  # invertible, not orthogonal times a scalar
    assert cka(x, x @ skew) < 0.9
    assert cka(torch.as_tensor(x), torch.as_tensor(x @ q)) == pytest.approx(1.0)  # torch works too


def test_unbiased_hsic_is_the_u_statistic_over_distinct_quadruples():
    x, y = features(6, 3, 5), features(6, 2, 6)
    k, l_ = x @ x.T, y @ y.T
    total = 0.0
    for i, j, q, r in itertools.permutations(range(6), 4):
        total += k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
    expected = total / (6 * 5 * 4 * 3)
    assert float(unbiased_hsic(torch.as_tensor(k), torch.as_tensor(l_))) == pytest.approx(expected, rel=1e-9)


def test_minibatch_estimate_converges_to_the_whole_sample():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2048, 16))
    y = np.tanh(x @ rng.normal(size=(16, 8))) + 0.5 * rng.normal(size=(2048, 8))
    z = rng.normal(size=(2048, 4))  # unrelated
    acc = MinibatchCKA(2, 2)
    for start in range(0, 2048, 128):
        sl = slice(start, start + 128)
        acc.update([x[sl], y[sl]], [y[sl], z[sl]])
    grid = acc.value()
    assert grid.shape == (2, 2)
    assert grid[1, 0] == pytest.approx(1.0)  # y against itself
    assert grid[0, 0] == pytest.approx(cka(x, y), abs=0.03)
    assert abs(grid[0, 1]) < 0.05 and cka(x, z) < 0.05  # nothing shared
    one = MinibatchCKA(1, 1)
    one.update([x[:128]], [y[:128]])
    assert abs(one.value()[0, 0] - cka(x, y)) > abs(grid[0, 0] - cka(x, y))  # more batches, closer


def test_bad_input_says_what_to_do():
    with pytest.raises(ConfigError, match="same examples"):
        cka(features(10), features(11))
    with pytest.raises(ConfigError, match=r"\(n, d\)"):
        cka(np.zeros((4, 2, 2)), np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="constant"):
        cka(np.ones((5, 3)), features(5))
    acc = MinibatchCKA(1, 1)
    with pytest.raises(ConfigError, match="no batches"):
        acc.value()
    with pytest.raises(ConfigError, match="at least 4"):
        acc.update([features(3)], [features(3)])
    with pytest.raises(ConfigError, match="expected 1 and 1 layers"):
        acc.update([features(8), features(8)], [features(8)])
