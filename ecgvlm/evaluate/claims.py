"""Explanations checked against the signal: the claims an explanation makes, and whether the
record's own measurements (``ecgvlm.measure``) and labels support them.

``extract_claims(text)`` finds the checkable statements of an explanation by rules over a
vocabulary built from the label vocabulary and the knowledge base (names, abbreviations,
synonyms):

* numeric: heart rate (bpm), PR, QRS, QT and QTc (ms, or s: "0.20 s"), QRS axis (degrees),
  each with its comparison ("QRS >= 120 ms", "rate 60-100 bpm", "PR of 168 ms");
* categorical: bradycardia / tachycardia / normal rate, regular / irregular rhythm, P waves
  present or absent, PR prolonged / short, QRS wide / narrow, QT(c) prolonged, left / right /
  normal axis, ST elevation / depression and T-wave inversion in named leads or lead groups
  (inferior, lateral, anterior, septal, ...);
* named findings ("atrial fibrillation", "RBBB", "first-degree AV block").

A negation cue before a claim in its clause ("no", "without", "absence of", "not") or after
it ("P waves are absent") flips its polarity; a hedge ("cannot exclude", "possible", "may",
"suggests") makes it unverifiable. Every claim keeps its character span.

``check_claims(claims, measurements, labels)`` gives each claim a verdict, ``supported``,
``contradicted`` or ``unverifiable``, with the measured value and the rule (threshold and
tolerance) used; thresholds and tolerances are one ``ClaimConfig`` whose defaults follow the
guidelines the knowledge base cites (AHA/ACCF/HRS 2009: rate 60 / 100 bpm, PR 120 / 200 ms,
QRS 120 ms, QTc 450 / 460 ms, axis -30 / +90 degrees, ST 0.1 mV elevation and 0.05 mV
depression). A named finding is supported by the record's labels or by ``check_finding``
agreeing with its measurements, and contradicted by measurements that fail its criteria or
by a label for another rhythm.

Nothing here reads a file or the network: claims are pure functions of the text.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ecgvlm.config import check_range

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
UNVERIFIABLE = "unverifiable"
VERDICTS = (SUPPORTED, CONTRADICTED, UNVERIFIABLE)

#: Explanations longer than this are not read (a runaway generation is no explanation).
MAX_TEXT_CHARS = 100_000

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
#: Lead groups as clinicians name them (contiguous-lead territories).
LEAD_GROUPS: dict[str, tuple[str, ...]] = {
    "inferior": ("II", "III", "aVF"),
    "high lateral": ("I", "aVL"),
    "lateral": ("I", "aVL", "V5", "V6"),
    "anterolateral": ("V3", "V4", "V5", "V6", "I", "aVL"),
    "anteroseptal": ("V1", "V2", "V3", "V4"),
    "septal": ("V1", "V2"),
    "anterior": ("V3", "V4"),
    "precordial": ("V1", "V2", "V3", "V4", "V5", "V6"),
    "chest": ("V1", "V2", "V3", "V4", "V5", "V6"),
    "limb": ("I", "II", "III", "aVR", "aVL", "aVF"),
}


@dataclass(frozen=True)
class ClaimConfig:
    """Thresholds (guideline values) and tolerances (how far a stated number may be from the
    measured one and still agree: automatic and manual readings of one ECG differ by about
    this much) of ``check_claims``.

    Attributes:
        brady_bpm, tachy_bpm: Bradycardia below, tachycardia above.
        pr_short_ms, pr_long_ms: PR short below, prolonged above.
        qrs_wide_ms: QRS wide at or above.
        qtc_long_ms: QTc prolonged at or above (the male limit); ``qtc_long_female_ms``
            (the female limit) and between them a "prolonged" claim is unverifiable, the
            sex being unknown.
        axis_left_deg, axis_right_deg: Left axis deviation below, right above.
        st_elevation_mv, st_depression_mv: ST elevation at or above, depression at or below
            minus this.
        st_tolerance_mv: An ST claim is contradicted only when no named lead comes within
            this of the threshold.
        p_present_fraction: P waves present when at least this share of beats has one;
            ``p_margin`` on either side is undecided.
        rate_tolerance_bpm, pr_tolerance_ms, qrs_tolerance_ms, qt_tolerance_ms,
            axis_tolerance_deg: Agreement margins of stated numbers.
    """

    brady_bpm: float = 60.0
    tachy_bpm: float = 100.0
    pr_short_ms: float = 120.0
    pr_long_ms: float = 200.0
    qrs_wide_ms: float = 120.0
    qtc_long_ms: float = 450.0
    qtc_long_female_ms: float = 460.0
    axis_left_deg: float = -30.0
    axis_right_deg: float = 90.0
    st_elevation_mv: float = 0.1
    st_depression_mv: float = 0.05
    st_tolerance_mv: float = 0.025
    p_present_fraction: float = 0.5
    p_margin: float = 0.2
    rate_tolerance_bpm: float = 10.0
    pr_tolerance_ms: float = 40.0
    qrs_tolerance_ms: float = 30.0
    qt_tolerance_ms: float = 40.0
    axis_tolerance_deg: float = 30.0

    def __post_init__(self) -> None:
        for name in ("rate_tolerance_bpm", "pr_tolerance_ms", "qrs_tolerance_ms",
                     "qt_tolerance_ms", "axis_tolerance_deg", "st_tolerance_mv", "p_margin"):
            check_range(f"claims.{name}", getattr(self, name), 0.0, None)
        if not self.brady_bpm < self.tachy_bpm:
            raise ValueError("claims.brady_bpm must be below claims.tachy_bpm")


@dataclass(frozen=True)
class Claim:
    """One checkable statement of an explanation.

    Attributes:
        kind: What it is about: ``heart_rate``, ``pr``, ``qrs``, ``qt``, ``qtc``, ``axis``
            (numeric), ``rate``, ``rhythm``, ``p_waves``, ``pr_length``, ``qrs_width``,
            ``qt_length``, ``axis_deviation``, ``st_elevation``, ``st_depression``,
            ``t_inversion`` (categorical) or ``finding``.
        value: A number in the kind's unit (bpm, ms, degrees), a category (``brady``,
            ``tachy``, ``normal``, ``regular``, ``irregular``, ``present``, ``prolonged``,
            ``short``, ``wide``, ``narrow``, ``left``, ``right``), a finding abbreviation,
            or None (ST and T claims).
        op: For numbers: ``=``, ``>=``, ``>``, ``<=``, ``<`` or ``between`` (``value`` and
            ``high``).
        high: Upper bound of a ``between``.
        leads: The leads a per-lead claim names (empty: any lead).
        negated: The text denies it ("no ST elevation").
        hedged: The text does not commit to it ("cannot exclude"): never verified.
        span: (start, end) character offsets in the text.
        text: The words the claim was read from.
    """

    kind: str
    value: float | str | None
    span: tuple[int, int]
    text: str
    op: str = "="
    high: float | None = None
    leads: tuple[str, ...] = ()
    negated: bool = False
    hedged: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["span"] = list(self.span)
        data["leads"] = list(self.leads)
        return data


@dataclass(frozen=True)
class Verdict:
    """One claim against one record.

    Attributes:
        claim: The claim.
        verdict: ``supported``, ``contradicted`` or ``unverifiable``.
        measured: The measured value(s) it was checked against (per lead: ``{lead: value}``).
        rule: The threshold or tolerance applied, in words.
        reason: Why it is unverifiable, else "".
    """

    claim: Claim
    verdict: str
    measured: Any = None
    rule: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        measured = self.measured
        if isinstance(measured, float) and not math.isfinite(measured):
            measured = None
        return {**self.claim.to_json(), "verdict": self.verdict, "measured": measured,
                "rule": self.rule, "reason": self.reason}


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_NUM = r"[+\-−–]?\d{1,3}(?:\.\d+)?"
_COMPARATOR = (r"(?P<cmp>>=|≥|=>|<=|≤|=<|>|<|=|of at least|at least|of more than|more than|"
               r"greater than|longer than|above|over|exceeding|of less than|less than|"
               r"shorter than|below|under|of about|about|around|approximately|of|is|was|at|"
               r"measures|measuring|measured at|:|~)?")
_GE = {">=", "≥", "=>", "of at least", "at least"}
_GT = {">", "of more than", "more than", "greater than", "longer than", "above", "over",
       "exceeding"}
_LE = {"<=", "≤", "=<"}
_LT = {"<", "of less than", "less than", "shorter than", "below", "under"}

# name -> (claim kind, pattern of the quantity's name)
_NUMERIC_NAMES: dict[str, tuple[str, str]] = {
    "qtc": ("qtc", r"\bQTc(?:\s*\((?:Bazett|Fridericia)\))?(?:\s+interval)?"),
    "qt": ("qt", r"\bQT(?!c)(?:\s+interval)?"),
    "pr": ("pr", r"\bPR(?:\s+interval)?"),
    "qrs": ("qrs", r"\bQRS(?:\s+(?:duration|width|interval|complex(?:es)?))?"),
    "axis": ("axis", r"\b(?:(?:QRS|frontal(?:\s+plane)?|electrical)\s+)?axis"),
    "heart_rate": ("heart_rate", r"\b(?:(?:heart|ventricular|atrial|sinus)\s+)?rate"),
}
_UNIT = r"(?P<unit>ms|msec|milliseconds?|s|sec|seconds?|bpm|beats?\s*(?:per|/)\s*min(?:ute)?|/min|°|deg(?:rees?)?)?"


@functools.lru_cache(maxsize=1)
def _numeric_patterns() -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for kind, name in _NUMERIC_NAMES.values():
        out.append((kind, re.compile(
            name + r"\s*" + _COMPARATOR + r"\s*(?P<num>" + _NUM + r")"
            r"(?:\s*(?:-|–|to)\s*(?P<high>" + _NUM + r"))?\s*" + _UNIT + r"(?![\w%])",
            re.IGNORECASE)))
    # A rate stated by its unit alone ("at 48 bpm", "HR 110/min").
    out.append(("heart_rate", re.compile(
        r"(?:\bHR\s*:?\s*)?(?P<cmp>)(?P<num>\d{2,3})(?:\s*(?:-|–|to)\s*(?P<high>\d{2,3}))?\s*"
        r"(?P<unit>bpm|beats?\s*(?:per|/)\s*min(?:ute)?|/min)\b", re.IGNORECASE)))
    return out


def _number(text: str) -> float:
    return float(text.replace("−", "-").replace("–", "-"))


def _to_unit(kind: str, value: float, unit: str) -> float | None:
    """A stated number in the kind's unit (ms for intervals), or None when it cannot be one."""
    unit = unit.lower().strip()
    if kind in ("pr", "qrs", "qt", "qtc"):
        if unit.startswith("s") or (not unit and 0 < value < 1):  # "0.20 s", "PR 0.16"
            return value * 1000.0
        if unit and not unit.startswith("m"):
            return None
        return value
    if kind == "heart_rate":
        return value if not unit or "min" in unit or unit == "bpm" else None
    if kind == "axis":
        return value if not unit or unit.startswith(("°", "deg")) else None
    return value


