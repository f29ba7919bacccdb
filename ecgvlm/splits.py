"""Patient-wise, label-stratified, deterministic splits of ECG records.

No patient lands in two splits: all windows of one MIT-BIH recording, and all records that
share a ``patient_id``, move together. A record without a ``patient_id`` is its own group
(its ``record_id`` without the ``@<start>s`` window suffix), which is exact for the sources
that publish one record per patient and a caveat for PTB-XL (see docs/data.md).

The standard MIT-BIH inter-patient split (de Chazal, O'Dwyer and Reilly, IEEE TBME 51(7),
2004) is available by name as ``scheme="mitbih_ds"``: DS1 for training, DS2 for testing, the
four paced records (102, 104, 107, 217) excluded.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from ecgvlm.records import EcgRecord

# de Chazal et al. 2004, Table I: 22 records each; paced records are excluded from both.
MITBIH_DS1 = (
    "101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122",
    "124", "201", "203", "205", "207", "208", "209", "215", "220", "223", "230",
)  # fmt: skip
MITBIH_DS2 = (
    "100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210",
    "212", "213", "214", "219", "221", "222", "228", "231", "232", "233", "234",
)  # fmt: skip
MITBIH_PACED = ("102", "104", "107", "217")

SCHEMES = ("patient", "mitbih_ds")


def patient_key(record: EcgRecord) -> str:
    """The grouping key of a record: its patient, else its recording (windows share one)."""
    if record.patient_id:
        return record.patient_id
    return record.record_id.split("@", 1)[0]


def _stable_rank(seed: int, key: str) -> str:
    # A hash of (seed, key) orders groups independently of input order and of PYTHONHASHSEED.
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _check_fractions(fractions: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    if isinstance(fractions, Mapping):
        named = {str(k): float(v) for k, v in fractions.items()}
    else:
        values = [float(v) for v in fractions]
        names = ("train", "val", "test") if len(values) == 3 else None
        if names is None:
            names = (
                ("train", "test")
                if len(values) == 2
                else tuple(f"split{i}" for i in range(len(values)))
            )
        named = dict(zip(names, values))
    if not named:
        raise ValueError("fractions must name at least one split")
    bad = {k: v for k, v in named.items() if not v > 0}
    if bad:
        raise ValueError(f"fractions must be > 0, got {bad}")
    total = sum(named.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total} from {named}")
    return named


def _mitbih_number(record: EcgRecord) -> str:
    if record.dataset != "mitdb":
        raise ValueError(
            f"scheme 'mitbih_ds' splits MIT-BIH records; {record.record_id} is {record.dataset}"
        )
    return record.record_id.split("/", 1)[1].split("@", 1)[0]


def mitbih_ds_split(records: Iterable[EcgRecord]) -> dict[str, list[EcgRecord]]:
    """The de Chazal inter-patient split: ``{"DS1": [...], "DS2": [...], "excluded": [...]}``.

    ``excluded`` holds the paced records and any record outside both lists, so nothing is
    dropped silently. Note that records 201 (DS1) and 202 (DS2) come from one patient: the
    published split keeps them apart, and so does this function.

    Raises:
        ValueError: a record is not from MIT-BIH.
    """
    out: dict[str, list[EcgRecord]] = {"DS1": [], "DS2": [], "excluded": []}
    ds1, ds2 = set(MITBIH_DS1), set(MITBIH_DS2)
    for rec in records:
        number = _mitbih_number(rec)
        out["DS1" if number in ds1 else "DS2" if number in ds2 else "excluded"].append(rec)
    return out


def split_records(
    records: Iterable[EcgRecord],
    fractions: Mapping[str, float] | Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    scheme: str = "patient",
) -> dict[str, list[EcgRecord]]:
    """Split records into named parts, patient-wise and stratified by label.

    Groups of records (one per patient, see ``patient_key``) are stratified by dataset and by
    their rarest label across the data set, shuffled within each stratum by a hash of ``(seed, group)``,
    and dealt one by one to the split furthest below its target share of that stratum's
    records. The result depends only on the records (not their order) and the seed.

    Args:
        records: The records to split.
        fractions: ``{"train": 0.8, "val": 0.1, "test": 0.1}``, or a sequence of 2 (train,
            test) or 3 (train, val, test) fractions summing to 1.
        seed: Shuffling seed.
        scheme: ``"patient"`` (the above) or ``"mitbih_ds"`` (``mitbih_ds_split``; fractions
            and seed are ignored).

    Returns:
        Split name -> records, each split in input order; every split named in
        ``fractions`` is present (possibly empty when there are fewer patients than splits).

    Raises:
        ValueError: bad fractions or scheme, or non-MIT-BIH records for ``"mitbih_ds"``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    records = list(records)
    if scheme == "mitbih_ds":
        return mitbih_ds_split(records)
    named = _check_fractions(fractions)

    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[patient_key(rec)].append(i)
    group_labels = {g: {lab for i in idx for lab in records[i].labels} for g, idx in groups.items()}
    label_freq = Counter(lab for labs in group_labels.values() for lab in labs)
    # A label that fewer patients carry than there are splits cannot be spread over them;
    # stratifying on it would make one-patient strata, each dealt to the largest split (so
    # every patient with a unique label would land in train). Such labels do not stratify.
    for labs in group_labels.values():
        labs.difference_update({lab for lab in labs if label_freq[lab] < len(named)})

    group_dataset = {g: records[idx[0]].dataset for g, idx in groups.items()}

    def stratum(g: str) -> tuple[str, str]:
        labs = group_labels[g]
        # Rarest label first; ties broken by name so the stratum is well defined. The dataset
        # is part of the stratum so that each split draws from every source alike.
        rarest = min(labs, key=lambda lab: (label_freq[lab], lab)) if labs else ""
        return group_dataset[g], rarest

    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for g in groups:
        strata[stratum(g)].append(g)

    assignment: dict[str, str] = {}
    totals = Counter()
    n_total = len(records)
    # Rare strata first, so the big ones even out the overall shares at the end.
    for name in sorted(strata, key=lambda s: (len(strata[s]), s)):
        members = sorted(strata[name], key=lambda g: _stable_rank(seed, g))
        size = sum(len(groups[g]) for g in members)
        placed = Counter()
        for g in members:
            n = len(groups[g])
            # Splits with room for the whole group within their share of this stratum, by
            # largest remaining share; when none has room (a stratum of one or two patients
            # cannot follow the fractions), the split furthest below its overall share.
            room = [
                split for split in named if placed[split] + n <= named[split] * size + 1e-9
            ]
            if room:
                best = max(
                    room,
                    key=lambda split, size=size, placed=placed: (
                        named[split] * size - placed[split],
                        named[split] * n_total - totals[split],
                    ),
                )
            else:
                best = max(named, key=lambda split: named[split] * n_total - totals[split])
            assignment[g] = best
            placed[best] += n
            totals[best] += n

    out: dict[str, list[EcgRecord]] = {name: [] for name in named}
    for rec in records:
        out[assignment[patient_key(rec)]].append(rec)
    return out
