"""Metrics against values worked out by hand, and the vectorised bootstrap against sklearn."""

import json
import warnings

import numpy as np
import pytest

from ecgvlm.metrics import (
    PRIOR_MODEL,
    UNPARSEABLE,
    MetricsError,
    _cell_weights,
    _cells,
    _class_cells,
    _encode,
    bootstrap_ci,
    classification_metrics,
    cluster_bootstrap_mean,
    cluster_ids,
    metrics_by_model_and_dataset,
    metrics_table,
    option_prior_baseline,
    point_scores,
    wilson_interval,
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


def test_blind_baseline_takes_its_prior_from_training_and_answers_only_offered_options():
    # Training: AF is the most frequent correct answer; in the test questions NORM is. The
    # test labels must not matter: only the training counts and the offered options do.
    train = [{"dataset": "cpsc2018", "true_label": x} for x in ["AF"] * 5 + ["NORM"] * 2 + ["RBBB"]]
    test = [
        {"sample_id": "q1", "dataset": "cpsc2018", "option_labels": ["NORM", "AF", "LBBB", "PVC"]},
        # AF is not offered: the most frequent offered one (NORM) is chosen, never AF.
        {"sample_id": "q2", "dataset": "cpsc2018", "option_labels": ["LBBB", "RBBB", "NORM", "PVC"]},
        {"sample_id": "q3", "dataset": "cpsc2018", "option_labels": ["LBBB", "RBBB", "STD", "PVC"]},
    ]
    pred = option_prior_baseline(test, train, seed=0)
    assert pred["q1"] == "AF"
    assert pred["q2"] == "NORM"
    assert pred["q3"] == "RBBB"
    for sample in test:
        assert pred[sample["sample_id"]] in sample["option_labels"]
    # Ties (options never seen in training) are a seeded draw among the tied options; a data
    # set absent from training falls back to the pooled counts.
    tied = [{"sample_id": f"t{i}", "dataset": "mitdb", "option_labels": ["X", "Y", "Z", "W"]}
            for i in range(200)]
    draws = option_prior_baseline(tied, train, seed=3)
    assert draws == option_prior_baseline(tied, train, seed=3)
    assert draws != option_prior_baseline(tied, train, seed=4)
    assert set(draws.values()) == {"X", "Y", "Z", "W"}
    assert option_prior_baseline(
        [{"sample_id": "m", "dataset": "mitdb", "option_labels": ["NORM", "AF"]}], train
    ) == {"m": "AF"}


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
    patients = [f"p{i % 7}" for i in range(len(true))]
    n_boot, seed = 200, 11
    ci = bootstrap_ci(true, pred, n_boot=n_boot, seed=seed, clusters=patients)

    # The same draws of (patient, class) cells, expanded to rows and scored by sklearn.
    _, t_codes, _ = _encode(np.asarray(true, dtype=object), np.asarray(pred_s, dtype=object))
    cell_of_row, cell_class = _cells(t_codes, cluster_ids(patients, len(true)))
    weights = _cell_weights(_class_cells(cell_class, len(classes)), len(cell_class), n_boot,
                            np.random.default_rng(seed))
    rows_of_cell = [np.flatnonzero(cell_of_row == c) for c in range(len(cell_class))]
    ref = {name: [] for name in ci}
    for w in weights:
        rows = np.concatenate([np.repeat(rows_of_cell[c], w[c]) for c in range(len(w))])
        scores = _sklearn_resample_scores([true[i] for i in rows], [pred_s[i] for i in rows])
        for name in ci:
            ref[name].append(scores[name])
        # Stratified: every resample holds every class as often as the data do.
        assert sorted({true[i] for i in rows}) == sorted(set(true))
    for name, (lo, hi) in ci.items():
        assert (lo, hi) == pytest.approx(tuple(np.percentile(ref[name], [2.5, 97.5]))), name


def _random_answers(n, seed=3):
    rng = np.random.default_rng(seed)
    labels = ["AF", "NORM", "RBBB", "STD", "LBBB"]
    true = [labels[i] for i in rng.integers(0, 5, n)]
    pred = [labels[i] if i < 5 else None for i in rng.integers(0, 6, n)]
    return true, pred, [f"p{i // 4}" for i in range(n)]


def test_bootstrap_intervals_do_not_depend_on_its_memory_chunks(monkeypatch):
    import ecgvlm.evaluate.metrics as metrics_module

    true, pred, patients = _random_answers(600)
    whole = bootstrap_ci(true, pred, n_boot=150, seed=4, clusters=patients)
    x = np.linspace(0, 1, len(true)) ** 2
    whole_mean = cluster_bootstrap_mean(x, patients, n_boot=150, seed=4)
    # 7 resamples per chunk (the last one short): a different chunking of the same draws.
    monkeypatch.setattr(metrics_module, "_BOOTSTRAP_CHUNK_ELEMENTS", 7 * len(true))
    assert bootstrap_ci(true, pred, n_boot=150, seed=4, clusters=patients) == whole
    assert cluster_bootstrap_mean(x, patients, n_boot=150, seed=4) == pytest.approx(whole_mean)


def test_bootstrap_memory_does_not_grow_with_resamples_times_rows():
    # The resamples are scored in chunks of bounded size: going from 10k to 40k rows adds a
    # few integers a row, not n_boot of them (that was 200 x 30k x 8 bytes x 3 arrays, 144 MB).
    import tracemalloc

    peaks = {}
    for n in (10_000, 40_000):
        true, pred, patients = _random_answers(n)
        tracemalloc.start()
        bootstrap_ci(true, pred, n_boot=200, seed=0, clusters=patients)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[40_000] - peaks[10_000] < 30_000 * 200, peaks


def _simulate_patients(rng, n_patients=5, n_windows=180):
    """Windows of a few patients whose accuracy differs by patient; the truth is 0.675."""
    acc = rng.uniform(0.4, 0.95, size=n_patients)
    correct = rng.random((n_patients, n_windows)) < acc[:, None]
    true = ["AF"] * (n_patients * n_windows)
    pred = ["AF" if c else "NORM" for c in correct.ravel()]
    patients = [f"p{g}" for g in np.repeat(np.arange(n_patients), n_windows)]
    return true, pred, patients


def test_patient_clustered_interval_covers_where_the_row_interval_does_not():
    # The simulation: 5 patients x 180 windows, accuracy varying by patient. Rows of
    # one patient are not independent: a row-level interval is far too narrow.
    rng = np.random.default_rng(2024)
    truth = (0.4 + 0.95) / 2
    covered = {"sample": 0, "patient": 0}
    width = {"sample": [], "patient": []}
    repeats = 120
    for r in range(repeats):
        true, pred, patients = _simulate_patients(rng)
        for unit, clusters in (("sample", None), ("patient", patients)):
            lo, hi = bootstrap_ci(true, pred, n_boot=300, seed=r, clusters=clusters)["accuracy"]
            covered[unit] += lo <= truth <= hi
            width[unit].append(hi - lo)
    assert covered["sample"] / repeats < 0.5
    assert covered["patient"] / repeats > 0.75
    assert np.mean(width["patient"]) > 2 * np.mean(width["sample"])
    # classification_metrics names the unit it resampled and flags the few patients.
    true, pred, patients = _simulate_patients(np.random.default_rng(0))
    m = classification_metrics(true, pred, n_boot=100, clusters=patients, cluster_unit="patient")
    assert (m.ci_unit, m.n_clusters) == ("patient", 5)
    assert m.ci_method["macro_f1"] == "patient bootstrap"
    assert "one true class" in m.flags


def test_rare_class_does_not_bias_class_averaged_intervals():
    # 12 classes, one frequent, eleven rare; always predicting the frequent one gives
    # balanced accuracy exactly 1/12. Resampling rows loses rare classes in almost every
    # resample, so averages over fewer classes put the whole interval above the point
    # estimate; stratified resampling keeps every class.
    true = ["A"] * 109 + [f"R{i}" for i in range(11)]
    pred = ["A"] * len(true)
    m = classification_metrics(true, pred, n_boot=500, seed=0)
    lo, hi = m.ci["balanced_accuracy"]
    assert lo <= m.balanced_accuracy <= hi
    assert m.balanced_accuracy == pytest.approx(1 / 12)
    lo, hi = m.ci["macro_f1"]
    assert lo <= m.macro_f1 <= hi


def test_tiny_or_single_class_rows_get_flags_and_exact_intervals():
    m = classification_metrics(["AF"], ["AF"], n_boot=200)
    assert m.accuracy == 1.0
    assert m.ci_method["accuracy"] == "wilson"
    assert m.ci["accuracy"] == pytest.approx(wilson_interval(1, 1))
    assert m.ci["accuracy"][0] < 0.25 and m.ci["accuracy"][1] == 1.0
    assert m.ci["balanced_accuracy"] == m.ci["accuracy"]
    assert set(m.flags) == {"n=1 < 10", "one true class"}
    # Wilson by hand: 8/10 at 95% -> centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10).
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * np.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
    # A row where every answer is right, 50 patients: the bootstrap has zero width, Wilson not.
    big = classification_metrics(["A", "B"] * 25, ["A", "B"] * 25, n_boot=100,
                                 clusters=[f"p{i}" for i in range(50)], cluster_unit="patient")
    assert big.ci_method["accuracy"] == "wilson" and big.ci["accuracy"][0] < 1.0
    assert big.flags == ()


def test_cluster_bootstrap_mean_resamples_clusters():
    values = [1.0] * 10 + [5.0] * 10
    row = cluster_bootstrap_mean(values, None, n_boot=400, seed=0)
    two = cluster_bootstrap_mean(values, ["a"] * 10 + ["b"] * 10, n_boot=400, seed=0)
    assert two[1] - two[0] > row[1] - row[0]
    assert two == pytest.approx((1.0, 5.0))


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
    for i, t in enumerate(Y_TRUE):
        rows.append({"sample_id": f"s{i}", "dataset": "cpsc2018", "model": PRIOR_MODEL,
                     "true_label": t, "predicted_label": "NORM"})
    rows.append({"sample_id": "m0", "dataset": "mitdb", "model": PRIOR_MODEL,
                 "true_label": "AF", "predicted_label": "NORM"})
    out = metrics_by_model_and_dataset(rows, n_boot=20, seed=1)
    assert sorted(out) == ["prior-baseline", "pulse", "pulse-lora"]
    assert out["pulse"]["cpsc2018"].balanced_accuracy == pytest.approx(7 / 18)
    assert out["pulse-lora"]["cpsc2018"].balanced_accuracy == 1.0
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
