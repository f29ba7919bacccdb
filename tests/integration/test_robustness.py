"""The printout-artefact sweep end to end: printouts re-rendered from real records inside the
Ray Data pipeline, asked through a fake endpoint on loopback, paired with the clean ones.

The fake endpoint answers correctly when it is sent the very printout prepare drew and "A"
otherwise, so every accuracy and every paired drop is known in advance.
"""

from __future__ import annotations

import base64
import json
import math
import re

import pandas as pd
import pytest

from ecgvlm.config import config_from_dict, config_to_dict
from ecgvlm.evaluate import EvalConfig, evaluate
from ecgvlm.evaluate.conditions import rerender_png, sample_seed
from ecgvlm.render import RenderConfig, render_printout
from ecgvlm.signal import find_record_paths, read_record, read_windows
from tests.fakes.mcq_split import sample_rows, write_split
from tests.fakes.openai_server import FakeOpenAIServer, Reply
from tests.unit.test_report import parse_markdown_tables

pytestmark = pytest.mark.integration

RENDER = RenderConfig(layout="auto")


def _records(samples_dir):
    """Four CPSC-2018 records and two MIT-BIH windows of the bundled samples."""
    cpsc = [read_record(p) for p in find_record_paths(samples_dir / "cpsc2018")[:4]]
    mitdb = read_windows(samples_dir / "mitdb" / "106", window_s=10.0)[:2]
    paths = [str(p) for p in find_record_paths(samples_dir / "cpsc2018")[:4]]
    return list(zip(cpsc + mitdb, paths + [str(samples_dir / "mitdb" / "106")] * 2))


@pytest.fixture
def prepared(samples_dir, tmp_path):
    """A split of real records in prepare's layout: the printout drawn as prepare draws it,
    ``source_path`` and ``record_id`` as prepare stores them, and a manifest."""
    pairs = _records(samples_dir)
    rows = []
    for (record, path), row in zip(pairs, sample_rows(len(pairs), datasets=("x",))):
        sample_id = f"{record.record_id}#0"
        rows.append({**row, "sample_id": sample_id, "dataset": record.dataset,
                     "record_id": record.record_id, "source_path": path,
                     "question": f"Which finding does ECG {sample_id} show?",
                     "png": render_printout(record, RENDER, seed=0).png})
    root = tmp_path / "prepared"
    write_split(root, rows)
    (root / "manifest.json").write_text(json.dumps(
        {"config": {"render": config_to_dict(RENDER), "window_s": 10.0, "seed": 0}}))
    return root, {r["sample_id"]: r for r in rows}


def _image(request) -> bytes:
    url = request["messages"][-1]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


def _responder(by_id):
    def respond(request):
        text = request["messages"][-1]["content"][-1]["text"]
        sample = by_id[re.search(r"ECG (\S+) show", text).group(1)]
        top = sample["answer_letter"] if _image(request) == sample["png"] else "A"
        return Reply(choice_logprobs={k: math.log(0.7 if k == top else 0.1) for k in "ABCD"})
    return respond


def test_rerendering_a_sample_as_prepared_gives_its_printout_byte_for_byte(prepared):
    _, by_id = prepared
    from ecgvlm.dataset import read_sample_record

    for row in by_id.values():
        record = read_sample_record(row["source_path"], row["dataset"], row["record_id"], 10.0)
        assert rerender_png(record, "normal", json.dumps(config_to_dict(RENDER)), 0) == row["png"]


