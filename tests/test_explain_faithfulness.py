"""Deletion/insertion AUC, pointing game and mask IoU on hand-made models, maps and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain import auc, baseline_images, deletion_insertion, mask_iou, pointing_game


class RegionModel(nn.Module):
    """Two classes: logit of class 1 = 8 x mean of channel 0 over a known region, class 0 = 0."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * self.region).sum(dim=(1, 2)) / self.region.sum()  # (B,)
        return torch.stack([torch.zeros_like(score), 8 * score], dim=1)  # (B, 2)


def region_setup() -> tuple[RegionModel, torch.Tensor, torch.Tensor]:
    region = torch.zeros(16, 16)
    region[4:10, 6:12] = 1.0
    images = torch.ones(3, 3, 16, 16)
    perfect = region.expand(3, 16, 16).clone()
    return RegionModel(region), images, perfect


def test_a_perfect_map_beats_the_random_baseline():
    model, images, perfect = region_setup()
    res = deletion_insertion(model, images, perfect, steps=32, deletion_baseline="zero", insertion_baseline="zero",
                             random_baseline=True)
    assert res.target.tolist() == [1, 1, 1]
    assert res.deletion.shape == (3, 33) and res.fractions.shape == (33,)
    assert float(res.fractions[0]) == 0.0 and float(res.fractions[-1]) == 1.0
    # the region is 36 of 256 px: deleting it first drops the probability to 0.5 within 14 % of the pixels
    assert bool((res.deletion_auc < res.random.deletion_auc).all())
    assert bool((res.insertion_auc > res.random.insertion_auc).all())
    assert float(res.deletion_auc.mean()) < 0.6 and float(res.insertion_auc.mean()) > 0.9
    # the worst map (region last) is worse than random
    worst = deletion_insertion(model, images, 1 - perfect, steps=32, mode="deletion")
    assert bool((worst.deletion_auc > res.random.deletion_auc).all()) and worst.insertion is None


def test_patch_steps_and_custom_random_maps():
    model, images, perfect = region_setup()
    res = deletion_insertion(model, images, perfect, patch_size=4, mode="deletion",
                             random_baseline=lambda m: torch.rand(m.shape, generator=torch.Generator().manual_seed(3)))
    assert res.deletion.shape == (3, 17)  # 16 patches of 4x4: one per step
    assert bool((res.deletion_auc <= res.random.deletion_auc).all())


def test_auc_and_baselines():
    x = torch.linspace(0, 1, 11)
    torch.testing.assert_close(auc(1 - x, x), torch.tensor(0.5))
    images = torch.randn(2, 3, 16, 16)
    assert bool((baseline_images(images, "zero") == 0).all())
    torch.testing.assert_close(baseline_images(images, "mean")[:, :, 5, 7], images.mean(dim=(2, 3)))
    blurred = baseline_images(images, "blur")
    assert blurred.shape == images.shape and float(blurred.std()) < float(images.std())
    with pytest.raises(ExplainError, match="unknown baseline"):
        baseline_images(images, "noise")


def test_bad_arguments():
    model, images, perfect = region_setup()
    with pytest.raises(ExplainError, match="maps must be"):
        deletion_insertion(model, images, perfect[:, :8])
    with pytest.raises(ExplainError, match="mode"):
        deletion_insertion(model, images, perfect, mode="both-ways")
    with pytest.raises(ExplainError, match="patch_size"):
        deletion_insertion(model, images, perfect, patch_size=5)
    with pytest.raises(ExplainError, match="out of range"):
        deletion_insertion(model, images, perfect, target=2)


def test_pointing_game_on_hand_made_maps():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[:, 2:5, 2:5] = True
    maps = np.zeros((3, 10, 10), dtype=np.float32)
    maps[0, 3, 3] = 1.0  # inside
    maps[1, 8, 8] = 1.0  # outside: (8, 8) is 4*sqrt(2) ~ 5.66 px from the corner (4, 4)
    maps[2, 5, 4] = 1.0  # one pixel below the mask
    assert pointing_game(maps, masks).tolist() == [True, False, False]
    assert pointing_game(maps, masks, tolerance=1).tolist() == [True, False, True]
    assert pointing_game(maps, masks, tolerance=5.6).tolist() == [True, False, True]
    assert pointing_game(maps, masks, tolerance=5.7).tolist() == [True, True, True]
    assert pointing_game(torch.from_numpy(maps[0]), torch.from_numpy(masks[0])).tolist() == [True]
    assert pointing_game(maps[:1], np.zeros((1, 10, 10), bool)).tolist() == [False]  # empty mask: a miss


def test_mask_iou():
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, :4, :4] = True
    perfect = mask.astype(np.float32)
    assert mask_iou(perfect, mask).tolist() == [1.0]
    assert mask_iou(1 - perfect, mask).tolist() == [0.0]
    # top 50 % of pixels = 32 px containing the 16 mask px: IoU 16 / 32
    torch.testing.assert_close(mask_iou(perfect, mask, top_percent=50), torch.tensor([0.5]))
    with pytest.raises(ExplainError, match="same shape"):
        mask_iou(perfect, mask[:, :4])
