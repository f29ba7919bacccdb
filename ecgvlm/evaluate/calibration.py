"""Calibration of option probabilities: how far a model's confidence can be trusted.

The evaluation's ``choice`` answer mode stores, for every question, the probability the model
gives each option. From those this module computes, per model and data set:

* ``ece``: expected calibration error of the top option's probability (the *confidence*)
  with **equal-mass** bins (each bin holds n / n_bins questions, sorted by confidence):
  ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``;
* ``brier``: the multi-class Brier score, ``mean_i sum_k (p_ik - y_ik)^2`` over the options
  (0 is perfect, 2 the worst; scikit-learn's ``brier_score_loss`` with every option as a
  label, which keeps the [0, 2] range for more than two options);
* ``log_loss``: the mean negative log-probability of the correct option (scikit-learn's
  ``log_loss``; a zero probability is clipped as scikit-learn clips it);
* ``aurc``: the area under the risk-coverage curve. Questions are answered from the most
  confident down; at each distinct confidence ``t`` the coverage is the share with
  confidence >= t and the risk the error rate among them; the area is the step integral
  ``sum_j risk_j * (coverage_j - coverage_{j-1})``. Without ties this is the mean, over
  k = 1..n, of the error rate of the k most confident answers. Lower is better; a model whose
  confidence says nothing has an AURC near its error rate;
* ``accuracy_at_coverage``: the accuracy of the ``ceil(c * n)`` most confident answers, for
  each coverage ``c`` in the config (50/80/90%); questions tied on confidence at the boundary
  count with their group's mean accuracy (the expectation over tie-breaks).

Intervals resample clusters (patients, or source recordings without a patient id) as the
classification metrics do (``ecgvlm.evaluate.metrics``), recomputing every statistic on
each resample.

Temperature scaling divides the log-probabilities by one temperature per model, fitted on
the **validation** split by minimising the log loss (``fit_temperature``), and is applied
unchanged to the test split: the report shows the test metrics before and after. Abstention
answers only when the (scaled) confidence reaches a threshold: given directly
(``abstain_below``) or chosen on the validation split as the lowest threshold whose accuracy
there reaches ``target_accuracy`` (``choose_threshold``).

This module imports numpy, scipy and scikit-learn only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ecgvlm.config import check_range
from ecgvlm.evaluate.metrics import (
    MIN_RELIABLE_CLUSTERS,
    MIN_RELIABLE_N,
    MetricsError,
    bootstrap_intervals,
    cluster_ids,
    cluster_unit,
    wilson_interval,
)

#: Temperatures the fit searches between (a wider range only ever means a degenerate fit).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

#: Statistics with bootstrap intervals, in the order tables show them.
CALIBRATION_NAMES: tuple[str, ...] = ("ece", "brier", "log_loss", "aurc")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration, temperature scaling and abstention in the evaluation.

    Attributes:
        split: The split temperature and ``target_accuracy``'s threshold are fitted on (the
            validation split of the same prepared set); empty: no fit, raw probabilities.
        n_bins: Equal-mass bins of the expected calibration error and reliability diagram.
        coverages: Coverages at which the accuracy of the most confident answers is reported.
        temperature_scaling: Fit a temperature per model on ``split``.
        abstain_below: Abstain when the top option's probability (after temperature
            scaling) is below this; None: see ``target_accuracy``.
        target_accuracy: Choose the threshold on ``split`` as the lowest confidence at which
            the answered questions there reach this accuracy; None: no abstention unless
            ``abstain_below`` is given. Only one of the two may be set.
    """

    split: str = "val"
    n_bins: int = 10
    coverages: tuple[float, ...] = (0.5, 0.8, 0.9)
    temperature_scaling: bool = True
    abstain_below: float | None = None
    target_accuracy: float | None = None

    def __post_init__(self) -> None:
        check_range("calibration.n_bins", self.n_bins, 1, 1000)
        if not self.coverages:
            raise ValueError("calibration.coverages must list at least one coverage")
        for c in self.coverages:
            if not 0.0 < c <= 1.0:
                raise ValueError(f"calibration.coverages entries must be in (0, 1], got {c!r}")
        if self.abstain_below is not None:
            check_range("calibration.abstain_below", self.abstain_below, 0.0, 1.0)
        if self.target_accuracy is not None:
            check_range("calibration.target_accuracy", self.target_accuracy, 0.0, 1.0)
        if self.abstain_below is not None and self.target_accuracy is not None:
            raise ValueError(
                "calibration: set abstain_below or target_accuracy, not both (one names the "
                "threshold, the other has it chosen on the validation split)"
            )
        if self.target_accuracy is not None and not self.split:
            raise ValueError("calibration.target_accuracy needs calibration.split to choose "
                             "the threshold on")


