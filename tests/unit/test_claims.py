"""Claims of explanations, and their verdicts against a record's measurements and labels.

The sentence set below is written by hand: each sentence with the claims a careful reader
finds in it (kind, value, polarity) and the verdict each must get against ``RECORD``. The
extractor must find them with a precision of at least 95% over the whole set.
"""

from __future__ import annotations

import pytest

from ecgvlm.evaluate.claims import (
    CONTRADICTED,
    SUPPORTED,
    UNVERIFIABLE,
    ClaimConfig,
    check_claims,
    extract_claims,
    parse_leads,
)
from ecgvlm.measure import Measurements
from ecgvlm.measure.core import LeadMeasurements

S, C, U = SUPPORTED, CONTRADICTED, UNVERIFIABLE

# A sinus bradycardia with first-degree AV block and RBBB, left axis, inferior ST elevation.
_ST = {"I": -0.07, "II": 0.14, "III": 0.21, "aVR": -0.10, "aVL": -0.12, "aVF": 0.16,
       "V1": 0.01, "V2": 0.03, "V3": 0.02, "V4": 0.0, "V5": -0.02, "V6": -0.01}
_T_NEGATIVE = {"III", "aVR", "aVL", "aVF", "V1"}
RECORD = Measurements(
    record_id="test/1", heart_rate_bpm=52.0, rr_mean_ms=1154.0, rr_sd_ms=20.0,
    rr_irregularity=0.03, rr_irregular=False, n_beats=10, premature_beats=0,
    p_wave_fraction=0.95, pr_ms=224.0, qrs_ms=132.0, qt_ms=452.0, qtc_bazett_ms=421.0,
    qtc_fridericia_ms=431.0, qrs_axis_deg=-48.0,
    leads=tuple(LeadMeasurements(lead, "ok", st, "negative" if lead in _T_NEGATIVE else "positive",
                                 1.0) for lead, st in _ST.items()),
)
LABELS = ("SB", "IAVB", "RBBB")

