"""Grounded training targets: make_mcq cites the record's own measurements."""

from __future__ import annotations

import numpy as np

from ecgvlm.knowledge import knowledge
from ecgvlm.mcq import McqConfig, make_mcq
from ecgvlm.measure import LeadMeasurements, Measurements, grounded_text
from ecgvlm.records import EcgRecord

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def _record(labels: tuple[str, ...]) -> EcgRecord:
    return EcgRecord("t/1", "cpsc2018", np.zeros((5000, 12), np.float32), 500.0, LEADS, labels)


def _sb(rate: float) -> Measurements:
    leads = tuple(LeadMeasurements(n, "ok", 0.0, "positive", 1.0) for n in LEADS)
    return Measurements(
        "t/1",
        heart_rate_bpm=rate,
        n_beats=8,
        p_wave_fraction=1.0,
        pr_ms=168.0,
        qrs_ms=92.0,
        qt_ms=440.0,
        qtc_bazett_ms=395.0,
        leads=leads,
    )


def test_grounded_text_cites_values() -> None:
    text = grounded_text("SB", _sb(48.0))
    assert text == (
        "Ventricular rate 48 bpm; a P wave before 100% of QRS complexes. "
        "PR 168 ms; QRS 92 ms; QT 440 ms, QTc (Bazett) 395 ms."
    )


def test_no_grounding_when_contradicted_or_unmeasurable() -> None:
    assert grounded_text("SB", _sb(95.0)) is None
    assert grounded_text("SB", Measurements("t/1")) is None
    assert grounded_text("MI", _sb(48.0)) is None  # no measurable criteria


def test_make_mcq_grounds_the_target() -> None:
    rec = _record(("SB",))
    generic = make_mcq(rec, 0, McqConfig())
    grounded = make_mcq(rec, 0, McqConfig(), measurements=_sb(48.0))
    assert knowledge("SB").description in generic.target_text
    assert "Ventricular rate 48 bpm" in grounded.target_text
    assert knowledge("SB").description not in grounded.target_text
    # Only the explanation changes: same options, same answer.
    assert grounded.options == generic.options and grounded.answer_letter == generic.answer_letter
    assert grounded.target_text.startswith(f"The answer is {grounded.answer_letter}.")


def test_fallbacks_keep_the_generic_text() -> None:
    rec = _record(("SB",))
    generic = make_mcq(rec, 0, McqConfig()).target_text
    assert (
        make_mcq(rec, 0, McqConfig(grounded_targets=False), measurements=_sb(48.0)).target_text
        == generic
    )
    assert make_mcq(rec, 0, McqConfig(), measurements=_sb(95.0)).target_text == generic


def test_prepare_shard_stores_measurements_and_grounded_targets(tmp_path) -> None:
    """build_shard (what each Ray task runs), called directly: no Ray needed."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from ecgvlm.dataset import PrepareConfig, SourceConfig, build_shard

    samples = Path(__file__).resolve().parents[2] / "data" / "samples" / "chapman_shaoxing"
    units = [
        {"path": str(samples / name), "dataset": "chapman_shaoxing",
         "record_id": f"chapman_shaoxing/{name}", "patient_id": name, "labels": list(labels),
         "start_s": 0.0, "windowed": False}
        for name, labels in (("JS00002", ("SB", "TAb")),)
    ]
    config = PrepareConfig(sources=(SourceConfig(str(samples)),), output_dir=str(tmp_path))
    spec = {"units": json.dumps(units), "split": "train", "shard": "train/part-00000"}
    summary = build_shard(spec, config, str(tmp_path), "test-id")
    assert summary["n_samples"] == 1 and "measure_s" in summary["timing"]
    (row,) = pq.read_table(tmp_path / "train" / "part-00000.parquet").to_pylist()
    m = Measurements.from_dict(json.loads(row["measurements"]))
    assert 50 <= m.heart_rate_bpm <= 54
    assert row["option_labels"][row["answer_index"]] == "SB"
    assert f"Ventricular rate {m.heart_rate_bpm:.0f} bpm" in row["target_text"]
