"""Rollout, gradient rollout and Chefer relevance as pure functions of hand-made attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitviz.errors import ExplainError
from vitviz.explain import attention_rollout, chefer_relevance, fuse_heads, grad_rollout, rollout_row
from vitviz.explain.rollout import token_row_to_grid

A1 = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]
A2 = [[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]


def as_layer(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)[None, None]  # (1, 1, N, N): one image, one head


def random_attention(depth: int = 3, batch: int = 2, heads: int = 3, n: int = 10, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, n, generator=gen, dtype=torch.float64).softmax(-1) for _ in range(depth)]


def test_hand_computed_two_layer_rollout():
    # By hand: Â = (A + I) / 2 (rows of A sum to 1), rollout = Â2 @ Â1.
    # Â1 = [[.75, .125, .125], [.1, .8, .1], [.05, .15, .8]];  Â2 = [[.6, .2, .2], [.25, .75, 0], [0, 0, 1]]
    # row 0: .6*Â1[0] + .2*Â1[1] + .2*Â1[2] = [.45+.02+.01, .075+.16+.03, .075+.02+.16]
    expected = torch.tensor([[0.48, 0.265, 0.255],
                             [0.2625, 0.63125, 0.10625],
                             [0.05, 0.15, 0.8]], dtype=torch.float64)
    out = attention_rollout([as_layer(A1), as_layer(A2)])
    torch.testing.assert_close(out[0], expected)
    # the map: class-token row over the patch columns, on a 1x2 grid
    torch.testing.assert_close(token_row_to_grid(out, (1, 2)), torch.tensor([[[0.265, 0.255]]], dtype=torch.float64))
    torch.testing.assert_close(rollout_row([as_layer(A1), as_layer(A2)])[0], expected[0])
    # start_layer=1 uses the last layer only
    torch.testing.assert_close(attention_rollout([as_layer(A1), as_layer(A2)], start_layer=-1)[0],
                               (torch.tensor(A2, dtype=torch.float64) + torch.eye(3)) / 2)


def test_discard_drops_the_weakest_patch_weights_but_never_the_class_column():
    a = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]]
    # discard_ratio 0.5 of 2 patch columns = 1 per row: the smaller patch weight goes. Row 1's class
    # weight (0.1) is the row's smallest, yet it stays. Then + I and renormalise:
    expected = torch.tensor([[1.5 / 1.8, 0.3 / 1.8, 0.0],
                             [0.1 / 1.7, 1.6 / 1.7, 0.0],
                             [0.4 / 1.8, 0.4 / 1.8, 1.0 / 1.8]], dtype=torch.float64)
    torch.testing.assert_close(attention_rollout([as_layer(a)], discard_ratio=0.5)[0], expected)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one(fusion, discard):
    out = attention_rollout(random_attention(), head_fusion=fusion, discard_ratio=discard)
    assert out.shape == (2, 10, 10)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 10, dtype=torch.float64))
    assert bool((out >= 0).all())
    row = rollout_row(random_attention(), 0, fusion, discard)
    torch.testing.assert_close(row, out[:, 0])


def test_head_fusion():
    heads = torch.tensor([[[[0.2, 0.8], [0.5, 0.5]], [[0.6, 0.4], [0.1, 0.9]]]])  # (1, 2, 2, 2)
    torch.testing.assert_close(fuse_heads(heads, "mean"), torch.tensor([[[0.4, 0.6], [0.3, 0.7]]]))
    torch.testing.assert_close(fuse_heads(heads, "max"), torch.tensor([[[0.6, 0.8], [0.5, 0.9]]]))
    torch.testing.assert_close(fuse_heads(heads, "min"), torch.tensor([[[0.2, 0.4], [0.1, 0.5]]]))


def test_grad_rollout_reduces_to_rollout_and_clamps():
    attn = random_attention()
    ones = [torch.ones_like(a) for a in attn]
    torch.testing.assert_close(grad_rollout(attn, ones), attention_rollout(attn))
    # negative gradients everywhere: nothing survives the clamp, only the residual identity is left
    neg = [-torch.ones_like(a) for a in attn]
    torch.testing.assert_close(grad_rollout(attn, neg), torch.eye(10, dtype=torch.float64).expand(2, 10, 10))
    torch.testing.assert_close(rollout_row(attn, 0, gradients=ones), attention_rollout(attn)[:, 0])


def test_chefer_relevance_by_numpy():
    attn = random_attention(depth=2, batch=1, heads=2, n=4, seed=3)
    grads = [torch.randn(a.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
             for i, a in enumerate(attn)]
    r = np.eye(4)
    for a, g in zip(attn, grads, strict=True):
        a_np, g_np = a[0].numpy(), g[0].numpy()  # (heads, N, N)
        a_bar = np.maximum(g_np * a_np, 0).mean(axis=0)  # clamp per head, then average
        r = r + a_bar @ r
    torch.testing.assert_close(chefer_relevance(attn, grads)[0], torch.from_numpy(r))
    # per-head clamping differs from clamping the head mean (that is grad-rollout's order)
    mean_first = np.maximum((grads[0][0].numpy() * attn[0][0].numpy()).mean(axis=0), 0)
    per_head = np.maximum(grads[0][0].numpy() * attn[0][0].numpy(), 0).mean(axis=0)
    assert not np.allclose(mean_first, per_head)


def test_bad_parameters_raise_explain_errors():
    attn = random_attention()
    for ratio in (1.0, -0.1, 1.5, "0.5"):
        with pytest.raises(ExplainError, match="discard_ratio"):
            attention_rollout(attn, discard_ratio=ratio)
    with pytest.raises(ExplainError, match="head fusion"):
        attention_rollout(attn, head_fusion="median")
    with pytest.raises(ExplainError, match="start_layer"):
        attention_rollout(attn, start_layer=3)
    with pytest.raises(ExplainError, match="with_grads"):
        grad_rollout(attn, None)
    with pytest.raises(ExplainError, match="no attention"):
        attention_rollout([])


def test_rollout_row_of_the_patch_mean_matches_the_full_product():
    gen = torch.Generator().manual_seed(3)
    attns = [torch.rand(2, 3, 5, 5, generator=gen).softmax(-1) for _ in range(3)]
    full = attention_rollout(attns)  # (B, N, N)
    for fusion, discard in (("mean", 0.0), ("max", 0.5)):
        full = attention_rollout(attns, fusion, discard)
        torch.testing.assert_close(rollout_row(attns, "mean", fusion, discard), full[:, 1:].mean(1))
        torch.testing.assert_close(rollout_row(attns, 2, fusion, discard), full[:, 2])
    torch.testing.assert_close(token_row_to_grid(full, (2, 2), 1, "mean"), full[:, 1:, 1:].mean(1).reshape(2, 2, 2))
    with pytest.raises(ExplainError, match="row must be"):
        rollout_row(attns, "median")