# (sentence, [(kind, value, polarity, verdict)]); polarity "" / "neg" / "hedge".
SENTENCES: list[tuple[str, list[tuple[str, object, str, str]]]] = [
    # numbers with units
    ("Heart rate 52 bpm.", [("heart_rate", 52.0, "", S)]),
    ("The ventricular rate is 75 bpm.", [("heart_rate", 75.0, "", C)]),
    ("Rate of about 60 beats per minute.", [("heart_rate", 60.0, "", S)]),
    ("Sinus rhythm at 110 bpm.", [("finding", "NSR", "", C), ("heart_rate", 110.0, "", C)]),
    ("HR 48/min.", [("heart_rate", 48.0, "", S)]),
    ("PR interval 220 ms.", [("pr", 220.0, "", S)]),
    ("PR of 0.16 s.", [("pr", 160.0, "", C)]),
    ("The PR interval measures 0.22 seconds.", [("pr", 220.0, "", S)]),
    ("QRS duration 130 ms.", [("qrs", 130.0, "", S)]),
    ("QRS 90 ms.", [("qrs", 90.0, "", C)]),
    ("QRS >= 120 ms.", [("qrs", 120.0, "", S)]),
    ("QRS duration of at least 120 ms.", [("qrs", 120.0, "", S)]),
    ("QRS less than 100 ms.", [("qrs", 100.0, "", C)]),
    ("QT 450 ms.", [("qt", 450.0, "", S)]),
    ("QTc 500 ms.", [("qtc", 500.0, "", C)]),
    ("QTc (Bazett) 430 ms.", [("qtc", 430.0, "", S)]),
    ("QRS axis -45 degrees.", [("axis", -45.0, "", S)]),
    ("Axis +60°.", [("axis", 60.0, "", C)]),
    # numbers without units
    ("PR 0.24.", [("pr", 240.0, "", S)]),
    ("QRS 128.", [("qrs", 128.0, "", S)]),
    ("Rate 120.", [("heart_rate", 120.0, "", C)]),
    # ranges
    ("Rate 60-100 bpm.", [("heart_rate", 60.0, "", S)]),
    ("QRS 80-100 ms.", [("qrs", 80.0, "", C)]),
    # rate categories
    ("Bradycardia.", [("rate", "brady", "", S)]),
    ("The patient is tachycardic.", [("rate", "tachy", "", C)]),
    ("Normal heart rate.", [("rate", "normal", "", C)]),
    # rhythm
    ("Regular rhythm.", [("rhythm", "regular", "", S)]),
    ("Irregularly irregular rhythm.", [("rhythm", "irregular", "", C)]),
    ("RR intervals are irregular.", [("rhythm", "irregular", "", C)]),
    ("Irregular RR intervals (RR irregularity 0.31).", [("rhythm", "irregular", "", C)]),
    # P waves
    ("P waves are present before each QRS.", [("p_waves", "present", "", S)]),
    ("No P waves.", [("p_waves", "present", "neg", C)]),
    ("P waves are absent.", [("p_waves", "present", "neg", C)]),
    ("Absence of discernible P waves.", [("p_waves", "present", "neg", C)]),
    # PR, QRS, QT categories
    ("Prolonged PR interval.", [("pr_length", "prolonged", "", S)]),
    ("Short PR.", [("pr_length", "short", "", C)]),
    ("Wide QRS complexes.", [("qrs_width", "wide", "", S)]),
    ("Narrow QRS.", [("qrs_width", "narrow", "", U)]),  # 132 ms: within the 15 ms margin
    ("The QRS is not wide.", [("qrs_width", "wide", "neg", C)]),
    ("Prolonged QT interval.", [("qt_length", "prolonged", "", C)]),
    # axis categories
    ("Left axis deviation.", [("axis_deviation", "left", "", S)]),
    ("Right axis deviation.", [("axis_deviation", "right", "", C)]),
    ("Normal axis.", [("axis_deviation", "normal", "", C)]),
    # ST and T by lead and lead group
    ("ST elevation in II, III and aVF.", [("st_elevation", None, "", S)]),
    ("Inferior ST elevation.", [("st_elevation", None, "", S)]),
    ("ST elevation in V1-V3.", [("st_elevation", None, "", C)]),
    ("ST-segment depression in leads I and aVL.", [("st_depression", None, "", S)]),
    ("ST depression in V5.", [("st_depression", None, "", C)]),
    ("No ST elevation.", [("st_elevation", None, "neg", C)]),
    ("Without ST depression in the lateral leads.", [("st_depression", None, "neg", C)]),
    ("T-wave inversion in III and aVF.", [("t_inversion", None, "", S)]),
    ("Inverted T waves in V2-V4.", [("t_inversion", None, "", C)]),
    ("T waves are inverted in the septal leads.", [("t_inversion", None, "", S)]),
    # named findings
    ("Sinus bradycardia.", [("finding", "SB", "", S), ("rate", "brady", "", S)]),
    ("First-degree AV block.", [("finding", "IAVB", "", S)]),
    ("RBBB.", [("finding", "RBBB", "", S)]),
    ("Right bundle branch block with a wide QRS.", [("finding", "RBBB", "", S), ("qrs_width", "wide", "", S)]),
    ("Atrial fibrillation.", [("finding", "AF", "", C)]),
    ("AF with rapid ventricular response.", [("finding", "AF", "", C)]),
    ("No atrial fibrillation.", [("finding", "AF", "neg", S)]),
    ("There is no RBBB.", [("finding", "RBBB", "neg", C)]),
    ("Sinus tachycardia.", [("finding", "STach", "", C), ("rate", "tachy", "", C)]),
    ("Left ventricular hypertrophy.", [("finding", "LVH", "", U)]),
    # hedges
    ("Cannot exclude left ventricular hypertrophy.", [("finding", "LVH", "hedge", U)]),
    ("Possible atrial fibrillation.", [("finding", "AF", "hedge", U)]),
    ("This may represent ST elevation in V1.", [("st_elevation", None, "hedge", U)]),
    ("Findings suggest right axis deviation.", [("axis_deviation", "right", "hedge", U)]),
    # negation scope
    ("No ST elevation and a normal axis.", [("st_elevation", None, "neg", C),
                                            ("axis_deviation", "normal", "", C)]),
    ("No ST elevation or ST depression.", [("st_elevation", None, "neg", C),
                                           ("st_depression", None, "neg", C)]),
    ("Regular rhythm without P waves.", [("rhythm", "regular", "", S),
                                         ("p_waves", "present", "neg", C)]),
    # several claims
    ("Sinus bradycardia at 52 bpm with a PR of 224 ms and QRS 132 ms.",
     [("finding", "SB", "", S), ("rate", "brady", "", S), ("heart_rate", 52.0, "", S),
      ("pr", 224.0, "", S), ("qrs", 132.0, "", S)]),
    ("Ventricular rate 48 bpm; a P wave before 100% of QRS complexes. PR 168 ms, QRS 92 ms.",
     [("heart_rate", 48.0, "", S), ("p_waves", "present", "", S), ("pr", 168.0, "", C),
      ("qrs", 92.0, "", C)]),
    # no claims
    ("The answer is B.", []),
    ("This ECG shows a finding.", []),
    ("I think the tracing is interesting.", []),
    ("", []),
    ("Ce tracé montre une fibrillation auriculaire.", []),
]


