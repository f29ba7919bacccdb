"""Measurements from the ECG signal itself: rate, rhythm, intervals, axis, ST and T per lead.

``measure_record(record, config)`` turns an ``EcgRecord`` into ``Measurements``. neurokit2
does the cleaning, the per-lead R-peak detection and the wavelet (DWT) delineation of P and T
waves; our own code fuses leads (R-peak voting, global QRS onset and offset from the
multi-lead slope), and measures the axis, ST at J+60 ms and T polarity. See docs/measure.md
for the method, the validation against cardiologists' marks and a clinical system, and why
neurokit2.

No torch or ray import, and neurokit2 itself is imported on first use (it takes seconds).
"""

from ecgvlm.measure.core import (
    MEASURE_VERSION,
    BeatMarks,
    LeadMeasurements,
    MeasureConfig,
    Measurements,
    delineate,
    measure_record,
)
from ecgvlm.measure.criteria import FindingCheck, check_finding
from ecgvlm.measure.text import format_table, grounded_text

__all__ = [
    "MEASURE_VERSION",
    "BeatMarks",
    "FindingCheck",
    "LeadMeasurements",
    "MeasureConfig",
    "Measurements",
    "check_finding",
    "delineate",
    "format_table",
    "grounded_text",
    "measure_record",
]
