"""The measurer: lead quality, fused R peaks, global wave boundaries, and the values from them.

Steps, for one record:

1. Lead quality: a lead with NaN/inf samples, a flat trace or a saturated one is not used.
2. Each usable lead is cleaned with neurokit2's ``ecg_clean`` filters (its default high-pass and
   mains notch; ``clean_leads`` designs them once per rate) and neurokit2 finds R peaks in it (``ecg_findpeaks``). With three or more usable leads they vote: a beat
   is kept where a strict majority saw a peak within ``peak_tolerance_ms``; with one or two,
   the first usable lead's peaks are used. Peaks closer than 200 ms are one QRS, and a peak
   whose steepest multi-lead slope is under ``min_slope_share`` of the median beat's is a T
   or P wave, not a QRS, and is dropped.
3. Global QRS onset and offset come from the spatial slope (the sum over usable leads of the
   absolute first difference): the contiguous region around each R peak where that slope stays
   above ``qrs_slope_fraction`` of its peak. Using all leads at once gives the earliest onset
   and latest offset that any lead shows, which is how the CSE committee defined global
   boundaries, without letting one noisy lead's outlier decide.
4. neurokit2's DWT delineator finds P onset, P offset and T offset in the ``delineation_leads``
   (the first of them that is usable); where several are given, the earliest onset and the
   latest offset over them are kept.
5. Values: medians over beats (robust to one mis-delineated beat), per-lead amplitudes
   against each beat's own PR-segment baseline.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ecgvlm.config import ConfigError, check_range
from ecgvlm.records import EcgRecord

# Bump when a change alters any measured value; prepared data sets record it in their manifest.
MEASURE_VERSION = "1"

QUALITY_OK = "ok"
# No two ventricular beats are closer than this (300 bpm); closer peaks are one QRS.
REFRACTORY_MS = 200.0
T_POLARITIES = ("positive", "negative", "flat")

# Standard limb-lead names, for the frontal axis; aVF is derived from II and I when absent.
_AXIS_LEADS = ("I", "II", "III", "aVF")


@dataclass(frozen=True)
class MeasureConfig:
    """How the measurer works; the defaults are the values validated in docs/measure.md.

    Attributes:
        min_beats: Fewer fused beats than this and nothing beat-based is measured.
        flat_range_mv: A lead whose peak-to-peak range is below this is flat (unused).
        saturated_fraction: A lead with more than this share of its samples pinned at its own
            maximum or minimum is saturated (clipped by the amplifier; unused).
        peak_tolerance_ms: R peaks of different leads within this distance are one beat.
        premature_fraction: A beat whose preceding RR is below this share of the median RR of
            its neighbourhood (five RRs) is premature.
        rr_irregular_threshold: ``rr_irregularity`` above this means ``rr_irregular``.
        qrs_slope_fraction: Share of the QRS peak spatial slope (above the record's baseline
            slope) that bounds the QRS.
        min_slope_share: A detected R peak whose steepest spatial slope is below this share
            of the median beat's is dropped (a T or P wave, not a QRS).
        delineation_leads: Leads the DWT delineator runs on for P and T, in preference order
            (the record's other usable leads follow, in their order).
        delineation_max_leads: How many usable leads to delineate and fuse (earliest P
            onset, latest P and T offset).
        st_offset_ms: Where ST deviation is read, after the J point (QRS offset).
        t_flat_mv: A T wave whose largest excursion from baseline is below this is flat.
        min_leads_for_intervals: Global intervals need this many usable leads.
        delineate_waves: Whether to run the DWT delineation of P and T (most of the cost).
            Off, only rate, rhythm without ``p_wave_fraction``, QRS duration and axis are
            measured.
    """

    min_beats: int = 3
    flat_range_mv: float = 0.05
    saturated_fraction: float = 0.02
    peak_tolerance_ms: float = 60.0
    premature_fraction: float = 0.8
    rr_irregular_threshold: float = 0.08
    qrs_slope_fraction: float = 0.04
    min_slope_share: float = 0.3
    delineation_leads: tuple[str, ...] = ("II", "V5", "I", "aVF", "V2", "MLII")
    delineation_max_leads: int = 3
    st_offset_ms: float = 60.0
    t_flat_mv: float = 0.1
    min_leads_for_intervals: int = 3
    delineate_waves: bool = True

    def __post_init__(self) -> None:
        check_range("min_beats", self.min_beats, 2, None)
        check_range("flat_range_mv", self.flat_range_mv, 0.0, None)
        check_range("saturated_fraction", self.saturated_fraction, 0.0, 1.0)
        check_range("peak_tolerance_ms", self.peak_tolerance_ms, 1.0, 200.0)
        check_range("premature_fraction", self.premature_fraction, 0.1, 1.0)
        check_range("rr_irregular_threshold", self.rr_irregular_threshold, 0.0, None)
        check_range("qrs_slope_fraction", self.qrs_slope_fraction, 0.01, 0.9)
        check_range("min_slope_share", self.min_slope_share, 0.0, 1.0)
        check_range("delineation_max_leads", self.delineation_max_leads, 1, 12)
        check_range("st_offset_ms", self.st_offset_ms, 0.0, 200.0)
        check_range("t_flat_mv", self.t_flat_mv, 0.0, None)
        check_range("min_leads_for_intervals", self.min_leads_for_intervals, 1, 12)
        if not self.delineation_leads:
            raise ConfigError("delineation_leads must name at least one lead")
        object.__setattr__(self, "delineation_leads", tuple(self.delineation_leads))


@dataclass(frozen=True)
class LeadMeasurements:
    """What is measured in one lead.

    Attributes:
        lead: Lead name as in the record.
        quality: ``"ok"``, ``"nan_gap"``, ``"flat"`` or ``"saturated"``.
        st_deviation_mv: Median over beats of the signal at J+``st_offset_ms`` minus the
            PR-segment baseline (the 40 ms before QRS onset); None where not measurable.
        t_polarity: ``"positive"``, ``"negative"`` or ``"flat"``; None where not measurable.
        qrs_amplitude_mv: Median over beats of the QRS peak-to-peak amplitude.
    """

    lead: str
    quality: str
    st_deviation_mv: float | None = None
    t_polarity: str | None = None
    qrs_amplitude_mv: float | None = None


# Value fields of Measurements, in table order (units in the names).
VALUE_FIELDS = (
    "heart_rate_bpm",
    "rr_mean_ms",
    "rr_sd_ms",
    "rr_irregularity",
    "rr_irregular",
    "n_beats",
    "premature_beats",
    "p_wave_fraction",
    "pr_ms",
    "qrs_ms",
    "qt_ms",
    "qtc_bazett_ms",
    "qtc_fridericia_ms",
    "qrs_axis_deg",
)


@dataclass(frozen=True)
class Measurements:
    """The measurements of one record. Every value may be None; ``reasons`` then says why.

    Attributes:
        record_id: The measured record.
        heart_rate_bpm: Ventricular rate, 60000 / ``rr_mean_ms``.
        rr_mean_ms: Mean RR interval.
        rr_sd_ms: Standard deviation of the RR intervals.
        rr_irregularity: Median absolute difference of successive RR intervals divided by
            the median RR (a robust normalised RMSSD: one ectopic beat moves only two of the
            differences, so it does not make a sinus rhythm irregular).
        rr_irregular: ``rr_irregularity`` above the configured threshold.
        n_beats: Beats found (fused over leads).
        premature_beats: Beats whose preceding RR is below the configured share of the local
            median RR.
        p_wave_fraction: Share of beats with a P wave before the QRS at a consistent PR
            (within 40 ms of the median PR): chaotic atrial activity gives no such P.
        pr_ms: PR interval (global P onset to global QRS onset), median over beats.
        qrs_ms: QRS duration (global onset to global offset), median over beats.
        qt_ms: QT interval (global QRS onset to T offset), median over beats.
        qtc_bazett_ms: QT / sqrt(RR in s).
        qtc_fridericia_ms: QT / cbrt(RR in s).
        qrs_axis_deg: Frontal QRS axis from the net QRS areas of leads I and aVF, in
            (-90, 270].
        leads: One LeadMeasurements per lead of the record.
        reasons: Value field (or ``"lead:<name>"``) -> why it is None / unused.
        version: ``MEASURE_VERSION`` of the code that measured.
    """

    record_id: str
    heart_rate_bpm: float | None = None
    rr_mean_ms: float | None = None
    rr_sd_ms: float | None = None
    rr_irregularity: float | None = None
    rr_irregular: bool | None = None
    n_beats: int = 0
    premature_beats: int | None = None
    p_wave_fraction: float | None = None
    pr_ms: float | None = None
    qrs_ms: float | None = None
    qt_ms: float | None = None
    qtc_bazett_ms: float | None = None
    qtc_fridericia_ms: float | None = None
    qrs_axis_deg: float | None = None
    leads: tuple[LeadMeasurements, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)
    version: str = MEASURE_VERSION

    def lead(self, name: str) -> LeadMeasurements | None:
        """The measurements of one lead, or None when the record has no such lead."""
        for lm in self.leads:
            if lm.lead == name:
                return lm
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_dict`` reverses it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurements:
        """Rebuild from ``to_dict`` output (e.g. the prepared data set's JSON column)."""
        kwargs = dict(data)
        kwargs["leads"] = tuple(LeadMeasurements(**lm) for lm in data.get("leads", ()))
        kwargs["reasons"] = dict(data.get("reasons", {}))
        return cls(**kwargs)


@dataclass(frozen=True)
class BeatMarks:
    """Global fiducial points of each beat, as sample indices (NaN where not found).

    Attributes:
        fs_hz: Sampling frequency the indices refer to.
        r: R peak of each beat (fused over leads), int.
        qrs_on, qrs_off: Global QRS onset and offset.
        p_on, p_off, t_off: P onset, P offset and T offset from the DWT delineation.
        used_leads: Indices of the leads that were usable.
        delineation_leads: Names of the leads P and T were delineated in.
    """

    fs_hz: float
    r: np.ndarray
    qrs_on: np.ndarray
    qrs_off: np.ndarray
    p_on: np.ndarray
    p_off: np.ndarray
    t_off: np.ndarray
    used_leads: tuple[int, ...]
    delineation_leads: tuple[str, ...]


def _ms(samples: float, fs_hz: float) -> float:
    return float(samples) * 1000.0 / fs_hz


def lead_quality(x: np.ndarray, config: MeasureConfig) -> str:
    """``"ok"``, ``"nan_gap"``, ``"flat"`` or ``"saturated"`` for one lead's samples (mV)."""
    if not np.all(np.isfinite(x)):
        return "nan_gap"
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < config.flat_range_mv:
        return "flat"
    eps = 1e-3 * (hi - lo)
    pinned = np.count_nonzero(x >= hi - eps) + np.count_nonzero(x <= lo + eps)
    if pinned > config.saturated_fraction * x.size:
        return "saturated"
    return QUALITY_OK


def _nk() -> Any:
    # neurokit2 pulls in pandas, scipy and sklearn (seconds): import on first measurement only.
    import neurokit2

    return neurokit2


@functools.lru_cache(maxsize=8)
def _clean_filters(fs_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """neurokit2's ``ecg_clean`` filters for one sampling rate: a 5th-order Butterworth
    high-pass at 0.5 Hz (second-order sections) and its 50 Hz moving-average notch."""
    from scipy.signal import butter

    highpass_sos = butter(5, 0.5, btype="highpass", output="sos", fs=fs_hz)
    notch_taps = np.ones(int(fs_hz / 50.0) if fs_hz >= 100 else 2)
    return highpass_sos, notch_taps


def clean_leads(signal_mv: np.ndarray, fs_hz: float) -> np.ndarray:
    """Each column cleaned as ``neurokit2.ecg_clean(column, fs_hz)`` (method "neurokit") does,
    to the last bit on finite signals.

    ecg_clean designs its Butterworth filter again for every call, which cost as much as the
    filtering itself (a quarter of the measure stage, 12 calls per record); here the design is
    made once per sampling rate and all leads are filtered in one call.
    """
    from scipy.signal import filtfilt, sosfiltfilt

    highpass_sos, notch_taps = _clean_filters(float(fs_hz))
    x = np.asarray(signal_mv, dtype=np.float64)
    highpassed = sosfiltfilt(highpass_sos, x, axis=0)
    return filtfilt(notch_taps, [len(notch_taps)], highpassed, axis=0, method="pad")


def _lead_peaks(cleaned: np.ndarray, fs_hz: float) -> np.ndarray:
    # ecg_findpeaks is ecg_peaks without the pandas frame around it (a third of the cost).
    info = _nk().ecg_findpeaks(cleaned, sampling_rate=fs_hz, method="neurokit")
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


def fuse_peaks(per_lead: list[np.ndarray], tolerance: int, min_votes: int) -> np.ndarray:
    """Beats seen by at least ``min_votes`` leads: peaks within ``tolerance`` samples group.

    Returns the median position of each kept group, sorted.
    """
    if not per_lead:
        return np.zeros(0, dtype=np.int64)
    pos = np.concatenate(per_lead)
    who = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_lead)])
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(pos, kind="stable")
    pos, who = pos[order], who[order]
    breaks = np.flatnonzero(np.diff(pos) > tolerance) + 1
    out = []
    for grp_pos, grp_who in zip(np.split(pos, breaks), np.split(who, breaks)):
        if len(np.unique(grp_who)) >= min_votes:
            out.append(int(np.median(grp_pos)))
    return np.asarray(out, dtype=np.int64)


