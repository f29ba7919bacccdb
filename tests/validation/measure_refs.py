"""The measurer against real references: LUDB and QTDB marks, MIT-BIH beats, GE MUSE values.

Each ``score_*`` function returns plain numbers; ``tests/unit/test_measure_validation.py``
asserts them against the targets and ``python -m tests.validation.measure_refs`` prints the
tables that docs/measure.md shows.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

from ecgvlm.measure import MeasureConfig, delineate, measure_record
from ecgvlm.records import EcgRecord
from ecgvlm.signal import read_record

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ecg"
LUDB_RECORDS = tuple(str(i) for i in range(1, 21))
LUDB_LEADS = ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6")
QTDB_RECORDS = (
    "sel100",
    "sel103",
    "sel221",
    "sel14046",
    "sel16265",
    "sel301",
    "sel803",
    "sel30",
    "sele0104",
    "sele0110",
)
MITDB_RECORDS = ("100", "106", "202", "231")
MARKS = ("p_on", "p_off", "qrs_on", "qrs_off", "t_off")
# CSE committee tolerances for the SD of the error (ms), and Martinez et al. 2004 (wavelet
# delineator on QTDB): mean ± SD of the error, ms.
CSE_SD_MS = {"p_on": 10.2, "p_off": 12.7, "qrs_on": 6.5, "qrs_off": 11.6, "t_off": 30.6}
MARTINEZ_QTDB_MS = {
    "p_on": (2.0, 14.8),
    "p_off": (1.9, 12.8),
    "qrs_on": (4.6, 7.7),
    "qrs_off": (0.8, 8.7),
    "t_off": (-1.6, 18.1),
}
# A detected mark pairs with a reference mark of the same beat within this distance.
MATCH_MS = 150.0


def _ludb_waves(record: str, lead: str, peak: str) -> list[tuple[float, int, float]]:
    """(onset, peak, offset) of each wave with peak symbol ``peak`` in one LUDB lead file.

    Marks are paired by position, not order (a few lead files have out-of-order or missing
    symbols): the onset is the last ``(`` at most 120 ms before the peak (or 4 ms after it),
    the offset the first ``)`` at most 250 ms after it.
    """
    ann = wfdb.rdann(str(DATA / "ludb" / record), lead)
    samples = np.asarray(ann.sample)
    symbols = np.asarray(ann.symbol)
    opens = samples[symbols == "("]
    closes = samples[symbols == ")"]
    out = []
    for pk in samples[symbols == peak]:
        before = opens[(opens <= pk + 2) & (opens >= pk - 60)]
        after = closes[(closes >= pk - 2) & (closes <= pk + 125)]
        out.append(
            (
                float(before.max()) if before.size else math.nan,
                int(pk),
                float(after.min()) if after.size else math.nan,
            )
        )
    return out


def ludb_reference(record: str) -> dict[str, np.ndarray]:
    """Global reference marks per beat of one LUDB record (samples at 500 Hz).

    QRS complexes of the 12 leads whose peaks lie within 100 ms are one beat; its global QRS
    onset is the earliest of the leads' onsets and its offset the latest (the CSE definition).
    A beat's P wave is any lead's P whose peak lies between the previous beat's R and this
    one's; its T wave any T between this R and the next. P onset: earliest; P and T offset:
    latest.
    """
    qrs = [w for lead in LUDB_LEADS for w in _ludb_waves(record, lead, "N")]
    qrs.sort(key=lambda w: w[1])
    beats: list[list[tuple[float, int, float]]] = []
    for w in qrs:
        if beats and w[1] - beats[-1][0][1] <= 50:
            beats[-1].append(w)
        else:
            beats.append([w])
    r = np.array([np.median([w[1] for w in b]) for b in beats])
    with np.errstate(all="ignore"):
        ref = {
            "r": r,
            "qrs_on": np.array([np.nanmin([w[0] for w in b] + [np.inf]) for b in beats]),
            "qrs_off": np.array([np.nanmax([w[2] for w in b] + [-np.inf]) for b in beats]),
        }
    p = [w for lead in LUDB_LEADS for w in _ludb_waves(record, lead, "p")]
    t = [w for lead in LUDB_LEADS for w in _ludb_waves(record, lead, "t")]
    edges = np.concatenate([[-np.inf], r, [np.inf]])
    p_on, p_off, t_off = (np.full(r.size, np.nan) for _ in range(3))
    for k in range(r.size):
        ps = [w for w in p if edges[k] < w[1] < edges[k + 1]]
        ts = [w for w in t if edges[k + 1] < w[1] < edges[k + 2]]
        if ps:
            p_on[k] = np.nanmin([w[0] for w in ps])
            p_off[k] = np.nanmax([w[2] for w in ps])
        if ts:
            t_off[k] = np.nanmax([w[2] for w in ts])
    for key in ("qrs_on", "qrs_off"):
        ref[key][~np.isfinite(ref[key])] = np.nan
    ref.update(p_on=p_on, p_off=p_off, t_off=t_off)
    return ref


def _pair_errors(
    ref: dict[str, np.ndarray], marks, fs_hz: float
) -> dict[str, tuple[list[float], int]]:
    """Per mark: errors (ms, detected - reference) of matched marks, and reference count."""
    out: dict[str, tuple[list[float], int]] = {}
    det_r = np.asarray(marks.r, dtype=float)
    for key in MARKS:
        errs: list[float] = []
        n_ref = 0
        for k, rk in enumerate(ref["r"]):
            if not np.isfinite(ref[key][k]):
                continue
            n_ref += 1
            if det_r.size == 0:
                continue
            j = int(np.argmin(np.abs(det_r - rk)))
            if abs(det_r[j] - rk) > 0.1 * fs_hz:
                continue
            d = getattr(marks, key)[j]
            e = (d - ref[key][k]) * 1000.0 / fs_hz
            if np.isfinite(e) and abs(e) <= MATCH_MS:
                errs.append(float(e))
        out[key] = (errs, n_ref)
    return out


@dataclass
class MarkScore:
    mark: str
    mean_ms: float
    sd_ms: float
    matched: float
    n_ref: int


def _summarise(acc: dict[str, tuple[list[float], int]]) -> list[MarkScore]:
    out = []
    for key in MARKS:
        errs, n_ref = acc[key]
        e = np.asarray(errs)
        out.append(
            MarkScore(
                key,
                float(e.mean()) if e.size else math.nan,
                float(e.std(ddof=1)) if e.size > 1 else math.nan,
                e.size / n_ref if n_ref else math.nan,
                n_ref,
            )
        )
    return out


def _merge(
    acc: dict[str, tuple[list[float], int]], new: dict[str, tuple[list[float], int]]
) -> None:
    for key, (errs, n) in new.items():
        old_errs, old_n = acc.get(key, ([], 0))
        acc[key] = (old_errs + errs, old_n + n)


def score_ludb(config: MeasureConfig | None = None) -> tuple[list[MarkScore], list[dict]]:
    """Boundary errors against LUDB's global marks, and per-record intervals (ms)."""
    config = config or MeasureConfig()
    acc: dict[str, tuple[list[float], int]] = {}
    rows = []
    for name in LUDB_RECORDS:
        rec = read_record(DATA / "ludb" / name)
        ref = ludb_reference(name)
        marks = delineate(rec.signal_mv, rec.fs_hz, rec.leads, config)
        _merge(acc, _pair_errors(ref, marks, rec.fs_hz))
        m = measure_record(rec, config, marks)
        ms = 1000.0 / rec.fs_hz
        with np.errstate(all="ignore"):
            ref_qrs = float(np.nanmedian(ref["qrs_off"] - ref["qrs_on"])) * ms
            ref_qt = float(np.nanmedian(ref["t_off"] - ref["qrs_on"])) * ms
            ref_pr = float(np.nanmedian(ref["qrs_on"] - ref["p_on"])) * ms
        rows.append(
            {
                "record": name,
                "qrs_ms": m.qrs_ms,
                "ref_qrs_ms": ref_qrs,
                "qt_ms": m.qt_ms,
                "ref_qt_ms": ref_qt,
                "pr_ms": m.pr_ms,
                "ref_pr_ms": ref_pr,
                "labels": rec.labels,
            }
        )
    return _summarise(acc), rows


