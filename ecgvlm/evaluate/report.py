"""The evaluation report: ``report.md``, ``metrics.json``, ``run.json`` and PNG plots.

``report.md`` holds Table 1 (classification metrics with 95% CIs per data set x model, with
the blind baseline), Table 2 (judge scores, paired across models), Table 3 (paired judge
differences between models), the models that could not be
evaluated and why, and the run's provenance (models, endpoint, judge model, rubric and prompt
versions, seeds, counts, git sha, resolved config). Its tables are plain GitHub markdown with
one header row, so they parse back (``cell [lo, hi]`` for a value with its interval, ``n/a``
for a missing value).

``metrics.json`` is ``{model: {dataset: {balanced_accuracy, weighted_precision,
weighted_recall, weighted_f1, macro_f1, accuracy, unparseable_rate, n, ci: {metric: [lo,
hi]}, per_class, confusion, ..., judge: {...}}}}``, the prior baseline under
``ecgvlm.metrics.PRIOR_MODEL``; ``run.json`` holds the provenance and the unavailable models.

matplotlib is imported inside the plotting functions (Agg backend): importing this module
stays cheap and never needs a display. A plot that fails is named in the report instead of
stopping it: the tables are the result, the plots a view of them.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgvlm.evaluate.calibration import CALIBRATION_NAMES as CALIBRATION_COLUMNS
from ecgvlm.evaluate.calibration import calibration_json
from ecgvlm.evaluate.judge import CRITERIA, LOWER_IS_BETTER
from ecgvlm.evaluate.metrics import PRIOR_MODEL, ClassificationMetrics

TABLE1_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "weighted_f1",
    "weighted_recall",
    "weighted_precision",
    "macro_f1",
)
_TITLES = {
    "balanced_accuracy": "Balanced accuracy",
    "weighted_f1": "Weighted F1",
    "weighted_recall": "Weighted recall",
    "weighted_precision": "Weighted precision",
    "macro_f1": "Macro-F1",
    "accuracy": "Accuracy",
    "unparseable_rate": "Unparseable",
    "factual_accuracy": "Factual accuracy",
    "completeness": "Completeness",
    "detail_quality": "Detail quality",
    "context_understanding": "Context understanding",
    "hallucination": "Hallucination",
    "ece": "ECE",
    "brier": "Brier",
    "log_loss": "Log loss",
    "aurc": "AURC",
}
NA = "n/a"
_MODE_WORDS = {"choice": "constrained choice among the option letters",
               "generate": "letters parsed from generated text"}


@dataclass
class EvalReport:
    """Everything a report is written from.

    Attributes:
        metrics: ``{model: {dataset: ClassificationMetrics}}`` including the prior baseline.
        judge: ``ecgvlm.judge.summarize_judgements`` output (empty when the judge did not run).
        unavailable: Model -> why it has no rows (e.g. gpt-4o without an API key).
        judge_note: Why Table 2 is empty or partial, if it is.
        judge_pairs: ``ecgvlm.judge.paired_differences`` output: per data set, the paired
            difference of each criterion between two models, with its interval.
        meta: Provenance: models, endpoint, judge model, rubric/prompt versions, seeds,
            counts, git sha, resolved config, timings.
        baseline_note: How the blind baseline was fitted, or why it did not run.
        chance: Data set -> the score of a uniform guess (mean of 1 / number of options).
        answer_mode: How Table 1's answers were given: ``choice`` or ``generate``.
        generated: With Table 1 from ``choice``, the metrics of the answers parsed from
            generated text (Table 1b); empty otherwise.
        generated_note: Models left out of Table 1b, and why.
        calibration: ``ecgvlm.evaluate.calibration.calibrate_models`` output (Tables 4, 5).
        calibration_note: Where the temperature and threshold were fitted, or why not.
        claims: ``{model: {dataset: ClaimStats}}`` of the explanations checked against the
            signal, with the reference pseudo-models (Table 6).
        claims_note: Why the check is partial, if it is.
        claim_examples: Model -> a few explanations with their verdicts.
        judge_agreement: Model -> rank correlations between the judge and the check.
        controls: ``conditions.compare_conditions`` output for the image controls (Table
            7), empty without controls.
        controls_note: Samples a control could not be run on, and why.
        robustness: ``conditions.compare_conditions`` output for the printout-artefact sweep
            (Table 8), empty without one.
        robustness_note: Why the sweep did not run, if it did not.
    """

    metrics: dict[str, dict[str, ClassificationMetrics]]
    judge: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    judge_note: str | None = None
    judge_pairs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    baseline_note: str | None = None
    chance: dict[str, float] = field(default_factory=dict)
    answer_mode: str = "generate"
    generated: dict[str, dict[str, ClassificationMetrics]] = field(default_factory=dict)
    generated_note: str | None = None
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration_note: str | None = None
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    claims_note: str | None = None
    claim_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    judge_agreement: dict[str, dict[str, Any]] = field(default_factory=dict)
    controls: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    controls_note: str | None = None
    robustness: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    robustness_note: str | None = None


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _fmt(value: float | None, digits: int = 3) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _fmt_ci(value: float | None, ci: Any, digits: int = 3) -> str:
    if value is None:
        return NA
    if not ci:
        return _fmt(value, digits)
    lo, hi = ci
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return str(cell).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered_models(models: Any) -> list[str]:
    """Evaluated models sorted, the prior baseline last."""
    models = set(models)
    return sorted(models - {PRIOR_MODEL}) + ([PRIOR_MODEL] if PRIOR_MODEL in models else [])


def table1_markdown(report: EvalReport, generated: bool = False) -> str:
    """Table 1: one row per data set x model, metric cells ``value [lo, hi]`` (with
    ``generated``: Table 1b, the answers parsed from generated text)."""
    header = ["Dataset", "Model", "n"] + [_TITLES[m] for m in TABLE1_METRICS] + [
        _TITLES["unparseable_rate"], "Note"
    ]
    metrics = report.generated if generated else report.metrics
    datasets = sorted({d for per_ds in metrics.values() for d in per_ds})
    rows = []
    for dataset in datasets:
        for model in _ordered_models(metrics):
            m = metrics[model].get(dataset)
            if m is None:
                continue
            notes = list(m.flags)
            if model == PRIOR_MODEL:
                chance = report.chance.get(dataset)
                notes.insert(0, "blind baseline" + (f", chance {chance:.3f}" if chance else ""))
            rows.append(
                [dataset, model, str(m.n)]
                + [_fmt_ci(getattr(m, k), m.ci.get(k)) for k in TABLE1_METRICS]
                + [_fmt_ci(m.unparseable_rate, m.ci.get("unparseable_rate")), "; ".join(notes)]
            )
    for model, reason in sorted(report.unavailable.items()) if not generated else ():
        rows.append(["all", model, "0"] + [NA] * (len(TABLE1_METRICS) + 1) + [f"not evaluated: {reason}"])
    return _md_table(header, rows)


def table2_markdown(report: EvalReport) -> str:
    """Table 2: judge scores (mean [95% CI]) per data set x model."""
    header = ["Dataset", "Model", "Judged", "Failures"] + [
        _TITLES[c] + (" (lower is better)" if c in LOWER_IS_BETTER else "") for c in CRITERIA
    ] + ["Note"]
    rows = []
    datasets = sorted({d for per_ds in report.judge.values() for d in per_ds})
    for dataset in datasets:
        for model in _ordered_models(report.judge):
            entry = report.judge[model].get(dataset)
            if entry is None:
                continue
            cells = []
            for c in CRITERIA:
                score = entry.get(c)
                cells.append(NA if score is None else _fmt_ci(score["mean"], score["ci"], 2))
            if entry["n_failures"] == entry["n"]:
                note = "all judgements failed"
            elif entry.get("excluded"):
                note = f"left out of the pairing: {entry['excluded']}"
            else:
                note = f"means over {entry.get('n_paired', entry['n'] - entry['n_failures'])} paired ids"
            rows.append([dataset, model, str(entry["n"]), str(entry["n_failures"])] + cells + [note])
    for model, reason in sorted(report.unavailable.items()):
        rows.append(["all", model, "0", "0"] + [NA] * len(CRITERIA) + [f"not evaluated: {reason}"])
    return _md_table(header, rows)


def table3_markdown(report: EvalReport) -> str:
    """Table 3: paired differences of judge scores between two models (mean [95% CI])."""
    header = ["Dataset", "Comparison", "Paired ids"] + [
        _TITLES[c] + (" (lower is better)" if c in LOWER_IS_BETTER else "") for c in CRITERIA
    ]
    rows = []
    for dataset, pairs in sorted(report.judge_pairs.items()):
        for name, entry in sorted(pairs.items()):
            cells = []
            for c in CRITERIA:
                diff = entry.get(c)
                cells.append(NA if diff is None else _fmt_ci(diff["mean"], diff["ci"], 2))
            rows.append([dataset, name, str(entry["n"])] + cells)
    return _md_table(header, rows)


def _calibration_entries(report: EvalReport) -> list[tuple[str, str, dict[str, Any]]]:
    """(dataset, model, entry) of ``report.calibration``, data sets then models sorted."""
    datasets = sorted({d for c in report.calibration.values() for d in c["datasets"]})
    return [(d, model, report.calibration[model]["datasets"][d]) for d in datasets
            for model in sorted(report.calibration) if d in report.calibration[model]["datasets"]]


def table4_markdown(report: EvalReport) -> str:
    """Table 4: calibration of the option probabilities, raw and after temperature scaling."""
    coverages: list[str] = []
    for _, _, entry in _calibration_entries(report):
        if entry["raw"] is not None:
            coverages = list(entry["raw"].accuracy_at_coverage)
            break
    header = (["Dataset", "Model", "Probabilities", "n", "Accuracy"]
              + [_TITLES[c] for c in CALIBRATION_COLUMNS] + [f"Acc. {c.split('@')[1]}" for c in coverages]
              + ["Note"])
    rows = []
    for dataset, model, entry in _calibration_entries(report):
        notes = list(entry["raw"].flags) if entry["raw"] is not None else []
        if entry["n_missing"]:
            notes.append(f"{entry['n_missing']} failed request(s) left out")
        note = "; ".join(notes)
        if entry["raw"] is None:
            rows.append([dataset, model, "none", "0", NA] + [NA] * (len(CALIBRATION_COLUMNS) + len(coverages))
                        + [note])
            continue
        for kind in ("raw", "scaled"):
            m = entry[kind]
            if m is None:
                continue
            label = "raw" if kind == "raw" else f"T = {m.temperature:.2f}"
            rows.append(
                [dataset, model, label, str(m.n), _fmt_ci(m.accuracy, m.ci.get("accuracy"))]
                + [_fmt_ci(getattr(m, c), m.ci.get(c)) for c in CALIBRATION_COLUMNS]
                + [_fmt_ci(m.accuracy_at_coverage[c], m.ci.get(c)) for c in coverages]
                + [note])
    return _md_table(header, rows)


def table5_markdown(report: EvalReport) -> str:
    """Table 5: answering only above the confidence threshold (coverage, accuracy)."""
    header = ["Dataset", "Model", "Threshold", "Coverage", "Accuracy when answering",
              "Accuracy of all"]
    rows = []
    for dataset, model, entry in _calibration_entries(report):
        a = entry["abstention"]
        if a is None:
            continue
        m = entry["scaled"] or entry["raw"]
        rows.append([dataset, model, _fmt(a.threshold) if a.threshold != float("inf") else "1 (all)",
                     _fmt_ci(a.coverage, a.ci.get("coverage")),
                     _fmt_ci(None if a.accuracy != a.accuracy else a.accuracy, a.ci.get("accuracy")),
                     _fmt(m.accuracy)])
    return _md_table(header, rows)


def table6_markdown(report: EvalReport) -> str:
    """Table 6: explanations checked against the signal, per data set x model."""
    from ecgvlm.evaluate.claims import MOVED_REFERENCE_MODEL, REFERENCE_MODEL

    header = ["Dataset", "Model", "Explanations", "Claims per explanation", "Supported",
              "Contradicted", "Unverifiable", "Contradicted-claim rate",
              "With a contradiction"]
    refs = [REFERENCE_MODEL, MOVED_REFERENCE_MODEL]
    models = sorted(m for m in report.claims if m not in refs) + [m for m in refs if m in report.claims]
    rows = []
    for dataset in sorted({d for per in report.claims.values() for d in per}):
        for model in models:
            c = report.claims[model].get(dataset)
            if c is None:
                continue
            rows.append([dataset, model, str(c.n_explanations),
                         _fmt_ci(c.claims_per_explanation, c.ci.get("claims_per_explanation"), 2)]
                        + [_fmt_ci(getattr(c, k), c.ci.get(k)) for k in
                           ("supported", "contradicted", "unverifiable", "contradicted_rate",
                            "with_contradiction")])
    return _md_table(header, rows)


def marked_explanation(text: str, verdicts: list[dict[str, Any]]) -> str:
    """The explanation with each contradicted claim in bold and its measured value after it."""
    out, last = [], 0
    for v in sorted((v for v in verdicts if v["verdict"] == "contradicted"), key=lambda v: v["span"]):
        start, end = v["span"]
        if start < last:
            continue
        measured = v["measured"]
        if isinstance(measured, float):
            measured = f"{measured:.3g}"
        out += [text[last:start], f"**{text[start:end]}** [measured: {measured}]"]
        last = end
    out.append(text[last:])
    return "".join(out).replace("\n", " ")


def control_verdict(entry: dict[str, Any]) -> str:
    """In words: whether accuracy falls without the ECG (normal minus blank, mismatched or
    text_only, the first that ran)."""
    for control in ("blank", "mismatched", "text_only"):
        c = entry.get(control)
        if c is None:
            continue
        image = "no image" if control == "text_only" else f"a {control} image"
        if c["ci"] is None:
            return f"undecided: no interval from one patient ({control})"
        if c["ci"][0] > 0:
            return f"reads the ECG: accuracy falls with {image}"
        return (f"no evidence it reads the ECG: it scores as well with {image} "
                "(the interval of the drop includes 0)")
    return ""


def table7_markdown(report: EvalReport) -> str:
    """Table 7: accuracy with the printout and with each image control, paired per sample."""
    controls = sorted({c for per in report.controls.values() for e in per.values()
                       for c in e if isinstance(e[c], dict)})
    header = ["Dataset", "Model", "n", "Accuracy (printout)"]
    for c in controls:
        header += [f"Accuracy ({c})", f"Printout minus {c}"]
    header += ["In words"]
    rows = []
    for dataset in sorted({d for per in report.controls.values() for d in per}):
        for model in sorted(report.controls):
            entry = report.controls[model].get(dataset)
            if entry is None:
                continue
            cells = [dataset, model, str(entry["n_normal"]), _fmt(entry["accuracy_normal"])]
            for c in controls:
                e = entry.get(c)
                cells += ([NA, NA] if e is None else
                          [_fmt(e["accuracy"]), _fmt_ci(e["difference"], e["ci"])])
            rows.append(cells + [control_verdict(entry)])
    return _md_table(header, rows)


def _condition_order(condition: str) -> tuple[str, float]:
    name, _, strength = condition.partition("@")
    return (name, float(strength) if strength else 0.0)


def table8_markdown(report: EvalReport) -> str:
    """Table 8: accuracy (and calibration error) per printout artefact and strength, with
    the paired drop from the clean printout on the same samples."""
    conditions = sorted({c for per in report.robustness.values() for e in per.values()
                         for c in e if isinstance(e[c], dict)}, key=_condition_order)
    with_ece = any(e[c]["ece"] is not None for per in report.robustness.values()
                   for e in per.values() for c in conditions if c in e)
    header = ["Dataset", "Model", "Artefact", "Strength", "n", "Accuracy", "Accuracy (clean)",
              "Drop [95% CI]"] + (["ECE", "ECE (clean)"] if with_ece else [])
    rows = []
    for dataset in sorted({d for per in report.robustness.values() for d in per}):
        for model in sorted(report.robustness):
            entry = report.robustness[model].get(dataset)
            for condition in conditions:
                e = (entry or {}).get(condition)
                if e is None:
                    continue
                name, _, strength = condition.partition("@")
                cells = [dataset, model, name, strength or NA, str(e["n"]), _fmt(e["accuracy"]),
                         _fmt(e["accuracy_normal"]), _fmt_ci(e["difference"], e["ci"])]
                if with_ece:
                    cells += [_fmt(e["ece"]), _fmt(e["ece_normal"])]
                rows.append(cells)
    return _md_table(header, rows)


def claims_caption(report: EvalReport) -> str:
    """What Table 6 is."""
    return (
        "Each generated explanation's checkable claims (rates, intervals, axis, rhythm, P "
        "waves, ST and T by lead, named findings; `ecgvlm/evaluate/claims.py`) checked "
        "against the record's own measurements and labels: supported, contradicted (the "
        "measurement misses the stated value or guideline threshold by more than the "
        "tolerance) or unverifiable (not measured, hedged, or in the margin). Shares are of "
        "the claims; the contradicted-claim rate is of the checkable ones (supported + "
        "contradicted). `reference` is the grounded reference explanation of each sample "
        "checked against its own record (the checker's floor: 0 expected); "
        "`reference-moved` is another sample's reference, of another finding, checked "
        "against this record (what a wrong explanation looks like). Intervals resample "
        "patients (or recordings) as in Table 1."
    )


def calibration_caption(report: EvalReport) -> str:
    """What Tables 4 and 5 are."""
    meta = report.meta
    cal = (meta.get("config") or {}).get("calibration") or {}
    fits = []
    for model, c in sorted(report.calibration.items()):
        fit = c["fit"]
        parts = []
        if fit.get("temperature") is not None:
            parts.append(f"T = {fit['temperature']:.3f}")
        if fit.get("threshold") is not None:
            parts.append("threshold " + ("1 (abstain on all)" if fit["threshold"] == float("inf")
                                          else f"{fit['threshold']:.3f}"))
        parts += fit.get("notes", [])
        fits.append(f"`{model}`: " + ("; ".join(parts) or "nothing fitted")
                    + f" ({fit.get('n_fit', 0)} validation answers)")
    return (
        "The constrained-choice answers' option probabilities. Confidence is the top "
        f"option's probability. ECE: {cal.get('n_bins', '?')} equal-mass bins; Brier: "
        "multi-class, sum over options (0 best, 2 worst); log loss of the correct option; "
        "AURC: area under the risk-coverage curve (lower is better; a confidence that says "
        "nothing gives about the error rate); Acc. c: accuracy of the c most confident "
        "answers. Point estimate [95% CI] resampling the same units as Table 1. "
        "Temperature and threshold are fitted per model on the "
        f"`{cal.get('split') or 'none'}` split and applied unchanged here: "
        + "; ".join(fits) + "."
    )


def metrics_json(report: EvalReport, generated: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {dataset: {...metrics, ci, per_class, confusion, answer_mode, judge?}}}``
    (with ``generated``: Table 1b's)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per_ds in (report.generated if generated else report.metrics).items():
        for dataset, m in per_ds.items():
            entry = m.to_json()
            if model != PRIOR_MODEL:
                entry["answer_mode"] = "generate" if generated else report.answer_mode
            checked = report.claims.get(model, {}).get(dataset)
            if checked is not None:
                entry["claims"] = checked.to_json()
            controlled = report.controls.get(model, {}).get(dataset)
            if controlled is not None and not generated:
                entry["controls"] = controlled
            swept = report.robustness.get(model, {}).get(dataset)
            if swept is not None and not generated:
                entry["robustness"] = {c: e for c, e in swept.items() if isinstance(e, dict)}
            judged = report.judge.get(model, {}).get(dataset)
            if judged is not None:
                entry["judge"] = judged
            if model == PRIOR_MODEL and dataset in report.chance:
                entry["chance"] = report.chance[dataset]
            out.setdefault(model, {})[dataset] = entry
    return out


def _units(report: EvalReport) -> str:
    """What the intervals resampled, in words ("patients", "recordings", "samples")."""
    units = sorted({m.ci_unit for per_ds in report.metrics.values() for m in per_ds.values()})
    return " / ".join(f"{u}s" for u in units) or "samples"


def table1_caption(report: EvalReport) -> str:
    """What Table 1's numbers are: intervals, resampled unit, conventions, the baseline."""
    meta = report.meta
    return (
        f"Point estimate [95% CI]: percentile bootstrap ({meta.get('n_boot', '?')} resamples, "
        f"seed {meta.get('bootstrap_seed', '?')}) that resamples whole {_units(report)} "
        "(windows of one patient are not independent), stratified by true class; Wilson "
        "intervals for rates where the bootstrap degenerates (metrics.json `ci_method`). "
        "Unparseable answers and failed requests count as wrong in accuracy, recall and F1; "
        "weighted precision covers parsed answers only (an unparseable answer is no class's "
        f"prediction). `{PRIOR_MODEL}` is the blind baseline: it never sees the ECG and "
        "answers each question with the offered option whose finding is most frequent "
        "among the training split's correct answers; near chance means the questions "
        "cannot be passed from the label prior. Note flags rows whose numbers mean little "
        "(n < 10, one true class, fewer than 5 patients)."
    )


