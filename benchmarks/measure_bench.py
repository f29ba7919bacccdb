"""Measurement speed on one core: ``measure_record`` on a 12-lead 10 s ECG, by stage.

    python benchmarks/measure_bench.py

The record is a 12-lead, 10 s, 500 Hz Chapman-Shaoxing sample (the one render_bench.py draws).
The process is pinned to one CPU core and times are CPU seconds (``time.process_time``),
medians over repeats. Rows: the whole ``measure_record`` with its defaults (P/T delineated in
3 leads), with P/T in 1 lead, without P/T delineation (rate, rhythm, QRS, axis, ST), the
neurokit2 cleaning + R-peak detection alone, and ``render_printout`` at its defaults for
comparison (a prepared sample pays both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np

from ecgvlm.measure import (
    MeasureConfig,
    core,
    measure_record,
)
from ecgvlm.render import render_printout
from ecgvlm.signal import read_record

SAMPLE = REPO / "data" / "samples" / "chapman_shaoxing" / "JS00001"


def _cpu_ms(fn, repeats: int) -> float:
    fn()  # warm-up: imports neurokit2, fills caches
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    rec = read_record(SAMPLE)

    def peaks_only() -> None:
        cleaned = core.clean_leads(rec.signal_mv, rec.fs_hz)
        for j in range(cleaned.shape[1]):
            core._lead_peaks(cleaned[:, j], rec.fs_hz)

    def neurokit2_clean() -> None:
        for j in range(rec.signal_mv.shape[1]):
            core._nk().ecg_clean(rec.signal_mv[:, j].astype(np.float64), sampling_rate=rec.fs_hz)

    rows = [
        ("measure_record, defaults (P/T in 3 leads)", lambda: measure_record(rec)),
        (
            "measure_record, P/T in 1 lead",
            lambda: measure_record(rec, MeasureConfig(delineation_max_leads=1)),
        ),
        (
            "measure_record, no P/T (delineate_waves=False)",
            lambda: measure_record(rec, MeasureConfig(delineate_waves=False)),
        ),
        ("clean (clean_leads) + R peaks, 12 leads", peaks_only),
        ("clean only: neurokit2 ecg_clean lead by lead, 12 leads", neurokit2_clean),
        (
            "clean only: clean_leads, 12 leads at once",
            lambda: core.clean_leads(rec.signal_mv, rec.fs_hz),
        ),
        ("render_printout, defaults", lambda: render_printout(rec)),
    ]
    print(f"record {rec.record_id}: {len(rec.leads)} leads, {rec.duration_s:g} s, {rec.fs_hz:g} Hz")
    print(f"load average {os.getloadavg()[0]:.1f} (times under load are inflated)")
    print("| stage | ms/record (CPU, median) |")
    print("| --- | --- |")
    for name, fn in rows:
        print(f"| {name} | {_cpu_ms(fn, args.repeats):.0f} |")


if __name__ == "__main__":
    main()