# ---------------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------------


def probability_matrix(option_probs: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of option probabilities as an (n, K) array, K the most options of any row.

    Shorter rows (questions with fewer options) are padded with zeros; every row is
    renormalised to sum to 1 (the endpoint's probabilities already do, up to rounding).

    Raises:
        MetricsError: on an empty input, a negative or non-finite probability, or a row
            without any probability mass.
    """
    if not len(option_probs):
        raise MetricsError("no option probabilities to score")
    width = max(len(row) for row in option_probs)
    out = np.zeros((len(option_probs), width), dtype=np.float64)
    for i, row in enumerate(option_probs):
        out[i, : len(row)] = np.asarray(row, dtype=np.float64)
    if not np.isfinite(out).all() or (out < 0).any():
        raise MetricsError("option probabilities must be finite and non-negative")
    sums = out.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise MetricsError(f"row {int(np.flatnonzero(sums[:, 0] <= 0)[0])} has no probability mass")
    return out / sums


def confidence_and_correct(probs: np.ndarray, answer_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top option's probability, and whether the top option (first on ties) is correct."""
    top = probs.argmax(axis=1)
    return probs.max(axis=1), (top == answer_index)


def scale_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise (zero stays zero; T = 1 returns ``probs``)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise MetricsError(f"temperature must be positive and finite, got {temperature!r}")
    with np.errstate(divide="ignore"):
        logits = np.log(probs) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, answer_index: np.ndarray) -> float:
    p = probs[np.arange(len(probs)), answer_index]
    return float(-np.log(np.clip(p, np.finfo(np.float64).eps, 1.0)).mean())


def fit_temperature(probs: np.ndarray, answer_index: np.ndarray) -> float:
    """The temperature minimising the log loss of ``softmax(log p / T)`` (bounded search).

    ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens under-confident ones.
    The search runs over ``log T`` within :data:`TEMPERATURE_BOUNDS`.
    """
    from scipy.optimize import minimize_scalar

    if len(probs) == 0:
        raise MetricsError("no validation answers to fit a temperature on")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll(scale_temperature(probs, math.exp(log_t)), answer_index),
                             bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def equal_mass_bins(confidence: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Row indices of each bin: sorted by confidence (stable), split into ``n_bins`` parts
    whose sizes differ by at most one (fewer bins when there are fewer rows)."""
    order = np.argsort(confidence, kind="stable")
    return [b for b in np.array_split(order, min(n_bins, len(order))) if len(b)]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ECE with equal-mass bins (see the module docstring)."""
    n = len(confidence)
    return float(sum(len(b) / n * abs(correct[b].mean() - confidence[b].mean())
                     for b in equal_mass_bins(confidence, n_bins)))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> list[dict[str, float]]:
    """Per equal-mass bin: mean confidence, accuracy and size (the reliability diagram)."""
    return [{"confidence": float(confidence[b].mean()), "accuracy": float(correct[b].mean()),
             "n": len(b)} for b in equal_mass_bins(confidence, n_bins)]


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at each distinct confidence, from the most confident down."""
    order = np.argsort(-confidence, kind="stable")
    conf, wrong = confidence[order], (~correct[order]).astype(np.float64)
    # The last index of each run of equal confidence: where a threshold can sit.
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    answered = ends + 1
    return answered / len(conf), np.cumsum(wrong)[ends] / answered


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (step integral, see the module docstring)."""
    coverage, risk = risk_coverage_curve(confidence, correct)
    return float(np.sum(risk * np.diff(np.r_[0.0, coverage])))


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy of the ``ceil(coverage * n)`` most confident answers, ties at the boundary
    counted with their group's mean accuracy."""
    n = len(confidence)
    k = max(1, math.ceil(coverage * n - 1e-9))
    above = confidence > np.sort(confidence)[::-1][k - 1]
    tied = confidence == np.sort(confidence)[::-1][k - 1]
    from_tied = k - int(above.sum())
    return float((correct[above].sum() + from_tied * correct[tied].mean()) / k)


def log_loss(probs: np.ndarray, answer_index: np.ndarray) -> float:
    """scikit-learn's log loss with every option position as a label."""
    from sklearn.metrics import log_loss as sk_log_loss

    return float(sk_log_loss(answer_index, probs, labels=list(range(probs.shape[1]))))


def brier(probs: np.ndarray, answer_index: np.ndarray) -> float:
    """scikit-learn's multi-class Brier score with every option position as a label."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(answer_index, probs, labels=list(range(probs.shape[1]))))


def _statistics(probs: np.ndarray, answer_index: np.ndarray, n_bins: int,
                coverages: Sequence[float], fast: bool = False) -> dict[str, float]:
    confidence, correct = confidence_and_correct(probs, answer_index)
    if fast:  # the same numbers as scikit-learn's, without its input checks (bootstrap)
        onehot = np.zeros_like(probs)
        onehot[np.arange(len(probs)), answer_index] = 1.0
        brier_value = float(((probs - onehot) ** 2).sum(axis=1).mean())
        log_loss_value = _nll(probs, answer_index)
    else:
        brier_value, log_loss_value = brier(probs, answer_index), log_loss(probs, answer_index)
    out = {
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "brier": brier_value,
        "log_loss": log_loss_value,
        "aurc": aurc(confidence, correct),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
    }
    for c in coverages:
        out[coverage_key(c)] = accuracy_at_coverage(confidence, correct, c)
    return out


def coverage_key(coverage: float) -> str:
    """``accuracy@80%`` for 0.8: the name of an accuracy-at-coverage statistic."""
    return f"accuracy@{coverage * 100:g}%"


def _wilson_where_degenerate(
    ci: dict[str, tuple[float, float]], proportions: dict[str, tuple[int, int]]
) -> dict[str, tuple[float, float]]:
    """``ci`` with a Wilson interval for each proportion (name -> (successes, n)) whose
    bootstrap interval is missing, zero-width or from fewer than ``MIN_RELIABLE_N`` values,
    as Table 1 does (``ecgvlm.evaluate.metrics``)."""
    out = dict(ci)
    for name, (k, n) in proportions.items():
        lo, hi = out.get(name, (0.0, 0.0))
        if n and (hi <= lo or n < MIN_RELIABLE_N):
            out[name] = wilson_interval(k, n)
    return out


def reliability_flags(n: int, clusters: Sequence[Any] | None) -> tuple[str, ...]:
    """Why a row's numbers may mislead: fewer than ``MIN_RELIABLE_N`` questions, fewer than
    ``MIN_RELIABLE_CLUSTERS`` patients or recordings (the words Table 1's Note uses)."""
    flags = []
    if n < MIN_RELIABLE_N:
        flags.append(f"n={n} < {MIN_RELIABLE_N}")
    unit = cluster_unit(clusters or [])
    n_clusters = len(np.unique(cluster_ids(clusters, n)))
    if unit != "sample" and n_clusters < MIN_RELIABLE_CLUSTERS:
        flags.append(f"{n_clusters} {unit}{'s' if n_clusters != 1 else ''}")
    return tuple(flags)


@dataclass(frozen=True)
class CalibrationMetrics:
    """Calibration of one model on one data set (one set of probabilities).

    Attributes:
        n: Questions with option probabilities.
        accuracy: Share whose most probable option is correct.
        mean_confidence: Mean top-option probability.
        ece, brier, log_loss, aurc: See the module docstring.
        accuracy_at_coverage: ``accuracy@50%`` ... -> accuracy of the most confident answers.
        ci: Statistic name -> (low, high) 95% cluster-bootstrap interval; none from fewer than
            two clusters (one patient's windows cannot be resampled), where ``accuracy``
            gets a Wilson interval as in Table 1.
        flags: Why the numbers may mislead (few questions, few patients), as in Table 1.
        temperature: The temperature applied to the probabilities (1.0: raw).
        reliability: The reliability diagram's equal-mass bins.
        risk_coverage: (coverage, risk) points of the risk-coverage curve.
    """

    n: int
    accuracy: float
    mean_confidence: float
    ece: float
    brier: float
    log_loss: float
    aurc: float
    accuracy_at_coverage: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    temperature: float = 1.0
    reliability: tuple[dict[str, float], ...] = ()
    risk_coverage: tuple[tuple[float, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = {k: [lo, hi] for k, (lo, hi) in self.ci.items()}
        data["flags"] = list(self.flags)
        data["reliability"] = list(self.reliability)
        data["risk_coverage"] = [list(p) for p in self.risk_coverage]
        return data


def calibration_metrics(
    probs: np.ndarray,
    answer_index: np.ndarray,
    n_bins: int = 10,
    coverages: Sequence[float] = (0.5, 0.8, 0.9),
    clusters: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    temperature: float = 1.0,
) -> CalibrationMetrics:
    """Every calibration statistic of ``probs`` (already temperature-scaled by the caller,
    who passes the ``temperature`` used so that it is recorded), with cluster-bootstrap CIs
    when ``n_boot`` > 0."""
    answer_index = np.asarray(answer_index, dtype=np.int64)
    if len(probs) != len(answer_index):
        raise MetricsError(f"{len(probs)} probability rows but {len(answer_index)} answers")
    if len(probs) == 0:
        raise MetricsError("no option probabilities to score")
    if (answer_index < 0).any() or (answer_index >= probs.shape[1]).any():
        raise MetricsError("an answer index is outside its question's options")
    point = _statistics(probs, answer_index, n_bins, coverages)
    ci = {}
    n_clusters = len(np.unique(cluster_ids(clusters, len(probs))))
    if n_boot and n_clusters > 1:
        ci = bootstrap_intervals(
            lambda rows: _statistics(probs[rows], answer_index[rows], n_bins, coverages, fast=True),
            len(probs), clusters, n_boot, seed)
    confidence, correct = confidence_and_correct(probs, answer_index)
    if n_boot:
        ci = _wilson_where_degenerate(ci, {"accuracy": (int(correct.sum()), len(probs))})
    coverage, risk = risk_coverage_curve(confidence, correct)
    return CalibrationMetrics(
        n=len(probs),
        accuracy=point["accuracy"],
        mean_confidence=point["mean_confidence"],
        ece=point["ece"],
        brier=point["brier"],
        log_loss=point["log_loss"],
        aurc=point["aurc"],
        accuracy_at_coverage={coverage_key(c): point[coverage_key(c)] for c in coverages},
        ci=ci,
        flags=reliability_flags(len(probs), clusters),
        temperature=temperature,
        reliability=tuple(reliability_bins(confidence, correct, n_bins)),
        risk_coverage=tuple(zip(coverage.round(6).tolist(), risk.round(6).tolist())),
    )


# ---------------------------------------------------------------------------------------------
# Abstention
# ---------------------------------------------------------------------------------------------


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float:
    """The lowest confidence threshold at which the answers with confidence >= it reach
    ``target_accuracy`` (the largest coverage that does); ``inf`` (abstain on everything)
    when no threshold does."""
    _, risk = risk_coverage_curve(confidence, correct)
    thresholds = np.sort(np.unique(confidence))[::-1]
    ok = np.flatnonzero(1.0 - risk >= target_accuracy - 1e-12)
    return float(thresholds[ok[-1]]) if len(ok) else math.inf


@dataclass(frozen=True)
class Abstention:
    """Selective answering of one model on one data set at one threshold.

    Attributes:
        threshold: Answer only when the top probability is >= this.
        n: Questions.
        coverage: Share answered.
        accuracy: Accuracy among the answered (NaN when none is).
        ci: ``coverage`` and ``accuracy`` -> 95% cluster-bootstrap interval.
    """

    threshold: float
    n: int
    coverage: float
    accuracy: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = {k: [lo, hi] for k, (lo, hi) in self.ci.items()}
        for key in ("threshold", "accuracy"):  # JSON has no inf or NaN
            if not math.isfinite(data[key]):
                data[key] = None
        return data


def abstention(
    confidence: np.ndarray,
    correct: np.ndarray,
    threshold: float,
    clusters: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Abstention:
    """Coverage and accuracy when answering only at confidence >= ``threshold``."""

    def stats(rows: np.ndarray) -> dict[str, float]:
        answered = confidence[rows] >= threshold
        acc = float(correct[rows][answered].mean()) if answered.any() else math.nan
        return {"coverage": float(answered.mean()), "accuracy": acc}

    point = stats(np.arange(len(confidence)))
    ci = {}
    if n_boot:
        if len(np.unique(cluster_ids(clusters, len(confidence)))) > 1:
            ci = bootstrap_intervals(stats, len(confidence), clusters, n_boot, seed)
        answered = confidence >= threshold
        ci = _wilson_where_degenerate(ci, {
            "coverage": (int(answered.sum()), len(confidence)),
            "accuracy": (int(correct[answered].sum()), int(answered.sum()))})
    return Abstention(threshold, len(confidence), point["coverage"], point["accuracy"], ci)


# ---------------------------------------------------------------------------------------------
# Per model and data set
# ---------------------------------------------------------------------------------------------

#: Fewest validation answers a temperature or a threshold is fitted on: below that the fit
#: says more about the few questions than about the model.
MIN_FIT_ANSWERS = 10


def answers_of(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[Any], int]:
    """(probabilities, correct option index, cluster of each row, rows without
    probabilities) of prediction rows (``option_probs``, ``answer_letter``, ``cluster``);
    a failed request has no probabilities and is counted, not scored."""
    from ecgvlm.prompt import letter_index

    usable = [r for r in rows if r.get("option_probs") is not None and not r.get("error")]
    if not usable:
        return np.zeros((0, 1)), np.zeros(0, dtype=np.int64), [], len(rows)
    probs = probability_matrix([list(r["option_probs"]) for r in usable])
    answers = np.array([letter_index(str(r["answer_letter"]), len(r["option_probs"]))
                        for r in usable], dtype=np.int64)
    return probs, answers, [r.get("cluster") for r in usable], len(rows) - len(usable)


def fit_model(val_rows: Sequence[dict[str, Any]], config: CalibrationConfig) -> dict[str, Any]:
    """One model's temperature and abstention threshold from its validation answers.

    Returns:
        ``{"temperature": T or None, "threshold": t or None, "n_fit": answers used,
        "notes": [why something was not fitted]}``; the threshold is ``abstain_below`` when
        that is set, ``inf`` when ``target_accuracy`` is out of reach on validation.
    """
    probs, answers, _, _ = answers_of(val_rows)
    fit: dict[str, Any] = {"temperature": None, "threshold": config.abstain_below,
                           "n_fit": len(probs), "notes": []}
    enough = len(probs) >= MIN_FIT_ANSWERS
    if not enough and (config.temperature_scaling or config.target_accuracy is not None):
        fit["notes"].append(f"{len(probs)} validation answers, at least {MIN_FIT_ANSWERS} "
                            "needed to fit on: raw probabilities, no chosen threshold")
        return fit
    if config.temperature_scaling:
        fit["temperature"] = fit_temperature(probs, answers)
        probs = scale_temperature(probs, fit["temperature"])
        if fit["temperature"] >= TEMPERATURE_BOUNDS[1] * 0.999:
            fit["notes"].append(
                f"T reached the search bound {TEMPERATURE_BOUNDS[1]:g}: on validation the "
                "probabilities do no better than uniform ones (a model at chance)")
    if config.target_accuracy is not None:
        confidence, correct = confidence_and_correct(probs, answers)
        fit["threshold"] = choose_threshold(confidence, correct, config.target_accuracy)
        if math.isinf(fit["threshold"]):
            fit["notes"].append(f"no threshold reaches accuracy {config.target_accuracy} on "
                                "validation: abstains on every question")
    return fit


def calibrate_models(
    test_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    config: CalibrationConfig,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Calibration of each model's ``choice`` answers per data set, before and after its
    temperature (fitted on ``val_rows``), and its abstention at the threshold.

    Returns:
        ``{model: {"fit": fit_model(...), "datasets": {dataset: {"raw": CalibrationMetrics,
        "scaled": CalibrationMetrics or None, "abstention": Abstention or None,
        "n_missing": rows without probabilities}}}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for model in sorted({str(r["model"]) for r in test_rows}):
        fit = fit_model([r for r in val_rows if r["model"] == model], config)
        temperature, threshold = fit["temperature"], fit["threshold"]
        per_dataset: dict[str, Any] = {}
        mine = [r for r in test_rows if r["model"] == model]
        for dataset in sorted({str(r["dataset"]) for r in mine}):
            probs, answers, clusters, n_missing = answers_of([r for r in mine if r["dataset"] == dataset])
            entry: dict[str, Any] = {"raw": None, "scaled": None, "abstention": None,
                                     "n_missing": n_missing}
            per_dataset[dataset] = entry
            if not len(probs):
                continue
            kwargs = {"n_bins": config.n_bins, "coverages": config.coverages,
                      "clusters": clusters, "n_boot": n_boot, "seed": seed}
            entry["raw"] = calibration_metrics(probs, answers, **kwargs)
            if temperature is not None:
                probs = scale_temperature(probs, temperature)
                entry["scaled"] = calibration_metrics(probs, answers, temperature=temperature,
                                                      **kwargs)
            if threshold is not None:
                confidence, correct = confidence_and_correct(probs, answers)
                entry["abstention"] = abstention(confidence, correct, threshold, clusters,
                                                 n_boot, seed)
        out[model] = {"fit": fit, "datasets": per_dataset}
    return out


def calibration_json(calibration: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``calibrate_models`` output as plain JSON data (``calibration.json``)."""

    def plain(value: Any) -> Any:
        if hasattr(value, "to_json"):
            return value.to_json()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(calibration)
