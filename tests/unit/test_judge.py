"""The judge's strict validation, its single re-ask, failures, sampling and summaries."""

import json

import pytest

from ecgvlm import judge as J
from ecgvlm.config import ConfigError
from ecgvlm.records import Judgement

VALID = {
    "factual_accuracy": 4,
    "completeness": 3,
    "detail_quality": 5,
    "context_understanding": 4,
    "hallucination": 1,
    "rationale": "Names the irregular RR intervals.",
}

ITEM = J.JudgeItem(
    sample_id="cpsc2018/A0001#0",
    dataset="cpsc2018",
    model="pulse",
    question="Which finding does this ECG show?",
    reference=J.reference_text("Atrial fibrillation", "Irregularly irregular rhythm, no P waves."),
    explanation="The answer is B. Irregular rhythm without P waves.",
)


class ScriptedJudge:
    """A fake judge behind the Judge protocol: replies from a list, records every prompt."""

    model = "fake-judge"

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = []

    def complete(self, messages):
        self.calls.append(messages)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_rubric_names_all_criteria_and_version_is_a_short_hash():
    messages = J.judge_messages(ITEM)
    assert [m["role"] for m in messages] == ["system", "user"]
    for criterion in J.CRITERIA:
        assert criterion in messages[0]["content"]
    assert "LOWER IS BETTER" in messages[0]["content"]
    assert "Atrial fibrillation" in messages[1]["content"]
    assert "Irregularly irregular" in messages[1]["content"]
    assert ITEM.explanation in messages[1]["content"]
    assert len(J.RUBRIC_VERSION) == 12 and int(J.RUBRIC_VERSION, 16) >= 0
    assert J.CRITERIA == ("factual_accuracy", "completeness", "detail_quality",
                          "context_understanding", "hallucination")


@pytest.mark.parametrize(
    "reply, error",
    [
        ("```json\n{}\n```", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in VALID.items() if k != "completeness"}), "missing key"),
        (json.dumps({**VALID, "overall": 4}), "unexpected key"),
        (json.dumps({**VALID, "hallucination": 0}), "hallucination must be an integer 1-5"),
        (json.dumps({**VALID, "detail_quality": 6}), "detail_quality must be an integer"),
        (json.dumps({**VALID, "completeness": 3.0}), "completeness must be an integer"),
        (json.dumps({**VALID, "completeness": "3"}), "completeness must be an integer"),
        (json.dumps({**VALID, "completeness": True}), "completeness must be an integer"),
        (json.dumps({**VALID, "rationale": 3}), "rationale must be a string"),
    ],
)
def test_parse_rejects_anything_but_the_exact_object(reply, error):
    with pytest.raises(J.JudgeOutputError, match=error):
        J.parse_judge_reply(reply)


def test_parse_accepts_valid_with_or_without_rationale():
    scores, rationale = J.parse_judge_reply(json.dumps(VALID))
    assert scores == {k: VALID[k] for k in J.CRITERIA}
    assert rationale == VALID["rationale"]
    no_rationale = {k: VALID[k] for k in J.CRITERIA}
    assert J.parse_judge_reply("  " + json.dumps(no_rationale) + "\n") == (no_rationale, "")


def test_valid_reply_is_recorded_once():
    judge = ScriptedJudge(json.dumps(VALID))
    out = J.judge_explanation(judge, ITEM)
    assert out.failure is None and out.attempts == 1
    assert (out.factual_accuracy, out.completeness, out.detail_quality,
            out.context_understanding, out.hallucination) == (4, 3, 5, 4, 1)
    assert (out.judge_model, out.rubric_version) == ("fake-judge", J.RUBRIC_VERSION)
    assert (out.sample_id, out.dataset, out.model) == (ITEM.sample_id, "cpsc2018", "pulse")


def test_malformed_reply_is_asked_again_once_with_the_error():
    judge = ScriptedJudge("Sure! Scores: 4, 3, 5", json.dumps(VALID))
    out = J.judge_explanation(judge, ITEM)
    assert out.failure is None and out.attempts == 2 and out.detail_quality == 5
    retry = judge.calls[1]
    assert retry[:2] == judge.calls[0]
    assert retry[2] == {"role": "assistant", "content": "Sure! Scores: 4, 3, 5"}
    assert "not valid JSON" in retry[3]["content"]


def test_malformed_twice_is_a_failure_never_a_guess():
    judge = ScriptedJudge("nope", json.dumps({**VALID, "hallucination": 9}))
    out = J.judge_explanation(judge, ITEM)
    assert out.attempts == 2 and len(judge.calls) == 2
    assert "malformed reply after 2 attempt(s): hallucination must be an integer" in out.failure
    assert all(getattr(out, k) is None for k in J.CRITERIA)