def _op(comparator: str) -> str:
    c = (comparator or "").lower().strip()
    if c in _GE:
        return ">="
    if c in _GT:
        return ">"
    if c in _LE:
        return "<="
    if c in _LT:
        return "<"
    return "="


# Categorical claims: (kind, value, pattern). Longer phrasings first; matches may not overlap.
_CATEGORICAL: tuple[tuple[str, str, str], ...] = (
    ("rhythm", "irregular", r"\birregularly\s+irregular(?:\s+(?:rhythm|RR(?:\s+intervals?)?))?"),
    ("rhythm", "irregular", (r"\birregular(?:ly)?\s+(?:(?:ventricular|cardiac|heart|sinus|"
                            r"(?:narrow|wide|broad)[- ]complex)\s+)?"
                            r"(?:rhythm|RR(?:\s+intervals?)?|R-R(?:\s+intervals?)?|rate|tachycardia)")),
    ("rhythm", "irregular", r"\b(?:RR|R-R)\s+intervals?\s+(?:are\s+|were\s+)?irregular"),
    ("rhythm", "regular", (r"\bregular\s+(?:(?:ventricular|cardiac|heart|sinus|"
                          r"(?:narrow|wide|broad)[- ]complex)\s+)?"
                          r"(?:rhythm|RR(?:\s+intervals?)?|R-R(?:\s+intervals?)?|rate|tachycardia)")),
    ("rhythm", "regular", r"\b(?:RR|R-R)\s+intervals?\s+(?:are\s+|were\s+)?regular"),
    ("p_waves", "present", (r"\b(?:(?:discernible|visible|identifiable|normal|upright|consistent|"
                           r"clear|distinct)\s+)?P[- ]waves?(?:\s+before\s+(?:each|every|the)\s+QRS"
                           r"(?:\s+complex(?:es)?)?)?")),
    ("pr_length", "prolonged", (r"\b(?:prolonged|long|lengthened)\s+PR(?:\s+interval)?|"
                               r"\bPR(?:\s+interval)?\s+(?:is\s+)?(?:not\s+)?(?:prolonged|prolongation|lengthening)")),
    ("pr_length", "short", r"\bshort(?:ened)?\s+PR(?:\s+interval)?|\bPR(?:\s+interval)?\s+(?:is\s+)?short"),
    ("qrs_width", "wide", (r"\b(?:wide|broad|widened|prolonged)\s+QRS(?:\s+complex(?:es)?)?|"
                          r"\bQRS(?:\s+complex(?:es)?)?\s+(?:is\s+|are\s+)?(?:not\s+)?(?:wide|broad|widening|prolonged)")),
    ("qrs_width", "narrow", (r"\bnarrow\s+QRS(?:\s+complex(?:es)?)?|\bnarrow[- ]complex|"
                            r"\bQRS(?:\s+complex(?:es)?)?\s+(?:is\s+|are\s+)?(?:not\s+)?narrow")),
    ("qt_length", "prolonged", (r"\b(?:prolonged|long)\s+QTc?(?:\s+interval)?|"
                               r"\bQTc?(?:\s+interval)?\s+(?:is\s+)?(?:not\s+)?(?:prolonged|prolongation)")),
    ("axis_deviation", "left", r"\bleft\s+axis\s+deviation|\bleftward\s+axis|\baxis\s+(?:is\s+)?deviated\s+to\s+the\s+left"),
    ("axis_deviation", "right", r"\bright\s+axis\s+deviation|\brightward\s+axis|\baxis\s+(?:is\s+)?deviated\s+to\s+the\s+right"),
    ("axis_deviation", "normal", r"\bnormal\s+(?:QRS\s+|frontal\s+)?axis"),
    ("st_elevation", None, r"\bST[- ](?:segment\s+)?elevations?|\bST[- ]elevated|\belevat(?:ed|ion\s+of\s+the)\s+ST(?:\s+segments?)?"),
    ("st_depression", None, r"\bST[- ](?:segment\s+)?depressions?|\bST[- ]depressed|\bdepress(?:ed|ion\s+of\s+the)\s+ST(?:\s+segments?)?"),
    ("t_inversion", None, (r"\bT[- ]wave\s+inversions?|\binverted\s+T(?:[- ]waves?)?|\bT[- ]waves?\s+(?:are\s+)?inverted|"
                          r"\bnegative\s+T[- ]waves?")),
    ("rate", "brady", r"\bbradycardi(?:a|c)\b"),
    ("rate", "tachy", r"\btachycardi(?:a|c)\b"),
    ("rate", "normal", r"\bnormal\s+(?:heart\s+|ventricular\s+)?rate\b"),
)
_PER_LEAD = {"st_elevation", "st_depression", "t_inversion"}

