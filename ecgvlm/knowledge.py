"""Clinical knowledge about each canonical ECG finding: criteria, key features, look-alikes.

The data live in ``ecgvlm/data/knowledge.yaml`` (written in our own words from the guideline
each entry names). ``make_mcq`` takes its options and explanations from here, and explanation
checks use ``key_features``. Nothing is read at import; the file loads on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ecgvlm import labels

# What a criterion may compare (the names of ecgvlm.measure's fields, kept here so that
# loading the knowledge base does not import the measurer; a test checks they agree).
RECORD_MEASURES = (
    "heart_rate_bpm", "rr_mean_ms", "rr_sd_ms", "rr_irregularity", "rr_irregular", "n_beats",
    "premature_beats", "p_wave_fraction", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
    "qtc_fridericia_ms", "qrs_axis_deg",
)
LEAD_MEASURES = ("st_deviation_mv", "t_polarity", "qrs_amplitude_mv")
CRITERION_OPS = ("<", "<=", ">", ">=", "==")


@dataclass(frozen=True)
class Criterion:
    """One measurable criterion of a finding, e.g. ``heart_rate_bpm < 60``.

    Attributes:
        measure: A field of ``ecgvlm.measure.Measurements`` (``RECORD_MEASURES``) or, with
            ``leads``, of ``LeadMeasurements`` (``LEAD_MEASURES``).
        op: One of ``CRITERION_OPS``.
        value: The threshold (a number, a bool, or a T polarity string).
        leads: For per-lead measures: the leads it is checked in.
        min_leads: For per-lead measures: how many of ``leads`` must meet it.
    """

    measure: str
    op: str
    value: float | bool | str
    leads: tuple[str, ...] = ()
    min_leads: int = 1

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        text = f"{self.measure} {self.op} {value}"
        if self.leads:
            text += f" in at least {self.min_leads} of {', '.join(self.leads)}"
        return text


class KnowledgeError(RuntimeError):
    """The packaged knowledge base is inconsistent (a programming error, named precisely)."""


@dataclass(frozen=True)
class FindingKnowledge:
    """What the knowledge base says about one finding.

    Attributes:
        abbrev: Canonical abbreviation (a key of ``ecgvlm.labels.FINDINGS``).
        name: Display name, e.g. ``"Right bundle branch block"``.
        snomed: SNOMED-CT code, equal to the vocabulary's.
        summary: One sentence of criteria; the text of an MCQ option.
        description: The fuller criteria: rate, rhythm, P waves, PR, QRS, ST/T, leads.
        key_features: Short phrases an explanation of this finding should mention.
        confusable: Findings easily mistaken for this one (hard MCQ distractors).
        overlaps: Findings that may hold at the same time; never distractors for it.
        distractor_only_with: When non-empty, this finding is a distractor only for records
            carrying one of these labels (they rule it out).
        guideline: Key of the guideline whose criteria the entry follows.
        guideline_citation: That guideline's full citation.
        criteria: Measurable criteria (all must hold); empty where none is measurable.
    """

    abbrev: str
    name: str
    snomed: str
    summary: str
    description: str
    key_features: tuple[str, ...]
    confusable: tuple[str, ...]
    overlaps: tuple[str, ...]
    distractor_only_with: tuple[str, ...]
    guideline: str
    guideline_citation: str
    criteria: tuple[Criterion, ...] = ()

    @property
    def option_text(self) -> str:
        """``"<Name>: <summary>"``, the default MCQ option for this finding."""
        return f"{self.name}: {self.summary}"


_REQUIRED = ("name", "snomed", "guideline", "summary", "description", "key_features", "confusable")


def _load_raw() -> dict[str, Any]:
    text = resources.files("ecgvlm").joinpath("data", "knowledge.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "findings" not in data or "guidelines" not in data:
        raise KnowledgeError("knowledge.yaml must hold 'guidelines' and 'findings' mappings")
    return data


def _criteria(entry: dict[str, Any], abbrev: str) -> tuple[Criterion, ...]:
    raw = entry.get("criteria", []) or []
    if not isinstance(raw, list):
        raise KnowledgeError(f"knowledge.yaml: {abbrev}.criteria must be a list")
    out = []
    for i, c in enumerate(raw):
        where = f"knowledge.yaml: {abbrev}.criteria[{i}]"
        if not isinstance(c, dict) or set(c) - {"measure", "op", "value", "leads", "min_leads"}:
            raise KnowledgeError(f"{where} must map measure, op, value[, leads, min_leads]")
        leads = tuple(c.get("leads", ()) or ())
        allowed = LEAD_MEASURES if leads else RECORD_MEASURES
        if c.get("measure") not in allowed:
            raise KnowledgeError(
                f"{where}: measure {c.get('measure')!r} is not one of {', '.join(allowed)}"
            )
        if c.get("op") not in CRITERION_OPS:
            raise KnowledgeError(f"{where}: op {c.get('op')!r} is not one of {CRITERION_OPS}")
        min_leads = int(c.get("min_leads", 1))
        if leads and not 1 <= min_leads <= len(leads):
            raise KnowledgeError(f"{where}: min_leads must be in [1, {len(leads)}]")
        out.append(Criterion(c["measure"], c["op"], c.get("value"), leads, min_leads))
    return tuple(out)


def _str_tuple(entry: dict[str, Any], key: str, abbrev: str) -> tuple[str, ...]:
    value = entry.get(key, []) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise KnowledgeError(f"knowledge.yaml: {abbrev}.{key} must be a list of strings")
    return tuple(value)


@functools.cache
def knowledge_base() -> dict[str, FindingKnowledge]:
    """Return canonical abbreviation -> FindingKnowledge (loaded and checked once).

    Raises:
        KnowledgeError: a missing field, an unknown guideline, a reference to a finding that
            has no entry, or a finding confused or overlapping with itself.
    """
    data = _load_raw()
    guidelines: dict[str, str] = {k: " ".join(str(v).split()) for k, v in data["guidelines"].items()}
    raw: dict[str, dict[str, Any]] = data["findings"]
    # Overlap is mutual: if A may hold together with B, B may hold together with A.
    overlaps: dict[str, set[str]] = {k: set() for k in raw}
    for abbrev, entry in raw.items():
        for other in _str_tuple(entry, "overlaps", abbrev):
            if other not in raw:
                raise KnowledgeError(f"knowledge.yaml: {abbrev}.overlaps names unknown {other!r}")
            overlaps[abbrev].add(other)
            overlaps[other].add(abbrev)

    out: dict[str, FindingKnowledge] = {}
    for abbrev, entry in raw.items():
        missing = [k for k in _REQUIRED if not entry.get(k)]
        if missing:
            raise KnowledgeError(f"knowledge.yaml: {abbrev} lacks {', '.join(missing)}")
        if entry["guideline"] not in guidelines:
            raise KnowledgeError(
                f"knowledge.yaml: {abbrev}.guideline {entry['guideline']!r} is not one of "
                f"{', '.join(sorted(guidelines))}"
            )
        confusable = _str_tuple(entry, "confusable", abbrev)
        only_with = _str_tuple(entry, "distractor_only_with", abbrev)
        for field_name, refs in (("confusable", confusable), ("distractor_only_with", only_with)):
            for other in refs:
                if other not in raw or other == abbrev:
                    raise KnowledgeError(
                        f"knowledge.yaml: {abbrev}.{field_name} names {other!r}, which is "
                        "itself or has no entry"
                    )
        out[abbrev] = FindingKnowledge(
            abbrev=abbrev,
            name=str(entry["name"]).strip(),
            snomed=str(entry["snomed"]).strip(),
            summary=" ".join(str(entry["summary"]).split()),
            description=" ".join(str(entry["description"]).split()),
            key_features=_str_tuple(entry, "key_features", abbrev),
            confusable=confusable,
            overlaps=tuple(sorted(overlaps[abbrev] - {abbrev})),
            distractor_only_with=only_with,
            guideline=entry["guideline"],
            guideline_citation=guidelines[entry["guideline"]],
            criteria=_criteria(entry, abbrev),
        )
    return out


def guidelines() -> dict[str, str]:
    """Guideline key -> full citation."""
    return {k: " ".join(str(v).split()) for k, v in _load_raw()["guidelines"].items()}


def knowledge(abbrev: str) -> FindingKnowledge:
    """The knowledge entry of one canonical label.

    Raises:
        KeyError: the label has no entry (explicit unknowns ``"UNK:..."`` never do).
    """
    kb = knowledge_base()
    if abbrev not in kb:
        what = "an explicit unknown code" if labels.is_unknown(abbrev) else "not a known finding"
        raise KeyError(f"no knowledge entry for {abbrev!r}: {what}")
    return kb[abbrev]


def missing_entries(candidates: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Canonical labels (default: every label the readers can emit) without an entry."""
    if candidates is None:
        candidates = labels.emittable_labels()
    kb = knowledge_base()
    return sorted(c for c in candidates if c not in kb and not labels.is_unknown(c))