def test_transport_error_is_a_failure_with_its_cause():
    out = J.judge_explanation(ScriptedJudge(ConnectionError("refused")), ITEM)
    assert out.failure == "request failed: ConnectionError: refused"
    assert out.attempts == 1


def test_judge_all_keeps_order():
    class ByExplanation:
        model = "fake-judge"

        def complete(self, messages):
            # The score depends on the sample, so the order of the results can be checked.
            i = int(messages[1]["content"].rsplit("explanation-", 1)[1])
            return json.dumps({**VALID, "completeness": 1 + i % 5})

    items = [J.JudgeItem(f"s{i}", "d", "m", "q", "r", f"explanation-{i}") for i in range(7)]
    done = []
    out = J.judge_all(ByExplanation(), items, concurrency=3, progress=done.append)
    assert [j.sample_id for j in out] == [f"s{i}" for i in range(7)]
    assert [j.completeness for j in out] == [1, 2, 3, 4, 5, 1, 2]
    assert len(done) == 7
    assert J.judge_all(ByExplanation(), [], concurrency=3) == []


def test_sampling_is_seeded_paired_and_skips_failed_requests():
    rows = []
    for model in ("pulse", "pulse-lora"):
        for i in range(40):
            rows.append({"sample_id": f"a{i:02d}", "dataset": "A", "model": model,
                         # pandas reads a null error back as NaN: still "answered".
                         "error": "timeout" if (model == "pulse" and i == 3) else
                         (float("nan") if i % 2 else None)})
        for i in range(3):
            rows.append({"sample_id": f"b{i}", "dataset": "B", "model": model, "error": None})
    picked = J.sample_for_judging(rows, n_samples=10, seed=5)
    assert sorted(picked) == [("pulse", "A"), ("pulse", "B"), ("pulse-lora", "A"),
                              ("pulse-lora", "B")]
    assert picked[("pulse", "A")] == picked[("pulse-lora", "A")]
    assert len(picked[("pulse", "A")]) == 10 and len(set(picked[("pulse", "A")])) == 10
    assert "a03" not in picked[("pulse-lora", "A")]
    assert sorted(picked[("pulse", "B")]) == ["b0", "b1", "b2"]  # fewer than n: all of them
    assert picked == J.sample_for_judging(list(reversed(rows)), n_samples=10, seed=5)
    assert picked != J.sample_for_judging(rows, n_samples=10, seed=6)


def test_summary_means_and_failures():
    def jd(model, fa, failure=None):
        scores = {"factual_accuracy": fa, "completeness": 3, "detail_quality": 3,
                  "context_understanding": 3, "hallucination": 2}
        if failure:
            scores = {k: None for k in scores}
        return Judgement(sample_id="s", dataset="A", model=model, judge_model="j",
                         rubric_version="v", failure=failure, **scores)

    # factual_accuracy 2, 4, 5 -> mean 11/3; sd = sqrt(((2-11/3)^2+(4-11/3)^2+(5-11/3)^2)/2)
    #                                        = sqrt((25/9 + 1/9 + 16/9)/2) = sqrt(7/3)
    out = J.summarize_judgements([jd("m", 2), jd("m", 4), jd("m", 5), jd("m", 1, "bad")])
    entry = out["m"]["A"]
    assert (entry["n"], entry["n_failures"]) == (4, 1)
    assert entry["factual_accuracy"]["mean"] == pytest.approx(11 / 3)
    assert entry["factual_accuracy"]["sd"] == pytest.approx((7 / 3) ** 0.5)
    lo, hi = entry["factual_accuracy"]["ci"]
    assert 2 <= lo <= 11 / 3 <= hi <= 5
    assert entry["hallucination"] == {"mean": 2.0, "sd": 0.0, "ci": [2.0, 2.0]}
    only_failed = J.summarize_judgements([jd("x", 1, "bad")])
    assert only_failed["x"]["A"]["completeness"] is None


def test_config_validation_and_missing_key():
    with pytest.raises(ConfigError, match=r"judge.n_samples must be in \[1, inf\]"):
        J.JudgeConfig(n_samples=0)
    with pytest.raises(J.JudgeUnavailableError, match="NO_SUCH_KEY_VAR is not set"):
        J.OpenAIJudge(J.JudgeConfig(api_key_env="NO_SUCH_KEY_VAR"))


def _jd(model, sample_id, fa, failure=None, dataset="A"):
    scores = {"factual_accuracy": fa, "completeness": 3, "detail_quality": 3,
              "context_understanding": 3, "hallucination": 2}
    if failure:
        scores = {k: None for k in scores}
    return Judgement(sample_id=sample_id, dataset=dataset, model=model, judge_model="j",
                     rubric_version="v", failure=failure, **scores)