def _refractory(r: np.ndarray, min_gap: int) -> np.ndarray:
    """Drop a peak closer than ``min_gap`` to the previous kept one (an R' or a notch)."""
    keep: list[int] = []
    for p in np.sort(r):
        if not keep or p - keep[-1] >= min_gap:
            keep.append(int(p))
    return np.asarray(keep, dtype=np.int64)


def _run_bounds(above: np.ndarray, start: int, gap: int) -> tuple[int, int]:
    """The above-threshold region around ``start``, bridging dips shorter than ``gap``."""
    n = above.size
    lo = start
    below = 0
    i = start
    while i > 0 and below < gap:
        i -= 1
        if above[i]:
            lo, below = i, 0
        else:
            below += 1
    hi = start
    below = 0
    i = start
    while i < n - 1 and below < gap:
        i += 1
        if above[i]:
            hi, below = i, 0
        else:
            below += 1
    return lo, hi


def _spatial_slope(cleaned: np.ndarray, fs_hz: float) -> np.ndarray:
    """Sum over leads of the absolute first difference, smoothed over 8 ms."""
    slope = np.abs(np.diff(cleaned, axis=0)).sum(axis=1)
    width = max(1, round(0.008 * fs_hz))
    return np.convolve(slope, np.ones(width) / width, mode="same")


