"""Read ECG records from every supported source into ``EcgRecord``s (millivolts, float32).

Supported sources (dataset keys as in ``ecgvlm.labels.DATASETS``):

- WFDB records (``.hea`` + ``.mat``/``.dat``): the Challenge-format 12-lead sets
  (``cpsc2018`` early release with ``#Dx:`` abbreviations, ``cpsc2018_extra``,
  ``chapman_shaoxing`` (PhysioNet ecg-arrhythmia), ``georgia``, ``ptbxl``), ``ptbdb`` and
  ``mitdb`` (with its reference ``.atr`` annotations).
- CPSC 2018 original release: ``A0001.mat`` holding an ``ECG`` struct (``sex``, ``age``,
  ``data`` 12 x n in mV, 500 Hz) with the labels in ``REFERENCE.csv`` beside it (classes 1-9).
- Chapman-Shaoxing original release: one ``<FileName>.csv`` per record (a header row of lead
  names, 5000 rows, microvolts, 500 Hz) with ``Diagnostics.csv`` (or ``.xlsx``) in the same
  folder or its parent (columns ``FileName``, ``Rhythm``, ``Beat``, ``PatientAge``, ``Gender``).

wfdb's terse names (``p_signal``, ``sig_name``, ``fs``) are translated here, once. Every
problem with an input raises a subclass of ``EcgReadError`` naming the record and the problem.
Labels go through ``ecgvlm.labels``; codes outside the vocabulary stay as ``"UNK:<code>"``.

This module imports numpy, wfdb and scipy only (no torch, no ray) and does no I/O on import.
"""

from __future__ import annotations

import csv
import functools
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ecgvlm import labels as L
from ecgvlm.records import EcgRecord

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_LEAD_BY_LOWER = {name.lower(): name for name in STANDARD_LEADS}

# Datasets whose records are 12-lead resting ECGs in the standard lead set.
TWELVE_LEAD_DATASETS = ("cpsc2018", "cpsc2018_extra", "chapman_shaoxing", "georgia", "ptbxl")
MITDB_N_LEADS = 2
CPSC_ORIGINAL_FS_HZ = 500.0
CHAPMAN_ORIGINAL_FS_HZ = 500.0
CHAPMAN_ORIGINAL_N_SAMPLES = 5000  # 10 s at 500 Hz, as the Chapman data descriptor states

# Unit strings in WFDB headers, as millivolts per unit.
_MV_PER_UNIT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}

# Bits per sample of the WFDB storage formats whose file size we can predict exactly.
_BITS_PER_SAMPLE = {"8": 8, "16": 16, "24": 24, "32": 32, "61": 16, "80": 8, "160": 16, "212": 12}

# MIT-BIH records 201 and 202 were taken from the same patient (the database directory says
# so, and 202's header notes "the same analog tape as record 201").
_MITDB_SAME_PATIENT = {"202": "201"}

# Record-name patterns that identify a dataset when neither the caller nor the folder does.
_NAME_PATTERNS = (
    (re.compile(r"^A\d{4,5}$"), "cpsc2018"),
    (re.compile(r"^Q\d{4,5}$"), "cpsc2018_extra"),
    (re.compile(r"^JS\d{5}$"), "chapman_shaoxing"),
    (re.compile(r"^MUSE_\d{8}_\d{6}_\d+$"), "chapman_shaoxing"),
    (re.compile(r"^E\d{5}$"), "georgia"),
    (re.compile(r"^HR\d{5}$"), "ptbxl"),
    (re.compile(r"^s\d{4}_re$"), "ptbdb"),
    (re.compile(r"^[12]\d{2}$"), "mitdb"),
)

# Files that sit beside records but are not records.
_NOT_RECORDS = {"reference", "labels", "labels_summary", "diagnostics", "readme", "manifest"}


# --------------------------------------------------------------------------------------------
# Errors


class EcgReadError(ValueError):
    """A record that cannot be read as a valid ECG; names the record and the problem."""

    def __init__(self, record: str | Path, problem: str) -> None:
        self.record = str(record)
        self.problem = problem
        super().__init__(f"{self.record}: {problem}")

    def __str__(self) -> str:
        # Explicit, because OSError (a base of MissingFileError) formats its own way.
        return f"{self.record}: {self.problem}"

    def __reduce__(self):  # keep picklable (Ray ships exceptions between processes)
        return (type(self), (self.record, self.problem))


class MissingFileError(EcgReadError, FileNotFoundError):
    """A header, signal, annotation or label file the record needs does not exist.

    Also a ``FileNotFoundError``, with ``filename`` set to the missing file where known.
    """

    def __init__(self, record: str | Path, problem: str, filename: str | Path | None = None):
        super().__init__(record, problem)
        self.filename = None if filename is None else str(filename)

    def __reduce__(self):
        return (type(self), (self.record, self.problem, self.filename))


class HeaderError(EcgReadError):
    """A header or label table that cannot be parsed, or a record of unknown dataset."""


class TruncatedSignalError(EcgReadError):
    """The signal file holds fewer samples than the header says."""