def test_means_are_paired_over_ids_every_model_had_judged():
    # s1's judgement of model b failed: a's mean must leave s1 out too, or the two means
    # compare different ECGs (a on s1..s3, b on s2..s3).
    judgements = [
        _jd("a", "s1", 5), _jd("a", "s2", 2), _jd("a", "s3", 4),
        _jd("b", "s1", 1, "malformed"), _jd("b", "s2", 3), _jd("b", "s3", 3),
    ]
    out = J.summarize_judgements(judgements, n_boot=200)
    assert out["a"]["A"]["factual_accuracy"]["mean"] == pytest.approx(3.0)  # (2 + 4) / 2
    assert out["a"]["A"]["n_paired"] == 2 and out["a"]["A"]["n"] == 3
    assert out["b"]["A"]["factual_accuracy"]["mean"] == pytest.approx(3.0)
    assert out["b"]["A"]["n_failures"] == 1
    # Paired differences a - b by hand: s2: 2 - 3 = -1, s3: 4 - 3 = 1 -> mean 0.
    diffs = J.paired_differences(judgements, n_boot=200)
    entry = diffs["A"]["a - b"]
    assert entry["n"] == 2
    assert entry["factual_accuracy"]["mean"] == pytest.approx(0.0)
    assert entry["completeness"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    lo, hi = entry["factual_accuracy"]["ci"]
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)


def test_paired_interval_resamples_patients():
    # Two patients, ten windows each; a beats b by 2 on patient p1 and ties on p2. Resampling
    # windows gives a narrow interval; resampling patients can draw p1 twice or p2 twice.
    judgements = []
    for i in range(20):
        patient_one = i < 10
        judgements += [_jd("a", f"s{i}", 4 if patient_one else 3), _jd("b", f"s{i}", 2 if patient_one else 3)]
    clusters = {f"s{i}": "patient:p1" if i < 10 else "patient:p2" for i in range(20)}
    rows = J.paired_differences(judgements, n_boot=400, seed=0)["A"]["a - b"]["factual_accuracy"]
    by_patient = J.paired_differences(judgements, n_boot=400, seed=0, clusters=clusters)
    lo, hi = by_patient["A"]["a - b"]["factual_accuracy"]["ci"]
    assert (lo, hi) == pytest.approx((0.0, 2.0))
    assert rows["ci"][1] - rows["ci"][0] < hi - lo


def test_a_model_failing_every_request_does_not_empty_the_data_set_for_the_others():
    rows = [{"sample_id": f"s{i}", "dataset": "A", "model": m,
             "error": "HTTP 500" if m == "gpt-4o" else None}
            for i in range(5) for m in ("pulse", "pulse-lora", "gpt-4o")]
    picked = J.sample_for_judging(rows, n_samples=3, seed=0)
    assert sorted(picked) == [("pulse", "A"), ("pulse-lora", "A")]
    assert len(picked[("pulse", "A")]) == 3
    assert J.unanswered_groups(rows) == [("gpt-4o", "A")]
    # Likewise a model whose every judgement failed is left out of the pairing, named.
    judgements = [_jd("a", "s1", 4), _jd("a", "s2", 2), _jd("b", "s1", 1, "bad"),
                  _jd("b", "s2", 1, "bad")]
    out = J.summarize_judgements(judgements, n_boot=50)
    assert out["a"]["A"]["factual_accuracy"]["mean"] == pytest.approx(3.0)
    assert out["b"]["A"]["excluded"] == "every judgement failed"


def test_request_hash_covers_everything_the_reply_depends_on():
    import dataclasses

    config = J.JudgeConfig()
    base = J.request_hash(ITEM, config)
    assert base == J.request_hash(ITEM, J.JudgeConfig())
    changed = [
        J.request_hash(dataclasses.replace(ITEM, explanation="Something else."), config),
        J.request_hash(dataclasses.replace(ITEM, reference="Correct answer: LBBB"), config),
        J.request_hash(dataclasses.replace(ITEM, question="Another stem?"), config),
        J.request_hash(ITEM, J.JudgeConfig(temperature=0.7)),
        J.request_hash(ITEM, J.JudgeConfig(base_url="http://127.0.0.1:9/v1")),
        J.request_hash(ITEM, J.JudgeConfig(model="gpt-4o-mini")),
        J.request_hash(ITEM, J.JudgeConfig(json_mode=False)),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # Scheduling settings do not change the request.
    assert J.request_hash(ITEM, J.JudgeConfig(concurrency=1, n_samples=3)) == base
