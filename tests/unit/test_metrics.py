"""Metrics against values worked out by hand, and the vectorised bootstrap against sklearn."""

import json
import warnings

import numpy as np
import pytest

from ecgvlm.metrics import (
    PRIOR_MODEL,
    UNPARSEABLE,
    MetricsError,
    bootstrap_ci,
    classification_metrics,
    metrics_by_model_and_dataset,
    metrics_table,
    point_scores,
    prior_baseline,
)

# Six samples, three classes, one unparseable answer (None).
#
#   sample  true   pred
#   0       NORM   NORM   hit
#   1       NORM   NORM   hit
#   2       NORM   AF     miss
#   3       AF     AF     hit
#   4       AF     None   unparseable: counted wrong
#   5       RBBB   AF     miss
#
# Per class (TP / support / times predicted):
#   AF:   TP 1, support 2, predicted 3 -> P 1/3, R 1/2, F1 2*(1/6)/(5/6) = 2/5
#   NORM: TP 2, support 3, predicted 2 -> P 1,   R 2/3, F1 2*(2/3)/(5/3) = 4/5
#   RBBB: TP 0, support 1, predicted 0 -> P 0,   R 0,   F1 0
# balanced accuracy  = (1/2 + 2/3 + 0) / 3               = 7/18
# weighted precision = (2*1/3 + 3*1 + 1*0) / 6            = 11/18
# weighted recall    = (2*1/2 + 3*2/3 + 1*0) / 6          = 1/2  (= accuracy 3/6)
# weighted F1        = (2*2/5 + 3*4/5 + 1*0) / 6          = 8/15
# macro F1           = (2/5 + 4/5 + 0) / 3                = 2/5
# unparseable rate   = 1/6
Y_TRUE = ["NORM", "NORM", "NORM", "AF", "AF", "RBBB"]
Y_PRED = ["NORM", "NORM", "AF", "AF", None, "AF"]