def _qtdb_reference(name: str) -> dict[str, np.ndarray]:
    """Per annotated beat of q1c: R (the beat label) and the expert's boundaries."""
    ann = wfdb.rdann(str(DATA / "qtdb" / name), "q1c")
    s, sym, num = np.asarray(ann.sample), np.asarray(ann.symbol), np.asarray(ann.num)
    fs = 250.0
    beats = np.flatnonzero(~np.isin(sym, ["(", ")", "p", "t", "u"]))

    def nearest(b: int, symbol: str, wave: int, lo_s: float, hi_s: float) -> float:
        ok = (sym == symbol) & (num == wave) & (s >= s[b] + lo_s * fs) & (s <= s[b] + hi_s * fs)
        cand = s[ok]
        if cand.size == 0:
            return math.nan
        return float(cand[np.argmin(np.abs(cand - s[b]))])

    ref = {"r": s[beats].astype(float)}
    ref["qrs_on"] = np.array([nearest(b, "(", 1, -0.15, 0.0) for b in beats])
    ref["qrs_off"] = np.array([nearest(b, ")", 1, 0.0, 0.2) for b in beats])
    ref["p_on"] = np.array([nearest(b, "(", 0, -0.5, 0.0) for b in beats])
    ref["p_off"] = np.array([nearest(b, ")", 0, -0.4, 0.0) for b in beats])
    ref["t_off"] = np.array([nearest(b, ")", 2, 0.0, 0.8) for b in beats])
    return ref