def table2_caption(report: EvalReport) -> str:
    """What Table 2's numbers are."""
    meta = report.meta
    return (
        f"Judge `{meta.get('judge_model', NA)}`, rubric `{meta.get('rubric_version', NA)}`, "
        f"up to {meta.get('judge_n_samples', '?')} samples per model x data set (the same "
        f"sample ids for every model, seed {meta.get('judge_seed', '?')}). Scores 1-5, "
        "mean [95% bootstrap CI resampling patients, or recordings]; higher is better except "
        "hallucination. Means are paired: over the ids that every model of the data set "
        "had judged successfully. Failures (malformed twice or request failed) are counted "
        "and left out."
    )


def report_markdown(report: EvalReport, plots: list[str] | None = None) -> str:
    """The whole ``report.md``."""
    meta = report.meta
    lines = ["# ecgvlm evaluation report", ""]
    if meta.get("created_utc"):
        run = (f"Run {meta.get('run_name', '')} created {meta['created_utc']} "
               f"(git {meta.get('git_sha') or 'unknown'}).")
        lines += [run, ""]
    lines += [f"## Table 1: classification ({_MODE_WORDS[report.answer_mode]})", "",
              table1_caption(report), ""]
    if report.baseline_note:
        lines += [f"**Blind baseline:** {report.baseline_note}", ""]
    lines += [table1_markdown(report), ""]
    if report.generated:
        lines += ["## Table 1b: classification of the answers in generated text", "",
                  ("The same questions answered in free text, the letter parsed out of the "
                   "reply (the explanations the judge reads); intervals as in Table 1."), ""]
        if report.generated_note:
            lines += [f"**Not evaluated:** {report.generated_note}", ""]
        lines += [table1_markdown(report, generated=True), ""]
    lines += [
        "## Table 2: judge scores of the explanations",
        "",
        table2_caption(report),
        "",
    ]
    if report.judge_note:
        lines += [f"**Note:** {report.judge_note}", ""]
    lines += [table2_markdown(report), ""]
    if report.judge_pairs:
        caption = ("Mean of (first model minus second) over the ids both had judged, with a "
                   "paired bootstrap 95% CI that resamples patients (or recordings). An "
                   "interval that excludes 0 is a difference the sample supports.")
        lines += ["## Table 3: paired judge differences between models", "", caption, "",
                  table3_markdown(report), ""]
    if report.calibration:
        lines += ["## Table 4: calibration of the option probabilities", "",
                  calibration_caption(report), ""]
        if report.calibration_note:
            lines += [f"**Note:** {report.calibration_note}", ""]
        lines += [table4_markdown(report), ""]
        abstaining = table5_markdown(report)
        if abstaining.count("\n") > 1:
            lines += ["## Table 5: abstention", "",
                      ("Each model answers only when its (temperature-scaled) top probability "
                       "reaches the threshold; coverage is the share answered."), "",
                      abstaining, ""]
    if report.claims:
        lines += ["## Table 6: explanations checked against the signal", "",
                  claims_caption(report), ""]
        if report.claims_note:
            lines += [f"**Note:** {report.claims_note}", ""]
        lines += [table6_markdown(report), ""]
        for model, agreement in sorted(report.judge_agreement.items()):
            cells = []
            for key, words in (("factual_accuracy", "factual accuracy"),
                               ("hallucination", "hallucination")):
                cells.append(f"{words} {_fmt_ci(agreement.get(key), agreement['ci'].get(key), 2)}")
            lines += [f"- `{model}`: Spearman's rho between the judge's scores and the "
                      f"contradicted share of the explanation's checkable claims over "
                      f"{agreement['n']} explanations: " + "; ".join(cells) + "."]
        if report.judge_agreement:
            lines += [""]
        if any(report.claim_examples.values()):
            lines += ["Examples (contradicted claims in bold, with the measured value):", ""]
            for model, examples in sorted(report.claim_examples.items()):
                for ex in examples:
                    lines.append(f"- `{model}` on `{ex['sample_id']}`: "
                                 + marked_explanation(ex["text"][:600], ex["verdicts"]))
            lines += [""]
    if report.controls:
        caption = ("Does the model read the ECG? Table 1's questions asked again with no image "
                   "(text_only: what the language model alone gets), with a blank "
                   "page (the same layout, grid and labels, no trace) and with the printout of "
                   "another sample of the data set whose correct finding is not among the "
                   "options. \"Printout minus control\" is the paired accuracy difference on the "
                   "same samples with a 95% bootstrap interval resampling patients (or "
                   "recordings); printout minus blank is the model's image reliance.")
        lines += ["## Table 7: does it read the ECG?", "", caption, ""]
        if report.controls_note:
            lines += [f"**Note:** {report.controls_note}", ""]
        lines += [table7_markdown(report), ""]
    if report.robustness or report.robustness_note:
        caption = ("Robust to printout artefacts? Table 1's questions asked again with each "
                   "sample's printout re-rendered from its signal with one artefact at one "
                   "strength (seeded per sample), or in the study's ecg_plot style (a "
                   "different printer). \"Drop\" is clean minus artefact accuracy on the same "
                   "samples, with a 95% paired bootstrap interval resampling patients (or "
                   "recordings); the ECE is that of the option probabilities (equal-mass bins).")
        lines += ["## Table 8: robust to printout artefacts?", "", caption, ""]
        if report.robustness_note:
            lines += [f"**Note:** robustness sweep {report.robustness_note}", ""]
        if report.robustness:
            lines += [table8_markdown(report), ""]
    if report.unavailable:
        lines += ["## Models not evaluated", ""]
        lines += [f"- `{m}`: {why}" for m, why in sorted(report.unavailable.items())]
        lines += [""]
    lines += ["## Run", ""]
    for key in ("models", "endpoint", "judge_model", "judge_base_url", "rubric_version",
                "prompt_version", "bootstrap_seed", "judge_seed", "n_boot", "split",
                "git_sha", "wall_s", "throughput_ecg_per_s"):
        if key in meta:
            lines.append(f"- {key}: `{json.dumps(meta[key]) if not isinstance(meta[key], str) else meta[key]}`")
    counts = meta.get("counts")
    if counts:
        lines += ["", "Counts per model and answer mode:", ""]
        header = ["Model", "Answer mode", "Predictions", "Unparseable", "Request errors",
                  "Resumed"]
        rows = [
            [m, mode, str(c.get("n", 0)), str(c.get("unparseable", 0)), str(c.get("errors", 0)),
             str(c.get("resumed", 0))]
            for m, per_mode in sorted(counts.items()) for mode, c in sorted(per_mode.items())
        ]
        lines += [_md_table(header, rows)]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    if meta.get("config"):
        import yaml

        lines += ["", "## Resolved config", "", "```yaml",
                  yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_confusions(report: EvalReport, out_dir: Path) -> list[Path]:
    """One PNG per model: a row-normalised confusion matrix per data set, counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for model in _ordered_models(report.metrics):
        per_ds = report.metrics[model]
        if model == PRIOR_MODEL or not per_ds:
            continue
        datasets = sorted(per_ds)
        size = max(max(len(per_ds[d].confusion_labels), 2) for d in datasets)
        ncols = min(3, len(datasets))
        nrows = -(-len(datasets) // ncols)
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(ncols * (0.6 * size + 2.2), nrows * (0.55 * size + 2.4)),
            squeeze=False,
        )
        for ax in axes.flat[len(datasets):]:
            ax.set_visible(False)
        for ax, dataset in zip(axes.flat, datasets):
            m = per_ds[dataset]
            counts = np.array(m.confusion, dtype=float)
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
            cols = [("unparse-\nable" if c.startswith("<") else c) for c in m.confusion_labels]
            ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(m.labels)), m.labels, fontsize=8)
            for i in range(counts.shape[0]):
                for j in range(counts.shape[1]):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.6 else "black")
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{dataset} (n={m.n}, bal. acc {m.balanced_accuracy:.2f})", fontsize=9)
        fig.suptitle(f"Confusion matrices: {model} (rows normalised)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97 if nrows > 1 else 0.93))
        path = out_dir / f"confusion_{_safe_name(model)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _grouped_bars(ax: Any, groups: list[str], series: list[tuple[str, list, list]], hatch_for=()):
    """Bars per group (x) and series (colour), each with its interval drawn from lo to hi.

    The interval is drawn as it is, not as error around the bar: a percentile interval
    need not contain its point estimate, and ``yerr`` cannot show that (it rejects negative
    lengths).
    """
    import numpy as np

    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, (name, values, cis) in enumerate(series):
        vals = np.array([np.nan if v is None else v for v in values], dtype=float)
        pos = x + (k - (len(series) - 1) / 2) * width
        ax.bar(pos, vals, width, label=name, hatch="//" if name in hatch_for else None,
               alpha=0.6 if name in hatch_for else 0.9)
        spans = [(p, c[0], c[1]) for p, v, c in zip(pos, values, cis) if c and v is not None]
        if spans:
            xs, los, his = (np.array(s, dtype=float) for s in zip(*spans))
            ax.vlines(xs, los, his, colors="black", linewidth=1)
            ax.hlines(np.concatenate([los, his]), np.concatenate([xs, xs]) - width * 0.15,
                      np.concatenate([xs, xs]) + width * 0.15, colors="black", linewidth=1)
    ax.set_xticks(x, groups, fontsize=8)


def plot_metric_bars(report: EvalReport, out_dir: Path) -> Path | None:
    """Table 1 as bars: one panel per metric, data sets on x, one bar per model, 95% CIs."""
    if not report.metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for per_ds in report.metrics.values() for d in per_ds})
    models = _ordered_models(report.metrics)
    # Few data sets: metrics side by side; many: one metric per row, so labels stay legible.
    stacked = len(datasets) > 3
    panel_w = min(16.0, max(3.2, 0.3 * len(datasets) * len(models) + 1.5))
    n = len(TABLE1_METRICS)
    fig, axes = plt.subplots(
        n if stacked else 1, 1 if stacked else n, sharey=True, squeeze=False,
        figsize=(panel_w, 2.8 * n + 0.6) if stacked else (panel_w * n + 1, 3.8),
    )
    axes = axes.flat
    for ax, metric in zip(axes, TABLE1_METRICS):
        series = []
        for model in models:
            ms = [report.metrics[model].get(d) for d in datasets]
            series.append((model, [getattr(m, metric) if m else None for m in ms],
                           [m.ci.get(metric) if m else None for m in ms]))
        _grouped_bars(ax, datasets, series, hatch_for=(PRIOR_MODEL,))
        if len(datasets) > 2:
            ax.tick_params(axis="x", labelrotation=30)
            for label in ax.get_xticklabels():
                label.set_ha("right")
        ax.set_title(_TITLES[metric], fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes = list(fig.axes)
    axes[0].set_ylabel("score (95% bootstrap CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(models), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if stacked else 0.9))
    path = out_dir / "metrics_bars.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_judge_bars(report: EvalReport, out_dir: Path) -> Path | None:
    """Table 2 as bars: one panel per data set, criteria on x, one bar per model, 95% CIs."""
    if not report.judge:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for per_ds in report.judge.values() for d in per_ds})
    models = _ordered_models(report.judge)
    ncols = min(3, len(datasets))
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 0.5, 3.4 * nrows + 0.6),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    labels = [_TITLES[c].replace(" ", "\n") + ("\n(lower better)" if c in LOWER_IS_BETTER else "")
              for c in CRITERIA]
    for ax, dataset in zip(axes.flat, datasets):
        series = []
        for model in models:
            entry = report.judge[model].get(dataset) or {}
            scores = [entry.get(c) for c in CRITERIA]
            series.append((model, [s["mean"] if s else None for s in scores],
                           [s["ci"] if s else None for s in scores]))
        _grouped_bars(ax, labels, series)
        ax.set_title(dataset, fontsize=10)
        ax.set_ylim(0, 5.3)
        ax.set_yticks(range(6))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("judge score 1-5 (95% CI)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(models), fontsize=8, frameon=False)
    fig.suptitle(f"Judge: {report.meta.get('judge_model', '')}", x=0.01, ha="left", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.4 * nrows + 0.6)))
    path = out_dir / "judge_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _calibration_panels(report: EvalReport, title: str) -> tuple[Any, Any, list[str]]:
    """A figure with one panel per data set of ``report.calibration``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for c in report.calibration.values() for d, e in c["datasets"].items()
                       if e["raw"] is not None})
    ncols = min(3, len(datasets))
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, axes, datasets


