"""One canonical label vocabulary for every ECG source, and the maps into it.

Canonical abbreviations follow the PhysioNet/CinC Challenge 2020/2021 ``dx_mapping`` tables
where one exists (``NSR``, ``AF`` = atrial fibrillation, ``AFL`` = atrial flutter, ``IAVB``,
``PVC``...), so a label means the same thing whichever dataset it came from. The data live in
package files under ``ecgvlm/data/``:

- ``findings.csv``: one row per canonical finding (abbreviation, name, SNOMED-CT, kind, AAMI
  class of the beats it stands for).
- ``label_codes.csv``: source codes that are not a finding's own SNOMED code, per scheme
  (``snomed`` synonyms, ``cpsc`` abbreviations and REFERENCE.csv classes 1-9, ``chapman``
  acronyms, ``mitdb_rhythm`` aux_note strings, ``ptbdb`` reasons for admission).
- ``mitdb_beats.csv``: MIT-BIH beat symbols with their AAMI EC57 class and the finding a
  window containing such a beat carries (none for normal and unclassifiable beats).

The same letters mean different things in different sources, so every lookup names its
dataset: CPSC's ``AF`` is atrial fibrillation, Chapman-Shaoxing's ``AF`` is atrial flutter
(its fibrillation is ``AFIB``); CPSC's ``STE`` is ST elevation, Chapman's ``STE`` is "ST
extension" (a nonspecific ST abnormality). A code outside the vocabulary becomes the explicit
unknown ``"UNK:<raw code>"``: never dropped, so summaries can count it.

Nothing is read at import: the tables load on first use (``FINDINGS`` is resolved through a
module ``__getattr__``).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

UNKNOWN_PREFIX = "UNK:"

KINDS = ("rhythm", "conduction", "ectopy", "beat", "morphology", "axis")
AAMI_CLASSES = ("N", "S", "V", "F", "Q")

# Dataset keys used in record ids ("cpsc2018/A0001") and the code schemes each one's labels
# are looked up in, in order. Challenge-format sets write SNOMED-CT codes; CPSC's early
# Challenge release and its original REFERENCE.csv write abbreviations or classes 1-9.
DATASET_SCHEMES: dict[str, tuple[str, ...]] = {
    "cpsc2018": ("cpsc", "snomed"),
    "cpsc2018_extra": ("snomed",),
    "chapman_shaoxing": ("chapman", "snomed"),
    "georgia": ("snomed",),
    "ptbxl": ("snomed",),
    "ptbdb": ("ptbdb",),
    "mitdb": ("mitdb_rhythm",),
    # Any other WFDB record (an upload, a user's own file): Challenge-style SNOMED codes.
    "wfdb": ("snomed",),
}
DATASETS = tuple(DATASET_SCHEMES)

# Folder names and spellings users meet, mapped onto the dataset keys above.
_DATASET_ALIASES = {
    "cpsc": "cpsc2018",
    "cpsc_2018": "cpsc2018",
    "cpsc2018extra": "cpsc2018_extra",
    "cpsc_extra": "cpsc2018_extra",
    "cpscextra": "cpsc2018_extra",
    "chapman": "chapman_shaoxing",
    "chapmanshaoxing": "chapman_shaoxing",
    "shaoxing": "chapman_shaoxing",
    "ecg_arrhythmia": "chapman_shaoxing",
    "ptb_xl": "ptbxl",
    "ptb": "ptbdb",
    "mitbih": "mitdb",
    "mit_bih": "mitdb",
    "mitbih_arrhythmia": "mitdb",
}


@dataclass(frozen=True)
class Finding:
    """One canonical ECG finding.

    Attributes:
        abbrev: Canonical abbreviation, the key in ``FINDINGS`` (e.g. ``"AFL"``).
        name: Full clinical name (e.g. ``"atrial flutter"``).
        snomed: SNOMED-CT concept id as a string.
        kind: One of ``KINDS``: rhythm, conduction, ectopy, beat, morphology, axis.
        aami_class: AAMI EC57 class (N/S/V/F/Q) of the MIT-BIH beats this finding stands
            for, or ``""`` where no beat class applies.
    """

    abbrev: str
    name: str
    snomed: str
    kind: str
    aami_class: str = ""


@dataclass(frozen=True)
class BeatType:
    """One MIT-BIH beat annotation symbol.

    Attributes:
        symbol: The ``rdann(...).symbol`` character (``"V"``, ``"/"``...).
        name: What the symbol means.
        aami_class: AAMI EC57 class: N, S (SVEB), V (VEB), F (fusion) or Q (unknown/paced).
        finding: Canonical finding a window containing this beat carries, or None for beats
            that add no finding of their own (normal, unclassifiable).
    """

    symbol: str
    name: str
    aami_class: str
    finding: str | None


def _read_csv(name: str) -> list[dict[str, str]]:
    text = resources.files("ecgvlm").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@functools.cache
def findings() -> dict[str, Finding]:
    """Return the vocabulary: canonical abbreviation -> Finding (loaded once, on first use)."""
    out: dict[str, Finding] = {}
    for row in _read_csv("findings.csv"):
        f = Finding(
            abbrev=row["abbrev"],
            name=row["name"],
            snomed=row["snomed"],
            kind=row["kind"],
            aami_class=row["aami_class"],
        )
        if f.abbrev in out:
            raise RuntimeError(f"findings.csv lists {f.abbrev!r} twice")
        if f.kind not in KINDS:
            raise RuntimeError(f"findings.csv: {f.abbrev} has kind {f.kind!r}, not one of {KINDS}")
        if f.aami_class and f.aami_class not in AAMI_CLASSES:
            raise RuntimeError(f"findings.csv: {f.abbrev} has AAMI class {f.aami_class!r}")
        out[f.abbrev] = f
    return out


@functools.cache
def _code_tables() -> dict[str, dict[str, str]]:
    """scheme -> {source code -> canonical abbreviation}."""
    vocab = findings()
    tables: dict[str, dict[str, str]] = {"snomed": {f.snomed: f.abbrev for f in vocab.values()}}
    for row in _read_csv("label_codes.csv"):
        if row["abbrev"] not in vocab:
            raise RuntimeError(
                f"label_codes.csv maps {row['scheme']}:{row['code']} to {row['abbrev']!r}, "
                "which findings.csv lacks"
            )
        table = tables.setdefault(row["scheme"], {})
        if row["code"] in table and table[row["code"]] != row["abbrev"]:
            raise RuntimeError(f"label_codes.csv maps {row['scheme']}:{row['code']} twice")
        table[row["code"]] = row["abbrev"]
    return tables


@functools.cache
def beat_types() -> dict[str, BeatType]:
    """Return MIT-BIH beat symbol -> BeatType (AAMI class and the finding it implies)."""
    vocab = findings()
    out: dict[str, BeatType] = {}
    for row in _read_csv("mitdb_beats.csv"):
        finding = row["finding"] or None
        if finding is not None and finding not in vocab:
            raise RuntimeError(f"mitdb_beats.csv maps {row['symbol']!r} to unknown {finding!r}")
        out[row["symbol"]] = BeatType(row["symbol"], row["name"], row["aami_class"], finding)
    return out


def __getattr__(name: str):
    if name == "FINDINGS":
        return findings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def normalize_dataset(dataset: str) -> str:
    """Return the dataset key for a dataset or folder name (``"ptb-xl"`` -> ``"ptbxl"``).

    Raises:
        ValueError: the name is not a known dataset; the message lists the known keys.
    """
    key = dataset.strip().lower().replace("-", "_").replace(" ", "_")
    if key in DATASET_SCHEMES:
        return key
    key = _DATASET_ALIASES.get(key, _DATASET_ALIASES.get(key.replace("_", ""), key))
    if key not in DATASET_SCHEMES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return key


def _clean_code(code: str) -> str:
    # MIT-BIH aux strings may carry a trailing NUL; headers may pad codes with spaces.
    return code.replace("\x00", "").strip()


def canonical_label(dataset: str, code: str) -> str:
    """Map one source label code to its canonical abbreviation.

    Args:
        dataset: Dataset key or folder name (``"cpsc2018"``, ``"chapman_shaoxing"``,
            ``"georgia"``, ``"ptb-xl"``, ``"mitdb"``...): codes mean different things in
            different sources.
        code: The code as the source writes it: a SNOMED-CT id, a CPSC abbreviation or class
            number, a Chapman acronym, an MIT-BIH rhythm ``aux_note`` such as ``"(AFL"``.

    Returns:
        The canonical abbreviation (a key of ``FINDINGS``), or ``"UNK:<code>"`` when the
        code is outside the vocabulary.

    Raises:
        ValueError: unknown dataset.
    """
    key = normalize_dataset(dataset)
    clean = _clean_code(code)
    tables = _code_tables()
    for scheme in DATASET_SCHEMES[key]:
        table = tables.get(scheme, {})
        if clean in table:
            return table[clean]
        if scheme == "ptbdb":
            # PTB writes free text; match case-insensitively.
            folded = {k.lower(): v for k, v in table.items()}
            if clean.lower() in folded:
                return folded[clean.lower()]
    return UNKNOWN_PREFIX + clean


def canonical_labels(dataset: str, codes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Map several codes; duplicates (e.g. two synonyms of one finding) are kept once, in order."""
    out: list[str] = []
    for code in codes:
        if not _clean_code(code):
            continue
        label = canonical_label(dataset, code)
        if label not in out:
            out.append(label)
    return tuple(out)


