"""The report's files: tables that parse back to the metrics, metrics.json's shape, plots."""

import json
import re

import pytest
from PIL import Image

from ecgvlm.judge import CRITERIA, summarize_judgements
from ecgvlm.metrics import PRIOR_MODEL, metrics_by_model_and_dataset
from ecgvlm.records import Judgement
from ecgvlm.report import EvalReport, console_tables, write_report

Y_TRUE = ["NORM", "NORM", "NORM", "AF", "AF", "RBBB"]
Y_PRED = ["NORM", "NORM", "AF", "AF", None, "AF"]  # balanced accuracy 7/18, see test_metrics


def parse_markdown_tables(text):
    """Every GitHub markdown table in ``text`` as a list of {header: cell} rows.

    Written here, independent of the report code: a header row, a ``|---|`` separator row,
    then body rows with the same number of cells.
    """
    lines = text.splitlines()
    tables = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                assert len(cells) == len(header), lines[i]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def parse_cell(cell):
    """'0.389 [0.250, 0.520]' -> (0.389, (0.25, 0.52)); 'n/a' -> None."""
    if cell == "n/a":
        return None
    m = re.fullmatch(r"(-?\d+\.\d+)(?: \[(-?\d+\.\d+), (-?\d+\.\d+)\])?", cell)
    assert m, cell
    ci = (float(m.group(2)), float(m.group(3))) if m.group(2) else None
    return float(m.group(1)), ci


def _report():
    rows = []
    for model, preds in (("pulse", Y_PRED), ("pulse-lora", Y_TRUE)):
        for dataset in ("cpsc2018", "mitdb"):
            for i, (t, p) in enumerate(zip(Y_TRUE, preds)):
                rows.append({"sample_id": f"{dataset}-{i}", "dataset": dataset, "model": model,
                             "true_label": t, "predicted_label": p})
    metrics = metrics_by_model_and_dataset(rows, n_boot=200, seed=0)
    judgements = []
    for model, base in (("pulse", 2), ("pulse-lora", 4)):
        for dataset in ("cpsc2018", "mitdb"):
            for i in range(4):
                failed = model == "pulse" and i == 0
                scores = {c: None if failed else base + (i % 2) for c in CRITERIA}
                judgements.append(Judgement(sample_id=f"{dataset}-{i}", dataset=dataset,
                                            model=model, judge_model="fake-judge",
                                            rubric_version="abc", failure="bad" if failed else None,
                                            **scores))
    return EvalReport(
        metrics=metrics,
        judge=summarize_judgements(judgements, n_boot=100),
        unavailable={"gpt-4o": "OPENAI_API_KEY is not set"},
        meta={"models": ["pulse", "pulse-lora", "gpt-4o"], "judge_model": "fake-judge",
              "rubric_version": "abc", "prompt_version": "llava_v1-x", "bootstrap_seed": 0,
              "judge_seed": 0, "n_boot": 200, "git_sha": "deadbeef", "config": {"a": 1},
              "counts": {"pulse": {"n": 12, "unparseable": 2, "errors": 0, "resumed": 0}}},
    )


def test_report_tables_parse_back_to_the_metrics(tmp_path):
    report = _report()
    written = write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    table1, table2, counts = parse_markdown_tables(text)

    # Table 1: data set x model incl. the baseline, then the unavailable model with its reason.
    assert [(r["Dataset"], r["Model"]) for r in table1] == [
        ("cpsc2018", "pulse"), ("cpsc2018", "pulse-lora"), ("cpsc2018", PRIOR_MODEL),
        ("mitdb", "pulse"), ("mitdb", "pulse-lora"), ("mitdb", PRIOR_MODEL), ("all", "gpt-4o"),
    ]
    row = table1[0]
    value, ci = parse_cell(row["Balanced accuracy"])
    assert value == pytest.approx(7 / 18, abs=5e-4)
    m = report.metrics["pulse"]["cpsc2018"]
    assert ci == pytest.approx(m.ci["balanced_accuracy"], abs=5e-4)
    assert parse_cell(row["Weighted F1"])[0] == pytest.approx(8 / 15, abs=5e-4)
    assert parse_cell(row["Unparseable"])[0] == pytest.approx(1 / 6, abs=5e-4)
    assert row["n"] == "6"
    assert parse_cell(table1[2]["Balanced accuracy"])[0] == pytest.approx(1 / 3, abs=5e-4)
    assert "prior-only baseline" in table1[2]["Note"]
    assert table1[-1]["Balanced accuracy"] == "n/a"
    assert table1[-1]["Note"] == "not evaluated: OPENAI_API_KEY is not set"

    # Table 2: pulse had one failure of four (scores 3, 2, 3 -> mean 8/3).
    t2 = {(r["Dataset"], r["Model"]): r for r in table2}
    assert t2[("cpsc2018", "pulse")]["Failures"] == "1"
    assert t2[("cpsc2018", "pulse")]["Judged"] == "4"
    assert parse_cell(t2[("cpsc2018", "pulse")]["Factual accuracy"])[0] == pytest.approx(8 / 3, abs=5e-3)
    assert parse_cell(t2[("mitdb", "pulse-lora")]["Hallucination (lower is better)"])[0] == 4.5
    assert t2[("all", "gpt-4o")]["Note"].startswith("not evaluated")
    assert counts[0]["Unparseable"] == "2"

    # Provenance is in the report.
    for needle in ("fake-judge", "rubric `abc`", "llava_v1-x", "deadbeef", "gpt-4o`: OPENAI_API_KEY"):
        assert needle in text, needle
    assert "Table 1" in console_tables(report) and "Table 2" in console_tables(report)

    # metrics.json: {model: {dataset: {...}}} with CIs, the judge scores attached.
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(data) == ["prior-baseline", "pulse", "pulse-lora"]
    entry = data["pulse"]["cpsc2018"]
    for key in ("balanced_accuracy", "weighted_precision", "weighted_recall", "weighted_f1",
                "macro_f1", "unparseable_rate", "n", "ci", "per_class", "confusion"):
        assert key in entry, key
    assert entry["ci"]["weighted_f1"][0] <= entry["weighted_f1"] <= entry["ci"]["weighted_f1"][1]
    assert entry["judge"]["n_failures"] == 1
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["unavailable"] == {"gpt-4o": "OPENAI_API_KEY is not set"}

    # Plots: one confusion figure per evaluated model, metric bars, judge bars; all linked.
    for name in ("confusion_pulse.png", "confusion_pulse-lora.png", "metrics_bars.png",
                 "judge_scores.png"):
        assert name in written
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
        assert f"({name})" in text
    assert "confusion_prior-baseline.png" not in written


def test_report_without_judge_says_why(tmp_path):
    report = _report()
    report.judge = {}
    report.judge_note = "judge disabled in the config"
    written = write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "judge disabled in the config" in text
    assert "judge_scores.png" not in written
    table2 = parse_markdown_tables(text)[1]
    assert [r["Model"] for r in table2] == ["gpt-4o"]
