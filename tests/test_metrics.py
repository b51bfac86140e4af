"""The local `evaluate` modules load offline and compute what scikit-learn would."""

import pytest
import torch

from common.metrics import compute_metrics, load_metrics


@pytest.fixture(scope="module")
def metrics():
    return load_metrics()


def test_accuracy_and_per_class_metrics(metrics):
    refs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    m = compute_metrics(metrics, preds, refs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 4)
    assert m["per_class"]["c"]["recall"] == pytest.approx(2 / 4)
    assert m["per_class"]["c"]["precision"] == pytest.approx(1.0)
    f1_c = 2 * 1.0 * 0.5 / 1.5
    assert m["per_class"]["c"]["f1"] == pytest.approx(f1_c)


def test_class_never_predicted_gets_zero_not_nan(metrics):
    m = compute_metrics(metrics, torch.tensor([0, 0]), torch.tensor([0, 1]), ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "val_images": 1}
    assert m["accuracy"] == 0.5
