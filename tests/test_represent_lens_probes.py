"""logit_lens and probe_layers on hand-made inputs whose answers are known by construction, and the lens
curves drawn at the same depth as the probes (a hybrid's lens starts after its CNN stem)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitviz.errors import ConfigError, ExplainError
from vitviz.represent.features import Readouts
from vitviz.represent.figures import Curve, curves_figure, lens_figure
from vitviz.represent.lens import logit_lens
from vitviz.represent.probes import probe_layers


def readouts(lens_pred: list[list[int] | None], pred: list[int], error: float = 0.0,
             labels: list[str] | None = None) -> Readouts:
    """Readouts of len(lens_pred) layers (named layer.0, layer.1, ... unless ``labels``), only the predictions
    filled in."""
    n = len(pred)
    return Readouts(labels=labels or [f"layer.{k}" for k in range(len(lens_pred))], stages=[0] * len(lens_pred),
                    features=[torch.zeros(n, 2) for _ in lens_pred],
                    lens_pred=[None if p is None else torch.tensor(p) for p in lens_pred],
                    pred=torch.tensor(pred), lens_error=error)


def test_logit_lens_agreement_and_accuracy_by_construction():
    #           images:   0  1  2  3  4  5  6  7
    pred = [0, 1, 2, 2, 1, 0, 1, 2]  # the model's own predictions
    truth = [0, 1, 2, 0, 1, 0, 2, 2]  # it gets images 3 and 6 wrong: accuracy 6/8
    lens = [None, None,  # a hybrid's two stem stages: no lens there
            [0, 0, 0, 0, 0, 0, 0, 0],  # agrees on 0, 5 (2/8); right on 0, 3, 5 (3/8)
            [0, 1, 2, 0, 1, 0, 2, 1],  # agrees on all but 3, 6, 7 (5/8); right on all but 7 (7/8)
            pred]  # the last layer's lens is the model: agreement 1, accuracy the model's
    res = logit_lens(readouts(lens, pred), truth, name="hybrid")
    assert res.labels == ["layer.2", "layer.3", "layer.4"]
    assert res.positions == [2, 3, 4] and res.layers == 5
    assert res.agreement == pytest.approx([2 / 8, 5 / 8, 1.0])
    assert res.accuracy == pytest.approx([3 / 8, 7 / 8, 6 / 8])
    d = res.to_dict()
    assert d["model"] == "hybrid" and d["accuracy"] == pytest.approx([0.375, 0.875, 0.75])
    no_labels = logit_lens(readouts(lens, pred), None)
    assert no_labels.accuracy is None and no_labels.agreement == res.agreement


def test_logit_lens_refuses_models_it_does_not_describe():
    with pytest.raises(ExplainError, match="no logit lens"):
        logit_lens(readouts([None, None], [0, 1, 0, 1]), name="cnn")
    with pytest.raises(ExplainError, match="differs from the model's logits"):
        logit_lens(readouts([[0, 1, 0, 1]], [0, 1, 0, 1], error=0.5))
    with pytest.raises(ConfigError, match="one class per image"):
        logit_lens(readouts([[0, 1, 0, 1]], [0, 1, 0, 1]), [0, 1])


def test_probes_read_a_separable_layer_and_not_a_noise_layer():
    rng = np.random.default_rng(0)
    classes, n, d = 4, 200, 16
    y_train, y_test = rng.integers(0, classes, n), rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 4.0

    def separable(y: np.ndarray) -> torch.Tensor:
        return torch.tensor(centres[y] + rng.normal(size=(len(y), d)), dtype=torch.float32)  # (n, d)

    def noise(y: np.ndarray) -> torch.Tensor:
        return torch.tensor(rng.normal(size=(len(y), d)), dtype=torch.float32)  # (n, d), independent of y

    res = probe_layers([noise(y_train), separable(y_train)], y_train, [noise(y_test), separable(y_test)], y_test,
                       labels=["noise", "separable"], stages=[0, 1], name="made up")
    assert res.labels == ["noise", "separable"] and res.stages == [0, 1]
    assert res.test_accuracy[1] >= 0.97 and res.train_accuracy[1] >= 0.97
    assert res.test_accuracy[0] < 0.45  # chance is 0.25; 200 test images leave about +-0.06
    assert res.train_accuracy[0] > res.test_accuracy[0]  # the noise probe fits its training noise only


def test_probe_layers_refuses_mismatched_inputs():
    x = [torch.randn(10, 3)]
    y = np.arange(10) % 2
    with pytest.raises(ConfigError, match="same layers"):
        probe_layers(x, y, x + x, y)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        probe_layers(x, np.zeros(10), x, y)
    with pytest.raises(ConfigError, match="features and labels disagree"):
        probe_layers(x, y[:5], x, y)


def test_a_hybrid_lens_sits_at_its_blocks_depth_in_the_probe_plot():
    labels = ["stem.0", "stem.1", "stem.2", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    probes = curves_figure([Curve("hybrid", [0.1] * 7, labels=labels)], "probes")
    lens = logit_lens(readouts([None] * 3 + [[0, 1, 1, 0]] * 4, [0, 1, 1, 0], labels=labels), [0, 1, 1, 1],
                      name="hybrid")
    fig = lens_figure([lens.to_dict()])
    assert [t.name for t in fig.data] == ["hybrid: agreement", "hybrid: accuracy"]
    depth = dict(zip(labels, probes.data[0].x, strict=True))
    for trace in fig.data:
        assert list(trace.customdata) == labels[3:]
        np.testing.assert_allclose(trace.x, [depth[k] for k in labels[3:]])  # blocks.0 at 3/6, not at 0
    assert fig.data[0].line.dash is None and fig.data[1].line.dash == "dash"
    assert fig.data[0].line.color == fig.data[1].line.color  # one colour per model
