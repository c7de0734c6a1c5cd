"""Metrics from a confusion matrix agree with scikit-learn, including classes never seen or predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from vitviz.metrics import classification_report, confusion_matrix


def _random_predictions(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    noisy = torch.randint(0, k, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.6
    return torch.where(keep, labels, noisy), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_and_report_match_sklearn(seed: int) -> None:
    k = 7
    preds, labels = _random_predictions(k, 300, seed)
    cm = confusion_matrix(preds, labels, k)
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    np.testing.assert_array_equal(cm.numpy(), sk_confusion_matrix(labels, preds, labels=list(range(k))))

    report = classification_report(cm, [f"c{i}" for i in range(k)])
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=list(range(k)), zero_division=0)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert report["macro_precision"] == pytest.approx(p.mean())
    assert report["macro_recall"] == pytest.approx(r.mean())
    assert report["macro_f1"] == pytest.approx(f.mean())
    assert [c["name"] for c in report["per_class"]] == [f"c{i}" for i in range(k)]
    np.testing.assert_allclose([c["f1"] for c in report["per_class"]], f)
    assert [c["support"] for c in report["per_class"]] == s.tolist()
    assert report["confusion_matrix"] == cm.tolist()
    assert report["num_samples"] == 300


def test_absent_and_never_predicted_classes_count_as_zero() -> None:
    # Class 2 never occurs and is never predicted; class 1 occurs but is never predicted.
    labels = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([0, 0, 0, 0])
    report = classification_report(confusion_matrix(preds, labels, 3))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=[0, 1, 2], zero_division=0)
    assert report["accuracy"] == 0.5
    assert report["macro_precision"] == pytest.approx(p.mean())
    assert report["macro_recall"] == pytest.approx(r.mean())
    assert report["macro_f1"] == pytest.approx(f.mean())
    assert report["per_class"][2] == {"name": "2", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_summed_shard_matrices_give_the_metrics_of_the_whole() -> None:
    preds, labels = _random_predictions(5, 101, 3)
    whole = confusion_matrix(preds, labels, 5)
    parts = confusion_matrix(preds[::2], labels[::2], 5) + confusion_matrix(preds[1::2], labels[1::2], 5)
    assert torch.equal(whole, parts)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="class names"):
        classification_report(np.eye(3, dtype=int), ["a", "b"])
    empty = classification_report(np.zeros((2, 2), dtype=int))
    assert empty["accuracy"] == 0.0 and empty["num_samples"] == 0