def score_qtdb(config: MeasureConfig | None = None) -> list[MarkScore]:
    """Boundary errors against QTDB's q1c marks (both leads delineated together).

    Each annotated beat is delineated inside a 10 s window that starts 2 s before the first
    beat it scores; beats within 6.5 s of that start share the window.
    """
    config = config or MeasureConfig()
    acc: dict[str, tuple[list[float], int]] = {}
    for name in QTDB_RECORDS:
        rec = wfdb.rdrecord(str(DATA / "qtdb" / name))
        sig, fs = rec.p_signal.astype(np.float32), float(rec.fs)
        ref = _qtdb_reference(name)
        k = 0
        while k < ref["r"].size:
            a = int(ref["r"][k] - 2 * fs)
            take = (ref["r"] >= ref["r"][k]) & (ref["r"] <= ref["r"][k] + 6.5 * fs)
            marks = delineate(sig[a : a + int(10 * fs)], fs, tuple(rec.sig_name), config)
            win = {key: v[take] - a for key, v in ref.items()}
            _merge(acc, _pair_errors(win, marks, fs))
            k = int(np.flatnonzero(take)[-1]) + 1
    return _summarise(acc)


MITDB_BEATS = set("NLRBAaJSVrFejnE/fQ?")


def _match(det: np.ndarray, ref: np.ndarray, tol: float) -> int:
    """True positives: detections paired one-to-one with reference beats within ``tol``."""
    used = np.zeros(det.size, bool)
    tp = 0
    for r in ref:
        if det.size == 0:
            break
        d = np.abs(det - r).astype(float)
        d[used] = np.inf
        j = int(np.argmin(d))
        if d[j] <= tol:
            used[j] = True
            tp += 1
    return tp


def score_mitdb(config: MeasureConfig | None = None, minutes: float = 30.0) -> list[dict]:
    """R-peak sensitivity/PPV (50 ms) and 10 s rate error per MIT-BIH record.

    The first ``minutes`` of each record are cut into consecutive 10 s windows, as prepare
    does; in each, beats in the first and last 0.5 s are not scored (a window edge cuts them).
    """
    config = config or MeasureConfig(delineate_waves=False)
    rows = []
    for name in MITDB_RECORDS:
        rec = wfdb.rdrecord(str(DATA / "mitdb" / name))
        ann = wfdb.rdann(str(DATA / "mitdb" / name), "atr")
        fs = float(rec.fs)
        sig = rec.p_signal.astype(np.float32)
        beats = np.asarray([s for s, y in zip(ann.sample, ann.symbol) if y in MITDB_BEATS])
        n = int(10 * fs)
        tp = fn = fp = 0
        rate_err = []
        for a in range(0, min(sig.shape[0], int(minutes * 60 * fs)) - n + 1, n):
            win = EcgRecord(f"mitdb/{name}@{a}", "mitdb", sig[a : a + n], fs, tuple(rec.sig_name))
            marks = delineate(win.signal_mv, fs, win.leads, config)
            ref = beats[(beats >= a) & (beats < a + n)] - a
            edge = 0.5 * fs
            ref_in = ref[(ref >= edge) & (ref < n - edge)]
            det_in = marks.r[(marks.r >= edge) & (marks.r < n - edge)]
            hit = _match(det_in, ref_in, 0.05 * fs)
            tp += hit
            fn += ref_in.size - hit
            fp += det_in.size - hit
            m = measure_record(win, config, marks)
            if ref.size >= 3 and m.heart_rate_bpm is not None:
                ref_rate = 60.0 * fs / float(np.mean(np.diff(ref)))
                rate_err.append(m.heart_rate_bpm - ref_rate)
        e = np.abs(np.asarray(rate_err))
        rows.append(
            {
                "record": name,
                "sensitivity": tp / (tp + fn),
                "ppv": tp / (tp + fp),
                "n_beats": tp + fn,
                "windows": e.size,
                "rate_within_5": float(np.mean(e <= 5.0)),
                "rate_mae": float(e.mean()),
            }
        )
    return rows