def _polarity(claim):
    return "hedge" if claim.hedged else ("neg" if claim.negated else "")


def test_the_hand_written_set_is_large_and_covers_every_kind():
    assert len(SENTENCES) >= 60
    kinds = {k for _, want in SENTENCES for k, *_ in want}
    assert kinds >= {"heart_rate", "pr", "qrs", "qt", "qtc", "axis", "rate", "rhythm", "p_waves",
                     "pr_length", "qrs_width", "qt_length", "axis_deviation", "st_elevation",
                     "st_depression", "t_inversion", "finding"}


def test_extraction_precision_and_recall_on_the_hand_written_set():
    extracted = matched = expected = 0
    misses = []
    for sentence, want in SENTENCES:
        got = [(c.kind, c.value, _polarity(c)) for c in extract_claims(sentence)]
        wanted = [(k, v, p) for k, v, p, _ in want]
        extracted += len(got)
        expected += len(wanted)
        hits = sum(1 for g in got if g in wanted)
        matched += hits
        if hits != len(got) or hits != len(wanted):
            misses.append((sentence, got, wanted))
    precision = matched / extracted
    recall = matched / expected
    assert precision >= 0.95, misses
    assert recall >= 0.90, misses


@pytest.mark.parametrize("sentence,want", SENTENCES)
def test_verdicts_against_the_record(sentence, want):
    claims = extract_claims(sentence)
    verdicts = {(v.claim.kind, v.claim.value, _polarity(v.claim)): v
                for v in check_claims(claims, RECORD, LABELS)}
    for kind, value, polarity, verdict in want:
        got = verdicts.get((kind, value, polarity))
        assert got is not None, (sentence, kind, value, [c.text for c in claims])
        assert got.verdict == verdict, (sentence, got)


def test_spans_point_at_the_claim_text():
    text = "Sinus bradycardia at 52 bpm; ST elevation in II, III and aVF."
    for claim in extract_claims(text):
        assert text[claim.span[0]:claim.span[1]] == claim.text
    st = next(c for c in extract_claims(text) if c.kind == "st_elevation")
    assert st.leads == ("II", "III", "aVF") and st.text == "ST elevation in II, III and aVF"


def test_leads_lists_ranges_and_groups():
    assert parse_leads("V1-V3") == ("V1", "V2", "V3")
    assert parse_leads("leads II, III and aVF") == ("II", "III", "aVF")
    assert parse_leads("inferior") == ("II", "III", "aVF")
    assert parse_leads("the lateral leads and V1") == ("I", "aVL", "V5", "V6", "V1")
    assert parse_leads("avl, AVF") == ("aVL", "aVF")


def test_verdicts_carry_the_measured_value_and_the_rule():
    [verdict] = check_claims(extract_claims("QRS 90 ms."), RECORD, LABELS)
    assert verdict.verdict == C and verdict.measured == 132.0
    assert verdict.rule == "90 ms within 30 ms"
    [verdict] = check_claims(extract_claims("Regular rhythm."), RECORD, LABELS,
                             ClaimConfig())
    assert verdict.to_json()["verdict"] == S and verdict.to_json()["span"] == [0, 14]


def test_missing_measurements_and_bad_text_never_raise():
    claims = extract_claims("Rate 52 bpm, atrial fibrillation.")
    verdicts = check_claims(claims, None, ())
    assert [v.verdict for v in verdicts] == [U, U]
    assert verdicts[0].reason == "the sample has no measurements"
    # A record measured without P/T delineation: PR claims are unverifiable, with the reason.
    unmeasured = Measurements(record_id="x", heart_rate_bpm=70.0, reasons={"pr_ms": "not delineated"})
    [pr] = check_claims(extract_claims("PR 200 ms."), unmeasured, ())
    assert pr.verdict == U and "not delineated" in pr.reason
    assert extract_claims("x" * 100_001) == []
    assert extract_claims(None) == []  # type: ignore[arg-type]
    assert extract_claims("\x00\ufffd" * 50) == []