class ChecksumMismatchError(EcgReadError):
    """A signal's checksum differs from the one in the header (corrupted samples)."""


class NonFiniteSignalError(EcgReadError):
    """The signal contains NaN or infinite samples (or WFDB's invalid-sample value)."""


class LeadCountError(EcgReadError):
    """The record does not have the leads its dataset must have."""


# --------------------------------------------------------------------------------------------
# Dataset recognition and small helpers


def _record_name(path: Path) -> str:
    return path.name


def detect_dataset(path: str | Path) -> str | None:
    """Guess the dataset key of a record path from its folders, then from its name.

    Args:
        path: Record path without extension (``".../cpsc2018/A0001"``).

    Returns:
        A dataset key, or None when neither a parent folder nor the name tells.
    """
    p = Path(path)
    for parent in p.parents:
        if not parent.name:
            break
        try:
            return L.normalize_dataset(parent.name)
        except ValueError:
            continue
    for pattern, key in _NAME_PATTERNS:
        if pattern.match(p.name):
            return key
    return None


def _resolve_dataset(path: Path, dataset: str | None) -> str:
    if dataset is not None:
        try:
            return L.normalize_dataset(dataset)
        except ValueError as e:
            raise HeaderError(path, str(e)) from e
    key = detect_dataset(path)
    if key is None and Path(f"{path}.hea").is_file():
        # A WFDB record from no known collection: read it generically (SNOMED Dx codes).
        return "wfdb"
    if key is None and not any(Path(f"{path}{ext}").is_file() for ext in (".mat", ".csv")):
        if path.is_dir():  # a data set's folder, where one record was meant
            raise MissingFileError(
                path, "a folder, not a record: name one record in it "
                f"({path}/NAME, without an extension), or summarize the folder with "
                f"`ecgvlm datasets summarize {path}`", f"{path}.hea")
        raise MissingFileError(path, f"no {path}.hea, {path}.mat or {path}.csv", f"{path}.hea")
    if key is None:
        raise HeaderError(
            path,
            "cannot tell which dataset this record is from (folder and name are not "
            f"recognised); pass dataset= one of {', '.join(L.DATASETS)}",
        )
    return key


