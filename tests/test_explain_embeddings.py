"""Patch filters and their PCA, position-embedding similarity, mean attention distance."""

from __future__ import annotations

import math

import pytest
import torch
from test_explain_capture import tiny_timm_vit, tiny_vit
from test_explain_methods import tiny_hybrid

from vitviz.errors import ExplainError
from vitviz.explain import (
    attention_distance,
    filter_pca,
    mean_attention_distance,
    patch_distances,
    patch_embedding_filters,
    patch_embedding_pca,
    pos_embed_similarity,
    position_similarity,
)


def check_similarity(sim: torch.Tensor, grid: tuple[int, int]) -> None:
    gh, gw = grid
    assert sim.shape == (gh, gw, gh, gw)
    flat = sim.reshape(gh * gw, gh * gw)
    torch.testing.assert_close(flat, flat.T)
    torch.testing.assert_close(flat.diagonal(), torch.ones(gh * gw))
    assert float(flat.abs().max()) <= 1.0 + 1e-6


def test_position_similarity_is_symmetric_with_unit_diagonal():
    vit = tiny_vit()
    check_similarity(position_similarity(vit), (4, 4))
    check_similarity(position_similarity(vit, grid=(6, 5)), (6, 5))  # after interpolation
    check_similarity(position_similarity(tiny_hybrid()), (8, 8))
    timm_vit = tiny_timm_vit()
    check_similarity(position_similarity(timm_vit), (4, 4))


def test_similarity_of_hand_made_embeddings():
    emb = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, D=2): two orthogonal positions
    sim = pos_embed_similarity(emb)
    torch.testing.assert_close(sim.reshape(2, 2), torch.eye(2))
    with pytest.raises(ExplainError, match="grid"):
        position_similarity(tiny_vit(), grid=(0, 3))


def test_filters_and_pca():
    vit = tiny_vit()
    filters = patch_embedding_filters(vit)
    assert filters.shape == (32, 8, 8, 3)
    assert float(filters.min()) >= 0.0 and float(filters.max()) <= 1.0
    pca = patch_embedding_pca(vit)
    assert pca.components.shape == (28, 8, 8, 3) and pca.raw_components.shape == (28, 3, 8, 8)
    ev = pca.explained_variance_ratio
    assert bool((ev[:-1] >= ev[1:] - 1e-7).all()) and float(ev.sum()) <= 1.0 + 1e-6
    with pytest.raises(ExplainError, match="no pixel-space patch filters"):
        patch_embedding_filters(tiny_hybrid())
    with pytest.raises(ExplainError, match="n_components"):
        patch_embedding_pca(vit, n_components=33)


def test_pca_finds_a_planted_direction():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(3 * 4 * 4, generator=gen)
    direction /= direction.norm()
    coef = torch.randn(50, 1, generator=gen) * 10
    weight = (coef * direction + 0.01 * torch.randn(50, 48, generator=gen)).reshape(50, 3, 4, 4)
    pca = filter_pca(weight, n_components=3)
    assert float(pca.explained_variance_ratio[0]) > 0.99
    cosine = float((pca.raw_components[0].reshape(-1) * direction).sum())
    assert abs(cosine) > 0.999


def test_patch_distances():
    d = patch_distances((2, 2), 8)
    expected = torch.tensor([[0, 8, 8, 8 * math.sqrt(2)], [8, 0, 8 * math.sqrt(2), 8],
                             [8, 8 * math.sqrt(2), 0, 8], [8 * math.sqrt(2), 8, 8, 0]], dtype=torch.float64)
    torch.testing.assert_close(d, expected)


def test_mean_attention_distance_on_hand_made_attention():
    n = 1 + 4  # class token + a 2x2 grid of 8-px patches
    identity = torch.eye(n)[None, None].repeat(2, 3, 1, 1)  # (B, heads, N, N)
    uniform = torch.full((2, 3, n, n), 1.0 / n)
    out = mean_attention_distance([identity, uniform], grid=(2, 2), cell=8)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], torch.zeros(3))
    # uniform over the 4 patch keys (the class column is dropped and rows renormalised): from any
    # patch the distances are 0, 8, 8 and 8*sqrt(2) -> mean (16 + 8*sqrt(2)) / 4 = 4 + 2*sqrt(2)
    torch.testing.assert_close(out[1], torch.full((3,), 4 + 2 * math.sqrt(2)))
    # a head that attends only to the patch to its right (or left on the right edge): 8 px
    shift = torch.zeros(1, 1, n, n)
    for q, k in ((1, 2), (2, 1), (3, 4), (4, 3), (0, 0)):
        shift[0, 0, q, k] = 1.0
    torch.testing.assert_close(mean_attention_distance([shift], (2, 2), 8), torch.tensor([[8.0]]))


def test_attention_distance_of_a_model():
    vit = tiny_vit()
    images = torch.randn(5, 3, 32, 32)
    d = attention_distance(vit, images, batch_size=2)
    assert d.shape == (2, 2)
    assert bool((d >= 0).all()) and float(d.max()) <= 32 * math.sqrt(2)
    torch.testing.assert_close(d, attention_distance(vit, images, batch_size=5), atol=1e-5, rtol=1e-5)
