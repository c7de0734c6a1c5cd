"""Out-of-distribution scores (vitviz.ood): calibration, scoring, storage in checkpoints, training.

Tiny random models and synthetic images: "in distribution" is grayscale noise (the three channels
equal, as in the digits set), "out of distribution" is saturated colour noise. Every stage of any network sees
that difference, so the ``features`` score must flag the colour images; the energy score is checked
against its definition. Metadata rewrites must keep the tensor bytes identical.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

import vitviz
from vitviz.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint, update_checkpoint_meta
from vitviz.data import normalize
from vitviz.errors import CheckpointError, ConfigError
from vitviz.models.registry import build_model, preset_config
from vitviz.ood import _distance, _fit_layer, calibrate, ood_score, stage_modules
from vitviz.training import TrainConfig, train

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TINY = {
    "vit": ("vit_p4_d8_32", {"img_size": 16, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3}),
    "hybrid": ("hybrid_r18_vit_32", {"img_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2, "backbone_width": 8,
                                     "backbone_layers": (1, 1, 1), "num_classes": 3}),
    "resnet": ("resnet18_32", {"width": 8, "layers": (1, 1), "num_classes": 3}),
}


def tiny(family: str = "vit"):
    torch.manual_seed(0)
    name, overrides = TINY[family]
    fam, cfg = preset_config(name, **overrides)
    return build_model(fam, cfg).eval()


def gray(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8).expand(-1, 3, -1, -1).clone()


def colour(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Saturated colour noise: red and green opposite, little blue (channels the grayscale set never separates)."""
    g = torch.Generator().manual_seed(seed)
    red = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    blue = torch.randint(0, 64, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return torch.cat([red, 255 - red, blue], dim=1)


def tensor_bytes_digest(path) -> str:
    with open(path, "rb") as fp:
        (n,) = struct.unpack("<Q", fp.read(8))
        fp.seek(8 + n)
        return hashlib.sha256(fp.read()).hexdigest()


@pytest.fixture(scope="module")
def calibrated():
    model = tiny("vit")
    cal = calibrate(model, gray(200, 1), gray(100, 2), mean=MEAN, std=STD, keep=0.9)
    return model, cal


# --------------------------------------------------------------------------------------------------
# the score


@pytest.mark.parametrize("family", ["vit", "hybrid", "resnet"])
def test_features_score_flags_colour_images_for_a_model_trained_on_grayscale(family):
    model = tiny(family)
    size = 32 if family == "resnet" else 16
    cal = calibrate(model, gray(160, 1, size), gray(80, 2, size), mean=MEAN, std=STD, keep=0.95)
    assert cal["method"] == "features" and [layer["module"] for layer in cal["layers"]] == stage_modules(model)
    held_out = ood_score(model, cal, normalize(gray(80, 3, size), MEAN, STD))
    odd = ood_score(model, cal, normalize(colour(20, 4, size), MEAN, STD))
    assert odd.flagged.all(), odd.scores
    assert held_out.flagged.double().mean() <= 0.15  # about 5 % are expected; 80 images make it noisy


def test_threshold_keeps_the_asked_share_of_validation_and_scoring_reproduces_it(calibrated):
    model, cal = calibrated
    val = ood_score(model, cal, normalize(gray(100, 2), MEAN, STD))
    assert cal["num_val"] == 100 and cal["keep"] == 0.9
    # The threshold is the 0.9 quantile of exactly these scores: 10 of 100 lie beyond it (linear interpolation).
    assert int(val.flagged.sum()) == 10
    assert float(np.quantile(val.scores.numpy(), 0.9)) == pytest.approx(cal["threshold"], rel=1e-9)


def test_ppca_distance_is_the_mahalanobis_distance_when_every_component_is_kept():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                                  dtype=torch.float64)
    layer = _fit_layer("x", feats, rank=5)  # 5 components + a residual of one direction: the full Gaussian
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    cov = np.cov(feats.numpy(), rowvar=False, bias=True)
    d = x.numpy() - feats.numpy().mean(0)
    want = np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
    np.testing.assert_allclose(_distance(layer, x).numpy(), want, rtol=1e-4)  # arrays are stored as float32