def _save_panels(fig: Any, axes: Any, datasets: list[str], labels: tuple[str, str], path: Path) -> Path:
    """Unit axes, titles, legends and grids on the panels of ``_calibration_panels``; save."""
    import matplotlib.pyplot as plt

    for ax, dataset in zip(axes.flat, datasets):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=labels[0], ylabel=labels[1], title=dataset)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(report: EvalReport, out_dir: Path) -> Path | None:
    """Reliability diagrams, one panel per data set: accuracy against mean confidence per
    equal-mass bin for each model, raw (solid) and temperature-scaled (dashed)."""
    if not any(e["raw"] for c in report.calibration.values() for e in c["datasets"].values()):
        return None

    fig, axes, datasets = _calibration_panels(report, "Reliability (equal-mass bins)")
    for ax, dataset in zip(axes.flat, datasets):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        for k, model in enumerate(sorted(report.calibration)):
            entry = report.calibration[model]["datasets"].get(dataset) or {}
            for kind, style in (("raw", "-"), ("scaled", "--")):
                m = entry.get(kind)
                if m is None:
                    continue
                label = model if kind == "raw" else f"{model}, T={m.temperature:.2f}"
                ax.plot([b["confidence"] for b in m.reliability], [b["accuracy"] for b in m.reliability],
                        style, marker="o", markersize=3, color=f"C{k}", label=label)
    return _save_panels(fig, axes, datasets, ("mean confidence", "accuracy"),
                        out_dir / "reliability.png")