def _grounded_references(samples_dir):
    """(record id, label, measurements, labels, grounded text) of the bundled 12-lead records,
    measured as ``ecgvlm prepare`` measures them."""
    from ecgvlm.measure import MeasureConfig, grounded_text, measure_record
    from ecgvlm.signal import find_record_paths, read_record

    out = []
    config = MeasureConfig(delineate_waves=True)
    for path in find_record_paths(samples_dir):
        if "mitdb" in path.parts:
            continue
        record = read_record(path)
        m = measure_record(record, config)
        for label in record.labels:
            text = grounded_text(label, m)
            if text:
                out.append((record.record_id, label, m, tuple(record.labels), text))
    return out


def test_grounded_references_are_never_contradicted_and_moved_ones_are(samples_dir):
    refs = _grounded_references(samples_dir)
    assert len(refs) >= 10
    own = [v for _, _, m, labels, text in refs for v in check_claims(extract_claims(text), m, labels)]
    assert own and all(v.verdict != C for v in own), [v for v in own if v.verdict == C]
    assert sum(v.verdict == S for v in own) / len(own) > 0.8
    # The same explanations moved to a record without their finding.
    moved = []
    for rid, label, _, _, text in refs:
        for other_rid, _, m, labels, _ in refs:
            if other_rid != rid and label not in labels:
                moved += check_claims(extract_claims(text), m, labels)
    rate = sum(v.verdict == C for v in moved) / len(moved)
    assert rate > 0.2, rate


def test_measurements_read_from_the_split_column_give_the_same_reference(samples_dir):
    """The values as the evaluation reads them from a split: measurements as stored JSON
    give the same grounded reference, a null and unreadable JSON give no measurements."""
    import json

    from ecgvlm.evaluate.claims import measurements_of
    from ecgvlm.measure import grounded_text

    refs = _grounded_references(samples_dir)[:6]
    for _, label, m, _, text in refs:
        assert grounded_text(label, measurements_of(json.dumps(m.to_dict()))) == text
    assert measurements_of(None) is None
    assert measurements_of(float("nan")) is None
    assert measurements_of("{not json") is None
    assert measurements_of("[1, 2]") is None


def test_sorted_rows_read_once_for_lookups_in_order_and_restart_for_one_before():
    from ecgvlm.evaluate.job import _SortedRows

    rows = [{"dataset": d, "sample_id": s} for d, s in
            [("cpsc2018", "a"), ("cpsc2018", "c"), ("mitdb", "a"), ("mitdb", "b")]]
    started = []

    def generate():
        started.append(1)
        yield from ({**row, "n": i} for i, row in enumerate(rows))

    found = _SortedRows(generate)
    assert found.get("cpsc2018", "a")["n"] == 0
    assert found.get("cpsc2018", "a")["n"] == 0  # the same key again: no restart
    assert found.get("cpsc2018", "b") is None  # absent, between two present keys
    assert found.get("mitdb", "a")["n"] == 2
    assert found.get("mitdb", "b")["n"] == 3
    assert found.get("mitdb", "z") is None  # past the end
    assert len(started) == 1
    assert found.get("cpsc2018", "c")["n"] == 1  # before the last: a new pass
    assert len(started) == 2


def test_reference_pool_draws_another_finding_in_proportion_and_stays_bounded():
    from collections import Counter

    from ecgvlm.evaluate.claims import ReferencePool

    def pool(seed: int) -> ReferencePool:
        p = ReferencePool(per_finding=10, seed=seed)
        for i in range(900):
            p.add("af", f"af text {i}")
        for i in range(100):
            p.add("lbbb", f"lbbb text {i}")
        p.add("normal", "the only normal text")
        return p

    p = pool(0)
    assert [len(kept) for kept in p._kept.values()] == [10, 10, 1]  # at most per_finding each
    # Kept: a spread of each finding's texts, not just its first ten.
    assert max(int(t.rsplit(" ", 1)[1]) for t in p._kept["af"]) >= 100
    draws = Counter(p.draw("normal").split(" ")[0] for _ in range(2000))
    assert set(draws) == {"af", "lbbb"}  # never the excluded finding
    # af was offered 9 texts for each of lbbb's: drawn about 90% of the time, not 50%.
    assert 0.86 < draws["af"] / 2000 < 0.94
    assert {p.draw("af") for _ in range(50)} <= {*p._kept["lbbb"], *p._kept["normal"]}
    assert ReferencePool().draw("af") is None  # an empty pool
    # Seeded: the same texts kept and drawn on a rerun.
    first, again, other = pool(0), pool(0), pool(1)
    assert first._kept == again._kept != other._kept
    assert [first.draw("normal") for _ in range(20)] == [again.draw("normal") for _ in range(20)]


