"""ecgvlm.measure on synthetic ECGs with known rate, axis, ST and T, and on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ecgvlm.config import ConfigError
from ecgvlm.measure import MeasureConfig, Measurements, measure_record
from ecgvlm.records import EcgRecord

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Frontal-plane angle of each limb lead (hexaxial system), degrees.
LIMB_ANGLE_DEG = {"I": 0, "II": 60, "III": 120, "aVR": -150, "aVL": -30, "aVF": 90}
# Precordial leads: a fixed gain on the same waveform (their axis is not frontal).
PRECORDIAL_GAIN = {"V1": -0.6, "V2": -0.3, "V3": 0.4, "V4": 0.9, "V5": 1.0, "V6": 0.8}


def _bump(t: np.ndarray, centre_s: float, width_s: float, amp_mv: float) -> np.ndarray:
    return amp_mv * np.exp(-0.5 * ((t - centre_s) / width_s) ** 2)


def synthetic_ecg(
    rate_bpm: float = 60.0,
    axis_deg: float = 60.0,
    fs_hz: float = 500.0,
    duration_s: float = 10.0,
    rr_s: list[float] | None = None,
    st_mv: dict[str, float] | None = None,
    t_sign: dict[str, float] | None = None,
    noise_mv: float = 0.01,
    seed: int = 0,
) -> EcgRecord:
    """A 12-lead ECG whose frontal QRS vector points at ``axis_deg``.

    Each beat is a P, Q, R, S and T made of Gaussian bumps; limb leads see the waveform
    scaled by the cosine between the lead and the axis (so the axis measured from I and aVF
    is ``axis_deg``); ``st_mv`` adds a plateau from J to the T wave in named leads and
    ``t_sign`` flips (-1) or flattens (0) their T wave.
    """
    rng = np.random.default_rng(seed)
    n = int(duration_s * fs_hz)
    t = np.arange(n) / fs_hz
    if rr_s is None:
        rr_s = [60.0 / rate_bpm] * int(duration_s * rate_bpm / 60.0 + 2)
    beats = 0.4 + np.concatenate([[0.0], np.cumsum(rr_s)])
    beats = beats[beats < duration_s - 0.45]
    qrs = np.zeros(n)
    p_t = np.zeros(n)
    t_wave = np.zeros(n)
    plateau = np.zeros(n)
    for b in beats:
        p_t += _bump(t, b - 0.16, 0.02, 0.15)
        qrs += (
            _bump(t, b - 0.025, 0.008, -0.1)
            + _bump(t, b, 0.01, 1.2)
            + _bump(t, b + 0.03, 0.01, -0.25)
        )
        # QT shortens with rate (Bazett): the T peak sits 0.28 s after R at 60 bpm.
        rr_here = float(np.median(rr_s))
        t_wave += _bump(t, b + 0.28 * math.sqrt(rr_here), 0.045, 0.3)
        plateau += ((t > b + 0.05) & (t < b + 0.2)).astype(float)
    signal = np.zeros((n, len(LEADS)))
    for j, lead in enumerate(LEADS):
        gain = (
            math.cos(math.radians(LIMB_ANGLE_DEG[lead] - axis_deg))
            if lead in LIMB_ANGLE_DEG
            else PRECORDIAL_GAIN[lead]
        )
        tsg = (t_sign or {}).get(lead, 1.0)
        signal[:, j] = gain * qrs + abs(gain) * p_t + abs(gain) * tsg * t_wave
        signal[:, j] += (st_mv or {}).get(lead, 0.0) * plateau
        signal[:, j] += 0.1 * np.sin(2 * np.pi * 0.2 * t) + rng.normal(0.0, noise_mv, n)
    return EcgRecord("synthetic/test", "synthetic", signal.astype(np.float32), fs_hz, LEADS)


@pytest.mark.parametrize("rate_bpm", [48.0, 100.0])
def test_rate_and_regular_rhythm(rate_bpm: float) -> None:
    m = measure_record(synthetic_ecg(rate_bpm=rate_bpm))
    assert m.heart_rate_bpm == pytest.approx(rate_bpm, abs=1.0)
    assert m.rr_mean_ms == pytest.approx(60000.0 / rate_bpm, abs=10.0)
    assert m.rr_irregular is False
    assert m.premature_beats == 0
    assert m.p_wave_fraction is not None and m.p_wave_fraction >= 0.8
    assert m.pr_ms is not None and 100 <= m.pr_ms <= 260
    assert m.qrs_ms is not None and 50 <= m.qrs_ms <= 140
    assert m.qt_ms is not None and 300 <= m.qt_ms <= 480
    rr_s = m.rr_mean_ms / 1000.0
    assert m.qtc_bazett_ms == pytest.approx(m.qt_ms / math.sqrt(rr_s), abs=0.2)
    assert m.qtc_fridericia_ms == pytest.approx(m.qt_ms / rr_s ** (1 / 3), abs=0.2)


@pytest.mark.parametrize("axis_deg", [-45.0, 60.0, 120.0])
def test_qrs_axis(axis_deg: float) -> None:
    m = measure_record(synthetic_ecg(axis_deg=axis_deg))
    assert m.qrs_axis_deg == pytest.approx(axis_deg, abs=8.0)


def test_axis_from_two_limb_leads_when_others_are_flat() -> None:
    rec = synthetic_ecg(axis_deg=-45.0)
    sig = rec.signal_mv.copy()
    for lead in ("I", "aVF", "aVR", "aVL"):
        sig[:, LEADS.index(lead)] = 0.0
    m = measure_record(EcgRecord("x/y", "x", sig, rec.fs_hz, LEADS))
    assert m.lead("I").quality == "flat"
    assert m.qrs_axis_deg == pytest.approx(-45.0, abs=10.0)


def test_irregular_rhythm_and_single_premature_beat() -> None:
    rng = np.random.default_rng(3)
    irregular = measure_record(synthetic_ecg(rr_s=list(rng.uniform(0.45, 1.1, 20))))
    assert irregular.rr_irregular is True
    assert irregular.rr_irregularity > 0.15
    one_early = [0.8] * 5 + [0.5, 1.1] + [0.8] * 5
    m = measure_record(synthetic_ecg(rr_s=one_early))
    assert m.premature_beats == 1
    assert m.rr_irregular is False


def test_st_deviation_and_t_polarity_per_lead() -> None:
    m = measure_record(
        synthetic_ecg(st_mv={"V2": 0.25, "V5": -0.15}, t_sign={"V3": -1.0, "V6": 0.0})
    )
    assert m.lead("V2").st_deviation_mv == pytest.approx(0.25, abs=0.06)
    assert m.lead("V5").st_deviation_mv == pytest.approx(-0.15, abs=0.06)
    assert abs(m.lead("II").st_deviation_mv) < 0.06
    assert m.lead("V3").t_polarity == "negative"
    assert m.lead("II").t_polarity == "positive"
    assert m.lead("V6").t_polarity == "flat"
    assert m.lead("V5").qrs_amplitude_mv == pytest.approx(1.55, abs=0.3)


@pytest.mark.parametrize("fs_hz", [250.0, 1000.0])
def test_any_sampling_rate(fs_hz: float) -> None:
    m = measure_record(synthetic_ecg(rate_bpm=70.0, axis_deg=30.0, fs_hz=fs_hz))
    assert m.heart_rate_bpm == pytest.approx(70.0, abs=1.0)
    assert m.qrs_axis_deg == pytest.approx(30.0, abs=8.0)
    assert m.qt_ms is not None


def _with(rec: EcgRecord, sig: np.ndarray, leads: tuple[str, ...] | None = None) -> EcgRecord:
    return EcgRecord(rec.record_id, rec.dataset, sig, rec.fs_hz, leads or rec.leads)


def test_flat_record_gives_none_with_reasons() -> None:
    rec = synthetic_ecg()
    m = measure_record(_with(rec, np.zeros_like(rec.signal_mv)))
    assert m.heart_rate_bpm is None and m.qrs_ms is None and m.qrs_axis_deg is None
    assert m.n_beats == 0
    assert "no usable lead" in m.reasons["heart_rate_bpm"]
    assert all(lm.quality == "flat" for lm in m.leads)


def test_saturated_and_nan_leads_are_left_out_the_rest_measured() -> None:
    rec = synthetic_ecg(rate_bpm=80.0)
    sig = rec.signal_mv.copy()
    sig[:, LEADS.index("V4")] = np.clip(sig[:, LEADS.index("V4")] * 20.0, -1.0, 1.0)
    sig[1000:1400, LEADS.index("V1")] = np.nan
    m = measure_record(_with(rec, sig))
    assert m.lead("V4").quality == "saturated"
    assert m.lead("V1").quality == "nan_gap"
    assert "nan gap" in m.reasons["lead:V1"]
    assert m.heart_rate_bpm == pytest.approx(80.0, abs=1.0)
    assert m.qt_ms is not None


def test_all_nan_and_all_saturated() -> None:
    rec = synthetic_ecg()
    m = measure_record(_with(rec, np.full_like(rec.signal_mv, np.nan)))
    assert m.heart_rate_bpm is None and "nan_gap" in m.reasons["heart_rate_bpm"]
    m = measure_record(_with(rec, np.sign(rec.signal_mv - np.median(rec.signal_mv, axis=0)) * 5.0))
    assert m.heart_rate_bpm is None


def test_one_lead_gets_rate_not_intervals() -> None:
    rec = synthetic_ecg(rate_bpm=65.0)
    m = measure_record(_with(rec, rec.signal_mv[:, 1:2], ("II",)))
    assert m.heart_rate_bpm == pytest.approx(65.0, abs=1.0)
    assert m.qrs_ms is None and m.qrs_axis_deg is None
    assert "usable leads" in m.reasons["qrs_ms"]


def test_fewer_than_three_beats() -> None:
    rec = synthetic_ecg(rate_bpm=40.0)
    m = measure_record(_with(rec, rec.signal_mv[:1500]))
    assert m.heart_rate_bpm is None
    assert "fewer than 3" in m.reasons["heart_rate_bpm"]


def test_pure_noise_does_not_raise() -> None:
    rng = np.random.default_rng(0)
    rec = synthetic_ecg()
    m = measure_record(_with(rec, rng.normal(0, 0.5, rec.signal_mv.shape).astype(np.float32)))
    assert isinstance(m, Measurements)


def test_json_round_trip() -> None:
    m = measure_record(synthetic_ecg(st_mv={"V2": 0.2}))
    again = Measurements.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="min_beats"):
        MeasureConfig(min_beats=1)
    with pytest.raises(ConfigError, match="delineation_leads"):
        MeasureConfig(delineation_leads=())


def test_import_is_light() -> None:
    code = (
        "import sys, ecgvlm.measure;"
        "bad = [m for m in ('torch', 'ray', 'neurokit2') if m in sys.modules];"
        "print(', '.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("dataset", ["chapman_shaoxing", "mitdb", "ptbdb"])
def test_clean_leads_is_neurokit2_ecg_clean_to_the_bit(shared_ecg_dir, dataset: str) -> None:
    """The measure stage's one-call cleaning reproduces ecg_clean lead by lead exactly, on real
    records at 500, 360 and 1000 Hz (the notch's tap count follows the rate)."""
    import neurokit2

    from ecgvlm.measure.core import clean_leads
    from ecgvlm.signal import find_record_paths, read_record

    rec = read_record(find_record_paths(shared_ecg_dir / dataset)[0])
    signal = rec.signal_mv[:20_000]
    reference = np.column_stack([
        neurokit2.ecg_clean(signal[:, j].astype(np.float64), sampling_rate=rec.fs_hz)
        for j in range(signal.shape[1])
    ])
    np.testing.assert_array_equal(clean_leads(signal, rec.fs_hz), reference)


@pytest.mark.parametrize("fs_hz", [80.0, 128.0])
def test_clean_leads_at_low_rates_follows_ecg_clean(fs_hz: float) -> None:
    # Below 100 Hz ecg_clean's mains filter is a 2-tap average; at 128 Hz int(128 / 50) = 2.
    import neurokit2

    from ecgvlm.measure.core import clean_leads

    signal = synthetic_ecg(fs_hz=fs_hz).signal_mv[:, :3]
    reference = np.column_stack([
        neurokit2.ecg_clean(signal[:, j].astype(np.float64), sampling_rate=fs_hz)
        for j in range(3)
    ])
    np.testing.assert_array_equal(clean_leads(signal, fs_hz), reference)