def plot_risk_coverage(report: EvalReport, out_dir: Path) -> Path | None:
    """Risk-coverage curves, one panel per data set: the error rate of the answers kept as
    coverage grows from the most confident down, one line per model."""
    if not any(e["raw"] for c in report.calibration.values() for e in c["datasets"].values()):
        return None

    fig, axes, datasets = _calibration_panels(report, "Risk-coverage (raw probabilities)")
    for ax, dataset in zip(axes.flat, datasets):
        for k, model in enumerate(sorted(report.calibration)):
            m = (report.calibration[model]["datasets"].get(dataset) or {}).get("raw")
            if m is None:
                continue
            coverage, risk = zip(*m.risk_coverage)
            ax.step(coverage, risk, where="post", color=f"C{k}",
                    label=f"{model} (AURC {m.aurc:.3f})")
    return _save_panels(fig, axes, datasets, ("coverage", "risk (error rate)"),
                        out_dir / "risk_coverage.png")


def plot_claims(report: EvalReport, out_dir: Path) -> Path | None:
    """Table 6 as stacked bars: per data set, each model's claims split into supported,
    contradicted and unverifiable, with claims per explanation written next to them."""
    if not report.claims:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for per in report.claims.values() for d in per})
    models = sorted(report.claims)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(7.5, 0.45 * len(models) * len(datasets) + 1.2),
                             squeeze=False)
    colours = {"supported": "#4c9a2a", "contradicted": "#c0392b", "unverifiable": "#bbbbbb"}
    for ax, dataset in zip(axes[:, 0], datasets):
        names = [m for m in models if dataset in report.claims[m]]
        left = [0.0] * len(names)
        for kind, colour in colours.items():
            widths = [getattr(report.claims[m][dataset], kind) or 0.0 for m in names]
            ax.barh(names, widths, left=left, color=colour, label=kind)
            left = [a + b for a, b in zip(left, widths)]
        for y, m in enumerate(names):
            c = report.claims[m][dataset]
            ax.text(1.01, y, f"{c.claims_per_explanation:.1f}/expl.", va="center", fontsize=7)
        ax.set_xlim(0, 1.15)
        ax.set_title(dataset, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="lower right", bbox_to_anchor=(1.0, 1.05))
    axes[-1, 0].set_xlabel("share of claims")
    fig.tight_layout()
    path = out_dir / "claims.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_robustness(report: EvalReport, out_dir: Path) -> Path | None:
    """Accuracy against artefact strength, one panel per artefact, one line per model
    (pooled over data sets; strength 0 is the clean printout); printers (``ecg_plot``) as
    one more panel of bars."""
    from ecgvlm.evaluate.conditions import PRINTERS, strength_curve

    conditions = {c for per in report.robustness.values() for e in per.values()
                  for c in e if isinstance(e[c], dict)}
    if not conditions:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    artefacts = sorted({c.partition("@")[0] for c in conditions if "@" in c})
    printers = sorted(c for c in conditions if c in PRINTERS)
    panels = artefacts + (["printer"] if printers else [])
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.0, 3.6 * ncols), 3.4 * nrows),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    models = sorted(report.robustness)
    for ax, artefact in zip(axes.flat, artefacts):
        for k, model in enumerate(models):
            points = strength_curve(report.robustness[model], artefact)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        color=f"C{k}", label=model)
        ax.set(title=artefact, xlabel="strength (0: clean)", ylabel="accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if printers:
        ax = axes.flat[len(artefacts)]
        def pooled(model: str, condition: str, key: str) -> float:
            pairs = [(e[condition][key], e[condition]["n"])
                     for e in report.robustness[model].values() if condition in e]
            n = sum(c for _, c in pairs)
            return sum(a * c for a, c in pairs) / n if n else float("nan")

        series = [(model, [pooled(model, printers[0], "accuracy_normal")]
                   + [pooled(model, p, "accuracy") for p in printers]) for model in models]
        width = 0.8 / max(len(series), 1)
        for k, (model, values) in enumerate(series):
            ax.bar([i + k * width for i in range(len(values))], values, width, color=f"C{k}",
                   label=model)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(1 + len(printers))],
                      ["clean", *printers])
        ax.set(title="printer", ylabel="accuracy", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.suptitle("Re-rendered printouts, pooled over data sets", fontsize=9)
    fig.tight_layout()
    path = out_dir / "robustness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``run.json``, the plots and ``report.md`` into ``out_dir``.

    Returns:
        Name -> path of everything written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics_json(report), indent=2, sort_keys=True))
    written["metrics.json"] = path
    if report.generated:
        path = out / "metrics_generate.json"
        path.write_text(json.dumps(metrics_json(report, generated=True), indent=2, sort_keys=True))
        written["metrics_generate.json"] = path
    if report.claims:
        path = out / "claims.json"
        data = {"stats": {m: {d: c.to_json() for d, c in per.items()}
                          for m, per in report.claims.items()},
                "examples": report.claim_examples, "judge_agreement": report.judge_agreement,
                "note": report.claims_note}
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=list))
        written["claims.json"] = path
    if report.calibration:
        path = out / "calibration.json"
        path.write_text(json.dumps(calibration_json(report.calibration), indent=2, sort_keys=True))
        written["calibration.json"] = path
    path = out / "run.json"
    run = {**report.meta, "unavailable": report.unavailable, "judge_note": report.judge_note,
           "baseline_note": report.baseline_note, "chance": report.chance,
           "table1_answer_mode": report.answer_mode, "generated_note": report.generated_note,
           "calibration_note": report.calibration_note, "controls_note": report.controls_note,
           "robustness_note": report.robustness_note}
    path.write_text(json.dumps(run, indent=2, sort_keys=True, default=str))
    written["run.json"] = path
    plots: list[Path] = []
    failures: list[str] = []
    for plot in (plot_confusions, plot_metric_bars, plot_judge_bars, plot_reliability,
                 plot_risk_coverage, plot_claims, plot_robustness):
        try:
            made = plot(report, out)
        except Exception as e:  # noqa: BLE001 - named in report.md; the tables still count
            failures.append(f"{plot.__name__}: {type(e).__name__}: {e}")
            continue
        plots += made if isinstance(made, list) else ([made] if made is not None else [])
    for p in plots:
        written[p.name] = p
    path = out / "report.md"
    text = report_markdown(report, [str(p) for p in plots])
    if failures:
        text += "\n## Plots that failed\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    path.write_text(text)
    written["report.md"] = path
    return written