def test_claim_stats_by_hand_and_without_claims():
    import numpy as np

    from ecgvlm.evaluate.claims import ClaimCounts, claim_stats

    counts = [ClaimCounts(2, 1, 1), ClaimCounts(0, 0, 0), ClaimCounts(3, 0, 0), ClaimCounts(0, 2, 0)]
    stats = claim_stats(counts, [f"patient:{i}" for i in range(4)], n_boot=200)
    assert (stats.n_explanations, stats.n_claims) == (4, 9)
    assert stats.claims_per_explanation == pytest.approx(9 / 4)
    assert (stats.supported, stats.contradicted, stats.unverifiable) == pytest.approx((5 / 9, 3 / 9, 1 / 9))
    assert stats.contradicted_rate == pytest.approx(3 / 8)
    assert stats.with_contradiction == pytest.approx(2 / 4)
    lo, hi = stats.ci["contradicted_rate"]
    assert lo <= 3 / 8 <= hi
    # The evaluation passes the same counts as one array (explanations x 3): the same stats.
    table = np.array([[c.supported, c.contradicted, c.unverifiable] for c in counts])
    assert claim_stats(table, [f"patient:{i}" for i in range(4)], n_boot=200) == stats
    # No claims at all: shares are unknown, not zero; one patient: no interval.
    empty = claim_stats([ClaimCounts()] * 3, ["recording:mitdb/100"] * 3, n_boot=100)
    assert empty.supported is None and empty.contradicted_rate is None and empty.ci == {}


def test_judge_agreement_is_spearman_over_the_judged_explanations():
    from scipy.stats import spearmanr

    from ecgvlm.evaluate.job import judge_claim_agreement
    from ecgvlm.records import Judgement

    # Explanation i has i contradicted of 5 checkable claims; the judge's factual accuracy
    # falls as contradictions rise (with one tie) and hallucination rises with them.
    rates, judgements = {}, []
    factual = [5, 5, 4, 2, 1, 1]
    for i in range(6):
        sid = f"d/r{i}#0"
        rates[(sid, "m")] = i / 5
        judgements.append(Judgement(sid, "d", "m", "judge", "v", factual[i], 3, 3, 3, i % 6 or 1))
    # d/r9#0 has no checkable claim: no rate, so it is left out of the correlation.
    judgements.append(Judgement("d/r9#0", "d", "m", "judge", "v", 5, 3, 3, 3, 1))
    judgements.append(Judgement("d/r8#0", "d", "m", "judge", "v", None, None, None, None, None,
                                failure="malformed twice"))
    clusters = {f"d/r{i}#0": f"patient:{i}" for i in range(10)}
    out = judge_claim_agreement(judgements, rates, clusters, n_boot=200, seed=0)
    rates = [i / 5 for i in range(6)]
    assert out["m"]["n"] == 6
    assert out["m"]["factual_accuracy"] == pytest.approx(spearmanr(factual, rates).statistic)
    assert out["m"]["factual_accuracy"] < -0.9
    assert out["m"]["hallucination"] == pytest.approx(
        spearmanr([i % 6 or 1 for i in range(6)], rates).statistic)
    lo, hi = out["m"]["ci"]["factual_accuracy"]
    assert lo <= out["m"]["factual_accuracy"] <= hi


