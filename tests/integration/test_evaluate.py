"""The evaluation job end to end over real HTTP on loopback, and resuming a killed run.

The endpoint is the fake OpenAI-compatible server (tests/fakes/openai_server.py) answering
per sample and model by a fixed rule, so every prediction is known in advance; the judge is a
second fake server returning valid JSON, malformed JSON once, and malformed JSON twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ecgvlm.config import config_from_dict, load_config
from ecgvlm.evaluate import ChatClient, EvalConfig, EvaluationError, PredictionStore, evaluate
from ecgvlm.evaluate.memory import SETTING_VARIABLES
from ecgvlm.judge import RUBRIC_VERSION
from tests.conftest import ctrl_c_able, driver_lines
from tests.fakes.mcq_split import sample_rows, write_split
from tests.fakes.openai_server import FakeOpenAIServer, Reply
from tests.unit.test_report import parse_cell, parse_markdown_tables

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_PER_DATASET = 8
ROWS = sample_rows(N_PER_DATASET, measurements=True)
BY_ID = {r["sample_id"]: r for r in ROWS}
EXPLANATION = {"pulse": "Regular rhythm seen in lead II.", "pulse-lora": "Wide QRS in V1."}
# As our endpoint lists models when the server has no OpenAI key.
SERVED = ("pulse", "pulse-lora", {"id": "gpt-4o", "object": "model", "owned_by": "openai",
                                  "available": False, "reason": "OPENAI_API_KEY is not set"})


def _index(sample_id: str) -> int:
    return int(re.search(r"/[rv](\d+)#", sample_id).group(1))


def expected_letter(sample_id: str, model: str) -> str | None:
    """The fake endpoint's rule (None: it answers something unparseable)."""
    i = _index(sample_id)
    if model == "pulse":
        return None if i % 5 == 4 else "B"
    correct = BY_ID[sample_id]["answer_letter"]
    return correct if i % 4 != 3 else "ABCD"[("ABCD".index(correct) + 1) % 4]


def endpoint_responder(request):
    text = request["messages"][-1]["content"][-1]["text"]
    sample_id = re.search(r"ECG (\S+) show", text).group(1)
    letter = expected_letter(sample_id, request["model"])
    if letter is None:
        return "I cannot tell from this tracing."
    return f"The answer is {letter}. {EXPLANATION[request['model']]}"


def judge_responder(request):
    messages = request["messages"]
    user = messages[1]["content"]
    i = _index(re.search(r"ECG (\S+) show", user).group(1))
    is_pulse = "cannot tell" in user or EXPLANATION["pulse"] in user
    base = 2 if is_pulse else 4
    valid = json.dumps({"factual_accuracy": base, "completeness": base, "detail_quality": base,
                        "context_understanding": base, "hallucination": 6 - base,
                        "rationale": "ok"})
    if i == 1 and len(messages) == 2:
        return "Here are my scores: 4/5"  # malformed once, valid when asked again
    if i == 2 and is_pulse:
        return json.dumps({"factual_accuracy": 9})  # malformed twice: a recorded failure
    return valid


@pytest.fixture
def split_dir(tmp_path):
    # A training split too: the blind baseline counts its prior there, never on the test.
    write_split(tmp_path / "prepared", sample_rows(N_PER_DATASET, seed=1), split="train")
    return write_split(tmp_path / "prepared", ROWS)


def _config(split_dir, out, endpoint, judge_url, **kw):
    judge = {"base_url": judge_url, "api_key_env": "ECGVLM_TEST_NO_KEY", "n_samples": 100,
             "concurrency": 4, "timeout_s": 10}
    data = {"data_dir": str(split_dir), "output_dir": str(out), "endpoint": endpoint,
            "models": ["pulse", "pulse-lora", "gpt-4o"], "concurrency": 2, "batch_size": 4,
            "timeout_s": 10, "max_retries": 2, "backoff_s": 0.01, "n_boot": 100,
            "progress": False, "judge": judge, "answer_mode": ["generate"]}
    data.update(kw)
    return data