def score_muse(config: MeasureConfig | None = None) -> list[dict]:
    """Rate, QRS, QT and QRS axis against the GE MUSE values of four Chapman-Shaoxing records."""
    config = config or MeasureConfig()
    rows = []
    with open(DATA / "chapman_shaoxing" / "muse_measurements.csv", newline="") as f:
        for ref in csv.DictReader(f):
            m = measure_record(read_record(DATA / "chapman_shaoxing" / ref["record"]), config)
            rows.append(
                {
                    "record": ref["record"],
                    "rhythm": ref["Rhythm"],
                    "rate": m.heart_rate_bpm,
                    "ref_rate": float(ref["VentricularRate"]),
                    "qrs_ms": m.qrs_ms,
                    "ref_qrs_ms": float(ref["QRSDuration"]),
                    "qt_ms": m.qt_ms,
                    "ref_qt_ms": float(ref["QTInterval"]),
                    "axis_deg": m.qrs_axis_deg,
                    "ref_axis_deg": float(ref["RAxis"]),
                }
            )
    return rows


SINUS = {"NSR", "SB", "STach"}
RHYTHM_DATASETS = ("cpsc2018", "chapman_shaoxing", "cpsc2018_extra", "georgia", "ptb-xl", "ptbdb")


def score_rhythm(config: MeasureConfig | None = None) -> dict:
    """``rr_irregular`` on shared records labelled AF vs sinus rhythm (NSR, SB, STach).

    Records carrying both, or flutter or sinus arrhythmia, are left out.
    """
    config = config or MeasureConfig(delineate_waves=False)
    from ecgvlm.signal import iter_records

    table = {("AF", True): [], ("AF", False): [], ("sinus", True): [], ("sinus", False): []}
    for ds in RHYTHM_DATASETS:
        for rec in iter_records(DATA / ds, failures=[]):
            labels = set(rec.labels)
            if "AF" in labels and not labels & (SINUS | {"AFL", "SA"}):
                truth = "AF"
            elif labels & SINUS and not labels & {"AF", "AFL", "SA"}:
                truth = "sinus"
            else:
                continue
            m = measure_record(rec, config)
            if m.rr_irregular is not None:
                table[(truth, m.rr_irregular)].append(rec.record_id)
    return table


def _fmt(v: object) -> str:
    return (
        "–"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else (f"{v:.1f}" if isinstance(v, float) else str(v))
    )


def main() -> None:
    """Print the validation tables of docs/measure.md (takes a few minutes on one core)."""
    ludb, rows = score_ludb()
    qtdb = score_qtdb()
    print(
        "| mark | LUDB mean ± SD (ms) | LUDB matched | QTDB mean ± SD (ms) | QTDB matched "
        "| CSE SD tolerance | Martinez 2004 QTDB |"
    )
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(ludb, qtdb):
        mz = MARTINEZ_QTDB_MS[a.mark]
        print(
            f"| {a.mark} | {a.mean_ms:.1f} ± {a.sd_ms:.1f} | {a.matched:.1%} ({a.n_ref}) | "
            f"{b.mean_ms:.1f} ± {b.sd_ms:.1f} | {b.matched:.1%} ({b.n_ref}) | "
            f"{CSE_SD_MS[a.mark]} | {mz[0]} ± {mz[1]} |"
        )
    print("\n| LUDB record | PR | ref PR | QRS | ref QRS | QT | ref QT |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['record']} | {_fmt(r['pr_ms'])} | {_fmt(r['ref_pr_ms'])} | {_fmt(r['qrs_ms'])}"
            f" | {_fmt(r['ref_qrs_ms'])} | {_fmt(r['qt_ms'])} | {_fmt(r['ref_qt_ms'])} |"
        )
    print(
        "\n| MIT-BIH record | beats | sensitivity | PPV | windows | rate within 5 bpm | rate MAE |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in score_mitdb():
        print(
            f"| {r['record']} | {r['n_beats']} | {r['sensitivity']:.2%} | {r['ppv']:.2%} | "
            f"{r['windows']} | {r['rate_within_5']:.1%} | {r['rate_mae']:.2f} |"
        )
    print("\n| MUSE record | rhythm | rate | MUSE | QRS | MUSE | QT | MUSE | axis | MUSE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in score_muse():
        print(
            f"| {r['record']} | {r['rhythm']} | {_fmt(r['rate'])} | {r['ref_rate']:.0f} | "
            f"{_fmt(r['qrs_ms'])} | {r['ref_qrs_ms']:.0f} | {_fmt(r['qt_ms'])} | "
            f"{r['ref_qt_ms']:.0f} | {_fmt(r['axis_deg'])} | {r['ref_axis_deg']:.0f} |"
        )
    table = score_rhythm()
    print("\n| label \\ rr_irregular | True | False |")
    print("|---|---|---|")
    for truth in ("AF", "sinus"):
        print(f"| {truth} | {len(table[(truth, True)])} | {len(table[(truth, False)])} |")
    print(
        "AF called regular:",
        table[("AF", False)],
        "sinus called irregular:",
        table[("sinus", True)],
    )


if __name__ == "__main__":
    main()