def is_unknown(label: str) -> bool:
    """True for an explicit unknown (``"UNK:<code>"``)."""
    return label.startswith(UNKNOWN_PREFIX)


def label_name(label: str) -> str:
    """Full name of a canonical label, or ``"unknown code <code>"`` for an explicit unknown.

    Raises:
        KeyError: ``label`` is neither canonical nor an explicit unknown.
    """
    if is_unknown(label):
        return f"unknown code {label[len(UNKNOWN_PREFIX) :]}"
    vocab = findings()
    if label not in vocab:
        raise KeyError(f"{label!r} is not a canonical label")
    return vocab[label].name


def beat_finding(symbol: str) -> str | None:
    """Finding an MIT-BIH beat symbol implies (``"V"`` -> ``"PVC"``); None for normal beats.

    Returns ``"UNK:<symbol>"`` for a symbol that is not a beat annotation.
    """
    bt = beat_types().get(symbol)
    if bt is None:
        return UNKNOWN_PREFIX + symbol
    return bt.finding


def aami_class(symbol: str) -> str | None:
    """AAMI EC57 class (N/S/V/F/Q) of an MIT-BIH beat symbol; None for non-beat annotations."""
    bt = beat_types().get(symbol)
    return None if bt is None else bt.aami_class


def is_beat(symbol: str) -> bool:
    """True when an MIT-BIH annotation symbol marks a beat (not ``+``, ``~``, ``"``...)."""
    return symbol in beat_types()


def emittable_labels(dataset: str | None = None) -> list[str]:
    """Canonical labels the readers can emit, sorted; for one dataset, or for all.

    Every finding is reachable through its own SNOMED code, so the set for all datasets is
    the whole vocabulary. Explicit unknowns (``"UNK:..."``) are not listed.
    """
    if dataset is None:
        return sorted(findings())
    key = normalize_dataset(dataset)
    tables = _code_tables()
    out = {abbrev for scheme in DATASET_SCHEMES[key] for abbrev in tables.get(scheme, {}).values()}
    if key == "mitdb":
        out |= {bt.finding for bt in beat_types().values() if bt.finding}
    return sorted(out)