def console_tables(report: EvalReport) -> str:
    """The tables as the CLI prints them at the end of a run."""
    text = f"Table 1: classification, {_MODE_WORDS[report.answer_mode]} (value [95% CI])\n"
    if report.baseline_note:
        text += f"Blind baseline: {report.baseline_note}\n"
    text += table1_markdown(report) + "\n\nTable 2: judge scores (mean [95% CI])\n"
    if report.judge_note:
        text += f"Note: {report.judge_note}\n"
    text += table2_markdown(report) + "\n"
    if report.judge_pairs:
        text += "\nTable 3: paired judge differences (mean [95% CI])\n" + table3_markdown(report) + "\n"
    if report.calibration:
        text += "\nTable 4: calibration of the option probabilities (value [95% CI])\n"
        if report.calibration_note:
            text += f"Note: {report.calibration_note}\n"
        text += table4_markdown(report) + "\n"
    if report.claims:
        text += "\nTable 6: explanations checked against the signal (value [95% CI])\n"
        if report.claims_note:
            text += f"Note: {report.claims_note}\n"
        text += table6_markdown(report) + "\n"
    if report.controls:
        text += "\nTable 7: does it read the ECG? (paired accuracy differences [95% CI])\n"
        text += table7_markdown(report) + "\n"
    if report.robustness or report.robustness_note:
        text += "\nTable 8: robust to printout artefacts? (paired accuracy drops [95% CI])\n"
        if report.robustness_note:
            text += f"Note: robustness sweep {report.robustness_note}\n"
        if report.robustness:
            text += table8_markdown(report) + "\n"
    return text

