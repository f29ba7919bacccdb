"""Structured criteria in the knowledge base and check_finding against Measurements."""

from __future__ import annotations

import dataclasses

import pytest

from ecgvlm import knowledge as kn
from ecgvlm.measure import LeadMeasurements, Measurements, check_finding
from ecgvlm.measure.core import VALUE_FIELDS

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def _m(st: dict[str, float] | None = None, **values) -> Measurements:
    leads = tuple(LeadMeasurements(n, "ok", (st or {}).get(n, 0.0), "positive", 1.0) for n in LEADS)
    return Measurements("t/1", leads=leads, **values)


def test_measure_names_agree_with_the_measurer() -> None:
    assert kn.RECORD_MEASURES == VALUE_FIELDS
    lead_fields = {f.name for f in dataclasses.fields(LeadMeasurements)}
    assert set(kn.LEAD_MEASURES) <= lead_fields


def test_measurable_findings_have_criteria() -> None:
    kb = kn.knowledge_base()
    for abbrev in (
        "SB",
        "STach",
        "AF",
        "IAVB",
        "LBBB",
        "RBBB",
        "LAD",
        "RAD",
        "LQT",
        "STE",
        "STD",
        "LQRSV",
    ):
        assert kb[abbrev].criteria, abbrev
    assert not kb["MI"].criteria


def test_sinus_bradycardia() -> None:
    ok = check_finding("SB", _m(heart_rate_bpm=48.0, p_wave_fraction=1.0))
    assert ok.verdict == "consistent"
    bad = check_finding("SB", _m(heart_rate_bpm=95.0, p_wave_fraction=1.0))
    assert bad.verdict == "inconsistent"
    assert "heart_rate_bpm < 60: not met (measured 95.0)" in bad.summary()
    none = check_finding("SB", Measurements("t/2", reasons={"heart_rate_bpm": "2 beats found"}))
    assert none.verdict == "not_measurable"
    assert "2 beats found" in none.summary()


def test_partly_measured_is_consistent_when_nothing_fails() -> None:
    check = check_finding("SB", _m(heart_rate_bpm=50.0))
    assert check.verdict == "consistent"
    assert [r.met for r in check.results] == [True, None]


def test_per_lead_criterion_counts_leads() -> None:
    assert check_finding("STE", _m(st={"V2": 0.25, "V3": 0.2})).verdict == "consistent"
    assert check_finding("STE", _m(st={"V2": 0.25})).verdict == "inconsistent"
    unmeasured = Measurements("t/3", leads=tuple(LeadMeasurements(n, "flat") for n in LEADS))
    result = check_finding("STE", unmeasured)
    assert result.verdict == "not_measurable"
    assert "not measured in I" in result.summary()


def test_axis_window() -> None:
    assert check_finding("LAD", _m(qrs_axis_deg=-50.0)).verdict == "consistent"
    assert check_finding("LAD", _m(qrs_axis_deg=10.0)).verdict == "inconsistent"
    assert check_finding("RAD", _m(qrs_axis_deg=120.0)).verdict == "consistent"


def test_unknown_finding() -> None:
    with pytest.raises(KeyError, match="XYZ"):
        check_finding("XYZ", _m())


def test_bad_criteria_are_named() -> None:
    with pytest.raises(kn.KnowledgeError, match=r"SB.criteria\[0\]: measure 'rate'"):
        kn._criteria({"criteria": [{"measure": "rate", "op": "<", "value": 60}]}, "SB")
