"""Classification metrics of MCQ answers, as the study reports them, with honest intervals.

The study's Table 1 reports balanced accuracy and weighted precision, recall and F1 per data
set and model; we add macro-F1, the unparseable-answer rate, a per-class report, the confusion
matrix and 95% confidence intervals, plus a blind baseline row that never sees the ECG.

Conventions (the numbers in ``metrics.json`` depend on them):

* Metrics are computed on *labels* (the canonical finding behind the chosen option), not on
  letters, so they compare across questions whose options are shuffled.
* An answer that could not be parsed, or a request that failed, is counted **wrong**: its
  prediction becomes :data:`UNPARSEABLE`, a class that is never a true label. It is never
  replaced by a guess. Precision is a property of predicted classes, so an unparseable answer
  lowers recall and accuracy but no class's precision: weighted precision covers parsed
  answers only.
* Per-class averages run over the classes present among the true labels (a class that is
  only ever predicted has no support: it lowers the precision of nothing and the recall of
  the classes it was wrongly chosen for). ``macro_f1`` is the unweighted mean F1 over those
  classes; ``weighted_*`` weight each by its support; ``balanced_accuracy`` is the mean
  recall (sklearn's definition).
* Intervals are percentile bootstrap intervals that resample **clusters**, not rows: windows
  of one patient (or, without a patient id, of one source recording) are not independent,
  and resampling rows makes intervals far too narrow. The resampling is stratified by true
  class: for each class, the (cluster, class) cells holding it are drawn with replacement, so
  every resample holds every class and class-averaged metrics average over the same classes
  as the point estimate. (The correlation between one patient's cells of different classes
  is not kept.) Where the bootstrap degenerates (a zero-width interval, or n < 10), rates
  (accuracy, weighted recall, the unparseable rate, and balanced accuracy of a single-class
  row) get a Wilson score interval instead; ``ci_method`` says which.
* The blind baseline (:func:`option_prior_baseline`, model :data:`PRIOR_MODEL`) answers each
  question with the offered option whose finding is most frequent among the correct answers
  of the **training** split (ties broken by a seeded draw). On prior-balanced questions it
  scores near chance (1 / number of options); far above chance means the questions can be
  passed without looking.

This module imports numpy and scikit-learn only.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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

#: The model name of the blind baseline's rows in tables and ``metrics.json``.
PRIOR_MODEL = "prior-baseline"

#: Metrics that are proportions of samples: they get an exact-coverage (Wilson) interval where
#: the bootstrap degenerates.
RATE_METRICS: tuple[str, ...] = ("accuracy", "weighted_recall", "unparseable_rate")

#: Rows smaller than this are flagged: their numbers mean little.
MIN_RELIABLE_N = 10
#: Rows with fewer clusters (patients or recordings) than this are flagged.
MIN_RELIABLE_CLUSTERS = 5

# Resamples per vectorised chunk are capped so that one chunk's arrays (resamples x rows or
# clusters) stay at 4 MB each: the bootstrap's memory does not grow with the rows beyond a
# few integers a row, whatever ``n_boot``.
_BOOTSTRAP_CHUNK_ELEMENTS = 500_000


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
        ci: Metric name -> (low, high) interval (see ``ci_method``).
        ci_level: Coverage of ``ci`` (0.95).
        ci_method: Metric name -> ``"cluster bootstrap"`` or ``"wilson"`` (where the
            bootstrap degenerated).
        ci_unit: What the bootstrap resampled: ``"patient"``, ``"recording"`` or ``"sample"``.
        n_clusters: How many of those units the samples come from.
        flags: Why the row's numbers may mislead (few samples, one true class, few patients);
            empty when none applies.
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
    ci_method: dict[str, str] = field(default_factory=dict)
    ci_unit: str = "sample"
    n_clusters: int = 0
    flags: tuple[str, ...] = ()
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
        data["flags"] = list(self.flags)
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


def cluster_ids(
    clusters: Sequence[Any] | None, n: int
) -> np.ndarray:
    """Integer cluster codes; None, NaN or "" entries (and ``clusters=None``) are their own."""
    if clusters is None:
        return np.arange(n, dtype=np.int64)
    if len(clusters) != n:
        raise MetricsError(f"clusters has {len(clusters)} entries but there are {n} samples")
    index: dict[Any, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, c in enumerate(clusters):
        missing = c is None or c == "" or (isinstance(c, float) and np.isnan(c))
        key = ("\x00row", i) if missing else c
        out[i] = index.setdefault(key, len(index))
    return out


def _cells(t: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell of each row, true class of each cell): one cell per (true class, cluster)."""
    keys = t * (int(g.max()) + 1) + g
    uniq, cell_of_row = np.unique(keys, return_inverse=True)
    return cell_of_row.astype(np.int64), (uniq // (int(g.max()) + 1)).astype(np.int64)


def _class_cells(cell_class: np.ndarray, k: int) -> list[np.ndarray]:
    """The cells holding each class (classes no cell holds left out), found once per
    bootstrap rather than once per chunk of resamples."""
    return [m for m in (np.flatnonzero(cell_class == c) for c in range(k)) if len(m)]


def _cell_weights(
    by_class: list[np.ndarray], n_cells: int, b: int, rng: np.random.Generator
) -> np.ndarray:
    """How often each cell is drawn in each of ``b`` resamples, shape (b, n_cells).

    For every class, as many cells as hold it (``by_class``, from :func:`_class_cells`) are
    drawn with replacement from those cells. The draws go resample by resample (each
    resample's classes in turn), so a resample's cells do not depend on how many resamples
    are drawn at once: the chunks that bound the bootstrap's memory leave its intervals
    unchanged.
    """
    draws = np.empty((b, n_cells), dtype=np.int64)
    for r in range(b):
        start = 0
        for members in by_class:
            draws[r, start:start + len(members)] = members[rng.integers(0, len(members), len(members))]
            start += len(members)
    draws += (np.arange(b, dtype=np.int64) * n_cells)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n_cells).reshape(b, n_cells)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (never degenerate for n >= 1)."""
    from statistics import NormalDist

    if n < 1:
        raise MetricsError(f"n must be >= 1, got {n}")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Sequence[Any] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :data:`METRIC_NAMES` and the unparseable rate.

    Resamples (cluster, true class) cells, stratified by class (see the module docstring):
    ``n_boot`` resamples from ``np.random.default_rng(seed)``, all scored at once from their
    confusion counts (chunked to bound memory).

    Args:
        clusters: The cluster (patient or source recording) of each sample; None treats
            every sample as its own cluster.

    Returns:
        Metric name -> (low, high) at ``level`` coverage.
    """
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise MetricsError(f"level must be in (0, 1), got {level}")
    true, pred = as_label_arrays(y_true, y_pred)
    _, t, p = _encode(true, pred)
    k = int(t.max()) + 1
    cell_of_row, cell_class = _cells(t, cluster_ids(clusters, len(t)))
    n_cells = len(cell_class)
    # A resample's confusion counts (flattened K x (K+1)) are a bincount of the rows' cells
    # weighted by how often the resample drew each row's cell. Per row this keeps a few
    # integers; a dense table of counts per cell would take 8 (K^2 + K + 1) bytes a cell.
    width = k * (k + 1)
    codes = t * (k + 1) + p
    unparseable = pred == UNPARSEABLE
    rng = np.random.default_rng(seed)
    by_class = _class_cells(cell_class, k)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(n_cells, len(t)))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*METRIC_NAMES, "unparseable_rate")}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        row_weights = _cell_weights(by_class, n_cells, b, rng)[:, cell_of_row]
        slots = codes[None, :] + (np.arange(b, dtype=np.int64) * width)[:, None]
        conf = np.bincount(slots.ravel(), weights=row_weights.ravel(), minlength=b * width)
        conf = conf.round().astype(np.int64).reshape(b, k, k + 1)
        scores = _scores_from_confusion(conf)
        for name in METRIC_NAMES:
            parts[name].append(scores[name])
        parts["unparseable_rate"].append(row_weights[:, unparseable].sum(axis=1)
                                         / conf.sum(axis=(1, 2)))
    tail = (1 - level) / 2 * 100
    out = {}
    for name, chunks in parts.items():
        lo, hi = np.percentile(np.concatenate(chunks), [tail, 100 - tail])
        out[name] = (float(lo), float(hi))
    return out