def _strip_extension(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() in {".hea", ".mat", ".dat", ".atr", ".csv", ".xyz"}:
        return p.with_suffix("")
    return p


def standard_lead_name(name: str) -> str:
    """``"avr"`` -> ``"aVR"``, ``"v1"`` -> ``"V1"``; other names (``MLII``, ``vx``) unchanged."""
    return _LEAD_BY_LOWER.get(name.strip().lower(), name.strip())


def _order_standard_leads(
    record: str, leads: list[str], signal: np.ndarray, dataset: str
) -> tuple[tuple[str, ...], np.ndarray]:
    """Check a 12-lead record has exactly the standard leads, and put them in standard order."""
    if len(leads) != len(STANDARD_LEADS) or set(leads) != set(STANDARD_LEADS):
        raise LeadCountError(
            record,
            f"{dataset} records have the 12 standard leads; found {len(leads)}: {leads}",
        )
    order = [leads.index(name) for name in STANDARD_LEADS]
    return STANDARD_LEADS, signal[:, order]


def _check_finite(record: str, signal: np.ndarray, leads: tuple[str, ...] | list[str]) -> None:
    bad = ~np.isfinite(signal)
    if bad.any():
        per_lead = bad.sum(axis=0)
        where = ", ".join(f"{leads[i]}: {int(n)}" for i, n in enumerate(per_lead) if n)
        raise NonFiniteSignalError(
            record, f"{int(bad.sum())} NaN/inf (or invalid) samples ({where})"
        )


def _parse_comments(comments: list[str]) -> dict[str, str]:
    """Header comments ``"Age: 74"``, ``" Dx: AF,RBBB"`` -> {"age": "74", "dx": "AF,RBBB"}."""
    out: dict[str, str] = {}
    for line in comments:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out.setdefault(key.strip().lower(), value.strip())
    return out


def _meta_age_sex(info: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    age = info.get("age", "").strip()
    try:
        age_f = float(age)
        if math.isfinite(age_f):
            meta["age"] = int(age_f) if age_f.is_integer() else age_f
    except ValueError:
        pass  # "Unknown", "NaN", "": no age in the source
    sex = info.get("sex", info.get("gender", "")).strip()
    if sex and sex.lower() not in {"unknown", "nan"}:
        meta["sex"] = sex.capitalize()
    return meta


def _patient_id(dataset: str, name: str, path: Path) -> str | None:
    """Patient identity, where the source gives one (docs/data.md says which do)."""
    if dataset == "mitdb":
        return f"mitdb/{_MITDB_SAME_PATIENT.get(name, name)}"
    if dataset == "ptbdb":
        # PTB keeps each patient's records in a folder "patientNNN"; without it, unknown.
        folder = path.parent.name
        return f"ptbdb/{folder}" if re.fullmatch(r"patient\d+", folder) else None
    if dataset in ("ptbxl", "wfdb"):
        # PTB-XL has several records per patient, but the Challenge headers drop patient_id;
        # a generic WFDB record says nothing about its patient.
        return None
    # CPSC 2018, CPSC-Extra, Chapman-Shaoxing and Georgia publish one record per patient.
    return f"{dataset}/{name}"


def _labelled_record(
    path: Path,
    dataset: str,
    signal: np.ndarray,
    fs_hz: float,
    leads: tuple[str, ...],
    codes: tuple[str, ...],
    meta: dict[str, Any],
) -> EcgRecord:
    """An EcgRecord whose labels are the canonical forms of the source ``codes``."""
    return EcgRecord(
        record_id=f"{dataset}/{path.name}",
        dataset=dataset,
        signal_mv=signal,
        fs_hz=float(fs_hz),
        leads=leads,
        labels=L.canonical_labels(dataset, codes),
        patient_id=_patient_id(dataset, path.name, path),
        source_codes=codes,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# WFDB records


def _expected_file_bytes(header: Any, file_name: str) -> int | None:
    """Bytes a WFDB signal file must have, or None for formats we cannot predict."""
    idx = [i for i, f in enumerate(header.file_name) if f == file_name]
    bits = 0
    for i in idx:
        fmt = str(header.fmt[i])
        if fmt not in _BITS_PER_SAMPLE:
            return None
        spf = (header.samps_per_frame[i] or 1) if header.samps_per_frame else 1
        bits += _BITS_PER_SAMPLE[fmt] * spf
    offset = header.byte_offset[idx[0]] or 0
    return int(offset + math.ceil(header.sig_len * bits / 8))


def _require_header_file(path: Path, rid: str) -> Path:
    hea = path.with_suffix(".hea") if path.suffix else Path(f"{path}.hea")
    if not hea.is_file():
        raise MissingFileError(rid, f"header file {hea} does not exist", hea)
    return hea


def _record_line_gives_sample_count(hea: Path) -> bool:
    """The header's record line (its first line that is not a comment) has the number of
    samples, its fourth field ("name nsig fs siglen ...")."""
    for line in hea.read_text(errors="replace").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return len(line.split()) >= 4
    return False


def _read_wfdb_header(path: Path, rid: str) -> Any:
    import wfdb

    hea = _require_header_file(path, rid)
    try:
        return wfdb.rdheader(str(path))
    except Exception as e:  # wfdb raises bare ValueError/IndexError on malformed headers
        raise HeaderError(rid, f"cannot parse header {hea}: {e}") from e


def _check_signal_files(path: Path, rid: str, header: Any) -> None:
    """The header lists signals and a sample count, and every signal file is there in full."""
    if header.n_sig == 0 or not header.file_name:
        raise LeadCountError(rid, "header lists no signals")
    if len(header.file_name) != header.n_sig:
        raise HeaderError(
            rid, f"header says {header.n_sig} signals but has {len(header.file_name)} signal lines"
        )
    if not header.sig_len:
        # Without a sample count neither truncation nor the checksum can be verified.
        raise HeaderError(rid, "header gives no number of samples")
    for file_name in dict.fromkeys(header.file_name):
        f = path.parent / file_name
        if not f.is_file():
            raise MissingFileError(rid, f"signal file {f} does not exist", f)
        expected = _expected_file_bytes(header, file_name)
        actual = f.stat().st_size
        if expected is not None and actual < expected:
            raise TruncatedSignalError(
                rid,
                f"{file_name} has {actual} bytes, the header's {header.sig_len} samples need "
                f"{expected}",
            )


def _read_wfdb_signal(path: Path, rid: str) -> tuple[Any, np.ndarray, list[str]]:
    """Read and validate a WFDB record: files present, full length, checksums, finite, in mV.

    Returns the record as wfdb read it (its header fields), the signal in mV and the leads.
    """
    import wfdb

    hea = _require_header_file(path, rid)
    try:
        # rdrecord parses the header itself, and parsing a 12-lead header costs wfdb about as
        # much as reading the samples: the header is read on its own only to say what is wrong.
        rec = wfdb.rdrecord(str(path), physical=False)
    except Exception as e:
        header = _read_wfdb_header(path, rid)  # a header that does not parse: HeaderError
        _check_signal_files(path, rid, header)  # a missing or short signal file
        raise TruncatedSignalError(rid, f"cannot read the signal: {e}") from e
    _check_signal_files(path, rid, rec)
    if not _record_line_gives_sample_count(hea):
        # rdrecord then takes the count from the signal file's size, which hides truncation.
        raise HeaderError(rid, "header gives no number of samples")
    unnamed = [i for i, name in enumerate(rec.sig_name or []) if not (name or "").strip()]
    if unnamed:
        raise HeaderError(
            rid, f"signal {unnamed[0]} has no description (its lead name) in {hea.name}"
        )
    digital = rec.d_signal
    if digital is None or digital.shape[0] != rec.sig_len:
        n = 0 if digital is None else digital.shape[0]
        raise TruncatedSignalError(rid, f"read {n} samples, header says {rec.sig_len}")
    if digital.shape[1] != rec.n_sig:
        raise LeadCountError(rid, f"read {digital.shape[1]} signals, header says {rec.n_sig}")
    if rec.checksum is not None:
        got = rec.calc_checksum()
        for i, (want, have) in enumerate(zip(rec.checksum, got)):
            # The header stores a signed 16-bit sum; calc_checksum an unsigned one.
            if want is not None and (int(have) - int(want)) % 65536 != 0:
                raise ChecksumMismatchError(
                    rid,
                    f"signal {i} ({rec.sig_name[i]}) checksum {int(have) % 65536} does not "
                    f"match the header's {int(want) % 65536}: samples are corrupted",
                )
    leads = [standard_lead_name(n) for n in rec.sig_name]
    # dac() maps WFDB's invalid-sample value to NaN, which _check_finite then reports.
    physical = rec.dac(expanded=False, return_res=64, inplace=False)
    scale = np.ones(len(leads))
    for i, unit in enumerate(rec.units or ["mV"] * len(leads)):
        key = (unit or "mV").strip().lower()
        if key not in _MV_PER_UNIT:
            raise HeaderError(rid, f"signal {leads[i]} has unit {unit!r}; expected mV, uV or V")
        scale[i] = _MV_PER_UNIT[key]
    signal = (physical * scale).astype(np.float32)
    _check_finite(rid, signal, leads)
    return rec, signal, leads


def _read_wfdb(path: Path, dataset: str) -> EcgRecord:
    name = _record_name(path)
    rid = f"{dataset}/{name}"
    header, signal, leads = _read_wfdb_signal(path, rid)
    info = _parse_comments(header.comments or [])
    meta = _meta_age_sex(info)
    meta["source_format"] = "wfdb"

    if dataset == "mitdb":
        return _mitdb_record(path, rid, header, signal, leads, meta)[0]

    if dataset == "ptbdb":
        if not set(STANDARD_LEADS) <= set(leads):
            raise LeadCountError(rid, f"PTB records have the 12 standard leads; found {leads}")
        out_leads: tuple[str, ...] = tuple(leads)
    elif dataset in TWELVE_LEAD_DATASETS:
        out_leads, signal = _order_standard_leads(rid, leads, signal, dataset)
    else:
        out_leads = tuple(leads)
    codes = _wfdb_codes(dataset, info)
    return _labelled_record(path, dataset, signal, float(header.fs), out_leads, codes, meta)


def _wfdb_codes(dataset: str, info: dict[str, str]) -> tuple[str, ...]:
    """The label codes of a (non-MIT-BIH) WFDB record, from its parsed header comments."""
    if dataset == "ptbdb":
        reason = info.get("reason for admission", "")
        return (reason,) if reason else ()
    return tuple(c.strip() for c in info.get("dx", "").split(",") if c.strip())


@dataclass(frozen=True)
class RecordLabels:
    """A record's identity and labels as ``read_record`` gives them, without its samples."""

    record_id: str
    dataset: str
    labels: tuple[str, ...]
    patient_id: str | None
    start_s: float = 0.0  # a whole record


def read_record_labels(path: str | Path, dataset: str | None = None) -> RecordLabels | None:
    """The labels ``read_record`` gives a WFDB record, from its header's comment lines alone.

    Reading a record costs about as much as wfdb's parse of its header (a pandas lookup per
    field of every signal line), while the labels are in the comments: prepare's scan, which
    only needs the labels to split, reads these and leaves the validation of the record to the
    read that builds its sample.

    Returns:
        None where the labels need more than the header's comments: MIT-BIH (annotations,
        windows) and the original CPSC-2018 and Chapman releases (tables beside the samples).

    Raises:
        EcgReadError: the dataset cannot be told, or no file of the record exists.
    """
    from wfdb.io.header import parse_header_content

    p = _strip_extension(path)
    key = _resolve_dataset(p, dataset)
    hea = Path(f"{p}.hea")
    if key == "mitdb" or not hea.is_file():
        return None
    # Read as wfdb.rdheader reads it, so that the comments are the same strings.
    _, comment_lines = parse_header_content(hea.read_text(encoding="ascii", errors="ignore"))
    info = _parse_comments([line.strip(" \t#") for line in comment_lines])
    return RecordLabels(
        record_id=f"{key}/{p.name}",
        dataset=key,
        labels=L.canonical_labels(key, _wfdb_codes(key, info)),
        patient_id=_patient_id(key, p.name, p),
    )


# --------------------------------------------------------------------------------------------
# MIT-BIH annotations and windows


@dataclass(frozen=True)
class _MitdbAnnotations:
    """Beats and rhythm episodes of one MIT-BIH record, in samples."""

    beat_samples: np.ndarray
    beat_symbols: np.ndarray
    # (start, end, aux string) episodes; end is exclusive and the last runs to the record end.
    rhythms: tuple[tuple[int, int, str], ...] = field(default_factory=tuple)

    def window_labels(
        self, start: int, end: int
    ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]:
        """Labels of samples [start, end): every rhythm in force, then beat findings."""
        rhythm_codes: list[str] = []
        fractions: dict[str, float] = {}
        for r0, r1, aux in self.rhythms:
            overlap = min(end, r1) - max(start, r0)
            if overlap > 0:
                if aux not in rhythm_codes:
                    rhythm_codes.append(aux)
                fractions[aux] = fractions.get(aux, 0.0) + overlap / (end - start)
        lo, hi = np.searchsorted(self.beat_samples, [start, end])
        symbols = self.beat_symbols[lo:hi]
        beat_counts = Counter(str(s) for s in symbols)
        labels = list(L.canonical_labels("mitdb", rhythm_codes))
        # Beat findings in a fixed clinical order (by vocabulary order), not by first beat.
        order = {abbrev: i for i, abbrev in enumerate(L.findings())}
        beat_labels = {L.beat_finding(s) for s in beat_counts} - {None}
        for lab in sorted(beat_labels, key=lambda a: order.get(a, len(order))):
            if lab not in labels:
                labels.append(lab)
        aami = Counter()
        for s, n in beat_counts.items():
            aami[L.aami_class(s)] += n
        meta = {
            "beat_counts": dict(sorted(beat_counts.items())),
            "aami_counts": {k: aami[k] for k in L.AAMI_CLASSES if aami[k]},
            "rhythm_fractions": {k: round(v, 4) for k, v in fractions.items()},
        }
        codes = tuple(rhythm_codes) + tuple(sorted(beat_counts))
        return tuple(labels), codes, meta


def _read_mitdb_annotations(path: Path, rid: str, n_samples: int) -> _MitdbAnnotations:
    import wfdb

    atr = Path(f"{path}.atr")
    if not atr.is_file():
        raise MissingFileError(rid, f"reference annotation file {atr} does not exist", atr)
    try:
        ann = wfdb.rdann(str(path), "atr")
    except Exception as e:
        raise HeaderError(rid, f"cannot parse annotations {atr}: {e}") from e
    samples = np.asarray(ann.sample, dtype=np.int64)
    symbols = np.asarray(ann.symbol, dtype=object)
    aux = ann.aux_note or [""] * len(symbols)
    is_beat = np.array([L.is_beat(s) for s in symbols], dtype=bool)
    changes = [
        (int(samples[i]), aux[i].replace("\x00", "").strip())
        for i in range(len(symbols))
        if symbols[i] == "+" and aux[i].replace("\x00", "").strip()
    ]
    rhythms = tuple(
        (s, changes[k + 1][0] if k + 1 < len(changes) else n_samples, code)
        for k, (s, code) in enumerate(changes)
    )
    order = np.argsort(samples[is_beat], kind="stable")
    return _MitdbAnnotations(samples[is_beat][order], symbols[is_beat][order], rhythms)


def _mitdb_record(
    path: Path, rid: str, header: Any, signal: np.ndarray, leads: list[str], meta: dict
) -> tuple[EcgRecord, _MitdbAnnotations]:
    """The whole MIT-BIH record labelled with all its rhythms and beat findings."""
    if len(leads) != MITDB_N_LEADS:
        raise LeadCountError(rid, f"MIT-BIH records have 2 signals; found {leads}")
    # MIT-BIH headers open their comments with "<age> <sex> ...", e.g. "68 M 1960 2851 x1".
    first = re.match(r"^\s*(\d+)\s+([MF])\b", (header.comments or [""])[0])
    if first:
        meta = {
            **meta,
            "age": int(first.group(1)),
            "sex": "Male" if first.group(2) == "M" else "Female",
        }
    ann = _read_mitdb_annotations(path, rid, signal.shape[0])
    labels, codes, window_meta = ann.window_labels(0, signal.shape[0])
    record = EcgRecord(
        record_id=rid,
        dataset="mitdb",
        signal_mv=signal,
        fs_hz=float(header.fs),
        leads=tuple(leads),
        labels=labels,
        patient_id=_patient_id("mitdb", path.name, path),
        source_codes=codes,
        meta={**meta, **window_meta},
    )
    return record, ann


def _format_start(start_s: float) -> str:
    return f"{start_s:g}s"


def read_windows(
    path: str | Path, window_s: float = 10.0, dataset: str | None = None
) -> list[EcgRecord]:
    """Cut a long annotated recording (MIT-BIH) into fixed, non-overlapping windows.

    Each window is labelled with every rhythm in force during it (from the ``+``
    annotations' ``aux_note``) followed by the findings its beats imply (a window with ``V``
    beats carries ``PVC``). ``meta`` holds ``beat_counts`` (per symbol), ``aami_counts`` and
    ``rhythm_fractions`` (share of the window per source rhythm string). A final window
    shorter than ``window_s`` is not returned.

    Args:
        path: Record path without extension (``".../mitdb/106"``).
        window_s: Window length in seconds.
        dataset: Dataset key; recognised from the path when None. Only ``"mitdb"`` has
            windows.

    Returns:
        Windows in time order, ``record_id`` like ``"mitdb/106@120s"``, ``start_s`` set.

    Raises:
        EcgReadError: as ``read_record``; HeaderError for a non-MIT-BIH dataset.
        ValueError: ``window_s`` is not positive.
    """
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    p = _strip_extension(path)
    key = _resolve_dataset(p, dataset)
    if key != "mitdb":
        raise HeaderError(p, f"read_windows cuts MIT-BIH records; this is {key}")
    rid = f"mitdb/{p.name}"
    header, signal, leads = _read_wfdb_signal(p, rid)
    meta = {**_meta_age_sex(_parse_comments(header.comments or [])), "source_format": "wfdb"}
    whole, ann = _mitdb_record(p, rid, header, signal, leads, meta)
    return _window_record(whole, window_s, ann)


def _window_record(
    record: EcgRecord, window_s: float, annotations: _MitdbAnnotations
) -> list[EcgRecord]:
    n = round(window_s * record.fs_hz)
    if n < 1:
        raise ValueError(f"window_s={window_s} is shorter than one sample at {record.fs_hz} Hz")
    base_meta = {k: v for k, v in record.meta.items() if k not in _WINDOW_META_KEYS}
    out = []
    for start in range(0, record.n_samples - n + 1, n):
        labels, codes, meta = annotations.window_labels(start, start + n)
        start_s = start / record.fs_hz
        out.append(
            replace(
                record,
                record_id=f"{record.record_id}@{_format_start(start_s)}",
                signal_mv=record.signal_mv[start : start + n],
                labels=labels,
                start_s=start_s,
                source_codes=codes,
                meta={**base_meta, **meta},
            )
        )
    return out


_WINDOW_META_KEYS = ("beat_counts", "aami_counts", "rhythm_fractions")


# --------------------------------------------------------------------------------------------
# CPSC 2018 original release


@functools.lru_cache(maxsize=16)
def _cpsc_reference(ref_path: str, mtime: float) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    try:
        with open(ref_path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise MissingFileError(ref_path, f"cannot read REFERENCE.csv: {e}") from e
    if not rows or rows[0][0].strip().lower() != "recording":
        raise HeaderError(ref_path, "REFERENCE.csv must start with a 'Recording,...' header row")
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        # Labels are class numbers 1-9; pandas-written copies may say "2.0".
        codes = []
        for c in row[1:]:
            c = c.strip()
            if c and c.lower() != "nan":
                codes.append(str(int(float(c))) if re.fullmatch(r"\d+(\.0+)?", c) else c)
        out[row[0].strip()] = tuple(codes)
    return out


def _read_cpsc_original(path: Path, dataset: str) -> EcgRecord:
    from scipy.io import loadmat

    name = _record_name(path)
    rid = f"{dataset}/{name}"
    mat = Path(f"{path}.mat")
    try:
        content = loadmat(str(mat), squeeze_me=True, struct_as_record=False)
    except Exception as e:
        raise HeaderError(rid, f"cannot read {mat} as a MATLAB file: {e}") from e
    if "ECG" not in content:
        raise HeaderError(rid, f"{mat} has no 'ECG' struct (keys: {sorted(content)})")
    ecg = content["ECG"]
    try:
        data = np.asarray(ecg.data, dtype=np.float64)
    except AttributeError as e:
        raise HeaderError(rid, f"{mat}: the ECG struct has no 'data' field") from e
    if data.ndim != 2 or data.shape[0] != len(STANDARD_LEADS):
        raise LeadCountError(
            rid, f"CPSC ECG.data must be 12 x n_samples (12 leads); got shape {data.shape}"
        )
    signal = data.T.astype(np.float32)  # the original release stores millivolts
    _check_finite(rid, signal, STANDARD_LEADS)
    ref = path.parent / "REFERENCE.csv"
    if not ref.is_file():
        raise MissingFileError(rid, f"label file {ref} does not exist", ref)
    table = _cpsc_reference(str(ref), ref.stat().st_mtime)
    if name not in table:
        raise HeaderError(rid, f"{ref} has no row for {name}")
    codes = table[name]
    meta = _meta_age_sex({"age": str(getattr(ecg, "age", "")), "sex": str(getattr(ecg, "sex", ""))})
    meta["source_format"] = "cpsc2018_original"
    return _labelled_record(path, dataset, signal, CPSC_ORIGINAL_FS_HZ, STANDARD_LEADS, codes, meta)


# --------------------------------------------------------------------------------------------
# Chapman-Shaoxing original release


def _find_chapman_diagnostics(path: Path) -> Path | None:
    for folder in (path.parent, path.parent.parent):
        for name in ("Diagnostics.csv", "Diagnostics.xlsx"):
            if (folder / name).is_file():
                return folder / name
    return None


@functools.lru_cache(maxsize=4)
def _chapman_diagnostics(diag_path: str, mtime: float) -> dict[str, dict[str, str]]:
    p = Path(diag_path)
    if p.suffix == ".csv":
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    else:
        import pandas as pd

        try:
            rows = pd.read_excel(p, dtype=str).fillna("").to_dict("records")
        except ImportError as e:
            raise HeaderError(
                p,
                "reading Diagnostics.xlsx needs openpyxl; install it or export the sheet "
                "to Diagnostics.csv beside it",
            ) from e
    if rows and "FileName" not in rows[0]:
        raise HeaderError(p, f"no FileName column; columns: {list(rows[0])}")
    return {str(r["FileName"]).strip(): {k: str(v) for k, v in r.items()} for r in rows}


def _read_chapman_original(path: Path, dataset: str) -> EcgRecord:
    name = _record_name(path)
    rid = f"{dataset}/{name}"
    csv_path = Path(f"{path}.csv")
    diag = _find_chapman_diagnostics(path)
    if diag is None:
        raise MissingFileError(
            rid, f"no Diagnostics.csv or Diagnostics.xlsx beside {csv_path} or in its parent"
        )
    with csv_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise TruncatedSignalError(rid, f"{csv_path} is empty")
    leads = [standard_lead_name(h) for h in rows[0]]
    body = [r for r in rows[1:] if r]
    if any(len(r) != len(leads) for r in body):
        short = next(i for i, r in enumerate(body) if len(r) != len(leads))
        raise TruncatedSignalError(
            rid, f"row {short + 2} of {csv_path} has fewer than {len(leads)} values"
        )
    try:
        values = np.array(body, dtype=np.float64)
    except ValueError as e:
        raise HeaderError(rid, f"{csv_path} has non-numeric samples: {e}") from e
    if values.shape[0] < CHAPMAN_ORIGINAL_N_SAMPLES:
        raise TruncatedSignalError(
            rid,
            f"{csv_path} has {values.shape[0]} samples; Chapman records have "
            f"{CHAPMAN_ORIGINAL_N_SAMPLES} (10 s at 500 Hz)",
        )
    signal = (values / 1000.0).astype(np.float32)  # microvolts -> millivolts
    out_leads, signal = _order_standard_leads(rid, leads, signal, dataset)
    _check_finite(rid, signal, out_leads)
    table = _chapman_diagnostics(str(diag), diag.stat().st_mtime)
    if name not in table:
        raise HeaderError(rid, f"{diag} has no row for {name}")
    row = table[name]
    codes = [row.get("Rhythm", "").strip()]
    codes += [b for b in row.get("Beat", "").split() if b.upper() != "NONE"]
    codes = tuple(c for c in codes if c)
    meta = _meta_age_sex({"age": row.get("PatientAge", ""), "sex": row.get("Gender", "")})
    meta["source_format"] = "chapman_original"
    return _labelled_record(path, dataset, signal, CHAPMAN_ORIGINAL_FS_HZ, out_leads, codes, meta)


# --------------------------------------------------------------------------------------------
# Public readers


def read_record(path: str | Path, dataset: str | None = None) -> EcgRecord:
    """Read one record, whatever its source format, into an ``EcgRecord``.

    MIT-BIH records come back whole (30 min), labelled with every rhythm and beat finding in
    the record; use ``read_windows`` for fixed windows.

    Args:
        path: Record path as wfdb takes it, without extension (``".../cpsc2018/A0001"``); a
            path with ``.hea``/``.mat``/``.csv`` is accepted too.
        dataset: Dataset key or folder name; recognised from the parent folders or the record
            name when None.

    Returns:
        The record: float32 millivolts ``(n_samples, n_leads)``, standard lead names (12-lead
        sets in the order I, II, III, aVR, aVL, aVF, V1-V6), canonical labels plus
        ``"UNK:<code>"`` unknowns, the source codes, and age/sex in ``meta`` where known.

    Raises:
        MissingFileError, HeaderError, TruncatedSignalError, ChecksumMismatchError,
        NonFiniteSignalError, LeadCountError: all subclasses of ``EcgReadError``.
    """
    p = _strip_extension(path)
    key = _resolve_dataset(p, dataset)
    if Path(f"{p}.hea").is_file():
        return _read_wfdb(p, key)
    if Path(f"{p}.mat").is_file():
        if key != "cpsc2018":
            raise MissingFileError(f"{key}/{p.name}", f"header file {p}.hea does not exist")
        return _read_cpsc_original(p, key)
    if Path(f"{p}.csv").is_file():
        if key != "chapman_shaoxing":
            raise MissingFileError(f"{key}/{p.name}", f"header file {p}.hea does not exist")
        return _read_chapman_original(p, key)
    raise MissingFileError(f"{key}/{p.name}", f"no {p}.hea, {p}.mat or {p}.csv")


def resample(record: EcgRecord, fs_hz: float) -> EcgRecord:
    """Resample a record to ``fs_hz`` with a polyphase anti-aliasing filter.

    Labels, patient and window offset are kept; ``meta["resampled_from_hz"]`` records the
    original rate. The new length is ``round(n_samples * fs_hz / record.fs_hz)``.

    Raises:
        ValueError: ``fs_hz`` is not positive.
    """
    from scipy.signal import resample_poly

    if not fs_hz > 0:
        raise ValueError(f"fs_hz must be > 0, got {fs_hz}")
    if float(fs_hz) == float(record.fs_hz):
        return record
    # Exact rational ratio of the two rates (e.g. 500 -> 360 Hz is up 18, down 25).
    ratio = Fraction(fs_hz).limit_denominator(1000) / Fraction(record.fs_hz).limit_denominator(1000)
    out = resample_poly(
        record.signal_mv.astype(np.float64), ratio.numerator, ratio.denominator, axis=0
    )
    n_out = round(record.n_samples * float(fs_hz) / record.fs_hz)
    if out.shape[0] < n_out:
        out = np.pad(out, ((0, n_out - out.shape[0]), (0, 0)), mode="edge")
    meta = {**record.meta, "resampled_from_hz": record.meta.get("resampled_from_hz", record.fs_hz)}
    return replace(record, signal_mv=out[:n_out].astype(np.float32), fs_hz=float(fs_hz), meta=meta)


@dataclass(frozen=True)
class ReadFailure:
    """A record that ``iter_records`` could not read, and why."""

    path: str
    error: EcgReadError


def find_record_paths(root: str | Path) -> list[Path]:
    """Record paths (no extension) under ``root``, sorted: WFDB headers, CPSC original
    ``.mat`` files with a ``REFERENCE.csv`` beside them, and Chapman original ``.csv`` files
    with a ``Diagnostics`` table beside them or in the parent folder.

    Raises:
        MissingFileError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file() or any(Path(f"{root}{ext}").is_file() for ext in (".hea", ".mat", ".csv")):
        return [_strip_extension(root)]
    if not root.is_dir():
        raise MissingFileError(root, "no such file or directory")
    found: set[Path] = set()
    for hea in root.rglob("*.hea"):
        found.add(hea.with_suffix(""))
    for mat in root.rglob("*.mat"):
        stem = mat.with_suffix("")
        if stem not in found and (mat.parent / "REFERENCE.csv").is_file():
            found.add(stem)
    for c in root.rglob("*.csv"):
        stem = c.with_suffix("")
        if stem in found or c.stem.lower() in _NOT_RECORDS:
            continue
        if _find_chapman_diagnostics(stem) is not None:
            found.add(stem)
    return sorted(found)


def iter_records(
    root: str | Path,
    dataset: str | None = None,
    window_s: float | None = 10.0,
    failures: list[ReadFailure] | None = None,
    progress: bool = False,
) -> Iterator[EcgRecord]:
    """Walk a dataset folder (or a folder of dataset folders) and yield its records.

    MIT-BIH records are yielded as ``window_s`` windows (whole when ``window_s`` is None).
    A record that cannot be read does not stop the walk: its ``ReadFailure`` (path and the
    ``EcgReadError``) is appended to ``failures``. Pass a list to collect them; with
    ``failures=None`` each failure is reported with ``warnings.warn`` instead, never dropped
    silently.

    Args:
        root: A folder, or one record path.
        dataset: Dataset key for every record; recognised per record when None.
        window_s: MIT-BIH window length in seconds, or None for whole records.
        failures: List that receives a ``ReadFailure`` per unreadable record.
        progress: Show a tqdm progress bar.

    Yields:
        EcgRecords in sorted path order.
    """
    paths = find_record_paths(root)
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, desc=f"reading {root}", unit="record")
    for p in paths:
        try:
            key = _resolve_dataset(p, dataset)
            if key == "mitdb" and window_s is not None:
                records = read_windows(p, window_s=window_s, dataset=key)
            else:
                records = [read_record(p, dataset=key)]
        except EcgReadError as e:
            if failures is None:
                warnings.warn(f"skipped unreadable record: {e}", stacklevel=2)
            else:
                failures.append(ReadFailure(str(p), e))
            continue
        yield from records


@dataclass
class DatasetSummary:
    """Counts over the records of one dataset (see ``summarize_records``).

    Attributes:
        dataset: Dataset key.
        n_records: Records yielded (MIT-BIH: windows).
        n_recordings: Distinct source recordings (a MIT-BIH recording gives many windows).
        n_patients: Distinct patients; a record without patient_id counts as its own.
        duration_s: Total signal duration.
        label_counts: Canonical label -> number of records carrying it (unknowns included).
        unknown_codes: Raw code -> number of records carrying it as ``"UNK:<code>"``.
    """

    dataset: str
    n_records: int = 0
    n_recordings: int = 0
    n_patients: int = 0
    duration_s: float = 0.0
    label_counts: Counter = field(default_factory=Counter)
    unknown_codes: Counter = field(default_factory=Counter)


def summarize_records(records: Iterable[EcgRecord]) -> dict[str, DatasetSummary]:
    """Count records, recordings, patients, labels and unknown codes per dataset, streaming."""
    out: dict[str, DatasetSummary] = {}
    recordings: dict[str, set[str]] = {}
    patients: dict[str, set[str]] = {}
    for rec in records:
        s = out.setdefault(rec.dataset, DatasetSummary(rec.dataset))
        recording = rec.record_id.split("@", 1)[0]
        s.n_records += 1
        s.duration_s += rec.duration_s
        recordings.setdefault(rec.dataset, set()).add(recording)
        patients.setdefault(rec.dataset, set()).add(rec.patient_id or recording)
        s.label_counts.update(rec.labels)
        s.unknown_codes.update(
            lab[len(L.UNKNOWN_PREFIX) :] for lab in rec.labels if L.is_unknown(lab)
        )
    for key, s in out.items():
        s.n_recordings = len(recordings[key])
        s.n_patients = len(patients[key])
    return dict(sorted(out.items()))