def test_hand_computed_metrics():
    m = classification_metrics(Y_TRUE, Y_PRED, n_boot=0)
    assert m.balanced_accuracy == pytest.approx(7 / 18)
    assert m.weighted_precision == pytest.approx(11 / 18)
    assert m.weighted_recall == pytest.approx(1 / 2)
    assert m.weighted_f1 == pytest.approx(8 / 15)
    assert m.macro_f1 == pytest.approx(2 / 5)
    assert m.accuracy == pytest.approx(1 / 2)
    assert m.unparseable_rate == pytest.approx(1 / 6)
    assert (m.n, m.n_unparseable) == (6, 1)
    assert m.per_class["AF"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2}
    )
    assert m.per_class["RBBB"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # Rows are the true classes, columns the predicted labels; the sentinel column comes last.
    assert m.confusion_labels == ("AF", "NORM", "RBBB", UNPARSEABLE)
    assert m.confusion == ((1, 0, 0, 1), (1, 2, 0, 0), (1, 0, 0, 0))
    assert m.ci == {}
    # The vectorised path used by the bootstrap gives the same point values.
    fast = point_scores(Y_TRUE, Y_PRED)
    for name in ("balanced_accuracy", "weighted_precision", "weighted_recall", "weighted_f1",
                 "macro_f1", "accuracy", "unparseable_rate"):
        assert fast[name] == pytest.approx(getattr(m, name)), name


def test_class_only_predicted_is_not_averaged_over():
    # true [A, B], pred [C, B]: A recall 0 (F1 0), B P=R=F1=1; C has no support.
    # Averages over {A, B}: balanced 1/2, macro-F1 1/2 (sklearn's default label set would
    # include C and give macro-F1 1/3).
    m = classification_metrics(["A", "B"], ["C", "B"], n_boot=0)
    assert m.balanced_accuracy == pytest.approx(0.5)
    assert m.macro_f1 == pytest.approx(0.5)
    assert m.weighted_f1 == pytest.approx(0.5)
    assert m.unparseable_rate == 0.0
    assert m.confusion_labels == ("A", "B", "C")
    assert m.confusion == ((0, 0, 1), (0, 1, 0))


def test_unparseable_is_never_a_hit_even_if_a_true_label_looks_empty():
    with pytest.raises(MetricsError, match="true label #1"):
        classification_metrics(["A", None], ["A", "A"], n_boot=0)
    with pytest.raises(MetricsError, match="true label #0"):
        classification_metrics([UNPARSEABLE], [None], n_boot=0)
    with pytest.raises(MetricsError, match="2 labels but y_pred has 1"):
        classification_metrics(["A", "B"], ["A"], n_boot=0)
    # NaN (a null read back from Parquet by pandas) and "" are unparseable too.
    m = classification_metrics(["A", "A", "A"], [float("nan"), "", "A"], n_boot=0)
    assert (m.n_unparseable, m.accuracy) == (2, pytest.approx(1 / 3))


def test_prior_majority_baseline_by_hand():
    # Counts NORM 3, AF 2, RBBB 1 -> always NORM.
    # NORM: P 3/6, R 1, F1 2/3; AF, RBBB: 0.
    # balanced 1/3, weighted recall 1/2, weighted precision 3*(1/2)/6 = 1/4,
    # weighted F1 3*(2/3)/6 = 1/3, macro-F1 (2/3)/3 = 2/9.
    pred = prior_baseline(Y_TRUE)
    assert pred == ["NORM"] * 6
    m = classification_metrics(Y_TRUE, pred, n_boot=0)
    assert m.balanced_accuracy == pytest.approx(1 / 3)
    assert m.weighted_recall == pytest.approx(1 / 2)
    assert m.weighted_precision == pytest.approx(1 / 4)
    assert m.weighted_f1 == pytest.approx(1 / 3)
    assert m.macro_f1 == pytest.approx(2 / 9)
    # Ties are broken alphabetically; a training prior can be given instead.
    assert prior_baseline(["B", "A"]) == ["A", "A"]
    assert prior_baseline(["A", "A"], prior_labels=["B", "B", "A"]) == ["B", "B"]
    sampled = prior_baseline(["A"] * 2000 + ["B"] * 1000, strategy="sample", seed=3)
    assert sampled == prior_baseline(["A"] * 2000 + ["B"] * 1000, strategy="sample", seed=3)
    assert 0.6 < sampled.count("A") / 3000 < 0.73
    with pytest.raises(MetricsError, match="strategy must be one of"):
        prior_baseline(["A"], strategy="mode")


def _sklearn_resample_scores(true, pred):
    """Reference: one resample scored by sklearn with this module's conventions."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        f1_score,
        precision_recall_fscore_support,
    )

    classes = sorted(set(true))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(true, pred)
    wp, wr, wf, _ = precision_recall_fscore_support(
        true, pred, labels=classes, average="weighted", zero_division=0
    )
    macro = f1_score(true, pred, labels=classes, average="macro", zero_division=0)
    return {"balanced_accuracy": balanced, "weighted_precision": wp, "weighted_recall": wr,
            "weighted_f1": wf, "macro_f1": macro,
            "accuracy": float(np.mean(np.array(true) == np.array(pred))),
            "unparseable_rate": float(np.mean(np.array(pred) == UNPARSEABLE))}


def test_vectorised_bootstrap_equals_sklearn_loop():
    rng = np.random.default_rng(7)
    classes = ["AF", "NORM", "RBBB", "STD"]
    true = list(rng.choice(classes, size=40, p=[0.3, 0.5, 0.15, 0.05]))
    pred = [t if rng.random() < 0.6 else rng.choice(classes + ["LBBB", None]) for t in true]
    pred_s = [p if p else UNPARSEABLE for p in pred]
    n_boot, seed = 200, 11
    ci = bootstrap_ci(true, pred, n_boot=n_boot, seed=seed)

    # Same generator, same draws: score each resample with sklearn in a plain loop.
    idx = np.random.default_rng(seed).integers(0, len(true), size=(n_boot, len(true)))
    ref = {name: [] for name in ci}
    for row in idx:
        scores = _sklearn_resample_scores([true[i] for i in row], [pred_s[i] for i in row])
        for name in ci:
            ref[name].append(scores[name])
    for name, (lo, hi) in ci.items():
        assert (lo, hi) == pytest.approx(tuple(np.percentile(ref[name], [2.5, 97.5]))), name


def test_bootstrap_ci_properties():
    m = classification_metrics(Y_TRUE * 20, Y_PRED * 20, n_boot=300, seed=0)
    for name in ("balanced_accuracy", "weighted_f1", "weighted_recall", "weighted_precision",
                 "macro_f1", "unparseable_rate"):
        lo, hi = m.ci[name]
        assert lo <= getattr(m, name) <= hi, name
        assert hi > lo, name
    again = classification_metrics(Y_TRUE * 20, Y_PRED * 20, n_boot=300, seed=0)
    assert again.ci == m.ci
    perfect = classification_metrics(["A", "B", "B"], ["A", "B", "B"], n_boot=50)
    assert perfect.ci["balanced_accuracy"] == (1.0, 1.0)
    # A bigger sample narrows the interval.
    wide = classification_metrics(Y_TRUE * 5, Y_PRED * 5, n_boot=300).ci["weighted_f1"]
    narrow = classification_metrics(Y_TRUE * 80, Y_PRED * 80, n_boot=300).ci["weighted_f1"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_by_model_and_dataset_table_and_json():
    rows = []
    for model, preds in (("pulse", Y_PRED), ("pulse-lora", Y_TRUE)):
        for i, (t, p) in enumerate(zip(Y_TRUE, preds)):
            rows.append({"sample_id": f"s{i}", "dataset": "cpsc2018", "model": model,
                         "true_label": t, "predicted_label": p})
    rows.append({"sample_id": "m0", "dataset": "mitdb", "model": "pulse",
                 "true_label": "AF", "predicted_label": "AF"})
    out = metrics_by_model_and_dataset(rows, n_boot=20, seed=1)
    assert sorted(out) == ["prior-baseline", "pulse", "pulse-lora"]
    assert out["pulse"]["cpsc2018"].balanced_accuracy == pytest.approx(7 / 18)
    assert out["pulse-lora"]["cpsc2018"].balanced_accuracy == 1.0
    # The baseline scores each sample once, not once per model.
    assert out[PRIOR_MODEL]["cpsc2018"].n == 6
    assert out[PRIOR_MODEL]["cpsc2018"].balanced_accuracy == pytest.approx(1 / 3)
    table = metrics_table(out)
    assert [(r["dataset"], r["model"]) for r in table] == [
        ("cpsc2018", "pulse"), ("cpsc2018", "pulse-lora"), ("cpsc2018", PRIOR_MODEL),
        ("mitdb", "pulse"), ("mitdb", PRIOR_MODEL),
    ]
    data = json.loads(json.dumps(out["pulse"]["cpsc2018"].to_json()))
    assert data["weighted_f1"] == pytest.approx(8 / 15)
    assert len(data["ci"]["weighted_f1"]) == 2
