"""Measurements as text: the table ``ecgvlm measure`` prints, and grounded target sentences.

``grounded_text(abbrev, measurements)`` writes one or two sentences citing the record's own
values that bear on a finding ("Ventricular rate 48 bpm; a P wave before 100% of QRS
complexes. PR 168 ms, QRS 92 ms."). ``make_mcq`` puts them in the training target in place of
the knowledge base's generic description when the finding's criteria are met; where they are
not measurable, or the values contradict the label, it keeps the generic text.
"""

from __future__ import annotations

from ecgvlm.knowledge import knowledge_base
from ecgvlm.measure.core import VALUE_FIELDS, Measurements
from ecgvlm.measure.criteria import CONSISTENT, check_finding

_UNITS = {"_bpm": "bpm", "_ms": "ms", "_deg": "deg", "_mv": "mV"}


def _value(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)


def format_table(m: Measurements) -> str:
    """A plain-text table: record values with units (or why not), then one row per lead."""
    lines = [f"record            {m.record_id}  (measure v{m.version})"]
    for name in VALUE_FIELDS:
        value = getattr(m, name)
        unit = next((u for suffix, u in _UNITS.items() if name.endswith(suffix)), "")
        text = (
            f"{_value(value)} {unit}".rstrip()
            if value is not None
            else f"- ({m.reasons.get(name, 'not measured')})"
        )
        lines.append(f"{name:<18}{text}")
    lines.append("")
    lines.append(f"{'lead':<6}{'quality':<11}{'ST J+60 mV':>11}{'T wave':>10}{'QRS p-p mV':>12}")
    for lm in m.leads:
        st = f"{lm.st_deviation_mv:+.2f}" if lm.st_deviation_mv is not None else "-"
        amp = f"{lm.qrs_amplitude_mv:.2f}" if lm.qrs_amplitude_mv is not None else "-"
        lines.append(f"{lm.lead:<6}{lm.quality:<11}{st:>11}{lm.t_polarity or '-':>10}{amp:>12}")
    return "\n".join(lines)


def _leads_meeting(m: Measurements, measure: str, test) -> list[str]:
    return [
        lm.lead for lm in m.leads if getattr(lm, measure) is not None and test(getattr(lm, measure))
    ]


def _phrase(measure: str, m: Measurements, abbrev: str) -> str | None:
    """The words for one measured value, or None when it is not measured."""
    if measure == "heart_rate_bpm" and m.heart_rate_bpm is not None:
        return f"ventricular rate {m.heart_rate_bpm:.0f} bpm"
    if measure == "rr_irregular" and m.rr_irregular is not None:
        if m.rr_irregular:
            return f"irregular RR intervals (RR irregularity {m.rr_irregularity:.2f})"
        return "regular RR intervals"
    if measure == "p_wave_fraction" and m.p_wave_fraction is not None:
        if m.p_wave_fraction >= 0.5:
            return f"a P wave before {m.p_wave_fraction:.0%} of QRS complexes"
        return "no consistent P wave before the QRS complexes"
    if measure == "premature_beats" and m.premature_beats is not None:
        return f"{m.premature_beats} premature of {m.n_beats} beats"
    if measure == "pr_ms" and m.pr_ms is not None:
        return f"PR {m.pr_ms:.0f} ms"
    if measure == "qrs_ms" and m.qrs_ms is not None:
        return f"QRS {m.qrs_ms:.0f} ms"
    if measure in ("qt_ms", "qtc_bazett_ms") and m.qtc_bazett_ms is not None:
        return f"QT {m.qt_ms:.0f} ms, QTc (Bazett) {m.qtc_bazett_ms:.0f} ms"
    if measure == "qrs_axis_deg" and m.qrs_axis_deg is not None:
        return f"QRS axis {m.qrs_axis_deg:+.0f} degrees"
    if measure == "st_deviation_mv":
        sign = -1.0 if abbrev == "STD" else 1.0
        leads = [
            lm
            for lm in m.leads
            if lm.st_deviation_mv is not None and sign * lm.st_deviation_mv > 0.05
        ]
        if leads:
            worst = max(leads, key=lambda lm: sign * lm.st_deviation_mv)
            what = "depression" if sign < 0 else "elevation"
            return (
                f"ST {what} at J+60 ms in {', '.join(lm.lead for lm in leads)} "
                f"(up to {abs(worst.st_deviation_mv):.2f} mV in {worst.lead})"
            )
    if measure == "t_polarity":
        leads = _leads_meeting(m, "t_polarity", lambda v: v == "negative")
        if leads:
            return f"inverted T waves in {', '.join(leads)}"
    if measure == "qrs_amplitude_mv":
        amps = [lm.qrs_amplitude_mv for lm in m.leads[:6] if lm.qrs_amplitude_mv is not None]
        if amps:
            return f"largest limb-lead QRS amplitude {max(amps):.2f} mV"
    return None


def _sentence(phrases: list[str]) -> str:
    text = "; ".join(phrases)
    return text[0].upper() + text[1:] + "."


def grounded_text(abbrev: str, m: Measurements) -> str | None:
    """One or two sentences citing this record's values that bear on ``abbrev``.

    Returns None (the caller keeps the generic text) when the finding has no measurable
    criteria, none of them was measured, or the measurements contradict it.
    """
    if abbrev not in knowledge_base():
        return None
    check = check_finding(abbrev, m)
    if check.verdict != CONSISTENT:
        return None
    measures: list[str] = []
    for r in check.results:
        if r.met and r.criterion.measure not in measures:
            measures.append(r.criterion.measure)
    first = [p for p in (_phrase(x, m, abbrev) for x in measures) if p]
    if not first:
        return None
    # Context the reader checks next: rate, then the intervals not already cited.
    context = [
        x for x in ("heart_rate_bpm", "pr_ms", "qrs_ms", "qtc_bazett_ms") if x not in measures
    ]
    second = [p for p in (_phrase(x, m, abbrev) for x in context) if p]
    return _sentence(first) + (" " + _sentence(second) if second else "")
