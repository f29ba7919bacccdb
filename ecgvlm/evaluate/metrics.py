"""Classification metrics of MCQ answers, as the study reports them, with bootstrap CIs.

The study's Table 1 reports balanced accuracy and weighted precision, recall and F1 per data
set and model; we add macro-F1, the unparseable-answer rate, a per-class report, the confusion
matrix and percentile bootstrap 95% confidence intervals, plus a prior-only baseline row.

Conventions (the numbers in ``metrics.json`` depend on them):

* Metrics are computed on *labels* (the canonical finding behind the chosen option), not on
  letters, so they compare across questions whose options are shuffled.
* An answer that could not be parsed, or a request that failed, is counted **wrong**: its
  prediction becomes :data:`UNPARSEABLE`, a class that is never a true label. It is never
  replaced by a guess.
* Per-class averages run over the classes present among the true labels (a class that is
  only ever predicted has no support: it lowers the precision of nothing and the recall of
  the classes it was wrongly chosen for). ``macro_f1`` is the unweighted mean F1 over those
  classes; ``weighted_*`` weight each by its support; ``balanced_accuracy`` is the mean
  recall (sklearn's definition).
* The prior-only baseline (:func:`prior_baseline`) by default always predicts the most
  frequent true label of the evaluated set (ties broken alphabetically): it needs no image
  and shows what the label distribution alone scores. ``strategy="sample"`` instead draws
  each prediction from the empirical label prior with a seeded generator.

This module imports numpy and scikit-learn only.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: The predicted class of an unparseable answer or failed request: never a true label.
UNPARSEABLE = "<unparseable>"

#: Point metrics with bootstrap CIs, in the order tables show them.
METRIC_NAMES: tuple[str, ...] = (
    "balanced_accuracy",
    "weighted_f1",
    "weighted_recall",
    "weighted_precision",
    "macro_f1",
    "accuracy",
)

#: The model name of the prior-only baseline rows in tables and ``metrics.json``.
PRIOR_MODEL = "prior-baseline"

PRIOR_STRATEGIES = ("majority", "sample")

# Resamples per vectorised chunk are capped so that one chunk's index array stays ~80 MB.
_BOOTSTRAP_CHUNK_ELEMENTS = 10_000_000


class MetricsError(ValueError):
    """Labels that cannot be scored (empty, mismatched lengths, a missing true label)."""


@dataclass(frozen=True)
class ClassificationMetrics:
    """The metrics of one model on one data set.

    Attributes:
        balanced_accuracy, weighted_precision, weighted_recall, weighted_f1, macro_f1,
            accuracy: Point estimates on all samples (see the module docstring).
        unparseable_rate: Fraction of samples whose answer could not be parsed (or whose
            request failed); all of them are counted wrong.
        n: Number of samples.
        n_unparseable: Number of samples counted unparseable.
        ci: Metric name -> (low, high) percentile bootstrap interval.
        ci_level: Coverage of ``ci`` (0.95).
        n_boot: Number of bootstrap resamples (0: no CIs).
        seed: Seed of the bootstrap generator.
        labels: The true classes (sorted) that the averages run over.
        per_class: Class -> {precision, recall, f1, support}.
        confusion_labels: Column order of ``confusion``: true classes, then classes only
            predicted, then :data:`UNPARSEABLE` when it occurs.
        confusion: Counts; rows are the true classes in ``labels`` order, columns the
            predicted labels in ``confusion_labels`` order.
    """

    balanced_accuracy: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    macro_f1: float
    accuracy: float
    unparseable_rate: float
    n: int
    n_unparseable: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ci_level: float = 0.95
    n_boot: int = 0
    seed: int = 0
    labels: tuple[str, ...] = ()
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_labels: tuple[str, ...] = ()
    confusion: tuple[tuple[int, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists) for ``metrics.json``."""
        data = asdict(self)
        data["ci"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()}
        data["labels"] = list(self.labels)
        data["confusion_labels"] = list(self.confusion_labels)
        data["confusion"] = [list(row) for row in self.confusion]
        return data