def test_sweep_asks_rerendered_printouts_and_reports_the_paired_drop(ray_local, prepared, tmp_path):
    root, by_id = prepared
    out = tmp_path / "eval"
    cfg = {"data_dir": str(root), "output_dir": str(out), "models": ["pulse", "pulse-lora"],
           "answer_mode": ["choice"], "concurrency": 2, "batch_size": 2, "timeout_s": 10,
           "max_retries": 1, "backoff_s": 0.01, "n_boot": 200, "progress": False,
           "prior_split": "", "judge": {"enabled": False},
           "calibration": {"split": "", "n_bins": 2},
           "robustness": {"artefacts": ["noise", "ecg_plot"], "strengths": [0.5, 2.0]}}
    with FakeOpenAIServer(_responder(by_id), models=("pulse", "pulse-lora")) as endpoint:
        cfg["endpoint"] = endpoint.base_url
        _, written = evaluate(config_from_dict(EvalConfig, cfg))
        requests = list(endpoint.chat_requests)
        # A rerun resumes per condition: nothing is asked again.
        evaluate(config_from_dict(EvalConfig, cfg))
        assert len(endpoint.chat_requests) == len(requests)

    conditions = ("normal", "noise@0.5", "noise@2", "ecg_plot")
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(requests) == len(pred) == 2 * len(conditions) * len(by_id)
    assert sorted(set(pred["condition"])) == sorted(conditions)

    # The images: one per sample and condition whatever the model, each differing from the
    # prepared printout and from the other conditions' images.
    sent: dict[str, list[bytes]] = {}
    for r in requests:
        text = r.json["messages"][-1]["content"][-1]["text"]
        sid = re.search(r"ECG (\S+) show", text).group(1)
        sent.setdefault(sid, []).append(_image(r.json))
    for sid, images in sent.items():
        distinct = set(images)
        assert len(images) == 2 * len(conditions) and len(distinct) == len(conditions)
        assert by_id[sid]["png"] in distinct

    # Seeded per sample: another run draws the same bytes; another seed other bytes.
    from ecgvlm.dataset import read_sample_record

    row = next(iter(by_id.values()))
    record = read_sample_record(row["source_path"], row["dataset"], row["record_id"], 10.0)
    render_json = json.dumps(config_to_dict(RENDER), sort_keys=True)
    noisy = rerender_png(record, "noise@2", render_json, sample_seed(0, row["sample_id"]))
    assert noisy in set(sent[row["sample_id"]])
    assert noisy != rerender_png(record, "noise@2", render_json, sample_seed(1, row["sample_id"]))

    # Every re-rendered printout is answered "A": accuracy is the share of A answers, the drop
    # the clean accuracy (1.0) minus that, per data set, with its paired interval.
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("pulse", "pulse-lora"):
        for dataset in ("cpsc2018", "mitdb"):
            rows = [r for r in by_id.values() if r["dataset"] == dataset]
            share_a = sum(r["answer_letter"] == "A" for r in rows) / len(rows)
            entry = metrics[model][dataset]
            assert entry["accuracy"] == 1.0
            for condition in conditions[1:]:
                swept = entry["robustness"][condition]
                assert swept["n"] == len(rows) and swept["accuracy"] == pytest.approx(share_a)
                assert swept["difference"] == pytest.approx(1 - share_a)
                assert swept["ece"] is not None and swept["ece_normal"] == pytest.approx(0.3)
                if swept["ci"] is not None:
                    assert swept["ci"][0] <= swept["difference"] <= swept["ci"][1]

    text = (out / "report.md").read_text()
    assert "## Table 8: robust to printout artefacts?" in text
    table8 = next(t for t in parse_markdown_tables(text) if t and "Drop [95% CI]" in t[0])
    assert {(r["Artefact"], r["Strength"]) for r in table8} == {
        ("noise", "0.5"), ("noise", "2"), ("ecg_plot", "n/a")}
    assert "robustness.png" in written and (out / "robustness.png").is_file()


def test_sweep_of_a_set_prepared_without_source_paths_is_reported_not_run(ray_local, tmp_path):
    root = write_split(tmp_path / "prepared", sample_rows(3))
    out = tmp_path / "eval"
    cfg = {"data_dir": str(root), "output_dir": str(out), "models": ["pulse"],
           "answer_mode": ["generate"], "progress": False, "prior_split": "", "n_boot": 0,
           "judge": {"enabled": False}, "calibration": {"split": ""},
           "robustness": {"artefacts": ["blur"], "strengths": [1.0]}}
    with FakeOpenAIServer(models=("pulse",)) as endpoint:
        cfg["endpoint"] = endpoint.base_url
        report, _ = evaluate(config_from_dict(EvalConfig, cfg))
        assert len(endpoint.chat_requests) == 2 * 3  # the printouts' pass only
    assert report.robustness == {} and "no source_path column" in report.robustness_note
    assert "robustness sweep not run: the prepared set has no source_path" in (
        out / "report.md").read_text()