def test_evaluate_end_to_end_with_fake_endpoint_and_judge(ray_local, split_dir, tmp_path):
    out = tmp_path / "eval"
    with FakeOpenAIServer(endpoint_responder, models=SERVED) as endpoint, \
            FakeOpenAIServer(judge_responder, models=("gpt-4o",)) as judge_server:
        # The first two requests fail transiently: retried, not recorded as errors.
        endpoint.script(Reply(status=503), Reply(status=429, headers={"Retry-After": "0"}))
        cfg_path = tmp_path / "eval.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(split_dir, out, endpoint.base_url,
                                                   judge_server.base_url)))
        config = load_config(EvalConfig, cfg_path)
        report, _ = evaluate(config)
        n_chat = len(endpoint.chat_requests)
        last_request = endpoint.chat_requests[-1].json
        judge_requests = judge_server.chat_requests
        judge_port = judge_server.port

    # predictions.parquet: one row per (sample, served model), exactly the endpoint's answers.
    pred = pd.read_parquet(out / "predictions.parquet")
    for col in ("sample_id", "dataset", "model", "true_label", "answer_letter",
                "predicted_letter", "predicted_label", "explanation", "raw_text", "error",
                "latency_s"):
        assert col in pred.columns, col
    assert len(pred) == 2 * len(ROWS) and not pred.duplicated(["sample_id", "model"]).any()
    assert n_chat == 2 * len(ROWS) + 2  # two retried requests
    assert pred["error"].isna().all()
    for row in pred.itertuples():
        want = expected_letter(row.sample_id, row.model)
        assert (row.predicted_letter if isinstance(row.predicted_letter, str) else None) == want
        sample = BY_ID[row.sample_id]
        assert row.true_label == sample["option_labels"][sample["answer_index"]]
        if want:
            assert row.predicted_label == sample["option_labels"]["ABCD".index(want)]
            assert row.explanation == EXPLANATION[row.model]
    # Each request carried the question with its lettered options and the PNG as a data URL.
    content = last_request["messages"][-1]["content"]
    sample = BY_ID[re.search(r"ECG (\S+) show", content[-1]["text"]).group(1)]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert f"D. {sample['options'][3]}" in content[-1]["text"]
    assert last_request["temperature"] == 0
    # The parts were consolidated into predictions.parquet.
    assert list((out / "predictions").glob("*.parquet")) == []

    # metrics.json: pulse-lora answers samples 0,1,2,4,5,6 of 8 right per data set: 6/8.
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == ["prior-baseline", "pulse", "pulse-lora"]
    assert metrics["prior-baseline"]["cpsc2018"]["chance"] == pytest.approx(0.25)
    # Intervals resample source recordings (no patient ids in this split): 8 per data set.
    assert metrics["pulse"]["cpsc2018"]["ci_unit"] == "recording"
    assert metrics["pulse"]["cpsc2018"]["n_clusters"] == 8
    lora = metrics["pulse-lora"]["cpsc2018"]
    assert lora["weighted_recall"] == pytest.approx(6 / 8) and lora["n"] == 8
    # pulse: sample 4 of each data set is unparseable.
    assert metrics["pulse"]["mitdb"]["unparseable_rate"] == pytest.approx(1 / 8)
    assert report.unavailable == {
        "gpt-4o": "the endpoint says it is unavailable: OPENAI_API_KEY is not set"}

    # Judge: json mode at temperature 0; one re-ask succeeded, one sample failed twice.
    assert all(r.json["temperature"] == 0 for r in judge_requests)
    assert all(r.json["response_format"] == {"type": "json_object"} for r in judge_requests)
    # The judge saw the correct option and the knowledge base's description of its finding
    # (the target text's explanation for a finding the knowledge base lacks).
    from ecgvlm.knowledge import knowledge_base

    for r in judge_requests:
        user = r.json["messages"][1]["content"]
        sample = BY_ID[re.search(r"ECG (\S+) show", user).group(1)]
        label = sample["option_labels"][sample["answer_index"]]
        want = ("Explained by the target text only." if label == "XYZ"
                else knowledge_base()[label].description)
        assert want in user
        assert f"Correct answer: {sample['options'][sample['answer_index']]}" in user
    judged = pd.read_parquet(out / "judge.parquet")
    assert len(judged) == 2 * len(ROWS)
    assert (judged["rubric_version"] == RUBRIC_VERSION).all()
    failed = judged[judged["failure"].notna()]
    assert sorted(failed["sample_id"].map(_index)) == [2, 2]
    assert set(failed["model"]) == {"pulse"}
    retried = judged[(judged["attempts"] == 2) & judged["failure"].isna()]
    assert sorted(retried["sample_id"].map(_index)) == [1, 1, 1, 1]

    # report.md: both tables parse; gpt-4o rows say why they are missing.
    text = (out / "report.md").read_text()
    table1, table2 = parse_markdown_tables(text)[:2]
    t1 = {(r["Dataset"], r["Model"]): r for r in table1}
    assert parse_cell(t1[("cpsc2018", "pulse-lora")]["Weighted recall"])[0] == 0.75
    assert t1[("all", "gpt-4o")]["Note"].endswith("unavailable: OPENAI_API_KEY is not set")
    t2 = {(r["Dataset"], r["Model"]): r for r in table2}
    assert t2[("mitdb", "pulse")]["Failures"] == "1"
    assert parse_cell(t2[("mitdb", "pulse-lora")]["Factual accuracy"])[0] == 4.0
    assert parse_cell(t2[("mitdb", "pulse")]["Hallucination (lower is better)"])[0] == 4.0
    for name in ("confusion_pulse.png", "confusion_pulse-lora.png", "metrics_bars.png",
                 "judge_scores.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert RUBRIC_VERSION in text and "prompt_version" in text

    # Table 6: every explanation checked against its record's measurements. pulse-lora says
    # "Wide QRS in V1." (the QRS is wide only in the bundle branch blocks); pulse "Regular
    # rhythm seen in lead II." (irregular only in AF) or nothing checkable.
    for row in pred.itertuples():
        verdicts = json.loads(row.claims)
        sample = BY_ID[row.sample_id]
        label = sample["option_labels"][sample["answer_index"]]
        if expected_letter(row.sample_id, row.model) is None:
            assert verdicts == []
            continue
        [verdict] = verdicts
        assert verdict["kind"] == ("qrs_width" if row.model == "pulse-lora" else "rhythm")
        fits = label in ("RBBB", "LBBB") if row.model == "pulse-lora" else label != "AF"
        assert verdict["verdict"] == ("supported" if fits else "contradicted"), (label, verdict)
    checked = json.loads((out / "claims.json").read_text())["stats"]
    for dataset in ("cpsc2018", "mitdb"):
        labels = [r["option_labels"][r["answer_index"]] for r in ROWS if r["dataset"] == dataset]
        wide = sum(x in ("RBBB", "LBBB") for x in labels)
        lora = checked["pulse-lora"][dataset]
        assert lora["n_explanations"] == 8 and lora["n_claims"] == 8
        assert lora["contradicted_rate"] == pytest.approx(1 - wide / 8)
        # The grounded references are never contradicted by their own records.
        assert checked["reference"][dataset]["contradicted"] == 0
        assert checked["reference"][dataset]["n_claims"] > 0
    assert metrics["pulse-lora"]["cpsc2018"]["claims"]["n_claims"] == 8
    table6 = next(t for t in parse_markdown_tables(text) if t and "Contradicted-claim rate" in t[0])
    assert {r["Model"] for r in table6} >= {"pulse", "pulse-lora", "reference", "reference-moved"}
    assert "[measured:" in text  # an example with its contradicted span marked

    # A rerun with everything stored asks the endpoint nothing and gives the same rows. The
    # judge is the same server at the same URL (the URL is part of a judge request's identity).
    with FakeOpenAIServer(endpoint_responder, models=("pulse", "pulse-lora")) as endpoint, \
            FakeOpenAIServer(judge_responder, models=("gpt-4o",), port=judge_port) as judge_server:
        config = load_config(EvalConfig, cfg_path, [f"endpoint={endpoint.base_url}",
                                                    f"judge.base_url={judge_server.base_url}"])
        evaluate(config)
        assert endpoint.chat_requests == []
        # Stored successful judgements are reused; only the failed ones are asked again.
        assert len(judge_server.chat_requests) == 2 * 2
    again = pd.read_parquet(out / "predictions.parquet")
    pd.testing.assert_frame_equal(again, pred)

    # Another judge temperature is another request: nothing stored is reused.
    with FakeOpenAIServer(endpoint_responder, models=("pulse", "pulse-lora")) as endpoint, \
            FakeOpenAIServer(judge_responder, models=("gpt-4o",), port=judge_port) as judge_server:
        config = load_config(EvalConfig, cfg_path, [f"endpoint={endpoint.base_url}",
                                                    f"judge.base_url={judge_server.base_url}",
                                                    "judge.temperature=0.5"])
        evaluate(config)
        assert len(judge_server.chat_requests) >= 2 * len(ROWS)
        # Predictions of the test split are not mixed with another split's.
        config = load_config(EvalConfig, cfg_path, [f"endpoint={endpoint.base_url}", "split=train"])
        with pytest.raises(EvaluationError, match="holds predictions of split test"):
            evaluate(config)


# Constrained choice: the fake endpoint's option log-probabilities are known per sample.
# Validation: the top option has probability 27/30 (log-odds ln 27 against each other option)
# and is right on 3 questions in 4, so the log loss is least at T = ln 27 / ln 9 = 1.5 (where
# the top option's scaled probability e^a / (e^a + 3) equals 3/4, e^a = 9).
# Validation ids differ from the test ids ("/v" for "/r") so that the fake tells them apart.
VAL_ROWS = [{**r, "sample_id": r["sample_id"].replace("/r", "/v"),
             "question": r["question"].replace("/r", "/v")}
            for r in sample_rows(N_PER_DATASET, seed=2)]
VAL_BY_ID = {r["sample_id"]: r for r in VAL_ROWS}
TOP_SHARE = (0.4, 0.6, 0.8, 0.95)


def choice_logprobs(sample: dict, model: str, split: str) -> dict[str, float]:
    """The fake endpoint's option log-probabilities for one question."""
    import math

    i = _index(sample["sample_id"])
    correct = sample["answer_index"]
    if split == "val":
        top = correct if i % 4 != 3 else (correct + 1) % 4
        p_top = 27 / 30
    else:  # pulse-lora is right unless i % 4 == 3; pulse is right on even i
        right = i % 4 != 3 if model == "pulse-lora" else i % 2 == 0
        top = correct if right else (correct + 2) % 4
        p_top = TOP_SHARE[i % 4]
    return {"ABCD"[k]: math.log(p_top if k == top else (1 - p_top) / 3) for k in range(4)}


def choice_responder(request):
    text = request["messages"][-1]["content"][-1]["text"]
    sample_id = re.search(r"ECG (\S+) show", text).group(1)
    if "guided_choice" not in request:
        return endpoint_responder(request)
    assert request["guided_choice"] == ["A", "B", "C", "D"] and request["logprobs"] is True
    split = "val" if sample_id in VAL_BY_ID else "test"
    sample = VAL_BY_ID[sample_id] if split == "val" else BY_ID[sample_id]
    from ecgvlm.prompt import png_data_url

    if request["messages"][-1]["content"][0]["image_url"]["url"] != png_data_url(sample["png"]):
        # Not this sample's printout (an image control): the model says A.
        return Reply(choice_logprobs={"A": math.log(0.7), "B": math.log(0.1), "C": math.log(0.1),
                                      "D": math.log(0.1)})
    return Reply(choice_logprobs=choice_logprobs(sample, request["model"], split))


def test_choice_mode_stores_probabilities_and_reports_calibration(ray_local, split_dir, tmp_path):
    import numpy as np

    from ecgvlm.evaluate import calibration as cal

    write_split(split_dir, VAL_ROWS, split="val")
    out = tmp_path / "eval"
    with FakeOpenAIServer(choice_responder, models=("pulse", "pulse-lora")) as endpoint:
        cfg = _config(split_dir, out, endpoint.base_url, None, models=["pulse", "pulse-lora"],
                      answer_mode=["choice", "generate"], n_boot=200,
                      calibration={"n_bins": 4, "target_accuracy": 0.7},
                      controls=["blank", "mismatched"])
        cfg["judge"] = {"enabled": False}
        report, written = evaluate(config_from_dict(EvalConfig, cfg))
        n_requests = len(endpoint.chat_requests)
        # A rerun resumes: test answers of both modes and validation answers are all stored.
        evaluate(config_from_dict(EvalConfig, cfg))
        assert len(endpoint.chat_requests) == n_requests
    # Two models x (test in two modes, blank and mismatched controls + validation choices).
    pred = pd.read_parquet(out / "predictions.parquet")
    n_mismatched = int((pred["condition"] == "mismatched").sum()) // 2
    assert 0 < n_mismatched <= len(ROWS)
    assert n_requests == 2 * (2 * len(ROWS) + len(ROWS) + n_mismatched + len(VAL_ROWS))
    assert len(pred) == 2 * (3 * len(ROWS) + n_mismatched) and pred["error"].isna().all()
    assert set(pred.loc[pred["condition"] != "normal", "answer_mode"]) == {"choice"}

    # Table 7: with another image the fake says A, so the control's accuracy is the share of
    # A answers; the paired difference is against the same samples' printout accuracy.
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("pulse", "pulse-lora"):
        for dataset in ("cpsc2018", "mitdb"):
            rows = [r for r in ROWS if r["dataset"] == dataset]
            blank = metrics[model][dataset]["controls"]["blank"]
            assert blank["n"] == 8
            assert blank["accuracy"] == pytest.approx(np.mean([r["answer_letter"] == "A" for r in rows]))
            assert blank["difference"] == pytest.approx(metrics[model][dataset]["accuracy"]
                                                        - blank["accuracy"])
            assert blank["ci"][0] <= blank["difference"] <= blank["ci"][1]
    pred = pred[pred["condition"] == "normal"]
    choice = pred[pred["answer_mode"] == "choice"]
    for row in choice.itertuples():
        sample = BY_ID[row.sample_id]
        want = np.exp(list(choice_logprobs(sample, row.model, "test").values()))
        np.testing.assert_allclose(row.option_probs, want / want.sum(), atol=1e-12)
        assert row.predicted_letter == "ABCD"[int(np.argmax(want))] and row.explanation == ""
    generated = pred[pred["answer_mode"] == "generate"]
    assert (generated["explanation"].str.len() > 0).any()
    val = pd.read_parquet(out / "calibration" / "predictions.parquet")
    assert len(val) == 2 * len(VAL_ROWS) and set(val["split"]) == {"val"}

    # Table 1 scores the choices; Table 1b the letters parsed from text.
    lora = metrics["pulse-lora"]["cpsc2018"]
    assert lora["answer_mode"] == "choice" and lora["accuracy"] == pytest.approx(6 / 8)
    assert metrics["pulse"]["mitdb"]["accuracy"] == pytest.approx(4 / 8)
    assert metrics["pulse"]["mitdb"]["unparseable_rate"] == 0
    generated_metrics = json.loads((out / "metrics_generate.json").read_text())
    assert generated_metrics["pulse"]["mitdb"]["unparseable_rate"] == pytest.approx(1 / 8)

    # Calibration: the numbers are those of the known probabilities.
    calibration = json.loads((out / "calibration.json").read_text())
    for model in ("pulse", "pulse-lora"):
        fit = calibration[model]["fit"]
        assert fit["temperature"] == pytest.approx(1.5, rel=1e-4) and fit["n_fit"] == len(VAL_ROWS)
        # After scaling every validation question has confidence 3/4 at accuracy 3/4 >= 0.7.
        assert fit["threshold"] == pytest.approx(0.75, abs=1e-5)
        for dataset in ("cpsc2018", "mitdb"):
            rows = [r for r in ROWS if r["dataset"] == dataset]
            probs = np.exp([list(choice_logprobs(r, model, "test").values()) for r in rows])
            probs /= probs.sum(axis=1, keepdims=True)
            answers = np.array([r["answer_index"] for r in rows])
            conf, correct = probs.max(axis=1), probs.argmax(axis=1) == answers
            entry = calibration[model]["datasets"][dataset]
            raw = entry["raw"]
            onehot = np.eye(4)[answers]
            assert raw["brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean())
            assert raw["log_loss"] == pytest.approx(-np.log(probs[np.arange(8), answers]).mean())
            assert raw["ece"] == pytest.approx(cal.expected_calibration_error(conf, correct, 4))
            assert raw["aurc"] == pytest.approx(cal.aurc(conf, correct))
            assert raw["ci"]["ece"][0] <= raw["ece"] <= raw["ci"]["ece"][1]
            scaled = cal.scale_temperature(probs, fit["temperature"])
            assert entry["scaled"]["brier"] == pytest.approx(
                ((scaled - onehot) ** 2).sum(axis=1).mean())
            kept = scaled.max(axis=1) >= fit["threshold"]
            assert entry["abstention"]["coverage"] == pytest.approx(kept.mean())
            assert entry["abstention"]["accuracy"] == pytest.approx(correct[kept].mean())

    # The report shows both tables, the calibration and abstention tables, and the plots.
    text = (out / "report.md").read_text()
    assert "## Table 1: classification (constrained choice" in text and "## Table 1b" in text
    tables = parse_markdown_tables(text)
    table4 = next(t for t in tables if t and "ECE" in t[0])
    assert {(r["Model"], r["Probabilities"]) for r in table4} == {
        (m, p) for m in ("pulse", "pulse-lora") for p in ("raw", "T = 1.50")}
    assert any(t and "Accuracy when answering" in t[0] for t in tables)
    table7 = next(t for t in tables if t and "Printout minus blank" in t[0])
    assert {r["Model"] for r in table7} == {"pulse", "pulse-lora"} and all(r["In words"] for r in table7)
    for name in ("reliability.png", "risk_coverage.png", "calibration.json"):
        assert name in written and (out / name).is_file(), name
    assert report.judge_note == "the judge is disabled in the config (judge.enabled: false)"

    # A narrower rerun (fewer samples, one model) rewrites predictions.parquet with the claim
    # check: the rows it did not select are kept.
    n_stored = len(pd.read_parquet(out / "predictions.parquet"))
    with FakeOpenAIServer(choice_responder, models=("pulse", "pulse-lora")) as endpoint:
        narrow = {**cfg, "endpoint": endpoint.base_url, "limit_per_dataset": 2, "models": ["pulse"]}
        evaluate(config_from_dict(EvalConfig, narrow))
        assert endpoint.chat_requests == []
    assert len(pd.read_parquet(out / "predictions.parquet")) == n_stored


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_killed_run_resumes_without_redoing_or_duplicating(ray_local, split_dir, tmp_path, stop):
    """Killed (no clean-up runs) or stopped with Ctrl-C (one line says how to resume): the
    rerun asks only what was not stored."""
    out = tmp_path / "eval"
    total = 2 * len(ROWS)

    with FakeOpenAIServer(slow_endpoint_responder, models=("pulse", "pulse-lora")) as endpoint:
        cfg = _config(split_dir, out, endpoint.base_url, None, flush_every=1, batch_size=2,
                      models=["pulse", "pulse-lora"])
        cfg["judge"] = {"enabled": False}
        cfg_path = tmp_path / "eval.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
        proc = subprocess.Popen(
            [*ctrl_c_able("jobs.evaluate"), "--config", str(cfg_path)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        # flush_every=1: every block of answers is stored as soon as it arrives; kill the
        # job once the first one is on disk.
        deadline = time.monotonic() + 300  # generous: the shared CI machine may be loaded
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if list((out / "predictions").glob("part-*.parquet")):
                    break
                time.sleep(0.02)
        finally:
            proc.send_signal(stop)
            proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        if stop == signal.SIGINT:
            assert proc.returncode == 130, stderr[-3000:]
            # The command's own output; Ray's actors may log tracebacks of their own as they stop.
            assert not any("Traceback" in ln for ln in driver_lines(stderr)), stderr[-3000:]
            assert stderr.strip().splitlines()[-1] == (
                "ecgvlm evaluate: interrupted; rerun the same command: the answers already "
                "stored are not asked again"), stderr[-3000:]
        stored = PredictionStore(out).done_keys()
        assert 1 <= len(stored) < total, (len(stored), stderr[-2000:])
        assert not (out / "predictions.parquet").exists()  # killed before consolidating
        # The killed driver's client actors live in the shared cluster until Ray reaps them
        # and may still send a request: wait until none has arrived for 2 s.
        requested_before, quiet_since = len(endpoint.chat_requests), time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and time.monotonic() < deadline + 60:
            time.sleep(0.2)
            if len(endpoint.chat_requests) != requested_before:
                requested_before, quiet_since = len(endpoint.chat_requests), time.monotonic()

        evaluate(load_config(EvalConfig, cfg_path))
        second_run = endpoint.chat_requests[requested_before:]

    # (sample, model, answer mode): the run asks for generated text only.
    asked_again = {(re.search(r"ECG (\S+) show", r.json["messages"][-1]["content"][-1]["text"])
                    .group(1), r.json["model"], "generate") for r in second_run}
    assert not asked_again & stored, "stored predictions were requested again"
    # Only pairs unfinished at the kill were asked: at most those in flight were lost.
    assert len(second_run) == total - len(stored)
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == total and not pred.duplicated(["sample_id", "model"]).any()
    for row in pred.itertuples():
        got = row.predicted_letter if isinstance(row.predicted_letter, str) else None
        assert got == expected_letter(row.sample_id, row.model)
    assert list((out / "predictions").glob("*.parquet")) == []


def slow_endpoint_responder(request):
    time.sleep(0.3)  # 32 requests at concurrency 2 take >= 5 s: time to kill midway
    return endpoint_responder(request)


#: The fake endpoint in a process of its own (so that it can be killed): prints its port.
_ENDPOINT_PROCESS = (
    "import sys, time\n"
    "from tests.fakes.openai_server import FakeOpenAIServer\n"
    "from tests.integration.test_evaluate import slow_endpoint_responder\n"
    "server = FakeOpenAIServer(slow_endpoint_responder, models=('pulse', 'pulse-lora')).start()\n"
    "print(server.port, flush=True)\n"
    "time.sleep(3600)\n"
)


def test_endpoint_killed_mid_run_and_restarted_the_rerun_asks_only_what_failed(
    ray_local, split_dir, tmp_path
):
    """The endpoint's process is killed once the first answers are stored: the job's retries
    give up on what is left, which is stored as errors (the run still finishes); an endpoint
    comes back at the same address and the rerun asks exactly those again."""
    out = tmp_path / "eval"
    total = 2 * len(ROWS)
    # Without what an earlier in-process CLI run left in this process's environment.
    env = {**{k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES},
           "PYTHONPATH": str(REPO)}
    endpoint = subprocess.Popen([sys.executable, "-c", _ENDPOINT_PROCESS], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, text=True)
    try:
        port = int(endpoint.stdout.readline())
        cfg = _config(split_dir, out, f"http://127.0.0.1:{port}/v1", None, flush_every=1,
                      batch_size=2, models=["pulse", "pulse-lora"])
        cfg["judge"] = {"enabled": False}
        cfg_path = tmp_path / "eval.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.evaluate", "--config", str(cfg_path)], cwd=REPO,
            env={**env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if list((out / "predictions").glob("part-*.parquet")):
                break
            time.sleep(0.02)
    finally:
        endpoint.kill()
        endpoint.wait(timeout=30)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    # The job's driver allocates Arrow memory from the system allocator (glibc trims it), its
    # readers too: the CLI chose the pool before anything imported pyarrow; and glibc maps
    # large blocks at a fixed threshold.
    run = json.loads((out / "run.json").read_text())
    assert (run["arrow_memory_pool"], run["malloc_mmap_threshold"]) == ("system", "131072")
    assert "after pyarrow was imported" not in stderr, stderr[-3000:]
    stored = PredictionStore(out).load()
    failed = stored[stored["error"].notna()]
    assert len(stored) == total and 0 < len(failed) < total, stored["error"].value_counts()
    with FakeOpenAIServer(endpoint_responder, models=("pulse", "pulse-lora"),
                          port=port) as restarted:
        evaluate(config_from_dict(EvalConfig, cfg))
        asked_again = {(re.search(r"ECG (\S+) show", r.json["messages"][-1]["content"][-1]["text"])
                        .group(1), r.json["model"]) for r in restarted.chat_requests}
    assert asked_again == set(zip(failed["sample_id"], failed["model"]))
    assert len(restarted.chat_requests) == len(failed)
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == total and not pred.duplicated(["sample_id", "model"]).any()
    assert pred["error"].isna().all()


def test_chat_client_retries_backoff_and_gives_up():
    with FakeOpenAIServer(lambda req: "The answer is C.") as server:
        client = ChatClient(server.base_url, timeout_s=0.5, max_retries=4, backoff_s=0.01)
        server.script(Reply(status=500), Reply(status=429), Reply(body=b"{not json"),
                      Reply(content="late", delay_s=1.0))
        result = client.chat("pulse", [{"role": "user", "content": "q"}])
        # 500, 429, malformed body and a time-out were each retried; the 5th attempt answers.
        assert (result.text, result.error, result.attempts) == ("The answer is C.", None, 5)

        server.script(*[Reply(status=503)] * 5)
        result = client.chat("pulse", [{"role": "user", "content": "q"}])
        assert result.text is None and result.attempts == 5
        assert result.error.startswith("InternalServerError") or "503" in result.error

        server.script(Reply(status=404))  # not retryable: one attempt, error kept
        result = client.chat("nope", [{"role": "user", "content": "q"}])
        assert result.attempts == 1 and "NotFoundError" in result.error
        client.close()


def test_a_stalled_endpoint_holds_the_read_to_a_bounded_queue(ray_local, tmp_path):
    """While the endpoint answers nothing, the split is read only ``queued_block_limit``
    blocks ahead, not whole into the object store (or, small blocks, into the driver, which
    owns every block); once it answers every row is asked, and Ray Data's settings are the
    caller's again."""
    import threading

    import ray.data

    from ecgvlm.evaluate.job import queued_block_limit, run_predictions, split_files

    # Printouts of about 100 kB and blocks of one row: 240 blocks, well above the limit.
    rows = sample_rows(120, png_size=(192, 176))
    prepared = write_split(tmp_path / "prepared", rows, shards=4)
    asked, answering = threading.Event(), threading.Event()

    def stalled(request):
        asked.set()
        answering.wait(120)
        return "The answer is A."

    context = ray.data.DataContext.get_current()

    def settings() -> tuple[int, dict[str, float]]:
        return (context.target_max_block_size,
                context.execution_options.resource_limits.to_resource_dict())

    before = settings()
    owned = ray_local._private.worker.global_worker.core_worker.get_all_reference_counts
    already = len(owned())  # what this session's driver holds from earlier tests
    with FakeOpenAIServer(stalled, models=("pulse",)) as server:
        config = config_from_dict(EvalConfig, {
            "data_dir": str(prepared), "output_dir": str(tmp_path / "out"),
            "endpoint": server.base_url, "models": ["pulse"], "concurrency": 1,
            "batch_size": 1, "progress": False})
        result: dict[str, int] = {}
        ids = [r["sample_id"] for r in rows]
        asking = threading.Thread(target=lambda: result.update(written=run_predictions(
            config, split_files(prepared, "test"), {("pulse", "generate", "normal"): ids},
            PredictionStore(tmp_path / "out"))), daemon=True)
        asking.start()
        held = [already]
        try:
            assert asked.wait(60), "the endpoint was never asked"
            # Until the read has stopped growing the queue for 3 s (240 blocks take less).
            quiet_since, deadline = time.monotonic(), time.monotonic() + 60
            while time.monotonic() - quiet_since < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
                held.append(len(owned()))
                if held[-1] > max(held[:-1]):
                    quiet_since = time.monotonic()
        finally:
            answering.set()
            asking.join(180)
    assert result["written"] == len(ids) == 240
    # The limit's blocks, one in the actor, and a few refs of Ray Data's own (without the
    # limit: all 240 blocks and those).
    assert 0 < max(held) - already <= queued_block_limit(1) + 40, (already, held)
    assert settings() == before


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_evaluate_against_the_real_endpoint_with_the_tiny_model(
    ray_local, tiny_pulse_dir, split_dir, tmp_path
):
    """The Ray Serve app (tiny random PULSE + a LoRA adapter, no OpenAI key) over HTTP."""
    from ray import serve

    from ecgvlm import serving as sv
    from ecgvlm.evaluate.job import check_inputs
    from serve.app import build_app
    from tests.fakes.adapters import make_random_adapter

    adapter = make_random_adapter(tiny_pulse_dir, tmp_path / "lora", seed=1)
    port = _free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus": 0.1}
    app = build_app({"model_dir": str(tiny_pulse_dir), "adapters": {"study": str(adapter)},
                     # A key variable nobody sets: gpt-4o is listed as unavailable.
                     "openai": {"api_key_env": "ECGVLM_TEST_NO_OPENAI_KEY"},
                     "pulse": {"num_cpus": 0.5}, "gateway": small, "proxy": small})
    serve.run(app, name="ecgvlm-eval", route_prefix="/")
    out = tmp_path / "eval"
    try:
        with FakeOpenAIServer(judge_responder, models=("gpt-4o",)) as judge_server:
            cfg = _config(split_dir, out, f"http://127.0.0.1:{port}/v1", judge_server.base_url,
                          models=["pulse", "pulse-lora", "gpt-4o", "pulse-xl"],
                          limit_per_dataset=3, max_tokens=8, answer_mode=["choice", "generate"],
                          controls=["text_only"])
            cfg_path = tmp_path / "eval.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            report, _ = evaluate(load_config(EvalConfig, cfg_path))
            n_judged = len(judge_server.chat_requests)
            # The endpoint listed the weights of each PULSE model, and the run kept them.
            served = sv.model_fingerprints(sv.ServeArgs(model_dir=str(tiny_pulse_dir),
                                                        adapters={"study": str(adapter)}))
            inputs = json.loads((out / "inputs.json").read_text())
            assert inputs["fingerprints"] == {m: served[m] for m in ("pulse", "pulse-lora")}
            assert inputs["dataset_id"] is None  # the test's split has no manifest
            check_inputs(load_config(EvalConfig, cfg_path))  # the same weights: resumable
    finally:
        serve.delete("ecgvlm-eval")
        serve.shutdown()
    # Another adapter served as pulse-lora at the same address (a retrained one, here the
    # fake's card): the rerun is refused before Ray starts, rather than keeping the old
    # adapter's answers as the new one's.
    retrained = [{"id": "pulse", "fingerprint": served["pulse"]},
                 {"id": "pulse-lora", "fingerprint": "0123456789abcdef"}, "gpt-4o"]
    said = (f"{out} holds pulse-lora's answers from other weights (fingerprint "
            f"{served['pulse-lora']}); the endpoint serves pulse-lora with 0123456789abcdef")
    with FakeOpenAIServer(models=retrained) as other, \
            pytest.raises(EvaluationError, match=re.escape(said)):
        check_inputs(load_config(EvalConfig, cfg_path, [f"endpoint={other.base_url}"]))

    pred = pd.read_parquet(out / "predictions.parquet")
    assert sorted(set(pred["model"])) == ["pulse", "pulse-lora"]
    assert len(pred) == 2 * 3 * 6 and pred["error"].isna().all(), pred["error"].dropna()[:3]
    assert (pred["raw_text"].str.len() > 0).all()  # the tiny model generated text
    # The text-only baseline: PULSE answered every question without an image, in choices.
    text_only = pred[pred["condition"] == "text_only"]
    assert len(text_only) == 2 * 6 and set(text_only["answer_mode"]) == {"choice"}
    assert all(len(p) == 4 for p in text_only["option_probs"])
    # Constrained choice: every reply is one of the letters, with a probability per option
    # (summing to 1), and the answer is the most probable one.
    choice = pred[pred["answer_mode"] == "choice"]
    for row in choice.itertuples():
        probs = list(row.option_probs)
        assert len(probs) == 4 and sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert row.predicted_letter == "ABCD"[probs.index(max(probs))] == row.raw_text
    metrics = json.loads((out / "metrics.json").read_text())
    generated = json.loads((out / "metrics_generate.json").read_text())
    for model in ("pulse", "pulse-lora"):
        for dataset in ("cpsc2018", "mitdb"):
            assert metrics[model][dataset]["n"] == 3
            assert metrics[model][dataset]["unparseable_rate"] == 0  # Table 1: real answers
            assert metrics[model][dataset]["controls"]["text_only"]["n"] == 3
            # A random model's free text is rarely an answer: whatever parse_answer did not
            # accept is counted unparseable in Table 1b, and the metrics say so.
            rows = pred[(pred["model"] == model) & (pred["dataset"] == dataset)
                        & (pred["answer_mode"] == "generate")]
            assert generated[model][dataset]["unparseable_rate"] == pytest.approx(
                rows["predicted_letter"].isna().mean())
    # Calibration of the real probabilities; no validation split here, so nothing is fitted.
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["pulse"]["datasets"]["mitdb"]["raw"]["n"] == 3
    assert calibration["pulse"]["fit"]["temperature"] is None
    assert "no 'val' split" in report.calibration_note
    assert "ECGVLM_TEST_NO_OPENAI_KEY" in report.unavailable["gpt-4o"]
    assert "does not serve it" in report.unavailable["pulse-xl"]
    assert n_judged >= 12  # every (sample, model) judged once at least
    table1 = parse_markdown_tables((out / "report.md").read_text())[0]
    assert {r["Model"] for r in table1} == {"pulse", "pulse-lora", "prior-baseline", "gpt-4o",
                                            "pulse-xl"}


# What `ecgvlm evaluate` does with its memory settings before and while it connects to Ray;
# a task then reports what its worker was given.
_SETTINGS_DRIVER = (
    "import os, ray\n"
    "from ecgvlm.cli import _ray_for_job\n"
    "from ecgvlm.evaluate import settings_env_vars, use_fixed_mmap_threshold, "
    "use_returning_arrow_pool\n"
    "use_returning_arrow_pool()\n"
    "use_fixed_mmap_threshold()\n"
    "from ecgvlm.evaluate.memory import SETTING_VARIABLES as names\n"
    "with _ray_for_job(None, None, env_vars=settings_env_vars()):\n"
    "    seen = ray.get(ray.remote(lambda: [os.environ.get(n) for n in names]).remote())\n"
    "print('worker:', *seen)\n"
)


def test_a_clusters_workers_get_the_drivers_memory_settings(ray_head, tmp_path):
    """A cluster's workers do not inherit the driver's environment: the evaluation driver
    hands them its memory settings with the job's runtime env, and a variable that the
    submitted job's own runtime env sets stays the job's (Ray would refuse the driver's
    runtime env naming it again). Values no Ray process here has of itself: the pool the
    driver's command line names, the threshold the job's runtime env names."""
    from ecgvlm.local_ray import ray_command

    address, env = ray_head
    script = tmp_path / "driver.py"
    script.write_text(_SETTINGS_DRIVER)
    run = subprocess.run(
        [str(ray_command()), "job", "submit", "--address", address, "--runtime-env-json",
         json.dumps({"env_vars": {"MALLOC_MMAP_THRESHOLD_": "262144"}}), "--",
         "env", "ARROW_DEFAULT_MEMORY_POOL=jemalloc", f"PYTHONPATH={REPO}", sys.executable,
         str(script)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "worker: jemalloc 262144" in run.stdout, run.stdout[-3000:]