def test_energy_score_is_minus_logsumexp_of_the_logits():
    from scipy.special import logsumexp

    model = tiny("vit")
    cal = calibrate(model, gray(8, 1), gray(40, 2), mean=MEAN, std=STD, method="energy", keep=0.95)
    assert cal["method"] == "energy" and "layers" not in cal
    x = normalize(colour(5, 3), MEAN, STD)
    with torch.no_grad():
        logits = model(x).double().numpy()
    np.testing.assert_allclose(ood_score(model, cal, x).scores.numpy(), -logsumexp(logits, axis=1), rtol=1e-6)


def test_single_image_verdict_and_batch_access(calibrated):
    model, cal = calibrated
    one = ood_score(model, cal, normalize(colour(1, 5), MEAN, STD))
    assert one.out_of_distribution and one.verdict == "out of distribution" and one.score > one.threshold
    two = ood_score(model, cal, normalize(colour(2, 5), MEAN, STD))
    with pytest.raises(ConfigError, match="batch"):
        _ = two.score
    assert vitviz.ood_score is ood_score


def test_bad_calibrations_and_inputs_are_our_errors(calibrated):
    model, cal = calibrated
    x = normalize(gray(2, 1), MEAN, STD)
    with pytest.raises(CheckpointError, match="no out-of-distribution calibration"):
        ood_score(model, None, x)
    damaged = {**cal, "layers": [{**cal["layers"][0], "mean": {"shape": [32], "base64": "!!"}}]}
    with pytest.raises(CheckpointError, match="damaged"):
        ood_score(model, damaged, x)
    with pytest.raises(CheckpointError, match="another model"):
        ood_score(tiny("resnet"), cal, normalize(gray(2, 1, 32), MEAN, STD))
    with pytest.raises(CheckpointError, match="threshold"):
        ood_score(model, {**cal, "threshold": float("nan")}, x)
    with pytest.raises(ConfigError, match="keep"):
        calibrate(model, gray(4, 1), gray(4, 2), mean=MEAN, std=STD, keep=1.0)
    with pytest.raises(ConfigError, match=r"\(B, 3, S, S\)"):
        ood_score(model, cal, x[0])


# --------------------------------------------------------------------------------------------------
# storage


def test_calibration_round_trips_through_a_checkpoint_and_old_files_still_load(tmp_path, calibrated):
    model, cal = calibrated
    with_cal = save_checkpoint(model, tmp_path / "a.safetensors", ood=cal, mean=MEAN, std=STD)
    assert read_checkpoint_meta(with_cal).ood == cal
    loaded, meta = load_checkpoint(with_cal)
    x = normalize(colour(3, 9), MEAN, STD)
    assert torch.equal(ood_score(loaded, meta, x).scores, ood_score(model, cal, x).scores)

    old = save_checkpoint(model, tmp_path / "old.safetensors")  # no calibration: as files written before it
    meta = read_checkpoint_meta(old)
    assert meta.ood is None and "ood" not in meta.extra
    with pytest.raises(CheckpointError, match="docs/calibrate_ood.py"):
        ood_score(model, meta, x)


def test_update_checkpoint_meta_rewrites_only_the_header(tmp_path, calibrated):
    model, cal = calibrated
    path = save_checkpoint(model, tmp_path / "m.safetensors", dataset="noise", class_names=["a", "b", "c"])
    before, meta_before = tensor_bytes_digest(path), read_checkpoint_meta(path)
    new = update_checkpoint_meta(path, ood=cal)
    assert tensor_bytes_digest(path) == before
    assert new.ood == cal and new == read_checkpoint_meta(path)
    assert {**new.to_dict(), "ood": None} == meta_before.to_dict(), "nothing else changed"
    loaded, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file is left behind"
    with pytest.raises(ConfigError, match="fields"):
        update_checkpoint_meta(path, colour="red")
    assert tensor_bytes_digest(path) == before


def test_training_stores_a_calibration_in_the_best_checkpoint(tmp_path):
    config = TrainConfig.from_dict({"model": "vit_p4_d8_32", "img_size": 16, "embed_dim": 16, "depth": 1,
                                    "num_heads": 2, "dataset": "digits", "epochs": 1, "limit_train": 64,
                                    "limit_eval": 40, "batch_size": 32, "threads": 1, "progress": False,
                                    "out": str(tmp_path / "run")})
    train(config)
    model, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta.ood is not None and meta.ood["method"] == "features" and meta.ood["num_val"] == 40
    photo = normalize(colour(1, 0), meta.mean, meta.std)  # a colour image for a model of grayscale digits
    assert ood_score(model, meta, photo).out_of_distribution
