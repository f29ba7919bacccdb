"""The report's files: tables that parse back to the metrics, metrics.json's shape, plots."""

import json
import re

import pytest
from PIL import Image

from ecgvlm.judge import CRITERIA, paired_differences, summarize_judgements
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
    for dataset in ("cpsc2018", "mitdb"):
        for i, t in enumerate(Y_TRUE):
            rows.append({"sample_id": f"{dataset}-{i}", "dataset": dataset, "model": PRIOR_MODEL,
                         "true_label": t, "predicted_label": "NORM"})
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
        judge_pairs=paired_differences(judgements, n_boot=100),
        chance={"cpsc2018": 0.25, "mitdb": 0.25},
        baseline_note="fitted on the 'train' split",
        unavailable={"gpt-4o": "OPENAI_API_KEY is not set"},
        meta={"models": ["pulse", "pulse-lora", "gpt-4o"], "judge_model": "fake-judge",
              "rubric_version": "abc", "prompt_version": "llava_v1-x", "bootstrap_seed": 0,
              "judge_seed": 0, "n_boot": 200, "git_sha": "deadbeef", "config": {"a": 1},
              "counts": {"pulse": {"generate": {"n": 12, "unparseable": 2, "errors": 0,
                                                "resumed": 0}}}},
    )


def test_report_tables_parse_back_to_the_metrics(tmp_path):
    report = _report()
    written = write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    table1, table2, table3, counts = parse_markdown_tables(text)

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
    assert table1[2]["Note"].startswith("blind baseline, chance 0.250")
    # n = 6 < 10: every row is flagged, and its rates get exact (Wilson) intervals.
    assert "n=6 < 10" in row["Note"]
    assert m.ci_method["accuracy"] == "wilson"
    assert table1[-1]["Balanced accuracy"] == "n/a"
    assert table1[-1]["Note"] == "not evaluated: OPENAI_API_KEY is not set"

    # Table 2: pulse had one failure of four (scores 3, 2, 3 -> mean 8/3); pulse-lora's means
    # are paired over the same three ids (5, 4, 5 -> 14/3), not its four.
    t2 = {(r["Dataset"], r["Model"]): r for r in table2}
    assert t2[("cpsc2018", "pulse")]["Failures"] == "1"
    assert t2[("cpsc2018", "pulse")]["Judged"] == "4"
    assert parse_cell(t2[("cpsc2018", "pulse")]["Factual accuracy"])[0] == pytest.approx(8 / 3, abs=5e-3)
    assert parse_cell(t2[("mitdb", "pulse-lora")]["Hallucination (lower is better)"])[0] == pytest.approx(14 / 3, abs=5e-3)
    assert t2[("mitdb", "pulse-lora")]["Note"] == "means over 3 paired ids"
    # Table 3: pulse - pulse-lora = 3-5, 2-4, 3-5 = -2 on every paired id.
    t3 = {(r["Dataset"], r["Comparison"]): r for r in table3}
    assert parse_cell(t3[("mitdb", "pulse - pulse-lora")]["Completeness"]) == (-2.0, (-2.0, -2.0))
    assert t3[("mitdb", "pulse - pulse-lora")]["Paired ids"] == "3"
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


def test_wording_of_the_captions():
    text = report_markdown_text()
    # Precision covers parsed answers only; the resampled unit is named; no "upper bound".
    assert "weighted precision covers parsed answers only" in text
    assert "resamples whole samples" in text
    assert "upper bound" not in text


def report_markdown_text():
    from ecgvlm.report import report_markdown

    return report_markdown(_report())


def test_console_tables_carry_the_judge_note():
    report = _report()
    report.judge, report.judge_pairs = {}, {}
    note = "judge not run: judge model 'gpt-4o' needs the OpenAI API but OPENAI_API_KEY is not set"
    report.judge_note = note
    console = console_tables(report)
    assert note in console
    assert console.index(note) > console.index("Table 2")


def test_a_point_outside_its_interval_or_a_failing_plot_never_stops_the_report(tmp_path, monkeypatch):
    import dataclasses

    from ecgvlm import report as R

    report = _report()
    # As seen in a real run: macro-F1 0.9153 with CI [0.8015, 0.9147], a baseline 0.083 with
    # [0.091, 0.167] (percentile intervals need not contain their point estimate).
    m = report.metrics["pulse"]["cpsc2018"]
    report.metrics["pulse"]["cpsc2018"] = dataclasses.replace(
        m, macro_f1=0.9153, ci={**m.ci, "macro_f1": (0.8015, 0.9147)})
    b = report.metrics[PRIOR_MODEL]["mitdb"]
    report.metrics[PRIOR_MODEL]["mitdb"] = dataclasses.replace(
        b, balanced_accuracy=0.083, ci={**b.ci, "balanced_accuracy": (0.091, 0.167)})
    written = write_report(report, tmp_path)
    assert "metrics_bars.png" in written and "report.md" in written

    def broken(report, out_dir):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(R, "plot_judge_bars", broken)
    out = tmp_path / "again"
    written = write_report(report, out)
    text = (out / "report.md").read_text()
    assert "## Plots that failed" in text and "'yerr' must not contain negative values" in text
    assert "judge_scores.png" not in written and "metrics_bars.png" in written
