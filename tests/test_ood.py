"""Out-of-distribution scores (vitviz.ood): calibration, scoring, storage in checkpoints, training.

Tiny random models and synthetic images: "in distribution" is grayscale noise (the three channels
equal, as in the digits set), "out of distribution" is saturated colour noise. Every stage of any network sees
that difference, so the ``features`` score must flag the colour images; the energy score is checked
against its definition. The input stage is checked against a NumPy/SciPy computation of its statistics, and
on shapes scenes against photo-like images (1/f texture and shading) that the tiny networks' stages miss.
In-distribution scenes that reach a model through a resize (made larger, shrunk by preprocess, as uploads
and the bundled samples do) must not be flagged once the calibration fits upload views, on tiny models
and on the shipped checkpoints. Metadata rewrites must keep the tensor bytes identical.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import vitviz
from vitviz.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint, update_checkpoint_meta
from vitviz.data import load_dataset, make_shapes, normalize
from vitviz.data.samples import PHOTOS, SHAPES_SAMPLE_SEED, dataset_samples, load_sample
from vitviz.data.uploads import upload_copies, upload_views
from vitviz.errors import CheckpointError, ConfigError
from vitviz.models.registry import build_model, preset_config
from vitviz.ood import (
    CALIBRATION_VERSION,
    PIXEL_BINS,
    _distance,
    _fit_gaussian,
    calibrate,
    ood_score,
    pixel_statistics,
    stage_modules,
)
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


def scenes(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Shapes scenes, uint8 (n, 3, S, S)."""
    return torch.from_numpy(make_shapes(n, seed=seed, img_size=size)[0]).permute(0, 3, 1, 2).contiguous()


def photo_like(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """An orange disc on a dark green ground, both with 1/f ("pink") colour texture, as in photos: uint8 (n, 3, S, S).

    Shapes scenes are flat colours, a smooth background, a grating and faint noise; a photo's pixels
    change at every scale (natural images have roughly 1/f amplitude spectra).
    """
    g = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(size).abs()
    radius = (f[:, None] ** 2 + f[None] ** 2).sqrt().clamp_min(1 / size)  # (S, S) spatial frequency
    spectrum = torch.complex(torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g))
    texture = torch.fft.ifft2(spectrum / radius).real  # (n, 3, S, S)
    texture = texture / texture.std(dim=(1, 2, 3), keepdim=True)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = (xx**2 + yy**2 < 0.5).float()  # (S, S)
    fg, ground = torch.tensor([0.9, 0.55, 0.3]).view(1, 3, 1, 1), torch.tensor([0.1, 0.25, 0.2]).view(1, 3, 1, 1)
    img = ground + (fg - ground) * disc + 0.12 * texture  # (n, 3, S, S)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


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
    assert cal["method"] == "features" and cal["version"] == CALIBRATION_VERSION
    assert [layer["module"] for layer in cal["layers"]] == ["input", *stage_modules(model)]
    held_out = ood_score(model, cal, normalize(gray(80, 3, size), MEAN, STD))
    odd = ood_score(model, cal, normalize(colour(20, 4, size), MEAN, STD))
    assert odd.flagged.all(), odd.scores
    assert held_out.flagged.double().mean() <= 0.15  # about 5 % are expected; 80 images make it noisy


@pytest.mark.parametrize("family", ["hybrid", "resnet"])
def test_input_stage_flags_photo_like_images_that_the_network_stages_miss(family):
    model = tiny(family)
    val_x = normalize(scenes(100, 2), MEAN, STD)
    cal = calibrate(model, scenes(200, 1), scenes(100, 2), mean=MEAN, std=STD, keep=0.95)
    result = ood_score(model, cal, normalize(photo_like(20, 4), MEAN, STD))
    assert result.stages == ("input", *stage_modules(model))
    assert torch.equal(result.scores, result.stage_scores.amax(1))

    # The test means something: thresholded as calibrate(..., pixels=False) would (the same quantile of
    # the validation split's maximum over the network stages), these random networks take most
    # photo-like images for scenes.
    network = ood_score(model, cal, val_x).stage_scores[:, 1:].amax(1)  # (Nv,)
    assert (result.stage_scores[:, 1:].amax(1) > torch.quantile(network, 0.95)).double().mean() < 0.5
    assert (result.stage("input") > result.threshold).all(), result.stage("input")
    assert result.flagged.all()
    kept = ood_score(model, cal, normalize(scenes(100, 3), MEAN, STD))
    assert (kept.stage("input") > kept.threshold).double().mean() <= 0.1  # about 5 % expected
    assert kept.flagged.double().mean() <= 0.15


