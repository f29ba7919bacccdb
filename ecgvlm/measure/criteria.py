"""Whether a record's measurements agree with a finding's measurable criteria.

The criteria live in the knowledge base (``criteria`` in ``ecgvlm/data/knowledge.yaml``,
from the guideline each entry names); this module checks ``Measurements`` against them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from ecgvlm.knowledge import Criterion, knowledge
from ecgvlm.measure.core import Measurements

CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
NOT_MEASURABLE = "not_measurable"

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class CriterionResult:
    """One criterion against one record.

    Attributes:
        criterion: The criterion checked.
        met: True / False, or None when not measurable.
        observed: The measured value (per-lead measures: ``{lead: value}``), None if absent.
        reason: Why it is not measurable, else "".
    """

    criterion: Criterion
    met: bool | None
    observed: object
    reason: str = ""

    def __str__(self) -> str:
        if self.met is None:
            return f"{self.criterion}: not measurable ({self.reason})"
        return f"{self.criterion}: {'met' if self.met else 'not met'} (measured {self.observed})"


@dataclass(frozen=True)
class FindingCheck:
    """A finding's criteria against one record's measurements.

    Attributes:
        abbrev: The finding.
        verdict: ``"consistent"`` (no criterion fails and at least one was measured),
            ``"inconsistent"`` (at least one fails) or ``"not_measurable"`` (none could be
            measured, or the finding has no measurable criteria).
        results: One CriterionResult per criterion.
    """

    abbrev: str
    verdict: str
    results: tuple[CriterionResult, ...]

    def summary(self) -> str:
        """One line: the verdict and each criterion's numbers."""
        if not self.results:
            return f"{self.abbrev}: {self.verdict} (no measurable criteria)"
        return f"{self.abbrev}: {self.verdict}; " + "; ".join(str(r) for r in self.results)


def _check(c: Criterion, m: Measurements) -> CriterionResult:
    op = _OPS[c.op]
    if not c.leads:
        value = getattr(m, c.measure)
        if value is None:
            return CriterionResult(c, None, None, m.reasons.get(c.measure, "not measured"))
        return CriterionResult(c, bool(op(value, c.value)), value)
    observed = {}
    for name in c.leads:
        lm = m.lead(name)
        value = getattr(lm, c.measure) if lm is not None else None
        if value is not None:
            observed[name] = value
    n_met = sum(bool(op(v, c.value)) for v in observed.values())
    if n_met >= c.min_leads:
        return CriterionResult(c, True, observed)
    # Unmeasured leads could still supply the missing ones: only then is it undecided.
    if n_met + (len(c.leads) - len(observed)) >= c.min_leads:
        missing = [n for n in c.leads if n not in observed]
        return CriterionResult(c, None, observed, f"not measured in {', '.join(missing)}")
    return CriterionResult(c, False, observed)


def check_finding(abbrev: str, measurements: Measurements) -> FindingCheck:
    """Check a finding's measurable criteria against a record's measurements.

    Args:
        abbrev: Canonical finding abbreviation (a knowledge base key).
        measurements: ``measure_record`` output for the record.

    Returns:
        FindingCheck with the verdict and the numbers behind it.

    Raises:
        KeyError: ``abbrev`` has no knowledge entry.
    """
    results = tuple(_check(c, measurements) for c in knowledge(abbrev).criteria)
    if any(r.met is False for r in results):
        verdict = INCONSISTENT
    elif any(r.met for r in results):
        verdict = CONSISTENT
    else:
        verdict = NOT_MEASURABLE
    return FindingCheck(abbrev, verdict, results)
