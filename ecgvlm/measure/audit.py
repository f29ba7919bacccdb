"""Records whose labels contradict their own measurements (``ecgvlm datasets audit``).

Public ECG labels are noisy; a researcher wants to see where before training. Each labelled
finding with measurable criteria is checked with ``check_finding``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ecgvlm.knowledge import knowledge_base
from ecgvlm.measure.core import MeasureConfig, measure_record
from ecgvlm.measure.criteria import CONSISTENT, INCONSISTENT, check_finding
from ecgvlm.records import EcgRecord


@dataclass
class LabelAudit:
    """Counts for one label over the audited records."""

    label: str
    consistent: int = 0
    inconsistent: int = 0
    not_measurable: int = 0
    records: list[str] = field(default_factory=list)


@dataclass
class AuditResult:
    """Per label: counts and the records whose measurements contradict it (with numbers)."""

    n_records: int
    labels: dict[str, LabelAudit]
    contradictions: list[tuple[str, str, str]]  # (record_id, label, check summary)


def audit_records(records: Iterable[EcgRecord], config: MeasureConfig | None = None) -> AuditResult:
    """Measure each record and check each of its labels that has measurable criteria."""
    config = config or MeasureConfig()
    kb = knowledge_base()
    per_label: dict[str, LabelAudit] = {}
    contradictions = []
    n = 0
    for rec in records:
        n += 1
        labels = [lab for lab in rec.labels if lab in kb and kb[lab].criteria]
        if not labels:
            continue
        m = measure_record(rec, config)
        for lab in labels:
            check = check_finding(lab, m)
            entry = per_label.setdefault(lab, LabelAudit(lab))
            if check.verdict == CONSISTENT:
                entry.consistent += 1
            elif check.verdict == INCONSISTENT:
                entry.inconsistent += 1
                entry.records.append(rec.record_id)
                contradictions.append((rec.record_id, lab, check.summary()))
            else:
                entry.not_measurable += 1
    return AuditResult(n, dict(sorted(per_label.items())), contradictions)