def as_label_arrays(
    y_true: Sequence[str], y_pred: Sequence[str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and map missing predictions (None, NaN, "") to :data:`UNPARSEABLE`.

    Raises:
        MetricsError: on empty input, different lengths, or a true label that is missing or
            equal to the sentinel.
    """
    if len(y_true) != len(y_pred):
        raise MetricsError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise MetricsError("no samples to score")
    true = []
    for i, label in enumerate(y_true):
        if not isinstance(label, str) or not label or label == UNPARSEABLE:
            raise MetricsError(f"true label #{i} is {label!r}: every sample needs a true label")
        true.append(label)
    pred = [p if isinstance(p, str) and p else UNPARSEABLE for p in y_pred]
    return np.asarray(true, dtype=object), np.asarray(pred, dtype=object)


def _encode(true: np.ndarray, pred: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Integer codes: true classes are 0..K-1 (sorted); every other prediction is K.

    Collapsing predictions outside the true classes into one bucket is exact for every metric
    here: such a prediction is a miss for its row's class and a hit or false alarm for none.
    """
    classes = sorted(set(true.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    t = np.fromiter((index[c] for c in true), dtype=np.int64, count=len(true))
    p = np.fromiter((index.get(c, k) for c in pred), dtype=np.int64, count=len(pred))
    return classes, t, p


def _scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from confusion counts of shape (B, K, K+1) (rows true, last column "other").

    Classes with no support in a resample are left out of its averages, as sklearn's
    balanced accuracy does; precision of a never-predicted class is 0 (``zero_division=0``).
    """
    k = conf.shape[1]
    tp = np.diagonal(conf[:, :, :k], axis1=1, axis2=2).astype(np.float64)
    support = conf.sum(axis=2).astype(np.float64)
    predicted = conf[:, :, :k].sum(axis=1).astype(np.float64)
    n = support.sum(axis=1)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    weight = support / n[:, None]
    n_present = present.sum(axis=1)
    return {
        "balanced_accuracy": (recall * present).sum(axis=1) / n_present,
        "weighted_precision": (precision * weight).sum(axis=1),
        "weighted_recall": (recall * weight).sum(axis=1),
        "weighted_f1": (f1 * weight).sum(axis=1),
        "macro_f1": (f1 * present).sum(axis=1) / n_present,
        "accuracy": tp.sum(axis=1) / n,
    }


def _confusion_batch(t: np.ndarray, p: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Confusion counts (B, K, K+1) of the resamples ``idx`` (B, n) in one bincount."""
    cells = k * (k + 1)
    codes = t * (k + 1) + p
    flat = codes[idx] + (np.arange(idx.shape[0], dtype=np.int64) * cells)[:, None]
    counts = np.bincount(flat.ravel(), minlength=idx.shape[0] * cells)
    return counts.reshape(idx.shape[0], k, k + 1)


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :data:`METRIC_NAMES` and the unparseable rate.

    Samples are resampled with replacement ``n_boot`` times from ``np.random.default_rng(seed)``;
    all resamples are scored at once from their confusion counts (chunked to bound memory).

    Returns:
        Metric name -> (low, high) at ``level`` coverage.
    """
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise MetricsError(f"level must be in (0, 1), got {level}")
    true, pred = as_label_arrays(y_true, y_pred)
    _, t, p = _encode(true, pred)
    unparseable = (pred == UNPARSEABLE).astype(np.float64)
    k = int(t.max()) + 1
    n = len(t)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*METRIC_NAMES, "unparseable_rate")}
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        scores = _scores_from_confusion(_confusion_batch(t, p, k, idx))
        for name in METRIC_NAMES:
            parts[name].append(scores[name])
        parts["unparseable_rate"].append(unparseable[idx].mean(axis=1))
    tail = (1 - level) / 2 * 100
    out = {}
    for name, chunks in parts.items():
        lo, hi = np.percentile(np.concatenate(chunks), [tail, 100 - tail])
        out[name] = (float(lo), float(hi))
    return out


def point_scores(y_true: Sequence[str], y_pred: Sequence[str | None]) -> dict[str, float]:
    """The point metrics of :data:`METRIC_NAMES` plus ``unparseable_rate`` (vectorised path)."""
    true, pred = as_label_arrays(y_true, y_pred)
    _, t, p = _encode(true, pred)
    k = int(t.max()) + 1
    conf = _confusion_batch(t, p, k, np.arange(len(t))[None, :])
    scores = {name: float(v[0]) for name, v in _scores_from_confusion(conf).items()}
    scores["unparseable_rate"] = float(np.mean(pred == UNPARSEABLE))
    return scores


def per_class_report(y_true: Sequence[str], y_pred: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """sklearn's per-class precision, recall, F1 and support over the true classes."""
    from sklearn.metrics import precision_recall_fscore_support

    true, pred = as_label_arrays(y_true, y_pred)
    classes = sorted(set(true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=classes, zero_division=0
    )
    return {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }


def confusion(
    y_true: Sequence[str], y_pred: Sequence[str | None]
) -> tuple[list[str], np.ndarray]:
    """Confusion counts: one row per true class (sorted), one column per predicted label.

    The columns are the true classes (sorted), then classes only ever predicted (sorted),
    then :data:`UNPARSEABLE` if any answer was unparseable; rows of classes that are never
    true would be all zeros and are left out.

    Returns:
        (column labels, int array of shape (n_true_classes, n_columns)).
    """
    from sklearn.metrics import confusion_matrix

    true, pred = as_label_arrays(y_true, y_pred)
    classes = sorted(set(true.tolist()))
    extra = sorted(set(pred.tolist()) - set(classes) - {UNPARSEABLE})
    labels = classes + extra + ([UNPARSEABLE] if (pred == UNPARSEABLE).any() else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "a single label was found"
        matrix = confusion_matrix(true, pred, labels=labels)
    return labels, matrix[: len(classes)]


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ClassificationMetrics:
    """All metrics of one model on one data set: sklearn point estimates plus bootstrap CIs.

    Args:
        y_true: True labels (canonical finding abbreviations), one per sample.
        y_pred: Predicted labels; None (or "") for an unparseable answer or failed request.
        n_boot: Bootstrap resamples; 0 skips the intervals.
        seed: Seed of the bootstrap generator.
        level: Coverage of the intervals.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

    true, pred = as_label_arrays(y_true, y_pred)
    classes = sorted(set(true.tolist()))
    wp, wr, wf, _ = precision_recall_fscore_support(
        true, pred, labels=classes, average="weighted", zero_division=0
    )
    macro = f1_score(true, pred, labels=classes, average="macro", zero_division=0)
    # sklearn warns when y_pred holds classes absent from y_true (the sentinel, a class only
    # predicted) or only one class occurs: both are expected here and handled as documented.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(true, pred)
    conf_labels, conf = confusion(true, pred)
    n_unparseable = int((pred == UNPARSEABLE).sum())
    ci = bootstrap_ci(true, pred, n_boot=n_boot, seed=seed, level=level) if n_boot else {}
    return ClassificationMetrics(
        balanced_accuracy=float(balanced),
        weighted_precision=float(wp),
        weighted_recall=float(wr),
        weighted_f1=float(wf),
        macro_f1=float(macro),
        accuracy=float(np.mean(true == pred)),
        unparseable_rate=n_unparseable / len(true),
        n=len(true),
        n_unparseable=n_unparseable,
        ci=ci,
        ci_level=level,
        n_boot=n_boot,
        seed=seed,
        labels=tuple(classes),
        per_class=per_class_report(true, pred),
        confusion_labels=tuple(conf_labels),
        confusion=tuple(tuple(int(x) for x in row) for row in conf),
    )


def prior_baseline(
    y_true: Sequence[str],
    strategy: str = "majority",
    seed: int = 0,
    prior_labels: Iterable[str] | None = None,
) -> list[str]:
    """Predictions of a prior-only model that never looks at the ECG.

    Args:
        y_true: The evaluated samples' true labels (only their count is used when
            ``prior_labels`` is given).
        strategy: ``"majority"`` always predicts the most frequent label (ties broken
            alphabetically); ``"sample"`` draws each prediction from the label frequencies.
        seed: Seed for ``"sample"``.
        prior_labels: Labels to take the prior from (e.g. the training split); defaults to
            ``y_true`` itself.
    """
    if strategy not in PRIOR_STRATEGIES:
        raise MetricsError(f"strategy must be one of {PRIOR_STRATEGIES}, got {strategy!r}")
    counts = Counter(prior_labels if prior_labels is not None else y_true)
    if not counts:
        raise MetricsError("no labels to take a prior from")
    if strategy == "majority":
        top = max(counts.values())
        label = min(c for c, v in counts.items() if v == top)
        return [label] * len(y_true)
    classes = sorted(counts)
    prob = np.array([counts[c] for c in classes], dtype=np.float64)
    draws = np.random.default_rng(seed).choice(len(classes), size=len(y_true), p=prob / prob.sum())
    return [classes[i] for i in draws]


def metrics_by_model_and_dataset(
    rows: Iterable[Mapping[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
    prior_strategy: str | None = "majority",
) -> dict[str, dict[str, ClassificationMetrics]]:
    """Score prediction rows (``model``, ``dataset``, ``true_label``, ``predicted_label``).

    Returns ``{model: {dataset: ClassificationMetrics}}``; with ``prior_strategy`` set, a
    :data:`PRIOR_MODEL` entry scores the prior-only baseline on each data set's samples (taken
    once per sample id, so several models over the same split do not weight it twice).
    """
    groups: dict[tuple[str, str], tuple[list[str], list[str | None]]] = {}
    truth_by_dataset: dict[str, dict[str, str]] = {}
    for row in rows:
        key = (str(row["model"]), str(row["dataset"]))
        true, pred = groups.setdefault(key, ([], []))
        true.append(row["true_label"])
        pred.append(row.get("predicted_label"))
        truth_by_dataset.setdefault(key[1], {})[str(row.get("sample_id", len(true)))] = row[
            "true_label"
        ]
    out: dict[str, dict[str, ClassificationMetrics]] = {}
    for (model, dataset), (true, pred) in sorted(groups.items()):
        out.setdefault(model, {})[dataset] = classification_metrics(true, pred, n_boot, seed)
    if prior_strategy is not None:
        for dataset, truth in sorted(truth_by_dataset.items()):
            true = [truth[k] for k in sorted(truth)]
            pred = prior_baseline(true, prior_strategy, seed)
            out.setdefault(PRIOR_MODEL, {})[dataset] = classification_metrics(
                true, pred, n_boot, seed
            )
    return out


def metrics_table(
    metrics: Mapping[str, Mapping[str, ClassificationMetrics]],
) -> list[dict[str, Any]]:
    """Table 1 rows (data set, then model, baseline last): point values and CI bounds."""
    rows = []
    datasets = sorted({d for per_ds in metrics.values() for d in per_ds})
    models = sorted(m for m in metrics if m != PRIOR_MODEL) + (
        [PRIOR_MODEL] if PRIOR_MODEL in metrics else []
    )
    for dataset in datasets:
        for model in models:
            m = metrics[model].get(dataset)
            if m is None:
                continue
            row: dict[str, Any] = {"dataset": dataset, "model": model, "n": m.n}
            for name in (*METRIC_NAMES, "unparseable_rate"):
                row[name] = getattr(m, name)
                if name in m.ci:
                    row[f"{name}_ci"] = m.ci[name]
            rows.append(row)
    return rows