# Finding synonyms the label names do not cover (lower case; word boundaries added).
_FINDING_SYNONYMS: dict[str, str] = {
    "afib": "AF", "a-fib": "AF", "a fib": "AF", "af": "AF", "aflutter": "AFL", "a-flutter": "AFL",
    "normal sinus rhythm": "NSR", "nsr": "NSR", "sinus rhythm": "NSR",
    "rbbb": "RBBB", "lbbb": "LBBB", "irbbb": "IRBBB", "lafb": "LAnFB",
    "left anterior hemiblock": "LAnFB", "left anterior fascicular block": "LAnFB",
    "first degree av block": "IAVB", "first-degree av block": "IAVB", "1st degree av block": "IAVB",
    "1st-degree av block": "IAVB", "first degree heart block": "IAVB",
    "mobitz i": "MoI", "mobitz type i": "MoI", "wenckebach": "MoI", "mobitz ii": "IIAVBII",
    "mobitz type ii": "IIAVBII", "third degree av block": "CHB", "third-degree av block": "CHB",
    "complete heart block": "CHB", "third-degree heart block": "CHB", "complete av block": "CHB",
    "wpw": "WPW", "wolff-parkinson-white": "WPW", "pre-excitation": "WPW", "preexcitation": "WPW",
    "pvc": "PVC", "pvcs": "PVC", "premature ventricular complex": "PVC",
    "premature ventricular complexes": "PVC", "premature ventricular contractions": "PVC",
    "premature ventricular beats": "PVC", "ventricular ectopic beats": "PVC",
    "ventricular ectopics": "PVC", "pac": "PAC", "pacs": "PAC",
    "premature atrial complex": "PAC", "premature atrial complexes": "PAC",
    "premature atrial contractions": "PAC", "premature atrial beats": "PAC",
    "svt": "SVT", "vt": "VTach", "v-tach": "VTach", "vf": "VF", "v-fib": "VF", "lvh": "LVH",
    "rvh": "RVH", "paced rhythm": "PR", "pacemaker rhythm": "PR", "junctional rhythm": "AVJR",
    "left atrial enlargement": "LAE", "right atrial enlargement": "RAH",
    "low voltage": "LQRSV", "low qrs voltage": "LQRSV",
    "myocardial infarction": "MI", "pathological q waves": "QAb",
}
# Findings read by the categorical patterns instead (their names are quantities' words).
_NOT_AS_FINDINGS = {"Brady", "LPR", "LQT", "STD", "STE", "TInv", "LAD", "RAD"}
# Abbreviations matched case-sensitively only (as words they are ordinary English).
_CASE_SENSITIVE = {"af", "vt", "vf", "pac", "pacs", "svt", "nsr"}