def _peak_slopes(r: np.ndarray, slope: np.ndarray, half: int) -> np.ndarray:
    return np.array([slope[max(0, p - half) : p + half + 1].max() for p in r])


def _drop_shallow(r: np.ndarray, slope: np.ndarray, half: int, share: float) -> np.ndarray:
    """Drop peaks whose steepest slope is below ``share`` of the median beat's.

    A QRS is the steepest wave of the ECG; a tall T or P wave that a detector took for an R
    peak (MIT-BIH 231's blocked P waves) rises at a tenth of its slope.
    """
    if r.size < 2:
        return r
    peaks = _peak_slopes(r, slope, half)
    return r[peaks >= share * float(np.median(peaks))]


def _qrs_bounds(
    slope: np.ndarray, r: np.ndarray, fs_hz: float, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Global QRS onset/offset per beat from the multi-lead spatial slope."""
    base = float(np.percentile(slope, 10))
    half = round(0.06 * fs_hz)
    reach = round(0.14 * fs_hz)
    gap = max(1, round(0.01 * fs_hz))
    on = np.full(r.size, np.nan)
    off = np.full(r.size, np.nan)
    n = slope.size
    for k, rk in enumerate(r):
        a, b = max(0, rk - reach), min(n, rk + reach + 1)
        c0, c1 = max(0, rk - half) - a, min(n, rk + half + 1) - a
        seg = slope[a:b]
        if c1 <= c0:
            continue
        peak_idx = c0 + int(np.argmax(seg[c0:c1]))
        thr = base + fraction * (seg[peak_idx] - base)
        lo, hi = _run_bounds(seg >= thr, peak_idx, gap)
        # A region that runs into the search edge has no boundary inside the window.
        if lo > 0:
            on[k] = a + lo
        if hi < seg.size - 1:
            off[k] = a + hi + 1
    return on, off


def _dwt_marks(cleaned: np.ndarray, r: np.ndarray, fs_hz: float) -> dict[str, np.ndarray]:
    """P onset, P offset and T offset per beat from neurokit2's DWT delineator."""
    with warnings.catch_warnings():
        # neurokit2 warns on every beat it cannot delineate; those beats come back as NaN.
        warnings.simplefilter("ignore")
        _, marks = _nk().ecg_delineate(cleaned, rpeaks=r, sampling_rate=fs_hz, method="dwt")
    out = {}
    for key, name in (
        ("ECG_P_Onsets", "p_on"),
        ("ECG_P_Offsets", "p_off"),
        ("ECG_T_Offsets", "t_off"),
    ):
        vals = np.asarray(marks.get(key, []), dtype=np.float64)
        if vals.size != r.size:
            raise RuntimeError(f"neurokit2 returned {vals.size} {key} for {r.size} beats")
        out[name] = vals
    return out


def delineate(
    signal_mv: np.ndarray,
    fs_hz: float,
    leads: tuple[str, ...],
    config: MeasureConfig | None = None,
    quality: list[str] | None = None,
) -> BeatMarks:
    """Find the beats and their global wave boundaries in a multi-lead signal.

    Args:
        signal_mv: ``(n_samples, n_leads)`` in mV.
        fs_hz: Sampling frequency.
        leads: Lead names, one per column.
        config: Measurer settings.
        quality: Per-lead quality (``lead_quality``) when already computed.

    Returns:
        BeatMarks; no beats when no lead is usable.

    Raises:
        RuntimeError: neurokit2 failed on this signal (``measure_record`` turns it into a
            reason).
    """
    config = config or MeasureConfig()
    if quality is None:
        quality = [lead_quality(signal_mv[:, j], config) for j in range(signal_mv.shape[1])]
    used = tuple(j for j, q in enumerate(quality) if q == QUALITY_OK)
    empty = np.zeros(0)
    if not used:
        return BeatMarks(fs_hz, np.zeros(0, np.int64), empty, empty, empty, empty, empty, (), ())
    cleaned = clean_leads(signal_mv[:, used], fs_hz)
    per_lead = [_lead_peaks(cleaned[:, i], fs_hz) for i in range(len(used))]
    tolerance = round(config.peak_tolerance_ms * fs_hz / 1000.0)
    if len(used) >= 3:
        r = fuse_peaks(per_lead, tolerance, min_votes=len(used) // 2 + 1)
    else:
        # Two leads cannot outvote each other: a union lets one lead's T waves or noise
        # (MIT-BIH V1) count as beats, an intersection drops beats one lead misses. The first
        # usable lead (II / MLII in the standard orders) decides; the other is a fallback.
        r = next((p for p in per_lead if p.size >= config.min_beats), per_lead[0])
    r = _refractory(r, round(REFRACTORY_MS * fs_hz / 1000.0))
    slope = _spatial_slope(cleaned, fs_hz)
    r = _drop_shallow(r, slope, round(0.06 * fs_hz), config.min_slope_share)
    nan = np.full(r.size, np.nan)
    if r.size < config.min_beats:
        # Too few beats to measure; neurokit2's delineator would also fail on so short a run.
        return BeatMarks(fs_hz, r, nan, nan, nan, nan, nan, used, ())
    qrs_on, qrs_off = _qrs_bounds(slope, r, fs_hz, config.qrs_slope_fraction)
    names = [leads[j] for j in used]
    if not config.delineate_waves:
        return BeatMarks(fs_hz, r, qrs_on, qrs_off, nan, nan, nan, used, ())
    # Preferred leads first, then the record's other usable leads in order.
    ranked = [n for n in config.delineation_leads if n in names]
    ranked += [n for n in names if n not in ranked]
    chosen = ranked[: config.delineation_max_leads]
    dwt = [_dwt_marks(cleaned[:, names.index(n)], r, fs_hz) for n in chosen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN beats stay NaN
        p_on = np.nanmin(np.stack([d["p_on"] for d in dwt]), axis=0)
        p_off = np.nanmax(np.stack([d["p_off"] for d in dwt]), axis=0)
        t_off = np.nanmax(np.stack([d["t_off"] for d in dwt]), axis=0)
    return BeatMarks(fs_hz, r, qrs_on, qrs_off, p_on, p_off, t_off, used, tuple(chosen))


def _median_ms(values: np.ndarray, fs_hz: float, min_n: int) -> float | None:
    values = values[np.isfinite(values)]
    if values.size < min_n:
        return None
    return round(_ms(float(np.median(values)), fs_hz), 1)


def _rhythm(r: np.ndarray, fs_hz: float, config: MeasureConfig) -> dict[str, Any]:
    rr = np.diff(r).astype(np.float64) * 1000.0 / fs_hz
    rr_mean = float(rr.mean())
    rr_med = float(np.median(rr))
    irregularity = float(np.median(np.abs(np.diff(rr)))) / rr_med if rr.size >= 2 else 0.0
    premature = 0
    for i in range(1, rr.size):
        local = np.median(rr[max(0, i - 2) : i + 3])
        premature += int(rr[i] < config.premature_fraction * local)
    return {
        "heart_rate_bpm": round(60000.0 / rr_mean, 1),
        "rr_mean_ms": round(rr_mean, 1),
        "rr_sd_ms": round(float(rr.std()), 1),
        "rr_irregularity": round(irregularity, 4),
        "rr_irregular": bool(irregularity > config.rr_irregular_threshold),
        "premature_beats": premature,
    }


def _baselines(x: np.ndarray, qrs_on: np.ndarray, fs_hz: float) -> np.ndarray:
    """Per-beat PR-segment baseline: median of the 40 ms before QRS onset."""
    w = round(0.04 * fs_hz)
    out = np.full(qrs_on.size, np.nan)
    for k, on in enumerate(qrs_on):
        if np.isfinite(on) and on - w >= 0:
            out[k] = float(np.median(x[int(on) - w : int(on)]))
    return out


def _lead_values(
    x: np.ndarray, marks: BeatMarks, rr_ms: float, config: MeasureConfig
) -> tuple[float | None, str | None, float | None]:
    """ST deviation at J+offset, T polarity and QRS amplitude of one lead (medians)."""
    fs = marks.fs_hz
    base = _baselines(x, marks.qrs_on, fs)
    st_off = round(config.st_offset_ms * fs / 1000.0)
    st, t_ext, amp = [], [], []
    # Without a T offset, the T wave is searched up to 45% of the RR after the J point.
    t_reach = round(0.45 * rr_ms * fs / 1000.0)
    for k in range(marks.r.size):
        on, off, b = marks.qrs_on[k], marks.qrs_off[k], base[k]
        if not (np.isfinite(on) and np.isfinite(off) and np.isfinite(b)):
            continue
        j = int(off)
        amp.append(float(np.ptp(x[int(on) : j + 1])))
        if j + st_off < x.size:
            st.append(float(x[j + st_off]) - b)
        t_end = int(marks.t_off[k]) if np.isfinite(marks.t_off[k]) else j + t_reach
        t_start = j + st_off
        if t_start < t_end <= x.size:
            seg = x[t_start:t_end] - b
            t_ext.append(float(seg[np.argmax(np.abs(seg))]))
    st_mv = round(float(np.median(st)), 3) if st else None
    amp_mv = round(float(np.median(amp)), 3) if amp else None
    t_pol = None
    if t_ext:
        t = float(np.median(t_ext))
        t_pol = "flat" if abs(t) < config.t_flat_mv else ("positive" if t > 0 else "negative")
    return st_mv, t_pol, amp_mv


def _net_qrs_area(x: np.ndarray, marks: BeatMarks) -> float | None:
    base = _baselines(x, marks.qrs_on, marks.fs_hz)
    areas = [
        float(np.sum(x[int(on) : int(off) + 1] - b))
        for on, off, b in zip(marks.qrs_on, marks.qrs_off, base)
        if np.isfinite(on) and np.isfinite(off) and np.isfinite(b)
    ]
    return float(np.median(areas)) if areas else None


def _axis(
    signal: np.ndarray, leads: tuple[str, ...], ok: set[str], marks: BeatMarks
) -> float | None:
    def col(name: str) -> np.ndarray | None:
        return signal[:, leads.index(name)] if name in ok else None

    lead_i, lead_ii, lead_iii, lead_avf = (col(n) for n in _AXIS_LEADS)
    # Einthoven: I = II - III, aVF = II - I/2; derive what is missing from what is usable.
    if lead_i is None and lead_ii is not None and lead_iii is not None:
        lead_i = lead_ii - lead_iii
    if lead_avf is None and lead_i is not None and lead_ii is not None:
        lead_avf = lead_ii - lead_i / 2.0
    if lead_i is None or lead_avf is None:
        return None
    a_i, a_f = _net_qrs_area(lead_i, marks), _net_qrs_area(lead_avf, marks)
    if a_i is None or a_f is None:
        return None
    deg = math.degrees(math.atan2(a_f, a_i))
    return round(deg + 360.0 if deg <= -90.0 else deg, 1)


def _p_wave_fraction(marks: BeatMarks) -> float:
    pr = marks.qrs_on - marks.p_on
    valid = np.isfinite(pr) & (pr > 0)
    if not valid.any():
        return 0.0
    tol = 0.04 * marks.fs_hz
    consistent = valid & (np.abs(pr - np.median(pr[valid])) <= tol)
    return round(float(consistent.sum()) / marks.r.size, 3)


def measure_record(
    record: EcgRecord, config: MeasureConfig | None = None, marks: BeatMarks | None = None
) -> Measurements:
    """Measure one record. Never raises on bad signals: values become None with a reason.

    Args:
        record: The ECG (any ``fs_hz``, any number of leads).
        config: Measurer settings.
        marks: ``delineate`` output for this record and config, when already computed.

    Returns:
        Measurements. Two-lead windows (MIT-BIH) get rate and rhythm; records with at least
        ``min_leads_for_intervals`` usable leads also get intervals, and the axis where the
        limb leads allow.
    """
    config = config or MeasureConfig()
    signal, fs, leads = record.signal_mv, float(record.fs_hz), record.leads
    reasons: dict[str, str] = {}
    quality = [lead_quality(signal[:, j], config) for j in range(signal.shape[1])]
    for name, q in zip(leads, quality):
        if q != QUALITY_OK:
            reasons[f"lead:{name}"] = f"lead {name} unused: {q.replace('_', ' ')}"
    bare = tuple(LeadMeasurements(n, q) for n, q in zip(leads, quality))

    def fail(why: str, **values: Any) -> Measurements:
        for name in VALUE_FIELDS:
            if values.get(name) is None and name != "n_beats":
                reasons.setdefault(name, why)
        return Measurements(record.record_id, leads=bare, reasons=reasons, **values)

    if not any(q == QUALITY_OK for q in quality):
        return fail(
            "no usable lead (" + ", ".join(f"{n}: {q}" for n, q in zip(leads, quality)) + ")"
        )
    n_usable = sum(q == QUALITY_OK for q in quality)
    # Too few leads for intervals: P waves (p_wave_fraction) need one delineated lead, not
    # two or three (half the cost on MIT-BIH windows).
    dconfig = (
        config
        if n_usable >= config.min_leads_for_intervals
        else replace(config, delineation_max_leads=1)
    )
    try:
        if marks is None:
            marks = delineate(signal, fs, leads, dconfig, quality)
    except Exception as e:  # noqa: BLE001 - neurokit2 raises many types on odd signals
        return fail(f"neurokit2 failed on this signal: {type(e).__name__}: {e}".split("\n")[0])
    n_beats = int(marks.r.size)
    if n_beats < config.min_beats:
        return fail(f"{n_beats} beats found, fewer than {config.min_beats}", n_beats=n_beats)

    try:
        return _measure_beats(record, config, marks, quality, reasons, bare)
    except Exception as e:  # noqa: BLE001 - the contract: a reason, never an exception
        return fail(f"measurement failed: {type(e).__name__}: {e}".split("\n")[0], n_beats=n_beats)


def _measure_beats(
    record: EcgRecord,
    config: MeasureConfig,
    marks: BeatMarks,
    quality: list[str],
    reasons: dict[str, str],
    bare: tuple[LeadMeasurements, ...],
) -> Measurements:
    """The beat-based values of ``measure_record`` (at least ``min_beats`` beats)."""
    signal, fs, leads = record.signal_mv, float(record.fs_hz), record.leads
    n_beats = int(marks.r.size)
    values: dict[str, Any] = {"n_beats": n_beats, **_rhythm(marks.r, fs, config)}
    if config.delineate_waves:
        values["p_wave_fraction"] = _p_wave_fraction(marks)
    else:
        reasons["p_wave_fraction"] = "P/T delineation is off (delineate_waves=False)"
    ok_names = {leads[j] for j in marks.used_leads}
    rr_s = values["rr_mean_ms"] / 1000.0
    if len(marks.used_leads) >= config.min_leads_for_intervals:
        min_n = config.min_beats
        values["qrs_ms"] = _median_ms(marks.qrs_off - marks.qrs_on, fs, min_n)
        values["qt_ms"] = _median_ms(marks.t_off - marks.qrs_on, fs, min_n)
        if not config.delineate_waves:
            reasons["pr_ms"] = "P/T delineation is off (delineate_waves=False)"
        elif values["p_wave_fraction"] >= 0.5:
            values["pr_ms"] = _median_ms(marks.qrs_on - marks.p_on, fs, min_n)
        else:
            reasons["pr_ms"] = (
                f"no consistent P wave before most QRS (p_wave_fraction "
                f"{values['p_wave_fraction']:.2f})"
            )
        for name in ("qrs_ms", "qt_ms", "pr_ms"):
            if values.get(name) is None:
                reasons.setdefault(name, f"boundaries found in fewer than {min_n} beats")
        if values["qt_ms"] is not None:
            values["qtc_bazett_ms"] = round(values["qt_ms"] / math.sqrt(rr_s), 1)
            values["qtc_fridericia_ms"] = round(values["qt_ms"] / rr_s ** (1.0 / 3.0), 1)
        values["qrs_axis_deg"] = _axis(signal, leads, ok_names, marks)
        if values["qrs_axis_deg"] is None:
            reasons["qrs_axis_deg"] = "needs two usable limb leads among I, II, III, aVF"
        per_lead = []
        for j, (name, q) in enumerate(zip(leads, quality)):
            if q != QUALITY_OK:
                per_lead.append(LeadMeasurements(name, q))
                continue
            st, tp, amp = _lead_values(
                signal[:, j].astype(np.float64), marks, values["rr_mean_ms"], config
            )
            per_lead.append(LeadMeasurements(name, q, st, tp, amp))
        leads_out = tuple(per_lead)
    else:
        why = (
            f"intervals need {config.min_leads_for_intervals} usable leads for global "
            f"boundaries; this record has {len(marks.used_leads)}"
        )
        for name in (
            "pr_ms",
            "qrs_ms",
            "qt_ms",
            "qtc_bazett_ms",
            "qtc_fridericia_ms",
            "qrs_axis_deg",
        ):
            reasons[name] = why
        leads_out = bare
    for name in ("qtc_bazett_ms", "qtc_fridericia_ms"):
        if values.get(name) is None:
            reasons.setdefault(name, "no QT")
    return Measurements(record.record_id, leads=leads_out, reasons=reasons, **values)
