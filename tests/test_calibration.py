"""Calibration metrics: hand-computed values, torchmetrics (ECE) and scikit-learn (Brier) on random inputs,
and the limiting cases (perfect calibration, one-hot correct predictions)."""
import math

import pytest
import torch

from peftlab.evaluation.calibration import (brier_score, calibration_metrics, expected_calibration_error,
                                            negative_log_likelihood, reliability_bins, reliability_diagram)


def test_hand_computed_values():
    probs = torch.tensor([[0.9, 0.1, 0.0],    # conf 0.9, right
                          [0.2, 0.7, 0.1],    # conf 0.7, right
                          [0.6, 0.3, 0.1],    # conf 0.6, wrong
                          [0.05, 0.15, 0.8]])  # conf 0.8, right
    labels = torch.tensor([0, 1, 1, 2])
    m = calibration_metrics(probs, labels)
    assert m["acc"] == pytest.approx(0.75)
    # bins of width 1/15: 0.9 -> bin 13, 0.7 -> 10, 0.6 -> 9, 0.8 -> 12; one example each
    assert m["ece"] == pytest.approx((0.1 + 0.3 + 0.6 + 0.2) / 4)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.3) + math.log(0.8)) / 4)
    brier = [(0.1 ** 2 + 0.1 ** 2), (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2), (0.6 ** 2 + 0.7 ** 2 + 0.1 ** 2),
             (0.05 ** 2 + 0.15 ** 2 + 0.2 ** 2)]
    assert m["brier"] == pytest.approx(sum(brier) / 4)


def test_shared_bin_averages_before_the_gap():
    """Two examples in one bin: |mean acc − mean conf|, not the mean of per-example gaps."""
    probs = torch.tensor([[0.62, 0.38], [0.64, 0.36]])  # both in bin [0.6, 0.667)
    labels = torch.tensor([0, 1])                          # one right, one wrong
    assert expected_calibration_error(probs, labels) == pytest.approx(abs(0.5 - 0.63))


@pytest.mark.parametrize("classes,seed", [(2, 0), (4, 1), (5, 2)])
def test_ece_matches_torchmetrics(classes, seed):
    from torchmetrics.classification import MulticlassCalibrationError

    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(500, classes, generator=generator) * 2, dim=1)
    labels = torch.randint(0, classes, (500,), generator=generator)
    reference = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(float(reference), abs=1e-6)


def test_ece_confidence_of_exactly_one_matches_torchmetrics():
    from torchmetrics.classification import MulticlassCalibrationError

    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.97, 0.03], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 0, 1])
    reference = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(float(reference), abs=1e-6)


@pytest.mark.parametrize("classes,seed", [(2, 0), (3, 1), (5, 2)])
def test_brier_matches_scikit_learn(classes, seed):
    from sklearn.metrics import brier_score_loss

    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(300, classes, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (300,), generator=generator)
    reference = brier_score_loss(labels.numpy(), probs.numpy(), labels=list(range(classes)), scale_by_half=False)
    assert brier_score(probs, labels) == pytest.approx(float(reference), abs=1e-9)


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    """Confidence c, right with probability c: every bin's accuracy equals its confidence."""
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    right = torch.rand(n, generator=generator, dtype=torch.float64) < confidence
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    labels = torch.where(right, 0, 1)
    assert expected_calibration_error(probs, labels) < 0.005
    # ... and an overconfident one is not: it claims c but is right with probability c − 0.2
    labels_over = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < confidence - 0.2, 0, 1)
    assert expected_calibration_error(probs, labels_over) == pytest.approx(0.2, abs=0.01)


def test_one_hot_correct_predictor():
    labels = torch.tensor([0, 2, 1, 1, 3])
    probs = torch.nn.functional.one_hot(labels, 4).double()
    m = calibration_metrics(probs, labels)
    assert m == {"acc": 1.0, "ece": 0.0, "nll": 0.0, "brier": 0.0}
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).double()
    assert negative_log_likelihood(wrong, labels) == math.inf  # no ε inside the log, as specified
    assert brier_score(wrong, labels) == 2.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="labels must lie"):
        calibration_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\(n, classes\)"):
        calibration_metrics(torch.tensor([0.5, 0.5]), torch.tensor([0]))


def test_reliability_diagram(tmp_path):
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 4, generator=generator), dim=1)
    labels = torch.randint(0, 4, (200,), generator=generator)
    bins = reliability_bins(probs, labels)
    assert bins["count"].sum() == 200 and len(bins["count"]) == 16
    path = reliability_diagram(probs, labels, tmp_path / "rel.png", title="random")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confident_coin_flip_and_uniform_predictor():
    """Spec blob.md §9.8–9.9: confidence 1.0 at 50% accuracy has ECE 0.5; uniform predictions over C
    classes have NLL log C and Brier 1 − 1/C."""
    labels = torch.tensor([0, 1] * 50)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]] * 100), labels) == pytest.approx(0.5)
    for classes in (2, 4, 5):
        probs = torch.full((100, classes), 1.0 / classes)
        m = calibration_metrics(probs, labels)
        assert m["nll"] == pytest.approx(math.log(classes)) and m["brier"] == pytest.approx(1 - 1 / classes)