def test_judged_shares_are_read_back_from_the_stored_verdicts(tmp_path):
    import json

    from ecgvlm.evaluate.job import contradicted_shares
    from ecgvlm.evaluate.store import PredictionStore
    from ecgvlm.records import Judgement

    def verdicts(*kinds):
        return json.dumps([{"verdict": k} for k in kinds])

    base = {"dataset": "d", "answer_mode": "generate", "condition": "normal"}
    store = PredictionStore(tmp_path)
    store.append([
        {**base, "sample_id": "s1", "model": "m", "claims": verdicts("supported", "contradicted",
                                                                      "contradicted", "unverifiable")},
        {**base, "sample_id": "s1", "model": "m", "condition": "blank",
         "claims": verdicts("contradicted")},  # not a judged row: another printout
        {**base, "sample_id": "s2", "model": "m", "claims": verdicts("unverifiable")},  # nothing checkable
        {**base, "sample_id": "s3", "model": "m", "claims": verdicts("supported")},  # not judged
        {**base, "sample_id": "s1", "model": "other", "claims": verdicts("contradicted")},
    ])
    store.consolidate()
    judged = [Judgement(sid, "d", model, "judge", "v", 3, 3, 3, 3, 1)
              for sid, model in (("s1", "m"), ("s2", "m"), ("s1", "other"))]
    assert contradicted_shares(store, judged) == {("s1", "m"): 2 / 3, ("s1", "other"): 1.0}
    assert contradicted_shares(store, []) == {}


def test_claim_examples_keep_the_most_contradicted_whatever_the_order_rows_come_in():
    import random

    from ecgvlm.evaluate.claims import ClaimConfig, check_explanation
    from ecgvlm.evaluate.job import ClaimExamples

    # Explanation i names i % 6 rhythms that the record's own (normal sinus rhythm) rules out.
    findings = ["atrial fibrillation", "atrial flutter", "sinus bradycardia",
                "sinus tachycardia", "ventricular tachycardia"]
    offers = []
    for i in range(12):
        text = ("Findings: " + ", ".join(findings[: i % 6]) + ".") if i % 6 else "Nothing to say."
        verdicts = check_explanation(text, None, ["NSR"], ClaimConfig())
        contradicted = sum(v.verdict == "contradicted" for v in verdicts)
        offers.append(("m", f"d/r{i}#0", "d", text, verdicts, contradicted))
    picks = []
    for order_seed in (0, 1, 2):
        examples = ClaimExamples(per_model=3, seed=7)
        shuffled = offers[:]
        random.Random(order_seed).shuffle(shuffled)
        for offer in shuffled:
            examples.offer(*offer)
        picks.append(examples.picked())
    assert picks[0] == picks[1] == picks[2]
    kept = picks[0]["m"]
    counts = [sum(v["verdict"] == "contradicted" for v in e["verdicts"]) for e in kept]
    best = sorted((o[5] for o in offers), reverse=True)[:3]
    assert len(kept) == 3 and counts == best and counts[0] > 0, counts
    assert all(e["verdicts"] for e in kept)
    # The same sample offered twice (not expected, but never a crash comparing examples).
    twice = ClaimExamples(per_model=3)
    for _ in range(2):
        twice.offer(*offers[5])
    assert [e["sample_id"] for e in twice.picked()["m"]] == ["d/r5#0", "d/r5#0"]
    # An explanation with no claim at all is never an example, even when nothing else is.
    empty = ClaimExamples(per_model=3)
    empty.offer("m", "d/r0#0", "d", "Nothing to say.", [], 0)
    assert empty.picked() == {}


def _stored_explanations(tmp_path, dataset_of=lambda row: row["dataset"]):
    """A split of 40 samples in three shards (in no particular order) and a store of their
    predictions by two models: generated answers with a checkable explanation, and rows the
    claim check leaves as they are (a choice, a blank printout, a failure, an unselected
    sample), all with ``claims`` already set."""
    import random

    from ecgvlm.config import config_from_dict
    from ecgvlm.evaluate import EvalConfig
    from ecgvlm.evaluate.job import SampleClusters, read_split_meta, split_files
    from ecgvlm.evaluate.store import PredictionStore
    from tests.fakes.mcq_split import sample_rows, write_split

    rows = sample_rows(20, measurements=True)
    random.Random(0).shuffle(rows)
    files = split_files(write_split(tmp_path / "split", rows, shards=3), "test")
    meta = read_split_meta(files)
    meta = meta[meta["sample_id"] != rows[0]["sample_id"]].reset_index(drop=True)
    store = PredictionStore(tmp_path / "out")
    texts = ["Wide QRS in V1.", "Regular rhythm seen in lead II.", ""]
    stored = []
    for i, row in enumerate(rows):
        for model in ("pulse", "pulse-lora"):
            base = {"sample_id": row["sample_id"], "dataset": dataset_of(row), "model": model,
                    "answer_mode": "generate", "condition": "normal", "claims": '["old"]',
                    "explanation": texts[(i + (model == "pulse")) % 3], "split": "test"}
            stored += [base, {**base, "answer_mode": "choice"}, {**base, "condition": "blank"}]
            if i % 7 == 3:
                stored.append({**base, "model": "gpt-4o", "error": "HTTP 500"})
    random.Random(1).shuffle(stored)
    store.append(stored)
    store.consolidate()
    config = config_from_dict(EvalConfig, {
        "data_dir": str(tmp_path / "split"), "output_dir": str(tmp_path / "out"),
        "endpoint": "http://127.0.0.1:9/v1", "n_boot": 20})
    return rows, files, meta, store, config, SampleClusters(meta)


