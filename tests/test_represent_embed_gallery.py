"""embed_2d (t-SNE keeps separated groups apart; UMAP's absence is a clear error) and error_gallery (the
misclassified images only, each explained by every model, as explain() explains it)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_explain_capture import tiny_vit
from test_explain_methods import tiny_resnet
from threadpoolctl import threadpool_limits

from vitviz.errors import ConfigError
from vitviz.explain import explain_details
from vitviz.represent.embedding import embed_2d, umap_available
from vitviz.represent.gallery import error_gallery, predictions
from vitviz.represent.subjects import Subject, prepare


def test_tsne_gives_two_coordinates_per_row_and_keeps_groups_apart():
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1], 20)  # (40,)
    x = rng.normal(size=(40, 12)) + 8.0 * group[:, None]  # two groups far apart in 12-d
    with threadpool_limits(1, user_api="openmp"):  # on a busy 2-core machine, OpenMP threads wait for each other
        coords = embed_2d(torch.tensor(x, dtype=torch.float32), "tsne")
    assert coords.shape == (40, 2) and np.isfinite(coords).all()
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1) + np.eye(40) * 1e9  # (40, 40), self excluded
    assert (group[d.argmin(axis=1)] == group).all()  # every point's nearest neighbour is of its own group


def test_embedding_errors_name_the_fix(monkeypatch):
    x = np.random.default_rng(1).normal(size=(10, 3))
    with pytest.raises(ConfigError, match="at least 5 feature rows"):
        embed_2d(x[:4])
    with pytest.raises(ConfigError, match="unknown embedding method 'pca'"):
        embed_2d(x, "pca")
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now fails, as without the extra
    assert not umap_available()
    with pytest.raises(ConfigError, match=r"umap-learn.*\.\[umap\].*method='tsne'"):
        embed_2d(x, "umap")


@pytest.fixture(scope="module")
def subjects() -> list[Subject]:
    return [Subject("vit", tiny_vit(), img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3),
            Subject("resnet", tiny_resnet(), img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)]


def test_the_gallery_shows_only_misclassified_images_explained_by_every_model(subjects):
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    vit_pred = predictions(subjects[0], images)
    labels = vit_pred.clone()
    labels[[2, 5, 9]] = (vit_pred[[2, 5, 9]] + 1) % 5  # the ViT is wrong exactly on images 2, 5 and 9
    items = error_gallery(subjects, images, labels, of=0, limit=8)
    assert [i.index for i in items] == [2, 5, 9]
    assert [i.label for i in items] == labels[[2, 5, 9]].tolist()
    resnet_pred = predictions(subjects[1], images)
    for item in items:
        assert np.array_equal(item.image, images[item.index].permute(1, 2, 0).numpy())
        assert [e.model for e in item.explained] == ["vit", "resnet"]
        assert [e.method for e in item.explained] == ["chefer", "gradcam"]  # each family's default method
        assert [e.pred for e in item.explained] == [int(vit_pred[item.index]), int(resnet_pred[item.index])]
        assert item.explained[0].pred != item.label  # the ViT's own error
        for e, s in zip(item.explained, subjects, strict=True):
            assert e.saliency.shape == (32, 32) and 0.0 < e.confidence <= 1.0
            want = explain_details(s.model, prepare(s, images[item.index:item.index + 1]), e.method).maps[0]
            np.testing.assert_allclose(e.saliency, want.numpy(), atol=1e-5)  # the map explain() gives
    assert [i.index for i in error_gallery(subjects, images, labels, of=0, limit=2)] == [2, 5]
    wrong = torch.nonzero(resnet_pred != labels).flatten().tolist()
    assert [i.index for i in error_gallery(subjects, images, labels, of=1, limit=3, pred=resnet_pred)] == wrong[:3]
    with pytest.raises(ConfigError, match="uint8"):
        error_gallery(subjects, images.float(), labels)
    with pytest.raises(ConfigError, match="of=2"):
        error_gallery(subjects, images, labels, of=2)
