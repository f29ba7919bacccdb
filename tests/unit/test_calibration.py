"""Calibration statistics, temperature scaling and abstention against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ecgvlm.evaluate import calibration as cal
from ecgvlm.evaluate.metrics import MetricsError


def test_ece_equal_mass_bins_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, False])
    # Bins {0.6, 0.7}: accuracy 0, confidence 0.65; {0.8, 0.9}: accuracy 1, confidence 0.85.
    assert cal.expected_calibration_error(conf, correct, 2) == pytest.approx(0.5 * 0.65 + 0.5 * 0.15)
    # One bin: |accuracy 0.5 - mean confidence 0.75|.
    assert cal.expected_calibration_error(conf, correct, 1) == pytest.approx(0.25)
    # More bins than rows: one row per bin, the mean |correct - confidence|.
    assert cal.expected_calibration_error(conf, correct, 10) == pytest.approx((0.1 + 0.2 + 0.7 + 0.6) / 4)
    bins = cal.reliability_bins(conf, correct, 2)
    assert [b["n"] for b in bins] == [2, 2]
    assert bins[0]["confidence"] == pytest.approx(0.65) and bins[1]["accuracy"] == 1.0


def test_brier_and_log_loss_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    answers = np.array([0, 2])
    by_hand = ((0.3**2 + 0.2**2 + 0.1**2) + (0.2**2 + 0.5**2 + 0.7**2)) / 2
    assert cal.brier(probs, answers) == pytest.approx(by_hand)
    assert cal.log_loss(probs, answers) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    fast = cal._statistics(probs, answers, 10, (0.5,), fast=True)
    slow = cal._statistics(probs, answers, 10, (0.5,), fast=False)
    assert fast == pytest.approx(slow)


def test_aurc_without_and_with_ties_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, False])
    # Error rates of the 1..4 most confident: 0, 1/2, 1/3, 1/2.
    assert cal.aurc(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # A tie: threshold 0.9 answers two (risk 1/2, coverage 2/3), then all (risk 1/3).
    tied = np.array([0.9, 0.9, 0.5])
    assert cal.aurc(tied, np.array([True, False, True])) == pytest.approx(0.5 * 2 / 3 + 1 / 3 * 1 / 3)
    # The order of tied rows does not matter.
    assert cal.aurc(tied, np.array([False, True, True])) == pytest.approx(cal.aurc(tied, np.array([True, False, True])))
    coverage, risk = cal.risk_coverage_curve(tied, np.array([True, False, True]))
    assert coverage.tolist() == pytest.approx([2 / 3, 1.0]) and risk.tolist() == pytest.approx([0.5, 1 / 3])


def test_accuracy_at_coverage_counts_boundary_ties_by_their_mean():
    conf = np.array([0.9, 0.8, 0.8, 0.1])
    correct = np.array([True, True, False, False])
    # Two answered: the 0.9 one (right) and one of the tied 0.8s (right half the time).
    assert cal.accuracy_at_coverage(conf, correct, 0.5) == pytest.approx(0.75)
    assert cal.accuracy_at_coverage(conf, correct, 0.25) == pytest.approx(1.0)
    assert cal.accuracy_at_coverage(conf, correct, 1.0) == pytest.approx(0.5)
    # ceil(0.8 * 4) = 4.
    assert cal.accuracy_at_coverage(conf, correct, 0.8) == pytest.approx(0.5)


def test_temperature_fit_matches_the_closed_form():
    # Two options, log-probability gap z on every question, the top option right 3 times in
    # 4: the log loss is minimal where sigmoid(z / T) = 3/4, i.e. T = z / ln 3.
    z = 2.0
    p_top = 1 / (1 + math.exp(-z))
    probs = np.array([[p_top, 1 - p_top]] * 4)
    answers = np.array([0, 0, 0, 1])
    temperature = cal.fit_temperature(probs, answers)
    assert temperature == pytest.approx(z / math.log(3), rel=1e-4)
    scaled = cal.scale_temperature(probs, temperature)
    assert scaled[0, 0] == pytest.approx(0.75, abs=1e-5)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_scale_temperature_keeps_zeros_order_and_identity():
    probs = np.array([[0.6, 0.3, 0.1, 0.0]])
    np.testing.assert_allclose(cal.scale_temperature(probs, 1.0), probs, atol=1e-12)
    hot = cal.scale_temperature(probs, 3.0)
    assert hot[0, 3] == 0.0 and hot[0, 0] < 0.6 and list(np.argsort(-hot[0])) == [0, 1, 2, 3]
    with pytest.raises(MetricsError, match="temperature"):
        cal.scale_temperature(probs, 0.0)


def test_probability_matrix_pads_and_renormalises():
    out = cal.probability_matrix([[0.5, 0.5], [0.2, 0.2, 0.6], [2.0, 2.0, 0.0]])
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out[2], [0.5, 0.5, 0.0])
    with pytest.raises(MetricsError, match="finite"):
        cal.probability_matrix([[0.5, float("nan")]])
    with pytest.raises(MetricsError, match="row 1"):
        cal.probability_matrix([[1.0], [0.0, 0.0]])


def test_choose_threshold_on_validation_answers():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True])
    # Accuracy of the answered at thresholds 0.9, 0.8, 0.7, 0.6: 1, 1, 2/3, 3/4.
    assert cal.choose_threshold(conf, correct, 0.75) == 0.6
    assert cal.choose_threshold(conf, correct, 0.8) == 0.8
    assert cal.choose_threshold(conf, correct, 1.0) == 0.8
    assert cal.choose_threshold(conf, correct, 0.0) == 0.6
    assert cal.choose_threshold(np.array([0.9]), np.array([False]), 0.5) == math.inf


def test_abstention_coverage_and_accuracy():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True])
    result = cal.abstention(conf, correct, 0.75, n_boot=200, seed=1)
    assert (result.coverage, result.accuracy, result.n) == (0.5, 1.0, 4)
    assert result.ci["coverage"][0] <= 0.5 <= result.ci["coverage"][1]
    nobody = cal.abstention(conf, correct, math.inf, n_boot=0)
    assert nobody.coverage == 0.0 and math.isnan(nobody.accuracy)
    assert nobody.to_json()["threshold"] is None and nobody.to_json()["accuracy"] is None


def test_calibration_metrics_point_values_and_intervals():
    rng = np.random.default_rng(0)
    n = 60
    probs = rng.dirichlet(np.ones(4), size=n)
    answers = rng.integers(0, 4, size=n)
    m = cal.calibration_metrics(probs, answers, n_bins=5, n_boot=300, seed=3)
    conf, correct = cal.confidence_and_correct(probs, answers)
    assert m.n == n and m.accuracy == pytest.approx(correct.mean())
    assert m.ece == pytest.approx(cal.expected_calibration_error(conf, correct, 5))
    assert m.aurc == pytest.approx(cal.aurc(conf, correct))
    assert set(m.accuracy_at_coverage) == {"accuracy@50%", "accuracy@80%", "accuracy@90%"}
    for name in cal.CALIBRATION_NAMES:
        lo, hi = m.ci[name]
        assert lo <= getattr(m, name) <= hi and lo < hi
    assert sum(b["n"] for b in m.reliability) == n
    assert m.risk_coverage[-1][0] == 1.0
    again = cal.calibration_metrics(probs, answers, n_bins=5, n_boot=300, seed=3)
    assert again.ci == m.ci
    with pytest.raises(MetricsError, match="outside"):
        cal.calibration_metrics(probs, np.full(n, 4), n_boot=0)


def test_intervals_resample_clusters_not_rows():
    # Ten identical copies of each of 8 questions: as 80 independent rows the interval of
    # the accuracy is narrow; as 8 clusters it is as wide as 8 questions allow.
    rng = np.random.default_rng(1)
    probs = np.repeat(rng.dirichlet(np.ones(4), size=8), 10, axis=0)
    answers = np.repeat(rng.integers(0, 4, size=8), 10)
    clusters = np.repeat([f"patient:{i}" for i in range(8)], 10).tolist()
    rows = cal.calibration_metrics(probs, answers, n_boot=400, seed=0)
    grouped = cal.calibration_metrics(probs, answers, n_boot=400, seed=0, clusters=clusters)
    width = {k: m.ci["brier"][1] - m.ci["brier"][0] for k, m in (("rows", rows), ("grouped", grouped))}
    assert width["grouped"] > 2 * width["rows"]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="not both"):
        cal.CalibrationConfig(abstain_below=0.5, target_accuracy=0.9)
    with pytest.raises(ValueError, match="coverages"):
        cal.CalibrationConfig(coverages=(0.0,))
    with pytest.raises(ValueError, match="target_accuracy needs"):
        cal.CalibrationConfig(split="", target_accuracy=0.9)


def test_one_patient_gets_no_bootstrap_interval_but_a_wilson_accuracy_and_a_flag():
    # Windows of one recording cannot be resampled: a zero-width "interval" would claim a
    # precision the data do not have.
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=20)
    answers = rng.integers(0, 4, size=20)
    m = cal.calibration_metrics(probs, answers, clusters=["recording:mitdb/100"] * 20, n_boot=100)
    assert "ece" not in m.ci and "brier" not in m.ci
    k = int((probs.argmax(axis=1) == answers).sum())
    from ecgvlm.evaluate.metrics import wilson_interval

    assert m.ci["accuracy"] == pytest.approx(wilson_interval(k, 20))
    assert m.flags == ("1 recording",)
    few = cal.calibration_metrics(probs[:5], answers[:5], n_boot=0)
    assert few.flags == ("n=5 < 10",) and few.ci == {}
    conf, correct = cal.confidence_and_correct(probs, answers)
    a = cal.abstention(conf, correct, 0.4, clusters=["recording:mitdb/100"] * 20, n_boot=100)
    answered = conf >= 0.4
    assert a.ci["coverage"] == pytest.approx(wilson_interval(int(answered.sum()), 20))