@pytest.mark.parametrize("window_rows", [1024, 7])
def test_the_claim_check_reads_each_record_beside_its_stored_explanations(
        tmp_path, monkeypatch, window_rows):
    """Each generated explanation of a selected sample is checked against its own record
    (read in the store's order from a sorted copy of the split: through many pieces with
    ``window_rows`` 7, and once per model), every other row keeps its claims, and the
    references count every selected sample."""
    import json

    import pyarrow.parquet as pq

    from ecgvlm.evaluate.claims import check_explanation, measurements_of
    from ecgvlm.evaluate.job import check_explanations
    from ecgvlm.measure import grounded_text

    monkeypatch.setattr("ecgvlm.evaluate.job.RECORDS_WINDOW_ROWS", window_rows)
    rows, files, meta, store, config, clusters = _stored_explanations(tmp_path)
    selected = set(meta["sample_id"])
    stats, examples, note = check_explanations(
        config, store, {"pulse", "pulse-lora", "gpt-4o"}, meta, clusters, files)
    assert note is None
    by_id = {row["sample_id"]: row for row in rows}
    checked: dict[tuple[str, str], int] = {}
    verdicts_seen = set()
    for row in pq.read_table(store.path).to_pylist():
        if (row["answer_mode"], row["condition"]) != ("generate", "normal") \
                or row["sample_id"] not in selected or row["error"]:
            assert row["claims"] == '["old"]', row
            continue
        split_row = by_id[row["sample_id"]]
        want = check_explanation(row["explanation"], measurements_of(split_row["measurements"]),
                                 split_row["labels"], config.claims)
        assert row["claims"] == json.dumps([v.to_json() for v in want]), row
        verdicts_seen |= {v.verdict for v in want}
        key = (row["model"], row["dataset"])
        checked[key] = checked.get(key, 0) + 1
    assert verdicts_seen == {"supported", "contradicted"}  # which record is read matters
    assert {(m, d): s.n_explanations for m, ds in stats.items() for d, s in ds.items()
            if m in ("pulse", "pulse-lora")} == checked
    for dataset in ("cpsc2018", "mitdb"):
        mine = [by_id[sid] for sid in selected if by_id[sid]["dataset"] == dataset]
        with_text = [r for r in mine if (m := measurements_of(r["measurements"])) is not None
                     and grounded_text(r["option_labels"][r["answer_index"]], m)]
        assert 0 < len(with_text) < len(mine)  # a finding without measurable criteria has none
        assert stats["reference"][dataset].n_explanations == len(with_text)
        assert stats["reference"][dataset].contradicted == 0
        assert stats["reference-moved"][dataset].n_explanations == len(mine)
    assert set(examples) <= {"pulse", "pulse-lora", "reference", "reference-moved"}


def test_a_stored_prediction_of_another_data_set_is_named(tmp_path):
    from ecgvlm.evaluate.errors import EvaluationError
    from ecgvlm.evaluate.job import check_explanations

    moved = "cpsc2018/r005#0"  # stored under a data set the split does not give it
    _, files, meta, store, config, clusters = _stored_explanations(
        tmp_path, dataset_of=lambda row: "ptbxl" if row["sample_id"] == moved else row["dataset"])
    assert moved in set(meta["sample_id"])
    with pytest.raises(EvaluationError, match=f"{moved} by pulse is of data set 'ptbxl'"):
        check_explanations(config, store, {"pulse"}, meta, clusters, files)