def test_pixel_statistics_match_a_numpy_computation():
    from scipy.signal import convolve2d

    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 12).view(1, 1, 1, 12).expand(2, 3, 10, 12)
    x = (smooth + 0.1 * torch.rand(2, 3, 10, 12, generator=g)).clamp(0, 1).double()  # (2, 3, 10, 12)
    x = (x * 255).round() / 255  # 8-bit levels, as images reach a model
    got = pixel_statistics(x).numpy()
    assert got.shape == (2, 6 + 3 * len(PIXEL_BINS))
    edges = [0.0, *PIXEL_BINS, np.inf]

    def shares(values):  # every bin but the last, [a, b) as in the docstring
        return np.histogram(values, bins=edges)[0][:-1] / values.size

    def steps(a):  # (C, H, W) -> all |horizontal| and |vertical| neighbour differences
        return np.concatenate([np.abs(np.diff(a, axis=-1)).ravel(), np.abs(np.diff(a, axis=-2)).ravel()])

    laplace = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    for b, img in enumerate(x.numpy()):
        luma = np.tensordot([0.299, 0.587, 0.114], img, axes=1)  # (H, W)
        chroma = np.stack([img[0] - img[1], (img[0] + img[1]) / 2 - img[2]])  # (2, H, W)
        want = np.concatenate([img.mean((1, 2)), img.std((1, 2)), shares(steps(luma[None])),
                               shares(np.abs(convolve2d(luma, laplace, mode="valid"))), shares(steps(chroma))])
        np.testing.assert_allclose(got[b], want, atol=1e-12)

    flat = pixel_statistics(torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64))[0]  # a constant image
    assert flat[:3].tolist() == pytest.approx([128 / 255] * 3, abs=1e-15), "the nearest 8-bit level"
    assert flat[3:6].tolist() == [0.0] * 3
    assert flat[6::len(PIXEL_BINS)].tolist() == [1.0] * 3, "every difference is 0: all in the first bin"
    with pytest.raises(ConfigError, match="3x3"):
        pixel_statistics(torch.zeros(1, 3, 2, 8))