def _name_variants(name: str) -> set[str]:
    """A name as written, without its parenthetical, and with it: "complete (third-degree)
    heart block" also reads "complete heart block" and "third-degree heart block"; "left
    atrial enlargement (left atrial abnormality)" also "left atrial abnormality"."""
    name = name.lower()
    out = {name, re.sub(r"\s*\([^)]*\)", "", name).strip()}
    m = re.search(r"(\S+)\s*\(([^)]*)\)", name)
    if m:
        inner = m.group(2).strip()
        if " " in inner:
            out.add(inner)
        else:
            out.add((name[:m.start(1)] + inner + name[m.end():]).strip())
    out |= {variant.replace("atrioventricular", "av") for variant in out}
    return {re.sub(r"\s+", " ", v) for v in out if len(v) > 3}


@functools.lru_cache(maxsize=1)
def finding_vocabulary() -> dict[str, str]:
    """Lower-case phrase -> finding abbreviation: label names, knowledge base names (with and
    without their parentheses, "atrioventricular" as "AV"), and common synonyms."""
    from ecgvlm.knowledge import knowledge_base
    from ecgvlm.labels import findings

    vocab: dict[str, str] = {}
    names = [(f.abbrev, f.name) for f in findings().values()]
    names += [(k.abbrev, k.name) for k in knowledge_base().values()]
    for abbrev, name in names:
        if abbrev in _NOT_AS_FINDINGS:
            continue
        for variant in _name_variants(name):
            vocab.setdefault(variant, abbrev)
    for phrase, abbrev in _FINDING_SYNONYMS.items():
        vocab.setdefault(phrase, abbrev)
    return vocab