def cluster_bootstrap_mean(
    values: Sequence[float],
    clusters: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling clusters.

    Each resample draws as many clusters as there are, with replacement, and takes the mean
    over all values of the drawn clusters (a cluster drawn twice counts twice).
    """
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise MetricsError("no values to average")
    g = cluster_ids(clusters, len(x))
    _, g = np.unique(g, return_inverse=True)
    n_g = int(g.max()) + 1
    sums = np.bincount(g, weights=x, minlength=n_g)
    counts = np.bincount(g, minlength=n_g).astype(np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n_g)
    means = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_g, size=(b, n_g))
        w = np.bincount((draws + (np.arange(b) * n_g)[:, None]).ravel(),
                        minlength=b * n_g).reshape(b, n_g)
        means.append((w @ sums) / (w @ counts))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return float(lo), float(hi)


def cluster_resamples(
    clusters: Sequence[Any] | None, n: int, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` row-index arrays, each drawing as many clusters as there are, with
    replacement, and taking all rows of every drawn cluster."""
    g = cluster_ids(clusters, n)
    _, g = np.unique(g, return_inverse=True)
    order = np.argsort(g, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(g))]
    members = [order[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n: int,
    clusters: Sequence[Any] | None,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every value ``statistic(rows)`` returns, over cluster resamples.

    Values that are NaN on a resample (nothing answered) are left out of that statistic's
    percentiles.
    """
    import math

    draws: dict[str, list[float]] = {}
    for rows in cluster_resamples(clusters, n, n_boot, seed):
        for name, value in statistic(rows).items():
            draws.setdefault(name, []).append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for name, values in draws.items():
        finite = np.asarray([v for v in values if not math.isnan(v)])
        if len(finite):
            lo, hi = np.percentile(finite, [tail, 100 - tail])
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
    clusters: Sequence[Any] | None = None,
    cluster_unit: str = "sample",
) -> ClassificationMetrics:
    """All metrics of one model on one data set: sklearn point estimates plus intervals.

    Args:
        y_true: True labels (canonical finding abbreviations), one per sample.
        y_pred: Predicted labels; None (or "") for an unparseable answer or failed request.
        n_boot: Bootstrap resamples; 0 skips the intervals.
        seed: Seed of the bootstrap generator.
        level: Coverage of the intervals.
        clusters: The patient (or source recording) of each sample; None: each its own.
        cluster_unit: What a cluster is, for the report (``patient``, ``recording``).
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
    n = len(true)
    n_unparseable = int((pred == UNPARSEABLE).sum())
    n_correct = int((true == pred).sum())
    unit = cluster_unit if clusters is not None else "sample"
    n_clusters = len(np.unique(cluster_ids(clusters, n)))
    ci: dict[str, tuple[float, float]] = {}
    method: dict[str, str] = {}
    if n_boot:
        ci = bootstrap_ci(true, pred, n_boot=n_boot, seed=seed, level=level, clusters=clusters)
        method = {name: f"{unit} bootstrap" for name in ci}
        # The bootstrap cannot vary what it cannot resample (one cluster, every answer right
        # or wrong, tiny n): give proportions an interval with its nominal coverage.
        successes = {"accuracy": n_correct, "weighted_recall": n_correct,
                     "unparseable_rate": n_unparseable}
        if len(classes) == 1:
            successes["balanced_accuracy"] = n_correct
        for name, k in successes.items():
            lo, hi = ci[name]
            if hi <= lo or n < MIN_RELIABLE_N:
                ci[name] = wilson_interval(k, n, level)
                method[name] = "wilson"
    flags = []
    if n < MIN_RELIABLE_N:
        flags.append(f"n={n} < {MIN_RELIABLE_N}")
    if len(classes) == 1:
        flags.append("one true class")
    if unit != "sample" and n_clusters < MIN_RELIABLE_CLUSTERS:
        flags.append(f"{n_clusters} {unit}{'s' if n_clusters != 1 else ''}")
    return ClassificationMetrics(
        balanced_accuracy=float(balanced),
        weighted_precision=float(wp),
        weighted_recall=float(wr),
        weighted_f1=float(wf),
        macro_f1=float(macro),
        accuracy=n_correct / n,
        unparseable_rate=n_unparseable / n,
        n=n,
        n_unparseable=n_unparseable,
        ci=ci,
        ci_level=level,
        ci_method=method,
        ci_unit=unit,
        n_clusters=n_clusters,
        flags=tuple(flags),
        n_boot=n_boot,
        seed=seed,
        labels=tuple(classes),
        per_class=per_class_report(true, pred),
        confusion_labels=tuple(conf_labels),
        confusion=tuple(tuple(int(x) for x in row) for row in conf),
    )


def finding_counts(
    rows: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Counter[str]], Counter[str]]:
    """Counts of the correct answers' findings: per data set, and pooled over all rows.

    Args:
        rows: Questions with ``dataset`` and ``true_label`` (or ``option_labels`` and
            ``answer_index``), e.g. the training split's metadata.
    """
    per_dataset: dict[str, Counter[str]] = {}
    pooled: Counter[str] = Counter()
    for row in rows:
        label = row.get("true_label")
        if label is None:
            label = list(row["option_labels"])[int(row["answer_index"])]
        per_dataset.setdefault(str(row["dataset"]), Counter())[str(label)] += 1
        pooled[str(label)] += 1
    return per_dataset, pooled


def _tie_break(seed: int, sample_id: str, n: int) -> int:
    """A seeded draw in [0, n) that depends on the sample only, not on the row order."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def option_prior_baseline(
    samples: Iterable[Mapping[str, Any]],
    prior: Mapping[str, Counter[str]] | Iterable[Mapping[str, Any]],
    seed: int = 0,
) -> dict[str, str]:
    """The blind baseline: per question, the offered option whose finding is most frequent.

    It never sees the ECG. Frequencies are counts of the correct answers' findings in the
    training split: of the question's own data set, or pooled over all data sets when the
    training split has none of that data set. Ties (e.g. options never seen in training)
    are broken by a draw seeded with ``seed`` and the sample id.

    Args:
        samples: Questions with ``sample_id``, ``dataset`` and ``option_labels``.
        prior: ``{dataset: Counter}`` or the training rows themselves (see
            :func:`finding_counts`).
        seed: Seed of the tie-breaking draw.

    Returns:
        sample id -> the predicted finding (always one of the question's options).
    """
    if isinstance(prior, Mapping):
        per_dataset = {str(k): Counter(v) for k, v in prior.items()}
        pooled: Counter[str] = Counter()
        for counts in per_dataset.values():
            pooled.update(counts)
    else:
        per_dataset, pooled = finding_counts(prior)
    out = {}
    for sample in samples:
        options = [str(o) for o in sample["option_labels"]]
        if not options:
            raise MetricsError(f"sample {sample['sample_id']!r} has no options")
        counts = per_dataset.get(str(sample["dataset"])) or pooled
        scores = [counts.get(o, 0) for o in options]
        best = [o for o, s in zip(options, scores) if s == max(scores)]
        out[str(sample["sample_id"])] = best[_tie_break(seed, str(sample["sample_id"]), len(best))]
    return out


def cluster_unit(clusters: Iterable[Any]) -> str:
    """What clusters named ``patient:<id>`` / ``recording:<id>`` are, in words."""
    kinds = {str(c).split(":", 1)[0] for c in clusters if c is not None and c != ""}
    if kinds == {"patient"}:
        return "patient"
    if kinds == {"recording"}:
        return "recording"
    return "patient or recording" if kinds else "sample"


def metrics_by_model_and_dataset(
    rows: Iterable[Mapping[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, ClassificationMetrics]]:
    """Score prediction rows (``model``, ``dataset``, ``true_label``, ``predicted_label``).

    A row's optional ``cluster`` (``patient:<id>``, or ``recording:<id>`` where no patient id
    exists) is what the intervals resample; rows without one are their own cluster. The blind baseline is scored like any
    model when its rows (model :data:`PRIOR_MODEL`, see :func:`option_prior_baseline`) are
    among ``rows``.

    Returns:
        ``{model: {dataset: ClassificationMetrics}}``.
    """
    groups: dict[tuple[str, str], tuple[list[str], list[str | None], list[Any]]] = {}
    for row in rows:
        key = (str(row["model"]), str(row["dataset"]))
        true, pred, clusters = groups.setdefault(key, ([], [], []))
        true.append(row["true_label"])
        pred.append(row.get("predicted_label"))
        clusters.append(row.get("cluster"))
    out: dict[str, dict[str, ClassificationMetrics]] = {}
    for (model, dataset), (true, pred, clusters) in sorted(groups.items()):
        clustered = any(c is not None and c != "" for c in clusters)
        out.setdefault(model, {})[dataset] = classification_metrics(
            true, pred, n_boot, seed, clusters=clusters if clustered else None,
            cluster_unit=cluster_unit(clusters),
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
