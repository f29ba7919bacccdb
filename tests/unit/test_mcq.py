"""Multiple-choice questions: golden text, distractor rules, determinism, letter balance."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from ecgvlm.config import ConfigError
from ecgvlm.knowledge import knowledge_base
from ecgvlm.mcq import McqConfig, McqError, finding_prevalence, make_mcq
from ecgvlm.metrics import option_prior_baseline
from ecgvlm.prompt import LETTERS, parse_answer
from ecgvlm.records import EcgRecord, McqSample


def _record(labels, record_id="cpsc2018/A0001", dataset="cpsc2018", patient_id="A0001"):
    return EcgRecord(
        record_id=record_id,
        dataset=dataset,
        signal_mv=np.zeros((50, 2), dtype=np.float32),
        fs_hz=500.0,
        leads=("I", "II"),
        labels=tuple(labels),
        patient_id=patient_id,
    )


# The study's question style (distractors from the whole knowledge base, half look-alikes):
# pinned since before the default became prior-balanced, and unchanged by it.
STUDY_STYLE = McqConfig(distractors="knowledge_base", hard_fraction=0.5)
STUDY_GOLDEN_OPTIONS = (
    ("Right bundle branch block: QRS at least 120 ms with an rsR' (M-shaped) complex in V1-V2 "
     "and a wide, slurred S wave in I and V6."),
    ("Incomplete right bundle branch block: QRS of 110-119 ms with an rsr' pattern in V1-V2 and "
     "a small slurred S wave in I and V6."),
    ("Left axis deviation: Frontal QRS axis between -30 and -90 degrees: positive QRS in lead I, "
     "negative in II and aVF."),
    ("Nonspecific intraventricular conduction disorder: QRS longer than 110 ms that fits neither "
     "right nor left bundle branch block criteria."),
)
STUDY_GOLDEN_TARGET = (
    "The answer is A. Right bundle branch block: the right ventricle is activated late through "
    "the left bundle, so the QRS lasts at least 120 ms. V1 and V2 show an rsr', rsR' or rSR' "
    "pattern (R' usually taller than r), leads I and V6 show a wide, slurred S wave (longer "
    "than the R wave or over 40 ms), and the R-peak time in V1 exceeds 50 ms. T waves are "
    "inverted in V1-V2, opposite to the terminal R'. By contrast, incomplete right bundle "
    "branch block would show QRS 110-119 ms, rsr' in V1 and V2 and slurred S wave in I and V6. "
    "Also labelled in this ECG: first-degree atrioventricular block."
)


# The default, prior-balanced: distractors from the data set's findings (PREVALENCE), drawn
# in proportion to how often each is asked; no look-alike, so no contrast sentence. Re-pinned
# deliberately when the default changed from the study's style.
PREVALENCE = {"RBBB": 0.3, "IAVB": 0.2, "AF": 0.2, "LBBB": 0.1, "STD": 0.1, "PVC": 0.1}
GOLDEN_OPTIONS = (
    ("Right bundle branch block: QRS at least 120 ms with an rsR' (M-shaped) complex in V1-V2 "
     "and a wide, slurred S wave in I and V6."),
    ("Left bundle branch block: QRS at least 120 ms with broad notched or slurred R waves in I, "
     "aVL, V5 and V6, no septal q waves there, and a deep QS or rS in V1."),
    ("ST-segment depression: ST segment depressed at least 0.5 mm below the baseline, "
     "horizontal or downsloping, in two or more contiguous leads."),
    ("Atrial fibrillation: Irregularly irregular RR intervals with no distinct P waves, only a "
     "fibrillatory baseline."),
)
GOLDEN_TARGET = (
    "The answer is A. Right bundle branch block: the right ventricle is activated late through "
    "the left bundle, so the QRS lasts at least 120 ms. V1 and V2 show an rsr', rsR' or rSR' "
    "pattern (R' usually taller than r), leads I and V6 show a wide, slurred S wave (longer "
    "than the R wave or over 40 ms), and the R-peak time in V1 exceeds 50 ms. T waves are "
    "inverted in V1-V2, opposite to the terminal R'. "
    "Also labelled in this ECG: first-degree atrioventricular block."
)


def test_golden_mcq_for_a_fixed_seed():
    sample = make_mcq(_record(["RBBB", "IAVB", "UNK:999"]), seed=7, prevalence=PREVALENCE)
    assert sample.question == "Which of the following best describes a finding in this ECG?"
    assert sample.options == GOLDEN_OPTIONS
    # IAVB is the record's own finding: never a distractor, whatever its prevalence.
    assert sample.option_labels == ("RBBB", "LBBB", "STD", "AF")
    assert (sample.answer_index, sample.answer_letter) == (0, "A")
    assert sample.target_text == GOLDEN_TARGET
    # The study's style, for reproduction, gives the question it always gave.
    study = make_mcq(_record(["RBBB", "IAVB", "UNK:999"]), seed=7, config=STUDY_STYLE,
                     prevalence=PREVALENCE)
    assert study.options == STUDY_GOLDEN_OPTIONS
    assert study.option_labels == ("RBBB", "IRBBB", "LAD", "NSIVCB")
    assert study.target_text == STUDY_GOLDEN_TARGET
    assert sample.sample_id == "cpsc2018/A0001#q7"
    assert sample.labels == ("RBBB", "IAVB", "UNK:999")
    assert sample.patient_id == "A0001" and sample.seed == 7


def test_same_inputs_same_question_and_seed_changes_it():
    rec = _record(["AF", "STD"])
    cfg = McqConfig(n_options=6)
    assert make_mcq(rec, 3, cfg) == make_mcq(rec, 3, cfg)
    variants = {make_mcq(rec, s, cfg).options for s in range(10)}
    assert len(variants) > 5


def test_multi_label_records_choose_the_correct_finding_by_seed():
    rec = _record(["AF", "RBBB", "STD"])
    chosen = Counter(make_mcq(rec, s).true_label for s in range(60))
    assert set(chosen) == {"AF", "RBBB", "STD"}
    assert min(chosen.values()) >= 10


@pytest.mark.parametrize("n_options", range(4, 9))
def test_every_finding_gets_valid_questions(n_options):
    kb = knowledge_base()
    cfg = McqConfig(n_options=n_options, hard_fraction=0.5)
    for i, abbrev in enumerate(sorted(kb)):
        rec = _record([abbrev], record_id=f"x/{abbrev}")
        s = make_mcq(rec, i, cfg)
        assert len(s.options) == len(s.option_labels) == n_options
        assert len(set(s.option_labels)) == n_options and len(set(s.options)) == n_options
        assert s.true_label == abbrev and s.answer_letter == LETTERS[s.answer_index]
        assert s.target_text.startswith(f"The answer is {s.answer_letter}. ")
        assert parse_answer(s.target_text, s.options) == s.answer_letter
        for label in s.option_labels:
            if label != abbrev:
                assert label not in kb[abbrev].overlaps, (abbrev, label)


def test_distractors_are_never_findings_the_record_has():
    kb = knowledge_base()
    labels = ["RBBB", "AF", "LAD", "IAVB", "STD", "PVC"]
    rec = _record(labels)
    overlapping = set().union(*(kb[lab].overlaps for lab in labels))
    for seed in range(100):
        s = make_mcq(rec, seed, McqConfig(n_options=8))
        distractors = set(s.option_labels) - {s.true_label}
        assert not distractors & set(labels)
        assert not distractors & overlapping


def test_hard_distractors_come_from_look_alikes():
    kb = knowledge_base()
    rec = _record(["RBBB"])
    all_hard = McqConfig(n_options=4, hard_fraction=1.0)
    for seed in range(20):
        s = make_mcq(rec, seed, all_hard)
        assert set(s.option_labels) - {"RBBB"} <= set(kb["RBBB"].confusable)
    no_hard = McqConfig(n_options=8, hard_fraction=0.0)
    hard_share = np.mean(
        [
            len((set(make_mcq(rec, s, no_hard).option_labels) - {"RBBB"}) & set(kb["RBBB"].confusable))
            / 7
            for s in range(50)
        ]
    )
    assert hard_share < 0.3  # random draws from ~60 findings rarely hit the 4 look-alikes


def test_sinus_rhythm_is_a_distractor_only_against_another_rhythm():
    # A record labelled only RBBB may well be in sinus rhythm: "sinus rhythm" would be right.
    for seed in range(80):
        assert "NSR" not in make_mcq(_record(["RBBB"]), seed, McqConfig(n_options=8)).option_labels
    seen = {
        seed for seed in range(80)
        if "NSR" in make_mcq(_record(["AF"]), seed, McqConfig(n_options=8)).option_labels
    }
    assert seen, "NSR never offered against atrial fibrillation"


def test_answer_letters_are_balanced_over_a_data_set():
    kb = sorted(knowledge_base())
    for n_options in (4, 5, 8):
        cfg = McqConfig(n_options=n_options)
        counts = Counter(
            make_mcq(_record([kb[i % len(kb)]], record_id=f"set/r{i}"), 0, cfg).answer_letter
            for i in range(400)
        )
        expected = 400 / n_options
        chi2 = sum((counts[letter] - expected) ** 2 / expected for letter in LETTERS[:n_options])
        # 99.9th percentile of chi-square with n-1 degrees of freedom (3: 16.27, 4: 18.47, 7: 24.32)
        assert chi2 < {4: 16.27, 5: 18.47, 8: 24.32}[n_options], (n_options, counts)
        assert max(abs(counts[l] - expected) for l in LETTERS[:n_options]) < 4 * math.sqrt(expected)


def test_unknown_only_records_cannot_make_a_question():
    with pytest.raises(McqError, match=r"only unknown codes \['UNK:1', 'UNK:2'\]"):
        make_mcq(_record(["UNK:1", "UNK:2"]), 0)
    with pytest.raises(McqError, match="no finding"):
        make_mcq(_record([]), 0)


def test_label_pool_limits_distractors():
    cfg = McqConfig(n_options=4, label_pool=("NSR", "AF", "AFL", "PVC", "PAC", "RBBB", "LBBB"))
    for seed in range(30):
        s = make_mcq(_record(["RBBB"]), seed, cfg)
        assert set(s.option_labels) <= set(cfg.label_pool)
    with pytest.raises(McqError, match="only 1 findings can be distractors"):
        make_mcq(_record(["RBBB"]), 0, McqConfig(label_pool=("RBBB", "LBBB")))


def test_name_style_options():
    s = make_mcq(_record(["AF"]), 1, McqConfig(option_style="name", n_options=5))
    assert s.options[s.answer_index] == "Atrial fibrillation"
    assert all(":" not in o for o in s.options)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_options": 3}, "n_options"),
        ({"n_options": 9}, "n_options"),
        ({"hard_fraction": 1.5}, "hard_fraction"),
        ({"option_style": "long"}, "option_style must be one of 'summary', 'name'"),
        ({"question": " "}, "question"),
        ({"label_pool": ("RBBB", "XYZ")}, "XYZ"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        McqConfig(**kwargs)


def test_config_hash_changes_with_config():
    assert McqConfig().config_hash() == McqConfig().config_hash()
    assert McqConfig().config_hash() != McqConfig(n_options=5).config_hash()


def test_row_round_trip():
    s = dataclasses.replace(make_mcq(_record(["LBBB"]), 2), png=b"\x89PNG")
    assert McqSample.from_row(s.to_row()) == s


# A skewed data set of single-finding records: AF is asked in 21% of questions, STach in 6%.
# (No finding above 1/n_options: a finding asked more often than that is the answer more
# often than a guesser who always picks it when offered could miss, whatever the distractors.)
SKEWED = {"AF": 84, "RBBB": 70, "LBBB": 60, "PVC": 50, "STD": 40, "IAVB": 36, "LAD": 30, "STach": 24}


def _skewed_questions(config, prevalence):
    records = [_record([label], record_id=f"set/{label}{i}", patient_id=f"{label}{i}")
               for label, n in SKEWED.items() for i in range(n)]
    out = []
    for rec in records:
        s = make_mcq(rec, 0, config, prevalence)
        out.append({"sample_id": s.sample_id, "dataset": "set", "option_labels": s.option_labels,
                    "true_label": s.true_label})
    return out


def test_prior_balanced_questions_leave_a_blind_guesser_near_chance():
    prevalence = finding_prevalence([[label] for label, n in SKEWED.items() for _ in range(n)])
    assert prevalence["AF"] == pytest.approx(84 / 394) and sum(prevalence.values()) == pytest.approx(1)
    default = _skewed_questions(McqConfig(), prevalence)
    # Every distractor is one of the data set's findings...
    assert {x for q in default for x in q["option_labels"]} == set(SKEWED)
    # ...offered about as often as it is the answer, so options do not betray the answer.
    offered = Counter(x for q in default for x in q["option_labels"])
    answered = Counter(q["true_label"] for q in default)
    ratio = {f: offered[f] / answered[f] for f in SKEWED}
    assert all(3.0 < r < 5.0 for r in ratio.values()), ratio  # 4 would be exact balance
    # The blind baseline (the offered option most frequent in training) against each style;
    # the split is by record, every other record to training.
    def blind_accuracy(questions):
        train, test = questions[::2], questions[1::2]
        pred = option_prior_baseline(test, train, seed=0)
        return sum(pred[q["sample_id"]] == q["true_label"] for q in test) / len(test)

    balanced = blind_accuracy(default)
    study = blind_accuracy(_skewed_questions(STUDY_STYLE, prevalence))
    assert abs(balanced - 0.25) < 0.08, balanced  # 0.30 here; chance 0.25
    assert study > 0.6, study


def test_prior_balanced_fills_in_from_the_pool_when_the_data_set_has_too_few_findings():
    s = make_mcq(_record(["AF"]), 0, McqConfig(), prevalence={"AF": 0.7, "RBBB": 0.3})
    assert "RBBB" in s.option_labels and len(set(s.option_labels)) == 4
    # Without a prevalence every finding of the pool weighs the same.
    assert make_mcq(_record(["AF"]), 0) == make_mcq(_record(["AF"]), 0, prevalence=None)
    with pytest.raises(ConfigError, match="distractors must be one of"):
        McqConfig(distractors="hard")


def test_asked_finding_and_draw_options_match_make_mcq():
    from ecgvlm.mcq import asked_finding, draw_options

    weights = finding_prevalence([["AF"], ["RBBB"], ["LBBB"], ["PVC"], ["NSR"], ["STD"]])
    for i in range(60):
        labels = [["AF", "RBBB"], ["PVC"], ["LBBB", "STD", "IAVB"]][i % 3]
        rec = _record(labels, record_id=f"set/r{i}")
        sample = make_mcq(rec, i, McqConfig(), weights)
        assert asked_finding(rec.record_id, rec.labels, i) == sample.true_label
        options, answer, _ = draw_options(rec.record_id, rec.labels, i, McqConfig(), weights)
        assert tuple(options) == sample.option_labels and answer == sample.answer_index
    assert asked_finding("set/x", ["UNK:1"], 0) is None


def test_calibrated_weights_offer_each_finding_n_times_as_often_as_it_is_the_answer():
    from ecgvlm.mcq import calibrate_distractor_weights, draw_options

    # Premature beats in sinus rhythm: sinus rhythm may not be their distractor, so drawn in
    # proportion to how often it is asked it is offered too seldom and betrays itself.
    labels = {"NSR": 12, "PVC": 10, "PAC": 10, "AF": 14, "AFL": 12, "SB": 10}
    questions = [(f"mitdb/{f}{i}", (f,), 0) for f, n in labels.items() for i in range(n)]
    config = McqConfig()

    def ratio(weights):
        answered, offered = Counter(), Counter()
        for rid, lab, seed in questions:
            options, answer, _ = draw_options(rid, lab, seed, config, weights)
            answered[options[answer]] += 1
            offered.update(options)
        return {f: offered[f] / answered[f] for f in labels}

    shares = finding_prevalence([f] for f, n in labels.items() for _ in range(n))
    calibrated = calibrate_distractor_weights(questions, config)
    assert set(calibrated) == set(labels) and sum(calibrated.values()) == pytest.approx(1)
    before, after = ratio(shares), ratio(calibrated)
    # 4 would tell a guesser nothing; calibration brings the worst finding closer to it.
    def worst(ratios):
        return max(abs(v - 4) for v in ratios.values())

    assert worst(after) < worst(before), (before, after)
    assert worst(after) < 1.0, after
    assert calibrate_distractor_weights([("x/1", ("UNK:1",), 0)], config) == {}