@functools.lru_cache(maxsize=1)
def _finding_pattern() -> re.Pattern[str]:
    phrases = sorted((p for p in finding_vocabulary() if p not in _CASE_SENSITIVE), key=len,
                     reverse=True)
    alternation = "|".join(re.escape(p).replace(r"\ ", r"[\s-]+") for p in phrases)
    return re.compile(r"(?<![\w-])(?:" + alternation + r")s?(?![\w-])", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _abbrev_pattern() -> re.Pattern[str]:
    words = sorted((p.upper() for p in _CASE_SENSITIVE), key=len, reverse=True)
    return re.compile(r"(?<![\w-])(?:" + "|".join(words) + r")s?(?![\w-])")


_LEAD_TOKEN = r"(?<![A-Za-z0-9])(?:aVR|aVL|aVF|AVR|AVL|AVF|V[1-6]|III|II|I)(?![A-Za-z0-9])"
_LEAD_LIST = re.compile(
    r"^\s*(?:(?:at\s+J\+\d+\s*ms\s+)?(?:in|across|over|throughout)\s+(?:the\s+)?)"
    r"(?P<list>(?:(?:leads?\s+)?" + _LEAD_TOKEN + r"(?:\s*(?:-|–|to|through)\s*" + _LEAD_TOKEN + r")?"
    r"|(?:high\s+lateral|inferior|lateral|anterolateral|anteroseptal|septal|anterior|precordial|"
    r"chest|limb)(?:\s+leads?)?)(?:\s*(?:,|/|and|&|,\s*and)\s*(?:(?:leads?\s+)?" + _LEAD_TOKEN +
    r"(?:\s*(?:-|–|to|through)\s*" + _LEAD_TOKEN + r")?|(?:high\s+lateral|inferior|lateral|"
    r"anterolateral|anteroseptal|septal|anterior|precordial|chest|limb)(?:\s+leads?)?))*)",
    re.IGNORECASE)
_GROUP_BEFORE = re.compile(
    r"\b(?P<group>high\s+lateral|inferior|lateral|anterolateral|anteroseptal|septal|anterior|"
    r"precordial|inferolateral)\s+$", re.IGNORECASE)


def _canonical_lead(token: str) -> str:
    token = token.strip()
    return {"AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}.get(token.upper(), token.upper() if
                                                          token[0] in "vV" else token)


def parse_leads(text: str) -> tuple[str, ...]:
    """Leads named in ``text``: lead names, ranges ("V1-V3") and groups ("inferior")."""
    out: list[str] = []
    for m in re.finditer(r"(?P<a>" + _LEAD_TOKEN + r")(?:\s*(?:-|–|to|through)\s*(?P<b>" +
                         _LEAD_TOKEN + r"))?|\b(?P<g>high\s+lateral|inferolateral|inferior|"
                         r"lateral|anterolateral|anteroseptal|septal|anterior|precordial|chest|"
                         r"limb)\b", text, re.IGNORECASE):
        if m.group("g"):
            group = re.sub(r"\s+", " ", m.group("g").lower())
            leads = (LEAD_GROUPS["inferior"] + LEAD_GROUPS["lateral"] if group == "inferolateral"
                     else LEAD_GROUPS[group])
        else:
            a = _canonical_lead(m.group("a"))
            b = _canonical_lead(m.group("b")) if m.group("b") else None
            if b and a in LEADS and b in LEADS and LEADS.index(a) <= LEADS.index(b):
                leads = LEADS[LEADS.index(a):LEADS.index(b) + 1]
            else:
                leads = (a,) + ((b,) if b else ())
        out += [lead for lead in leads if lead in LEADS and lead not in out]
    return tuple(out)


_CLAUSE_END = re.compile(r"[.;!?\n]|,\s*(?:but|however|whereas|while)\b|\b(?:but|however|whereas)\b",
                         re.IGNORECASE)
_NEGATION_BEFORE = re.compile(
    r"\b(?:no|not|without|absence\s+of|absent|lack\s+of|lacks|lacking|negative\s+for|free\s+of|"
    r"rules?\s+out|ruled\s+out|nor|neither|never|none)\b", re.IGNORECASE)
_NEGATION_AFTER = re.compile(
    r"^\s*(?:(?:is|are|was|were)\s+)?(?:absent|not\s+(?:seen|present|visible|identified|"
    r"evident|noted|observed|discernible)|(?:cannot|can't|could\s+not)\s+be\s+(?:seen|identified))\b",
    re.IGNORECASE)
_HEDGE = re.compile(
    r"\b(?:cannot\s+(?:be\s+)?exclude[d]?|can't\s+exclude|cannot\s+rule\s+out|can't\s+rule\s+out|"
    r"cannot\s+be\s+ruled\s+out|possible|possibly|probable|probably|may|might|could|suggest(?:s|ive|"
    r"ing)?|suspicious|suspected|consider|questionable|borderline|equivocal|perhaps|"
    r"unlikely)\b", re.IGNORECASE)
_HEDGE_AFTER = re.compile(r"^\s*(?:cannot\s+be\s+(?:excluded|ruled\s+out)|is\s+possible|is\s+"
                          r"suspected|may\s+be\s+present|\?)", re.IGNORECASE)


def _clause_start(text: str, start: int) -> int:
    """Where the clause holding ``start`` begins (after the last boundary before it)."""
    lo = max(0, start - 200)
    cut = lo
    for m in _CLAUSE_END.finditer(text, lo, start):
        cut = m.end()
    return cut


# A list continues a negation to its next item: "no ST elevation or depression".
_LIST_CONTINUES = re.compile(r"^\s*,?\s*(?:or|nor)\s*$", re.IGNORECASE)


def _with_polarity(text: str, found: list[tuple[str, Any, int, int, dict[str, Any]]]) -> list[Claim]:
    """Claims with negation and hedges read from their clause (see the module docstring).

    A negation cue counts among the six words before a claim and after the previous claim
    (so "no ST elevation and a normal axis" negates only the ST claim), or right after it
    ("P waves are absent"); a list joined by "or" or commas carries it on. A hedge anywhere
    earlier in the clause, or right after the claim, makes the claim unverifiable.
    """
    claims: list[Claim] = []
    previous: Claim | None = None
    for kind, value, start, end, extra in sorted(found, key=lambda f: (f[2], f[3])):
        clause = _clause_start(text, start)
        window_start = max(clause, previous.span[1] if previous and previous.span[1] <= start else clause)
        near = " ".join(text[window_start:start].split()[-6:])
        after = text[end:end + 60]
        negated = bool(_NEGATION_BEFORE.search(near) or _NEGATION_AFTER.match(after)
                       or re.search(r"\bnot\b", text[start:end], re.IGNORECASE))
        if (not negated and previous is not None and previous.negated
                and previous.span[1] <= start and previous.span[1] >= clause
                and _LIST_CONTINUES.match(text[previous.span[1]:start])):
            negated = True
        hedged = bool(_HEDGE.search(text[clause:start]) or _HEDGE_AFTER.match(after))
        claim = Claim(kind, value, (start, end), text[start:end], negated=negated, hedged=hedged,
                      **extra)
        claims.append(claim)
        previous = claim
    return claims


def _free(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
    """``span`` overlaps nothing in ``taken`` (then it is added to it)."""
    if any(span[0] < b and a < span[1] for a, b in taken):
        return False
    taken.append(span)
    return True


def extract_claims(text: str | None) -> list[Claim]:
    """The checkable claims of an explanation, in text order (see the module docstring).

    Numbers never overlap each other, nor claims of one category kind, nor named findings, the
    longer phrasing winning; otherwise they may ("sinus bradycardia" is the finding and a
    rate category, "regular narrow-complex tachycardia" a rhythm, a QRS width and a rate). Empty, non-string or over-long (``MAX_TEXT_CHARS``) text has no
    claims; never raises.
    """
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
        return []
    found: list[tuple[str, Any, int, int, dict[str, Any]]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in _numeric_patterns():
        for m in pattern.finditer(text):
            value = _to_unit(kind, _number(m.group("num")), m.group("unit") or "")
            high = m.group("high")
            high_value = _to_unit(kind, _number(high), m.group("unit") or "") if high else None
            if value is None or (high and high_value is None):
                continue
            if kind == "heart_rate" and not 10 <= value <= 350:
                continue
            if _free(m.span(), taken):
                found.append((kind, value, *m.span(), {"op": "between" if high else _op(m.group("cmp")),
                                                       "high": high_value}))
    taken_by_kind: dict[str, list[tuple[int, int]]] = {}
    for kind, value, pattern in _CATEGORICAL:
        taken = taken_by_kind.setdefault(kind, [])
        for m in re.finditer(pattern, text, re.IGNORECASE):
            leads: tuple[str, ...] = ()
            end = m.end()
            if kind in _PER_LEAD:
                after = _LEAD_LIST.match(text[end:end + 200])
                if after and after.group("list").strip():
                    leads = parse_leads(after.group("list"))
                    end += after.end()
                group = _GROUP_BEFORE.search(text[max(0, m.start() - 30):m.start()])
                if group:
                    leads = tuple(dict.fromkeys(parse_leads(group.group("group")) + leads))
            if _free((m.start(), end), taken):
                found.append((kind, value, m.start(), end, {"leads": leads}))
    taken = []
    vocab = finding_vocabulary()
    for pattern in (_finding_pattern(), _abbrev_pattern()):
        for m in pattern.finditer(text):
            phrase = re.sub(r"[\s-]+", " ", m.group(0).lower())
            abbrev = vocab.get(phrase) or vocab.get(phrase[:-1]) or vocab.get(
                m.group(0).lower().rstrip("s"))
            if abbrev is not None and _free(m.span(), taken):
                found.append(("finding", abbrev, *m.span(), {}))
    return _with_polarity(text, found)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------

_MEASURE_OF = {"heart_rate": "heart_rate_bpm", "pr": "pr_ms", "qrs": "qrs_ms", "qt": "qt_ms",
               "axis": "qrs_axis_deg"}
_UNIT_OF = {"heart_rate": "bpm", "pr": "ms", "qrs": "ms", "qt": "ms", "qtc": "ms", "axis": "deg"}


def _tolerance(kind: str, config: ClaimConfig) -> float:
    return {"heart_rate": config.rate_tolerance_bpm, "pr": config.pr_tolerance_ms,
            "qrs": config.qrs_tolerance_ms, "qt": config.qt_tolerance_ms,
            "qtc": config.qt_tolerance_ms, "axis": config.axis_tolerance_deg}[kind]


def _agrees(claim: Claim, measured: float, tol: float) -> bool:
    v = float(claim.value)  # type: ignore[arg-type]
    if claim.op == "between":
        return v - tol <= measured <= (claim.high or v) + tol
    if claim.op in (">=", ">"):
        return measured >= v - tol
    if claim.op in ("<=", "<"):
        return measured <= v + tol
    return abs(measured - v) <= tol


def _rule_text(claim: Claim, tol: float) -> str:
    unit = _UNIT_OF[claim.kind]
    if claim.op == "between":
        return f"{claim.value:g}-{claim.high:g} {unit} within {tol:g} {unit}"
    op = "" if claim.op == "=" else claim.op + " "
    return f"{op}{claim.value:g} {unit} within {tol:g} {unit}"


def _unverifiable(claim: Claim, reason: str, measured: Any = None) -> Verdict:
    return Verdict(claim, UNVERIFIABLE, measured, "", reason)


def _decide(claim: Claim, holds: bool | None, measured: Any, rule: str, reason: str = "") -> Verdict:
    """A verdict from whether the stated (not negated) fact holds; negation flips it."""
    if holds is None:
        return Verdict(claim, UNVERIFIABLE, measured, rule, reason or "in the undecided margin")
    if claim.negated:
        holds = not holds
    return Verdict(claim, SUPPORTED if holds else CONTRADICTED, measured, rule)


def _value_of(m: Any, name: str) -> tuple[Any, str]:
    value = getattr(m, name, None)
    return value, ("" if value is not None else m.reasons.get(name, "not measured"))


def _check_numeric(claim: Claim, m: Any, config: ClaimConfig) -> Verdict:
    tol = _tolerance(claim.kind, config)
    rule = _rule_text(claim, tol)
    if claim.kind == "qtc":
        values = {k: getattr(m, k) for k in ("qtc_bazett_ms", "qtc_fridericia_ms")
                  if getattr(m, k) is not None}
        if not values:
            return _unverifiable(claim, f"QTc: {m.reasons.get('qtc_bazett_ms', 'not measured')}")
        holds = any(_agrees(claim, v, tol) for v in values.values())
        return _decide(claim, holds, values, rule + " (Bazett or Fridericia)")
    value, reason = _value_of(m, _MEASURE_OF[claim.kind])
    if value is None:
        return _unverifiable(claim, f"{_MEASURE_OF[claim.kind]}: {reason}")
    if claim.kind == "axis":  # compare on the circle
        value = value if abs(value - float(claim.value)) <= 180 else value - 360 * math.copysign(1, value)
    return _decide(claim, _agrees(claim, value, tol), value, rule)


def _meets(value: float, threshold: float, margin: float, above: bool) -> bool | None:
    """Whether ``value`` is past a guideline threshold: True when it is (>= for ``above``,
    <= otherwise), False when it misses by more than ``margin``, None in between (a margin
    where automatic and manual readings of one ECG may disagree)."""
    if above:
        return True if value >= threshold else (False if value < threshold - margin else None)
    return True if value <= threshold else (False if value > threshold + margin else None)


def _three_ways(
    value: float, low: float, high: float, margin: float
) -> tuple[bool | None, bool | None, bool | None]:
    """Whether ``value`` is below ``low``, above ``high``, and between them (``_meets``
    each; None where the margin leaves it undecided)."""
    below = _meets(value, low, margin, above=False)
    above = _meets(value, high, margin, above=True)
    inside = (_meets(value, low, margin, above=True), _meets(value, high, margin, above=False))
    between = False if False in inside else (None if None in inside else True)
    return below, above, between


def _check_category(claim: Claim, m: Any, config: ClaimConfig) -> Verdict:
    kind, value = claim.kind, claim.value
    if kind == "rate":
        hr, reason = _value_of(m, "heart_rate_bpm")
        if hr is None:
            return _unverifiable(claim, f"heart_rate_bpm: {reason}")
        margin = config.rate_tolerance_bpm / 2
        below, above, between = _three_ways(hr, config.brady_bpm, config.tachy_bpm, margin)
        holds = {"brady": below, "tachy": above, "normal": between}[str(value)]
        return _decide(claim, holds, hr, f"brady < {config.brady_bpm:g}, tachy > "
                                         f"{config.tachy_bpm:g} bpm (margin {margin:g})")
    if kind == "rhythm":
        irregular, reason = _value_of(m, "rr_irregular")
        if irregular is None:
            return _unverifiable(claim, f"rr_irregular: {reason}")
        return _decide(claim, irregular == (value == "irregular"), m.rr_irregularity,
                       "rr_irregular from the RR irregularity")
    if kind == "p_waves":
        share, reason = _value_of(m, "p_wave_fraction")
        if share is None:
            return _unverifiable(claim, f"p_wave_fraction: {reason}")
        t, margin = config.p_present_fraction, config.p_margin
        return _decide(claim, _meets(share, t, margin, above=True), share,
                       f"present in >= {t:g} of beats (margin {margin:g})")
    if kind == "pr_length":
        pr, reason = _value_of(m, "pr_ms")
        if pr is None:
            return _unverifiable(claim, f"pr_ms: {reason}")
        margin = config.pr_tolerance_ms / 2
        if value == "prolonged":
            return _decide(claim, _meets(pr, config.pr_long_ms, margin, above=True), pr,
                           f"prolonged > {config.pr_long_ms:g} ms (margin {margin:g})")
        return _decide(claim, _meets(pr, config.pr_short_ms, margin, above=False), pr,
                       f"short < {config.pr_short_ms:g} ms (margin {margin:g})")
    if kind == "qrs_width":
        qrs, reason = _value_of(m, "qrs_ms")
        if qrs is None:
            return _unverifiable(claim, f"qrs_ms: {reason}")
        margin = config.qrs_tolerance_ms / 2
        holds = _meets(qrs, config.qrs_wide_ms, margin, above=value == "wide")
        return _decide(claim, holds, qrs, f"wide >= {config.qrs_wide_ms:g} ms (margin {margin:g})")
    if kind == "qt_length":
        qtc, reason = _value_of(m, "qtc_bazett_ms")
        if qtc is None:
            return _unverifiable(claim, f"qtc_bazett_ms: {reason}")
        margin = config.qt_tolerance_ms / 2
        holds = _meets(qtc, config.qtc_long_female_ms, config.qtc_long_female_ms
                       - config.qtc_long_ms + margin, above=True)
        return _decide(claim, holds, qtc, f"prolonged QTc >= {config.qtc_long_female_ms:g} ms "
                                          f"(women; men {config.qtc_long_ms:g}; margin {margin:g})")
    if kind == "axis_deviation":
        axis, reason = _value_of(m, "qrs_axis_deg")
        if axis is None:
            return _unverifiable(claim, f"qrs_axis_deg: {reason}")
        margin = config.axis_tolerance_deg / 3
        below, above, between = _three_ways(axis, config.axis_left_deg, config.axis_right_deg,
                                            margin)
        holds = {"left": below, "right": above, "normal": between}[str(value)]
        return _decide(claim, holds, axis, f"left < {config.axis_left_deg:g}, right > "
                                           f"{config.axis_right_deg:g} deg (margin {margin:g})")
    return _check_per_lead(claim, m, config)


def _check_per_lead(claim: Claim, m: Any, config: ClaimConfig) -> Verdict:
    names = claim.leads or tuple(lm.lead for lm in m.leads if lm.lead != "aVR")
    if claim.kind == "t_inversion":
        observed = {n: lm.t_polarity for n in names if (lm := m.lead(n)) is not None
                    and lm.t_polarity is not None}
        if not observed:
            return _unverifiable(claim, "T polarity not measured in " + (", ".join(names) or "any lead"))
        inverted = any(v == "negative" for v in observed.values())
        complete = len(observed) == len(names)
        holds = True if inverted else (False if complete or not claim.leads else None)
        return _decide(claim, holds, observed, "T negative in a named lead", "not measured in "
                       + ", ".join(n for n in names if n not in observed))
    observed = {n: lm.st_deviation_mv for n in names if (lm := m.lead(n)) is not None
                and lm.st_deviation_mv is not None}
    if not observed:
        return _unverifiable(claim, "ST not measured in " + (", ".join(names) or "any lead"))
    sign, threshold = ((1.0, config.st_elevation_mv) if claim.kind == "st_elevation"
                       else (-1.0, config.st_depression_mv))
    extreme = max(sign * v for v in observed.values())
    holds = _meets(extreme, threshold, config.st_tolerance_mv, above=True)
    what = "elevation" if sign > 0 else "depression"
    return _decide(claim, holds, observed, f"ST {what} >= {threshold:g} mV in a named lead "
                                           f"(none within {config.st_tolerance_mv:g}: contradicted)")


def _check_finding(claim: Claim, m: Any | None, labels: Sequence[str]) -> Verdict:
    """A named finding: supported by a label; contradicted by measurements that fail its
    criteria (``check_finding``) or by a label for another rhythm. Criteria that are met do
    not support it: they are necessary, not sufficient (a wide QRS is no LBBB)."""
    from ecgvlm.knowledge import knowledge_base
    from ecgvlm.labels import findings
    from ecgvlm.measure.criteria import INCONSISTENT, check_finding

    abbrev = str(claim.value)
    if abbrev in labels:
        return _decide(claim, True, list(labels), f"the record is labelled {abbrev}")
    kb = knowledge_base()
    check = check_finding(abbrev, m) if m is not None and abbrev in kb else None
    if check is not None and check.verdict == INCONSISTENT:
        return _decide(claim, False, check.summary(), "its measurable criteria (knowledge base)")
    kinds = findings()
    rhythms = [x for x in labels if x in kinds and kinds[x].kind == "rhythm"]
    overlaps = set(kb[abbrev].overlaps) if abbrev in kb else set()
    if abbrev in kinds and kinds[abbrev].kind == "rhythm" and rhythms and not overlaps & set(rhythms):
        return _decide(claim, False, rhythms, "the record is labelled with another rhythm")
    return _unverifiable(claim, "not labelled, and its measurable criteria do not rule it out",
                         check.summary() if check is not None else list(labels))


def check_claims(
    claims: Iterable[Claim],
    measurements: Any | None,
    labels: Sequence[str] = (),
    config: ClaimConfig | None = None,
) -> list[Verdict]:
    """A verdict for each claim against one record (``ecgvlm.measure.Measurements`` or None,
    and its canonical labels)."""
    config = config or ClaimConfig()
    out = []
    for claim in claims:
        if claim.hedged:
            out.append(_unverifiable(claim, "hedged: the explanation does not commit to it"))
        elif claim.kind == "finding":
            out.append(_check_finding(claim, measurements, list(labels)))
        elif measurements is None:
            out.append(_unverifiable(claim, "the sample has no measurements"))
        elif claim.kind in _UNIT_OF:
            out.append(_check_numeric(claim, measurements, config))
        else:
            out.append(_check_category(claim, measurements, config))
    return out


@dataclass(frozen=True)
class ClaimCounts:
    """The verdicts of one explanation, counted."""

    supported: int = 0
    contradicted: int = 0
    unverifiable: int = 0

    @property
    def n(self) -> int:
        return self.supported + self.contradicted + self.unverifiable


def count_verdicts(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> ClaimCounts:
    """Count ``verdicts``: ``Verdict``s, or their ``to_json()`` dicts as the ``claims``
    column of ``predictions.parquet`` stores them."""
    counts = {v: 0 for v in VERDICTS}
    for v in verdicts:
        counts[v.verdict if isinstance(v, Verdict) else v["verdict"]] += 1
    return ClaimCounts(counts[SUPPORTED], counts[CONTRADICTED], counts[UNVERIFIABLE])


# ---------------------------------------------------------------------------------------------
# In the evaluation
# ---------------------------------------------------------------------------------------------

#: Pseudo-models of the claims table: the grounded reference explanations checked against
#: their own records (the checker's floor: no contradiction expected), and moved to a record
#: with another finding (what a wrong explanation looks like to the checker).
REFERENCE_MODEL = "reference"
MOVED_REFERENCE_MODEL = "reference-moved"


def measurements_of(value: Any) -> Any | None:
    """``Measurements`` from the prepared set's JSON column (None when absent or unreadable)."""
    import json

    from ecgvlm.measure import Measurements

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        data = json.loads(value) if isinstance(value, str) else value
        return Measurements.from_dict(data) if isinstance(data, dict) else None
    except (TypeError, ValueError):
        return None


def check_explanation(
    text: str | None, measurements: Any | None, labels: Sequence[str], config: ClaimConfig
) -> list[Verdict]:
    """Every claim of ``text`` with its verdict against one record."""
    return check_claims(extract_claims(text), measurements, labels, config)


@dataclass(frozen=True)
class ClaimStats:
    """The explanations of one model on one data set, checked against the signal.

    Attributes:
        n_explanations: Explanations read (replies of successful requests).
        n_claims: Claims found in them.
        claims_per_explanation: ``n_claims / n_explanations``.
        supported, contradicted, unverifiable: Shares of the claims (None without claims).
        contradicted_rate: Contradicted among the checkable (supported + contradicted)
            claims; None when none is checkable.
        with_contradiction: Share of explanations with at least one contradicted claim.
        ci: Statistic -> 95% cluster-bootstrap interval (none from fewer than two clusters).
    """

    n_explanations: int
    n_claims: int
    claims_per_explanation: float
    supported: float | None
    contradicted: float | None
    unverifiable: float | None
    contradicted_rate: float | None
    with_contradiction: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = {k: [lo, hi] for k, (lo, hi) in self.ci.items()}
        return data


def claim_stats(
    counts: Sequence[ClaimCounts] | Any, clusters: Sequence[Any] | None = None,
    n_boot: int = 1000, seed: int = 0,
) -> ClaimStats:
    """Summarise per-explanation verdict counts, with intervals resampling clusters.

    ``counts``: a ``ClaimCounts`` per explanation, or an array of shape (explanations, 3)
    of their supported, contradicted and unverifiable counts.
    """
    import numpy as np

    from ecgvlm.evaluate.metrics import bootstrap_intervals, cluster_ids

    if isinstance(counts, np.ndarray):
        table = counts.astype(np.float64).reshape(-1, 3)
    else:
        table = np.array([[c.supported, c.contradicted, c.unverifiable] for c in counts],
                         dtype=np.float64).reshape(-1, 3)

    def stats(rows: np.ndarray) -> dict[str, float]:
        sup, con, unv = table[rows].sum(axis=0)
        n = sup + con + unv
        return {
            "claims_per_explanation": n / max(len(rows), 1),
            "supported": sup / n if n else math.nan,
            "contradicted": con / n if n else math.nan,
            "unverifiable": unv / n if n else math.nan,
            "contradicted_rate": con / (sup + con) if sup + con else math.nan,
            "with_contradiction": float((table[rows, 1] > 0).mean()) if len(rows) else math.nan,
        }

    point = stats(np.arange(len(table)))
    # One patient's explanations cannot be resampled: no interval rather than a zero-width one.
    ci = {}
    if n_boot and len(np.unique(cluster_ids(clusters, len(table)))) > 1:
        ci = bootstrap_intervals(stats, len(table), clusters, n_boot, seed)

    def value(name: str) -> float | None:
        return None if math.isnan(point[name]) else point[name]

    return ClaimStats(
        n_explanations=len(table), n_claims=int(table.sum()),
        claims_per_explanation=point["claims_per_explanation"], supported=value("supported"),
        contradicted=value("contradicted"), unverifiable=value("unverifiable"),
        contradicted_rate=value("contradicted_rate"),
        with_contradiction=value("with_contradiction") or 0.0, ci=ci)


def draw_donor(by_label: dict[str, list[Any]], excluded: set[str], rng: Any) -> Any | None:
    """A uniform seeded draw among the members of ``by_label``'s groups whose label is not
    ``excluded`` (None when there are none): O(labels) per draw, not O(samples)."""
    labels = [label for label in sorted(by_label) if label not in excluded]
    k = int(rng.integers(sum(len(by_label[label]) for label in labels) or 1))
    for label in labels:
        if k < len(by_label[label]):
            return by_label[label][k]
        k -= len(by_label[label])
    return None


class ReferencePool:
    """Grounded reference texts by finding, from which another sample's is drawn: the moved
    reference, checked against a record it was not written for.

    Each finding keeps a seeded uniform sample (a reservoir) of at most ``per_finding`` of
    its texts, so the pool does not grow with the split; a draw picks a finding other than
    the excluded one with a probability proportional to how many texts it was offered (as
    a uniform draw among all other findings' texts would), then one of its kept texts.
    """

    def __init__(self, per_finding: int = 256, seed: int = 0) -> None:
        import numpy as np

        self.per_finding = per_finding
        self._rng = np.random.default_rng(seed)
        self._kept: dict[str, list[str]] = {}
        self._offered: dict[str, int] = {}

    def add(self, finding: str, text: str) -> None:
        kept = self._kept.setdefault(finding, [])
        offered = self._offered[finding] = self._offered.get(finding, 0) + 1
        if len(kept) < self.per_finding:
            kept.append(text)
        elif (j := int(self._rng.integers(offered))) < self.per_finding:
            kept[j] = text

    def draw(self, excluded: str) -> str | None:
        """A text of a finding other than ``excluded`` (None when there is none)."""
        findings = [f for f in sorted(self._offered) if f != excluded]
        k = int(self._rng.integers(sum(self._offered[f] for f in findings) or 1))
        for finding in findings:
            if k < self._offered[finding]:
                kept = self._kept[finding]
                return kept[int(self._rng.integers(len(kept)))]
            k -= self._offered[finding]
        return None
