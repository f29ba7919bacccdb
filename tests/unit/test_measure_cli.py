"""``ecgvlm measure`` and ``ecgvlm datasets audit`` on the shared records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecgvlm.cli import main

# The staged set through the suite's one fixture for it (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_ecg_dir")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ecg"


def test_measure_prints_table_and_label_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", str(DATA / "chapman_shaoxing" / "JS00002")]) == 0
    out = capsys.readouterr().out
    assert "heart_rate_bpm    52 bpm" in out
    assert "SB: consistent; heart_rate_bpm < 60: met" in out
    assert out.count(" ok ") == 12


def test_measure_window_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(DATA / "mitdb" / "100")
    assert main(["measure", path, "--start-s", "60", "--duration-s", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 60 <= data["heart_rate_bpm"] <= 90
    assert data["qrs_ms"] is None and "usable leads" in data["reasons"]["qrs_ms"]


def test_measure_bad_window_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", str(DATA / "chapman_shaoxing" / "JS00002"), "--start-s", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--start-s 99" in err
    # 0 once measured the whole record, and a negative length blamed --start-s.
    for duration in ("0", "-5"):
        assert main(["measure", str(DATA / "chapman_shaoxing" / "JS00002"),
                     "--duration-s", duration]) == 2
        assert capsys.readouterr().err == (
            f"ecgvlm measure: error: --duration-s must be more than 0 seconds, got {duration}\n")


def test_audit_counts_per_label(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "audit", str(DATA / "chapman_shaoxing")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("14 records audited (0 unreadable)")
    sb = next(line for line in out.splitlines() if line.startswith("SB "))
    consistent, contradicted, not_measurable = (int(x) for x in sb.split()[1:])
    assert consistent >= 2 and consistent + contradicted + not_measurable == 3
    # JS20000 is labelled a non-specific intraventricular block with a narrow QRS.
    assert "JS20000  NSIVCB: inconsistent; qrs_ms > 110: not met (measured" in out