def test_input_stage_reads_pixels_whatever_the_normalisation():
    model = tiny("vit")
    images = scenes(60, 1)
    other = ((0.3, 0.4, 0.5), (0.2, 0.3, 0.35))
    a = calibrate(model, images, scenes(20, 2), mean=MEAN, std=STD)
    b = calibrate(model, images, scenes(20, 2), mean=other[0], std=other[1])
    x = photo_like(4, 5)
    za = ood_score(model, a, normalize(x, MEAN, STD)).stage("input")
    zb = ood_score(model, b, normalize(x, *other)).stage("input")
    np.testing.assert_allclose(za.numpy(), zb.numpy(), rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# upload views: the same content, made larger and resized as uploads and the bundled samples are

RESIZED_SIDES = (22, 32, 64, 96)  # test scenes made at these sides and resized to 16: between and beyond the views
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module")
def shapes_uploads():
    train, val = scenes(200, 1), scenes(100, 2)
    resized = torch.cat([upload_copies("shapes", scenes(60, 3), side, part="test") for side in RESIZED_SIDES])
    return train, val, upload_views("shapes", train, val), resized  # resized: (240, 3, 16, 16)


@pytest.mark.parametrize("family", ["vit", "hybrid", "resnet"])
def test_scenes_resized_like_an_upload_are_kept_once_the_calibration_fits_upload_views(family, shapes_uploads):
    train, val, views, resized = shapes_uploads
    model = tiny(family)
    x, photos = normalize(resized, MEAN, STD), normalize(photo_like(20, 4), MEAN, STD)
    plain = calibrate(model, train, val, mean=MEAN, std=STD, keep=0.95)
    # The test means something: calibrated on 16-px renders alone, most resized scenes are flagged
    # (shrinking averages away their noise and softens their edges).
    assert ood_score(model, plain, x).flagged.double().mean() > 0.5

    cal = calibrate(model, train, val, mean=MEAN, std=STD, keep=0.95, views=views)
    assert cal["views"] == ["native", "x1.25", "x1.5", "x3", "x8"] and cal["num_val"] == 5 * 100
    assert all(len(layer["gaussians"]) == 5 for layer in cal["layers"])
    assert ood_score(model, cal, x).flagged.double().mean() <= 0.12  # about 5 % expected
    assert ood_score(model, cal, normalize(scenes(100, 3), MEAN, STD)).flagged.double().mean() <= 0.12
    assert ood_score(model, cal, photos).flagged.all()


def test_each_stage_scores_an_image_against_its_nearest_view(shapes_uploads):
    train, val, views, resized = shapes_uploads
    model = tiny("vit")
    cal = calibrate(model, train, val, mean=MEAN, std=STD, views=views)
    x = normalize(torch.cat([scenes(4, 5), resized[::40], photo_like(2, 6)]), MEAN, STD)  # (12, 3, 16, 16)
    result = ood_score(model, cal, x)
    one_view = [ood_score(model, {**cal, "layers": [{**layer, "gaussians": [layer["gaussians"][v]]}
                                                     for layer in cal["layers"]]}, x).stage_scores
                for v in range(len(cal["views"]))]  # per view (12, stages)
    assert torch.equal(result.stage_scores, torch.stack(one_view).amin(0))
    assert torch.equal(result.scores, result.stage_scores.amax(1))
    val_scores = torch.cat([ood_score(model, cal, normalize(v, MEAN, STD)).scores
                            for v in (val, *(pair[1] for pair in views.values()))])
    assert cal["threshold"] == pytest.approx(float(torch.quantile(val_scores, cal["keep"])), rel=1e-9)


def test_upload_copies_are_made_larger_then_resized_by_preprocess():
    from PIL import Image

    from vitviz.data.datasets import SHAPES_SEEDS
    from vitviz.images import fit_image

    def fitted(big: np.ndarray, size: int) -> torch.Tensor:  # (n, H, W, 3) -> (n, 3, size, size) as preprocess resizes
        return torch.from_numpy(np.stack([np.asarray(fit_image(Image.fromarray(a), size)) for a in big])).permute(
            0, 3, 1, 2)

    images = scenes(3, 1)  # (3, 3, 16, 16)
    shapes = upload_copies("shapes", images, 40, part="val")
    assert torch.equal(shapes, fitted(make_shapes(3, seed=SHAPES_SEEDS["val"], img_size=40)[0], 16))
    digits = load_dataset("digits", img_size=16)
    copies = upload_copies("digits", digits.test.images[:4], 32, part="test")
    assert torch.equal(copies, fitted(load_dataset("digits", img_size=32).test.images[:4].permute(0, 2, 3, 1).numpy(),
                                      16))
    other = upload_copies("cifar10", images, 24)  # no source to remake: the images themselves are enlarged
    enlarged = np.stack([np.asarray(Image.fromarray(a).resize((24, 24), Image.Resampling.BICUBIC))
                         for a in images.permute(0, 2, 3, 1).numpy()])
    assert torch.equal(other, fitted(enlarged, 16)) and other.dtype == torch.uint8

    views = upload_views("shapes", images, images[:2], scales=(1.5, 2.0, 0.5, 16.0, 32.0), limit=2)
    assert list(views) == ["x1.5", "x2", "x16"], "no view at or below the side; one per side up to 256 px"
    assert [tuple(t.shape) for t in views["x16"]] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    with pytest.raises(ConfigError, match="uint8"):
        upload_copies("shapes", images.float(), 32)
    with pytest.raises(ConfigError, match="part"):
        upload_copies("shapes", images, 32, part="holdout")
    with pytest.raises(ConfigError, match="limit"):
        upload_views("shapes", images, images, limit=1)
    with pytest.raises(ConfigError, match="view 'x2'"):
        calibrate(tiny("vit"), images, images, mean=MEAN, std=STD, views={"x2": (images, scenes(2, 2, 20))})


def _native_counterparts(names: list[str], dataset: str, size: int) -> torch.Tensor:
    """The bundled samples' content made at the model's side, as its training images are: uint8 (n, 3, S, S)."""
    if dataset == "shapes":
        from vitviz.data.shapes import SHAPE_CLASSES

        images, labels, _ = make_shapes(2 * len(SHAPE_CLASSES), seed=SHAPES_SAMPLE_SEED, img_size=size)
        picks = [int(np.flatnonzero(labels == SHAPE_CLASSES.index(load_sample(n).label))[0]) for n in names]
        return torch.from_numpy(images[picks]).permute(0, 3, 1, 2)
    test = load_dataset("digits", img_size=size).test
    return test.images[[int(torch.nonzero(test.labels == int(load_sample(n).label))[0]) for n in names]]


@pytest.mark.parametrize("name", ["hybrid_digits", "hybrid_shapes", "resnet_digits", "resnet_shapes", "vit_digits",
                                  "vit_shapes"])
def test_shipped_checkpoints_keep_their_bundled_samples_and_flag_both_photos(name):
    """The dashboard's own path: a bundled sample, vitviz.preprocess (a resize), ood_score with meta.ood."""
    model, meta = load_checkpoint(SHIPPED / f"{name}.safetensors")
    samples = [n for n in dataset_samples(meta.dataset) if not n.startswith("photo")]
    assert len(samples) >= 8
    flagged = ood_score(model, meta, vitviz.preprocess([load_sample(n).image for n in samples], meta)).flagged
    native = _native_counterparts(samples, meta.dataset, meta.img_size)
    native_flagged = ood_score(model, meta, normalize(native, meta.mean, meta.std)).flagged
    # The resize flags nothing the model's own renders are not flagged for, and it keeps (nearly) all of
    # them: a few images of any test split lie beyond a threshold that keeps 98 % of validation.
    assert not (flagged & ~native_flagged).any(), (samples, flagged, native_flagged)
    assert int(flagged.sum()) <= len(samples) // 5, (samples, flagged)
    if meta.dataset == "shapes":
        assert not flagged.any(), (samples, flagged)
    photos = vitviz.preprocess([load_sample(f"photo · {Path(p).stem}").image for p in PHOTOS], meta)
    assert ood_score(model, meta, photos).flagged.all()


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
    layer = _fit_gaussian(feats, rank=5)  # 5 components + a residual of one direction: the full Gaussian
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
    first = cal["layers"][0]
    damaged = {**cal, "layers": [{**first, "gaussians": [{**first["gaussians"][0], "mean": {"shape": [32],
                                                                                          "base64": "!!"}}]}]}
    with pytest.raises(CheckpointError, match="damaged"):
        ood_score(model, damaged, x)
    with pytest.raises(CheckpointError, match="no Gaussians"):
        ood_score(model, {**cal, "layers": [{**first, "gaussians": []}, *cal["layers"][1:]]}, x)
    with pytest.raises(CheckpointError, match="another model"):
        ood_score(tiny("resnet"), cal, normalize(gray(2, 1, 32), MEAN, STD))
    with pytest.raises(CheckpointError, match="threshold"):
        ood_score(model, {**cal, "threshold": float("nan")}, x)
    with pytest.raises(ConfigError, match="keep"):
        calibrate(model, gray(4, 1), gray(4, 2), mean=MEAN, std=STD, keep=1.0)
    with pytest.raises(ConfigError, match=r"\(B, 3, S, S\)"):
        ood_score(model, cal, x[0])
    with pytest.raises(CheckpointError, match="version 99.*docs/calibrate_ood.py"):
        ood_score(model, {**cal, "version": 99}, x)
    pixels = cal["layers"][0]
    assert pixels["kind"] == "pixels"
    with pytest.raises(CheckpointError, match="unknown kind"):
        ood_score(model, {**cal, "layers": [{**pixels, "kind": "wavelets"}, *cal["layers"][1:]]}, x)
    with pytest.raises(CheckpointError, match="pixel_std"):
        ood_score(model, {**cal, "layers": [{**pixels, "pixel_std": [0.2, 0.0, 0.2]}, *cal["layers"][1:]]}, x)
    with pytest.raises(CheckpointError, match="bins"):
        ood_score(model, {**cal, "layers": [{**pixels, "bins": [0.1, 0.05]}, *cal["layers"][1:]]}, x)
    with pytest.raises(ConfigError, match="no stage 'head'"):
        ood_score(model, cal, x).stage("head")


def test_version_1_calibrations_without_the_input_stage_still_score(calibrated):
    model, cal = calibrated
    network_only = calibrate(model, gray(40, 1), gray(20, 2), mean=MEAN, std=STD, pixels=False)
    assert [layer["module"] for layer in network_only["layers"]] == stage_modules(model)
    old = {k: v for k, v in cal.items() if k != "threshold"}
    # Version 1 stages carry no kind, and their one Gaussian's fields sit in the stage itself.
    layers = [{"module": layer["module"], **layer["gaussians"][0]} for layer in cal["layers"][1:]]
    old = {**old, "version": 1, "threshold": 1.5, "layers": layers}
    x = normalize(torch.cat([gray(3, 7), colour(3, 8)]), MEAN, STD)
    now, then = ood_score(model, cal, x), ood_score(model, old, x)
    assert then.stages == now.stages[1:] == tuple(stage_modules(model))
    assert torch.equal(then.stage_scores, now.stage_scores[:, 1:])
    assert torch.equal(then.flagged, then.stage_scores.amax(1) > 1.5)


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
    assert meta.ood is not None and meta.ood["method"] == "features"
    # Digits remade at 1.25, 1.5, 3 and 8 times the 16-px side, 40 validation images each, as the split.
    assert meta.ood["views"] == ["native", "x1.25", "x1.5", "x3", "x8"] and meta.ood["num_val"] == 5 * 40
    photo = normalize(colour(1, 0), meta.mean, meta.std)  # a colour image for a model of grayscale digits
    assert ood_score(model, meta, photo).out_of_distribution
