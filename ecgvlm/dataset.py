"""Build the MCQ training set with Ray Data: scan -> split -> read, render, ask -> Parquet.

``prepare_dataset(config)`` is what ``jobs/prepare.py`` and ``ecgvlm prepare`` both call; the
caller has already connected to Ray (this module never calls ``ray.init``). Two Ray Data
passes:

1. **Scan**: one row per record path; workers return small metadata rows (record id,
   patient, labels): no signals reach the driver. A WFDB record's labels come from its
   header's comments alone; MIT-BIH (in windows) and the original CPSC/Chapman releases are
   read whole. Records whose labels are all unknown become rejects, and so do records that
   fail to read, here or when their shard reads them.
2. **Shards**: the driver splits the scanned units patient-wise (``split_records``), cuts
   each split into fixed shards of ``shard_size`` units in record order, and a Ray Data
   ``map_batches`` task per shard reads, renders and makes the questions, then writes the
   shard's Parquet file itself (atomically) plus a completion marker.

Shard names and contents depend only on the records and the config, so a rerun yields the
same files and skips every shard whose marker carries the same data set id. The output:

```
output_dir/
  manifest.json        counts per split and label, resolved configs, code version, sources
  prepare_config.yaml  the resolved config
  rejects.jsonl        one line per record (or window) that failed, with stage and reason
  train/part-00000.parquet  train/part-00000.done.json  ...  val/...  test/...
  llava/train.json llava/images/...   (with llava: true)
```

``load_split(output_dir, "train")`` reads a split back as ``McqSample`` objects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import ecgvlm
from ecgvlm import storage
from ecgvlm.config import ConfigError, absolute_path, check_range, config_to_dict, save_config
from ecgvlm.knowledge import knowledge_base
from ecgvlm.mcq import (
    CALIBRATION_ROUNDS,
    McqConfig,
    McqError,
    allowed_distractors,
    asked_finding,
    calibrate_distractor_weights,
    known_findings,
    make_mcq,
)
from ecgvlm.measure import MEASURE_VERSION, MeasureConfig, measure_record
from ecgvlm.prompt import PROMPT_VERSION, conversation_json, llava_record
from ecgvlm.records import EcgRecord, McqSample
from ecgvlm.render import RenderConfig

MANIFEST_FORMAT = "ecgvlm-mcq/1"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
CONFIG_NAME = "prepare_config.yaml"
LLAVA_DIR = "llava"

# Parquet columns, in order. ``conversation`` is LLaVA's JSON turn list as a string.
COLUMNS = (
    "sample_id", "dataset", "record_id", "patient_id", "start_s", "labels", "png",
    "question", "options", "option_labels", "answer_index", "answer_letter", "target_text",
    "conversation", "render_config_hash", "mcq_config_hash", "prompt_version", "seed", "split",
    "measurements", "source_path",
)
#: What a shard holds; a marker of another format means the shard is built again, so a rerun
#: brings an older data set's shards up to date (2: ``source_path``, which lets the evaluation
#: re-render a sample's printout from its record).
SHARD_FORMAT = 2


class PrepareError(ValueError):
    """The prepare job cannot go on (e.g. the output folder holds another data set)."""


@dataclass(frozen=True)
class SourceConfig:
    """One dataset root to scan.

    Attributes:
        root: A dataset folder, or a folder of dataset folders (as ``find_record_paths``):
            a local path or a URI of an object store (``s3://bucket/ecg/cpsc2018``), copied
            to each node's disk once (``storage.node_local``) because wfdb reads files.
        dataset: Dataset key for every record under ``root``; recognised per record if None.
        max_records: Take only the first N record paths in sorted order (0: all).
    """

    root: str
    dataset: str | None = None
    max_records: int = 0

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("sources[].root must not be empty")
        check_range("max_records", self.max_records, 0)


@dataclass(frozen=True)
class PrepareConfig:
    """The prepare job's config (``configs/prepare_*.yaml``).

    Attributes:
        sources: Dataset roots to scan.
        output_dir: Where shards, manifest and rejects go: a local path (made absolute on the
            driver) or a URI (``s3://...``); on a multi-node cluster a URI or a ``file://``
            path on a file system every node mounts.
        splits: Split names.
        fractions: Share of records per split (patient-wise, stratified), summing to 1.
        seed: Seed of the split, the questions and any render augmentation. Question ``k`` of a
            record uses seed ``seed + k``.
        window_s: MIT-BIH window length in seconds.
        questions_per_record: Questions (with different seeds) per record or window.
        render: Renderer config; layout ``auto`` draws 12-lead records as 3x4+II and MIT-BIH
            as strips.
        mcq: Question config.
        measure: How each record is measured for grounded targets and the ``measurements``
            column. Prepare's default skips the P/T-wave delineation, which is ~85% of the
            measurer's cost (about 0.5 s against 0.07 s per 12-lead 10 s record on one core,
            docs/measure.md), so rate, rhythm, QRS duration, axis and ST are measured and
            PR/QT are not; ``measure.delineate_waves=true`` measures everything.
        balanced_splits: Splits whose questions are answer-balanced: per data set, each
            finding keeps only as many units as it can be offered fairly as a distractor
            (``n_options - 1`` times its answers, among the kept questions the knowledge base
            lets it be a distractor for) and at most ``1 / mcq.n_options`` of the split; the
            excess of the frequent findings is a seeded drop spread across recordings
            (``balance_answers``). With prior-balanced distractors this puts a blind guesser
            that knows the training prior near chance (benchmarks/blind_baseline.py). None
            (default): every split but the first; ``[]``: none (the study's style, every unit
            kept). The finding counted is the one question 0 of a unit asks.
        llava: Also write LLaVA training JSON per split plus an image folder.
        shard_size: Records (or windows) per Parquet shard; part of the data set's identity.
        num_cpus_per_task: Ray CPUs reserved by each scan and shard task.
        overwrite: Replace an output folder that holds a different data set.
        progress: Show a progress bar.
    """

    sources: tuple[SourceConfig, ...] = ()
    output_dir: str = "runs/prepare"
    splits: tuple[str, ...] = ("train", "val", "test")
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    seed: int = 0
    window_s: float = 10.0
    questions_per_record: int = 1
    render: RenderConfig = field(default_factory=lambda: RenderConfig(layout="auto"))
    mcq: McqConfig = field(default_factory=McqConfig)
    measure: MeasureConfig = field(default_factory=lambda: MeasureConfig(delineate_waves=False))
    balanced_splits: tuple[str, ...] | None = None
    llava: bool = False
    shard_size: int = 64
    num_cpus_per_task: float = 1.0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources must list at least one dataset root")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if len(self.splits) != len(self.fractions) or not self.splits:
            raise ConfigError(
                f"splits {list(self.splits)} and fractions {list(self.fractions)} must have "
                "the same, non-zero length"
            )
        if len(set(self.splits)) != len(self.splits) or any(
            not s or "/" in s or s.startswith(".") or s == LLAVA_DIR for s in self.splits
        ):
            raise ConfigError(f"splits must be distinct plain folder names, got {list(self.splits)}")
        for name, frac in zip(self.splits, self.fractions):
            check_range(f"fractions[{name}]", frac, 0.0, 1.0)
        empty = [name for name, frac in zip(self.splits, self.fractions) if frac == 0]
        if empty:  # said here, not by the splitter once Ray has scanned every record
            kept = [(n, f) for n, f in zip(self.splits, self.fractions) if f > 0]
            raise ConfigError(
                f"fractions give {', '.join(empty)} no records; leave such a split out of "
                f"splits instead (splits=[{', '.join(n for n, _ in kept)}] "
                f"fractions=[{', '.join(f'{f:g}' for _, f in kept)}])")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"fractions must sum to 1, got {sum(self.fractions)}")
        unknown = sorted(set(self.balanced_splits or ()) - set(self.splits))
        if unknown:
            raise ConfigError(
                f"balanced_splits names {unknown}, which are not among splits {list(self.splits)}"
            )
        check_range("window_s", self.window_s, 1.0, 600.0)
        check_range("questions_per_record", self.questions_per_record, 1, 100)
        check_range("shard_size", self.shard_size, 1, 100_000)
        check_range("num_cpus_per_task", self.num_cpus_per_task, 0.01, 64)

    def remote_roots(self) -> tuple[str, ...]:
        """The sources' roots in object storage (their records are read from node copies)."""
        return tuple(s.root for s in self.sources if storage.local_path(s.root) is None)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the shards contain (not where or how fast)."""
        data = config_to_dict(self)
        for key in ("output_dir", "llava", "num_cpus_per_task", "overwrite", "progress"):
            data.pop(key)
        return data


@dataclass(frozen=True)
class Unit:
    """One record, or one window of a long record, that becomes ``questions_per_record`` rows."""

    path: str
    dataset: str
    record_id: str
    patient_id: str
    labels: tuple[str, ...]
    start_s: float
    windowed: bool

    def sort_key(self) -> tuple[str, float]:
        return (self.record_id.split("@", 1)[0], self.start_s)


@dataclass(frozen=True)
class PrepareResult:
    """What a prepare run did."""

    output_dir: str
    manifest: dict[str, Any]
    shards_written: int
    shards_skipped: int
    n_rejects: int

    @property
    def n_samples(self) -> int:
        return sum(s["n_samples"] for s in self.manifest["splits"].values())

    def summary(self) -> dict[str, Any]:
        """One JSON-friendly line for the command line."""
        return {
            "output_dir": self.output_dir,
            "samples": {name: s["n_samples"] for name, s in self.manifest["splits"].items()},
            "shards_written": self.shards_written,
            "shards_skipped": self.shards_skipped,
            "rejects": self.n_rejects,
            # Units left out of held-out splits to keep their questions fair (balanced_splits).
            "answer_balance_dropped": {
                split: {ds: sum(r["dropped"].values()) for ds, r in by_ds.items() if r["dropped"]}
                for split, by_ds in self.manifest.get("answer_balance", {}).items()
            },
        }


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _hash(obj: Any, n: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, str]:
    """The package version and, where this runs from a git checkout, the commit."""
    repo = Path(__file__).resolve().parents[1]
    sha = _git(repo, "rev-parse", "HEAD")
    if sha and _git(repo, "status", "--porcelain", "--untracked-files=no"):
        sha += "-dirty"
    return {"ecgvlm": ecgvlm.__version__, "git_sha": sha or "unknown"}


def _reject(stage: str, path: str, record_id: str, error: BaseException) -> dict[str, str]:
    return {
        "stage": stage,
        "path": path,
        "record_id": record_id,
        "error_type": type(error).__name__,
        "error": str(error) or repr(error),
    }


def _is_windowed(path: str, dataset: str | None) -> bool:
    from ecgvlm.signal import detect_dataset

    key = dataset or detect_dataset(path)
    return key == "mitdb"


def _read_units(path: str, dataset: str | None, window_s: float) -> list[EcgRecord]:
    if _is_windowed(path, dataset):
        # A 30-min MIT-BIH record spans several shards; Ray reuses worker processes, so a
        # worker that builds consecutive shards reads it once.
        return list(_read_windows_cached(path, dataset, window_s))
    from ecgvlm.signal import read_record

    return [read_record(path, dataset=dataset)]


@functools.lru_cache(maxsize=2)
def _read_windows_cached(path: str, dataset: str | None, window_s: float) -> tuple[EcgRecord, ...]:
    from ecgvlm.signal import read_windows

    return tuple(read_windows(path, window_s=window_s, dataset=dataset))


def local_record_path(path: str, roots: Sequence[str] = ()) -> str:
    """A record path on this node's disk: ``path`` itself when it is local; for a record in
    an object store, the same record in this node's copy of its source root (``roots``: the
    sources' URIs; ``storage.node_local`` copies a root once per node).

    wfdb and scipy read local files, and a record's header, signal, annotation and label
    tables sit side by side: copying the source tree keeps them together.

    Raises:
        PrepareError: ``path`` is a URI under none of ``roots``.
    """
    local = storage.local_path(path)
    if local is not None:
        return local
    for root in sorted(roots, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return os.path.join(storage.node_local(root), path[len(prefix):])
    raise PrepareError(f"{path} is under none of the sources {list(roots)}")


def read_sample_record(
    source_path: str, dataset: str, record_id: str, window_s: float, roots: Sequence[str] = ()
) -> EcgRecord:
    """The record (or MIT-BIH window) a split row was made from, read again as prepare read
    it: the row's ``source_path``, ``dataset`` and ``record_id`` and the manifest's
    ``window_s`` (``roots``: the sources in object storage, see ``local_record_path``). The
    evaluation re-renders printouts from it.

    Raises:
        EcgReadError: the record cannot be read (moved, deleted, unreadable).
        PrepareError: the file no longer holds ``record_id``.
    """
    local = local_record_path(source_path, roots)
    for record in _read_units(local, dataset or None, window_s):
        if record.record_id == record_id:
            return record
    raise PrepareError(f"{source_path} no longer holds {record_id} (window_s={window_s})")


# ---------------------------------------------------------------------------------------------
# Pass 1: scan
# ---------------------------------------------------------------------------------------------


def scan_path(row: dict[str, Any], window_s: float, roots: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one record path -> one metadata row per unit (or a reject row).

    Rows carry strings only (labels as JSON) so every block has one schema. ``roots``: the
    sources in object storage (``local_record_path``).
    """
    from ecgvlm.signal import read_record_labels

    path, dataset = str(row["path"]), (row["dataset"] or None)
    try:
        local = local_record_path(path, roots)
        # The header's comments where they hold the labels (the record is validated when its
        # sample is built); the whole record where the labels need its annotations or tables.
        labelled = read_record_labels(local, dataset)
        records = [labelled] if labelled is not None else _read_units(local, dataset, window_s)
    except Exception as e:  # noqa: BLE001 - every failure is recorded in rejects.jsonl
        return [{"unit": "", "reject": json.dumps(_reject("read", path, "", e))}]
    out = []
    for rec in records:
        if not known_findings(rec):
            err = McqError(f"{rec.record_id}: no label with a knowledge entry ({list(rec.labels)})")
            out.append({"unit": "", "reject": json.dumps(_reject("mcq", path, rec.record_id, err))})
            continue
        unit = Unit(
            path=path,
            dataset=rec.dataset,
            record_id=rec.record_id,
            patient_id=rec.patient_id or "",
            labels=tuple(rec.labels),
            start_s=float(rec.start_s),
            windowed=_is_windowed(local, dataset),
        )
        out.append({"unit": json.dumps(unit.__dict__), "reject": ""})
    return out


def _unit_from_dict(data: dict[str, Any]) -> Unit:
    return Unit(**{**data, "labels": tuple(data["labels"])})


def _unit_from_json(text: str) -> Unit:
    return _unit_from_dict(json.loads(text))


def list_sources(config: PrepareConfig) -> list[dict[str, Any]]:
    """Record paths per source, sorted and cut to ``max_records`` (driver side, no reading).

    The paths are absolute (a relative ``root`` is taken from the driver's working directory),
    so the tasks that read them may run anywhere; the manifest and the data set's identity
    keep ``root`` as the config gives it. A root in an object store is listed in this node's
    copy of it (``storage.node_local``) and its records named by URI, which each node maps
    to its own copy (``local_record_path``).
    """
    from ecgvlm.signal import find_record_paths

    items = []
    for src in config.sources:
        root = absolute_path(src.root)
        local_root = storage.node_local(root)
        paths = [str(p) for p in find_record_paths(local_root)]
        if local_root != root:
            paths = [storage.join(root, os.path.relpath(p, local_root)) for p in paths]
        if src.max_records:
            paths = paths[: src.max_records]
        items += [{"path": p, "dataset": src.dataset or "", "root": src.root} for p in paths]
    return items


def assign_splits(units: list[Unit], config: PrepareConfig) -> dict[str, list[Unit]]:
    """Patient-wise, label-stratified split of the scanned units (``split_records``)."""
    from ecgvlm.splits import split_records

    light = [
        EcgRecord(
            record_id=u.record_id,
            dataset=u.dataset,
            signal_mv=np.zeros((0, 1), dtype=np.float32),
            fs_hz=1.0,
            leads=("-",),
            labels=u.labels,
            patient_id=u.patient_id or None,
            start_s=u.start_s,
        )
        for u in units
    ]
    by_id = {u.record_id: u for u in units}
    parts = split_records(light, dict(zip(config.splits, config.fractions)), seed=config.seed)
    return {
        name: sorted((by_id[r.record_id] for r in parts[name]), key=Unit.sort_key)
        for name in config.splits
    }


def balanced_split_names(config: PrepareConfig) -> tuple[str, ...]:
    """The splits ``balanced_splits`` names (None: every split but the first)."""
    return config.splits[1:] if config.balanced_splits is None else config.balanced_splits


def _answer_cap(counts: Sequence[int], share: float) -> int:
    """The largest per-finding count ``c`` with ``c <= share' * sum(min(n, c))``, where
    ``share' = max(share, 1 / len(counts))`` (K findings cannot each be under 1/K)."""
    target = max(share, 1.0 / len(counts))
    for cap in range(max(counts), 0, -1):
        if cap <= target * sum(min(n, cap) for n in counts) + 1e-9:
            return cap
    return 1


def _fair_counts(groups: dict[str, list[Unit]], config: PrepareConfig) -> dict[str, int]:
    """How many units of each asked finding to keep (from the front of each ranked list).

    Fair means each finding can be offered as a distractor ``n_options - 1`` times as often
    as it is the answer, counting only the kept questions for which the knowledge base allows
    it as a distractor (sinus rhythm is none against a premature beat in sinus rhythm).
    Shrinking one finding shrinks what the others may keep, so the counts are iterated to a
    fixed point. Where that leaves nothing (as few findings as options, some of which exclude
    each other), the largest smaller ratio that leaves something is used. Last, no finding
    keeps more than ``1 / n_options`` of the units (``1 / K`` with only K findings).
    """
    pool = sorted(config.mcq.label_pool or knowledge_base())
    asked = set(groups)
    eligible = {
        u.record_id: asked & set(allowed_distractors(u.labels, finding, pool))
        for finding, members in groups.items()
        for u in members
    }
    keep = {f: len(us) for f, us in groups.items()}
    for per_answer in range(config.mcq.n_options - 1, 0, -1):
        fair = dict(keep)
        while True:
            offers = Counter(
                g for f, us in groups.items() for u in us[: fair[f]] for g in eligible[u.record_id]
            )
            shrunk = {f: min(n, offers[f] // per_answer) for f, n in fair.items()}
            if shrunk == fair:
                break
            fair = shrunk
        if sum(fair.values()):
            keep = fair
            break
    live = [n for n in keep.values() if n]
    cap = _answer_cap(live, 1.0 / config.mcq.n_options) if live else 0
    return {f: min(n, cap) for f, n in keep.items()}


def balance_answers(
    split_units: dict[str, list[Unit]], config: PrepareConfig
) -> tuple[dict[str, list[Unit]], dict[str, Any]]:
    """``split_units`` with the ``balanced_splits`` answer-balanced (see ``PrepareConfig``).

    Returns:
        The kept units per split (in their order), and per balanced split and data set the
        correct-finding counts kept and dropped, for the manifest.
    """
    out, report = dict(split_units), {}
    for split in balanced_split_names(config):
        by_group: dict[tuple[str, str], list[Unit]] = {}
        for u in split_units[split]:
            finding = asked_finding(u.record_id, u.labels, config.seed)
            if finding is not None:  # no question will be made of it either way
                by_group.setdefault((u.dataset, finding), []).append(u)
        dropped: set[str] = set()
        report[split] = {}
        for dataset in sorted({d for d, _ in by_group}):
            # A seeded order by hash: the kept units spread across recordings.
            groups = {
                f: sorted(us, key=lambda u: _hash([config.seed, u.record_id]))
                for (d, f), us in sorted(by_group.items())
                if d == dataset
            }
            keep = _fair_counts(groups, config)
            for finding, ranked in groups.items():
                dropped |= {u.record_id for u in ranked[keep[finding] :]}
            report[split][dataset] = {
                "kept": {f: n for f, n in keep.items() if n},
                "dropped": {f: len(us) - keep[f] for f, us in groups.items() if len(us) > keep[f]},
            }
        out[split] = [u for u in split_units[split] if u.record_id not in dropped]
    return out, report


def distractor_weights(
    split_units: dict[str, list[Unit]], config: PrepareConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Prior-balanced distractor weights per split and data set.

    Per split, not over the whole data set: a patient-wise split mixes the findings
    differently, and the options of a split's questions must not betray its answers. The
    balanced (held-out) splits get ``ecgvlm.mcq.calibrate_distractor_weights`` over their own
    questions; the others, training above all, how often each finding is asked: calibration
    replays every question for up to a dozen rounds on the driver (8,000 made-up questions of
    12 findings: 6.4 s on this machine without stopping early), and a training split whose findings are not balanced could not reach its targets
    anyway. Empty for the ``knowledge_base`` style, which draws uniformly.
    """
    if config.mcq.distractors != "prior_balanced":
        return {split: {} for split in split_units}
    balanced = set(balanced_split_names(config))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split, members in split_units.items():
        out[split] = {}
        for ds in sorted({u.dataset for u in members}):
            questions = [
                (u.record_id, u.labels, config.seed + k)
                for u in members
                if u.dataset == ds
                for k in range(config.questions_per_record)
            ]
            out[split][ds] = calibrate_distractor_weights(
                questions, config.mcq, rounds=CALIBRATION_ROUNDS if split in balanced else 0
            )
    return out


def plan_shards(split_units: dict[str, list[Unit]], shard_size: int) -> list[dict[str, Any]]:
    """Fixed shards per split: ``{"shard": "train/part-00000", "split", "units" (JSON)}``."""
    shards = []
    for split, units in split_units.items():
        for i in range(0, len(units), shard_size):
            chunk = units[i : i + shard_size]
            shards.append(
                {
                    "shard": f"{split}/part-{i // shard_size:05d}",
                    "split": split,
                    "units": json.dumps([u.__dict__ for u in chunk]),
                }
            )
    return shards


# ---------------------------------------------------------------------------------------------
# Pass 2: shards
# ---------------------------------------------------------------------------------------------


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (``"mitdb/106@90s#q0"`` -> ``"mitdb_106_90s_q0"``)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in sample_id).strip("_")


def sample_row(
    sample: McqSample,
    split: str,
    render_config_hash: str,
    mcq_config_hash: str,
    measurements: str = "null",
    source_path: str = "",
) -> dict[str, Any]:
    """The Parquet row of one sample (``COLUMNS``); ``measurements`` is the record's JSON,
    ``source_path`` the record it was read from (absolute, without extension)."""
    row = sample.to_row()
    row.update(
        measurements=measurements,
        source_path=source_path,
        conversation=conversation_json(sample.question, sample.options, sample.target_text),
        render_config_hash=render_config_hash,
        mcq_config_hash=mcq_config_hash,
        prompt_version=PROMPT_VERSION,
        split=split,
    )
    return {k: row[k] for k in COLUMNS}


def _arrow_schema():
    import pyarrow as pa

    types = {
        "start_s": pa.float64(), "png": pa.binary(), "answer_index": pa.int32(),
        "seed": pa.int64(), "labels": pa.list_(pa.string()),
        "options": pa.list_(pa.string()), "option_labels": pa.list_(pa.string()),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


def _marker_path(out_dir: str, shard: str) -> str:
    return storage.join(out_dir, f"{shard}.done.json")


def build_shard(
    spec: dict[str, Any], config: PrepareConfig, out_dir: str, dataset_id: str
) -> dict[str, Any]:
    """Read, render and ask for one shard's units; write its Parquet file and marker.

    Failures of single records (read, render, MCQ) are returned as rejects; the shard
    completes with the rest.

    Returns:
        The shard summary, also written as the shard's ``.done.json`` marker.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgvlm.render import render_printout

    t0 = time.perf_counter()
    timers = Counter()
    units = [_unit_from_dict(u) for u in json.loads(spec["units"])]
    weights = json.loads(spec.get("distractor_weights") or "{}")
    split, shard = spec["split"], spec["shard"]
    render_hash = config.render.config_hash()
    mcq_hash = config.mcq.config_hash()
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    llava_entries: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}

    remote_roots = config.remote_roots()
    by_path: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        by_path[u.path].append(u)
    for path, path_units in by_path.items():
        t = time.perf_counter()
        try:
            records = _read_units(local_record_path(path, remote_roots),
                                  path_units[0].dataset, config.window_s)
        except Exception as e:  # noqa: BLE001 - recorded in rejects.jsonl
            rejects += [_reject("read", path, u.record_id, e) for u in path_units]
            continue
        finally:
            timers["read_s"] += time.perf_counter() - t
        by_id = {r.record_id: r for r in records}
        for u in path_units:
            rec = by_id.get(u.record_id)
            if rec is None:
                err = PrepareError(f"{u.record_id} was scanned but is missing on re-reading")
                rejects.append(_reject("read", path, u.record_id, err))
                continue
            t = time.perf_counter()
            try:
                png = render_printout(rec, config.render, seed=config.seed).png
            except Exception as e:  # noqa: BLE001 - recorded in rejects.jsonl
                rejects.append(_reject("render", path, u.record_id, e))
                continue
            finally:
                timers["render_s"] += time.perf_counter() - t
            t = time.perf_counter()
            # Never a reject: a record that cannot be measured keeps its generic target, and
            # the reasons travel in the measurements column.
            measured = measure_record(rec, config.measure)
            measured_json = json.dumps(measured.to_dict())
            timers["measure_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for k in range(config.questions_per_record):
                try:
                    sample = make_mcq(
                        rec,
                        config.seed + k,
                        config.mcq,
                        weights.get(rec.dataset),
                        measurements=measured,
                    )
                except McqError as e:
                    rejects.append(_reject("mcq", path, u.record_id, e))
                    continue
                sample = replace(sample, png=png)
                rows.append(sample_row(sample, split, render_hash, mcq_hash, measured_json, path))
                if config.llava:
                    image = f"images/{split}/{safe_name(sample.sample_id)}.png"
                    images[image] = png
                    llava_entries.append(
                        llava_record(
                            sample.sample_id, image, sample.question, sample.options,
                            sample.target_text,
                        )
                    )
            timers["mcq_s"] += time.perf_counter() - t

    t = time.perf_counter()
    table = pa.Table.from_pylist(rows, schema=_arrow_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    shard_bytes = buf.getvalue()
    storage.write_bytes(storage.join(out_dir, f"{shard}.parquet"), shard_bytes)
    if config.llava:
        llava_root = storage.join(out_dir, LLAVA_DIR)
        for rel, png in images.items():
            storage.write_bytes(storage.join(llava_root, rel), png)
        fragment = storage.join(llava_root, f"{shard}.json")
        storage.write_bytes(fragment, json.dumps(llava_entries, ensure_ascii=False).encode())
    timers["write_s"] += time.perf_counter() - t

    summary = {
        "dataset_id": dataset_id,
        "format": SHARD_FORMAT,
        "shard": shard,
        "split": split,
        "file": f"{shard}.parquet",
        "sha256": hashlib.sha256(shard_bytes).hexdigest(),
        "bytes": len(shard_bytes),
        # Which node built it: on a cluster, the manifest shows the work was spread.
        "node_id": _node_id(),
        "n_samples": len(rows),
        "n_units": len(units),
        "labels": dict(Counter(lab for r in rows for lab in r["labels"])),
        "true_labels": dict(Counter(r["option_labels"][r["answer_index"]] for r in rows)),
        "answer_letters": dict(Counter(r["answer_letter"] for r in rows)),
        "datasets": dict(Counter(r["dataset"] for r in rows)),
        "records": sorted({r["record_id"].split("@", 1)[0] for r in rows}),
        "patients": sorted({r["patient_id"] or r["record_id"].split("@", 1)[0] for r in rows}),
        "rejects": rejects,
        "llava": config.llava,
        "timing": {k: round(v, 4) for k, v in timers.items()}
        | {"total_s": round(time.perf_counter() - t0, 4)},
    }
    storage.write_bytes(_marker_path(out_dir, shard), json.dumps(summary, sort_keys=True).encode())
    return summary


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _build_shards_batch(
    batch: dict[str, np.ndarray], config: PrepareConfig, out_dir: str, dataset_id: str
) -> dict[str, list[str]]:
    """Ray Data ``map_batches`` adapter: each row is one shard spec; returns summaries."""
    summaries = []
    for i in range(len(batch["shard"])):
        spec = {key: str(batch[key][i]) for key in ("shard", "split", "units", "distractor_weights")}
        summaries.append(json.dumps(build_shard(spec, config, out_dir, dataset_id)))
    return {"summary": summaries}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _load_marker(out_dir: str, shard: str, dataset_id: str, need_llava: bool) -> dict | None:
    shard_size = storage.size(storage.join(out_dir, f"{shard}.parquet"))
    if shard_size is None:
        return None
    try:
        summary = json.loads(storage.read_text(_marker_path(out_dir, shard)))
    except (OSError, json.JSONDecodeError):
        return None  # no marker, or a torn one: the shard is simply built again
    if summary.get("dataset_id") != dataset_id or summary.get("format") != SHARD_FORMAT:
        return None
    if need_llava and not summary.get("llava"):
        return None
    size = summary.get("bytes")  # markers before it was kept have none
    if size is not None and shard_size != size:
        return None  # truncated or replaced since: built again
    return summary


def _claim_output_dir(out_dir: str, dataset_id: str, config: PrepareConfig) -> None:
    """Refuse to mix two data sets in one folder (unless ``overwrite``)."""
    state = storage.join(out_dir, ".dataset_id")
    held = storage.read_text(state).strip() if storage.is_file(state) else None
    if held is not None and held != dataset_id:
        if not config.overwrite:
            raise PrepareError(
                f"{out_dir} holds another data set (id {held}, this config "
                f"gives {dataset_id}); choose a new output_dir or set overwrite=true"
            )
        for name in [*config.splits, LLAVA_DIR, MANIFEST_NAME, REJECTS_NAME, CONFIG_NAME]:
            storage.delete(storage.join(out_dir, name))
    storage.write_text(state, dataset_id + "\n")


@contextlib.contextmanager
def ray_data_settings(**settings: Any) -> Iterator[Any]:
    """Set Ray Data ``DataContext`` attributes for the datasets created inside, then restore them.

    A Dataset keeps a copy of the context it was created in and executes with it, so the
    settings hold for the datasets made inside the block, also when they run after it, and
    none of the caller's other datasets sees them. An unknown name is an ``AttributeError``.
    Nested options are replaced whole (``execution_options=`` a modified copy).

    Yields:
        The current DataContext, with the settings applied.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(context, name, value)
        yield context
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _prepare_settings() -> contextlib.AbstractContextManager[Any]:
    """Ray Data settings of prepare's datasets: quiet, and as many tasks as there are CPUs.

    Ray Data's bars would only repeat our own tqdm bar, which counts shards.

    Ray Data 2.60 budgets an operator's tasks from the resources its (default, rate-based)
    cluster autoscaler has granted the execution, not from the cluster's: on a fixed-size
    cluster that grant read zero each time a second task was held back, and one task ran
    while the other CPU idled. On 2 CPUs, 1,150 records' shard tasks ran alone for 6.6-7.0 s
    of an 18-22 s build; with the operator budget off, for under 1 s of a 12.6-13.7 s one
    (docs/prepare.md, "Two tasks at once"). The budget guards memory between operators; these
    pipelines have one operator, whose inputs (paths, shard specs) and outputs (summaries)
    are small.
    """
    return ray_data_settings(op_resource_reservation_enabled=False, enable_progress_bars=False)


def check_inputs(config: PrepareConfig) -> list[dict[str, Any]]:
    """Check, without Ray and writing nothing, what a prepare run needs from outside: an
    ``output_dir`` that can be made, and records under the sources' roots.

    ``ecgvlm prepare`` calls it before Ray starts and hands the records to
    :func:`prepare_dataset`, which otherwise calls it itself.

    Returns:
        The records, as :func:`list_sources` lists them.

    Raises:
        PrepareError: no records under any root. MissingFileError: a root that does not
        exist. StorageError: an ``output_dir`` that cannot be made.
    """
    storage.check_creatable(absolute_path(config.output_dir))
    items = list_sources(config)
    if not items:
        raise PrepareError(
            "no records found under " + ", ".join(s.root for s in config.sources)
        )
    return items


def scan(config: PrepareConfig, items: list[dict[str, Any]]
         ) -> tuple[list[Unit], list[dict[str, str]]]:
    """Pass 1 on Ray Data over the listed records ``items``: (units, rejects)."""
    import ray.data

    # A few blocks per CPU: enough to balance the load, few enough that per-task costs
    # stay small next to reading the records.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) / config.num_cpus_per_task))
    with _prepare_settings():
        ds = ray.data.from_items(
            [{"path": it["path"], "dataset": it["dataset"]} for it in items],
            override_num_blocks=min(len(items), 4 * cpus),
        ).flat_map(
            scan_path, fn_kwargs={"window_s": config.window_s, "roots": config.remote_roots()},
            num_cpus=config.num_cpus_per_task,
        )
    rows = ds.take_all()
    units = [_unit_from_json(r["unit"]) for r in rows if r["unit"]]
    rejects = [json.loads(r["reject"]) for r in rows if r["reject"]]
    seen: set[str] = set()
    for u in units:
        if u.record_id in seen:
            raise PrepareError(f"record id {u.record_id} occurs twice across the sources")
        seen.add(u.record_id)
    return sorted(units, key=Unit.sort_key), rejects


def prepare_dataset(config: PrepareConfig, records: list[dict[str, Any]] | None = None
                    ) -> PrepareResult:
    """Build (or finish building) the data set described by ``config``.

    Needs a connected Ray (``ray.init`` by the caller). ``records``: what
    :func:`check_inputs` returned for this ``config`` (checked here when not given).

    Returns:
        Counts of shards written and skipped, rejects, and the manifest written.

    Raises:
        PrepareError: nothing to read, or ``output_dir`` holds a different data set.
    """
    import ray.data
    from tqdm.auto import tqdm

    out_dir = absolute_path(config.output_dir)  # URIs pass as they are
    storage.check_shared({"output_dir": out_dir}
                         | {f"sources[{i}].root": s.root for i, s in enumerate(config.sources)})
    records = records or check_inputs(config)
    storage.check_writable(out_dir)
    started = time.time()
    units, scan_rejects = scan(config, records)
    scan_s = time.time() - started
    if not units:
        raise PrepareError(
            f"none of the {len(records)} records could be used; see the rejects: "
            + json.dumps(scan_rejects[:3])
        )
    split_units, answer_balance = balance_answers(assign_splits(units, config), config)
    shards = plan_shards(split_units, config.shard_size)
    weights = distractor_weights(split_units, config)
    for spec in shards:
        spec["distractor_weights"] = json.dumps(weights[spec["split"]], sort_keys=True)
    dataset_id = _hash(
        {
            "config": config.identity(),
            "units": {s: [u.record_id for u in us] for s, us in split_units.items()},
        }
    )
    _claim_output_dir(out_dir, dataset_id, config)

    done: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in shards:
        summary = _load_marker(out_dir, spec["shard"], dataset_id, config.llava)
        if summary is None:
            todo.append(spec)
        else:
            done[spec["shard"]] = summary
    n_skipped = len(done)

    if todo:
        with _prepare_settings():
            results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
                _build_shards_batch,
                batch_size=1,
                num_cpus=config.num_cpus_per_task,
                fn_kwargs={"config": config, "out_dir": out_dir, "dataset_id": dataset_id},
            )
        with tqdm(
            total=len(todo), desc="prepare shards", unit="shard", disable=not config.progress
        ) as bar:
            for row in results.iter_rows():
                summary = json.loads(row["summary"])
                done[summary["shard"]] = summary
                bar.update(1)
                bar.set_postfix(samples=sum(s["n_samples"] for s in done.values()))

    summaries = [done[spec["shard"]] for spec in shards]
    rejects = sorted(
        scan_rejects + [r for s in summaries for r in s["rejects"]],
        key=lambda r: (r["path"], r["record_id"], r["stage"]),
    )
    storage.write_text(
        storage.join(out_dir, REJECTS_NAME),
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects),
    )
    if config.llava:
        _merge_llava(out_dir, config.splits, shards)
    phases = {"scan_s": round(scan_s, 3), "build_s": round(time.time() - started - scan_s, 3)}
    manifest = _manifest(config, dataset_id, summaries, rejects, records, started, phases)
    manifest["mcq_distractor_weights"] = weights
    manifest["answer_balance"] = answer_balance
    save_config(config, storage.join(out_dir, CONFIG_NAME))
    # Written last: a data set is finished exactly when its manifest exists.
    storage.write_text(
        storage.join(out_dir, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True)
    )
    return PrepareResult(
        output_dir=out_dir,
        manifest=manifest,
        shards_written=len(todo),
        shards_skipped=n_skipped,
        n_rejects=len(rejects),
    )


def _merge_llava(out_dir: str, splits: Iterable[str], shards: list[dict[str, Any]]) -> None:
    """Concatenate the shards' LLaVA fragments into ``llava/<split>.json``."""
    root = storage.join(out_dir, LLAVA_DIR)
    for split in splits:
        entries: list[Any] = []
        for spec in shards:
            if spec["split"] == split:
                entries += json.loads(storage.read_text(storage.join(root, f"{spec['shard']}.json")))
        storage.write_text(
            storage.join(root, f"{split}.json"), json.dumps(entries, ensure_ascii=False, indent=1)
        )


def _manifest(
    config: PrepareConfig,
    dataset_id: str,
    summaries: list[dict[str, Any]],
    rejects: list[dict[str, str]],
    items: list[dict[str, Any]],
    started: float,
    phases: dict[str, float],
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for name in config.splits:
        mine = [s for s in summaries if s["split"] == name]

        def total(key: str, mine: list[dict[str, Any]] = mine) -> dict[str, int]:
            c: Counter[str] = Counter()
            for s in mine:
                c.update(s[key])
            return dict(sorted(c.items()))

        splits[name] = {
            "n_samples": sum(s["n_samples"] for s in mine),
            "n_units": sum(s["n_units"] for s in mine),
            "n_records": len({r for s in mine for r in s["records"]}),
            "n_patients": len({p for s in mine for p in s["patients"]}),
            "labels": total("labels"),
            "true_labels": total("true_labels"),
            "answer_letters": total("answer_letters"),
            "datasets": total("datasets"),
            "shards": [{"file": s["file"], "sha256": s["sha256"], "n_samples": s["n_samples"]} for s in mine],
        }
    per_root = Counter(it["root"] for it in items)
    timing: Counter[str] = Counter()
    for s in summaries:
        timing.update(s["timing"])
    return {
        "format": MANIFEST_FORMAT,
        "dataset_id": dataset_id,
        "columns": list(COLUMNS),
        "code_version": code_version(),
        "prompt_version": PROMPT_VERSION,
        "measure_version": MEASURE_VERSION,
        "render_config_hash": config.render.config_hash(),
        "mcq_config_hash": config.mcq.config_hash(),
        "config": config_to_dict(config),
        "sources": [
            {"root": s.root, "dataset": s.dataset, "n_record_paths": per_root[s.root]}
            for s in config.sources
        ],
        "splits": splits,
        "n_rejects": len(rejects),
        "rejects_by_stage": dict(Counter(r["stage"] for r in rejects)),
        "task_time_s": {k: round(v, 3) for k, v in sorted(timing.items())},
        "wall_time_s": round(time.time() - started, 3),
        "phase_wall_s": phases,
    }


# ---------------------------------------------------------------------------------------------
# Reading a prepared data set back
# ---------------------------------------------------------------------------------------------


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data set.

    Raises:
        FileNotFoundError: ``output_dir`` has no manifest (not prepared, or not finished).
    """
    path = storage.join(output_dir, MANIFEST_NAME)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: is {output_dir} a prepared data set?")
    return json.loads(storage.read_text(path))


def data_hash(manifest: Mapping[str, Any]) -> str:
    """What a prepared data set holds, as a hash: its ``dataset_id`` (config and records) and
    each split's shards with their SHA-256. The manifest file also holds the run's timings,
    so the file's own hash changed whenever ``prepare`` ran again, even one that rewrote no
    shard: ``train --resume`` then took the data for another (seen on the demo run again
    after its adapter was deleted)."""
    return _hash({
        "dataset_id": manifest.get("dataset_id"),
        "shards": {split: [[s.get("file"), s.get("sha256"), s.get("n_samples")]
                           for s in info.get("shards", [])]
                   for split, info in (manifest.get("splits") or {}).items()},
    })


def split_files(output_dir: str | Path, split: str) -> list[str]:
    """A split's Parquet shards, in order (as listed in the manifest); URIs stay URIs."""
    manifest = read_manifest(output_dir)
    if split not in manifest["splits"]:
        raise ValueError(
            f"split {split!r} not in {output_dir}; splits: {', '.join(manifest['splits'])}"
        )
    return [storage.join(output_dir, s["file"]) for s in manifest["splits"][split]["shards"]]


def check_shards_readable(files: Sequence[str | Path]) -> None:
    """Read each shard's Parquet footer; raise ValueError naming the first that is not a
    whole Parquet file (cut short by a full disk or an interrupted copy), before any reader
    fails on it deep inside a pipeline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(
                f"{path} is not a readable Parquet shard ({e}); rerun `ecgvlm prepare` with "
                "the same config: it rebuilds shards that changed since they were written"
            ) from e


def read_shards(files: Sequence[str | Path], **read_kwargs: Any) -> Any:
    """A Ray dataset of a split's Parquet shards (``read_kwargs`` go to ``read_parquet``).

    Read with Ray Data's first Parquet datasource: the second (Ray's default) starts 32
    footer-reading actors for every read. On a 2-core machine whose idle workers are gone
    that cost 11-18 s per first read against 0.7-3 s; warm, the second was ~0.1 s faster
    (benchmarks/read_shards_bench.py). A prepared split is a few dozen local shards, read
    once per training run (small splits are cached) or evaluation.
    """
    import ray.data

    with ray_data_settings(use_datasource_v2=False):
        return ray.data.read_parquet([str(f) for f in files], **read_kwargs)


def shard_dataset(files: Sequence[str | Path]) -> Any:
    """The shards ``files`` (local paths or URIs on one store) as a ``pyarrow.dataset``:
    nothing is read but the footers, so its ``schema`` is cheap."""
    import pyarrow.dataset as pads

    filesystem, paths = storage.filesystem_and_paths([str(f) for f in files])
    return pads.dataset(paths, format="parquet", filesystem=filesystem)


def iter_shard_batches(
    files: Sequence[str | Path], columns: Sequence[str], sample_ids: Iterable[str] | None = None,
    batch_rows: int = 1024,
) -> Iterator[Any]:
    """Record batches of ``sample_id`` and ``columns`` (those the shards have) of ``files``,
    of the samples ``sample_ids`` only when given, read a batch at a time with no read-ahead:
    a few columns of some samples without holding every column of every sample.

    Each batch is filtered here rather than by the dataset's own filter: its output was
    allocated outside Arrow's default pool (``release_arrow_memory`` could not give it back),
    and a 20k-sample read of six columns (17 MB) grew the process 55-67 MB against 44.
    """
    dataset = shard_dataset(files)
    yield from _filtered_batches(dataset, _shard_columns(dataset, columns), sample_ids, batch_rows)


def _shard_columns(dataset: Any, columns: Sequence[str]) -> list[str]:
    return [c for c in dict.fromkeys(["sample_id", *columns]) if c in dataset.schema.names]


def _filtered_batches(
    dataset: Any, names: list[str], sample_ids: Iterable[str] | None, batch_rows: int = 1024,
) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = None if sample_ids is None else pa.array(sorted(set(sample_ids)), pa.string())
    if wanted is not None and not len(wanted):
        return
    for batch in dataset.to_batches(columns=names, batch_size=batch_rows, batch_readahead=1,
                                    fragment_readahead=1):
        if wanted is not None:
            batch = batch.filter(pc.is_in(batch.column("sample_id"), value_set=wanted))
        if batch.num_rows:
            yield batch


def read_shard_rows(
    files: Sequence[str | Path], columns: Sequence[str], sample_ids: Iterable[str] | None = None,
) -> Any:
    """:func:`iter_shard_batches` as one Arrow table (one chunk per column)."""
    import pyarrow as pa

    dataset = shard_dataset(files)  # its footers read once, for the batches and the schema
    names = _shard_columns(dataset, columns)
    return pa.Table.from_batches(
        list(_filtered_batches(dataset, names, sample_ids)),
        schema=pa.schema([dataset.schema.field(c) for c in names])).combine_chunks()


def iter_shard_rows(
    files: Sequence[str | Path], columns: Sequence[str], sample_ids: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """:func:`iter_shard_batches` as dicts, one row at a time."""
    for batch in iter_shard_batches(files, columns, sample_ids):
        yield from batch.to_pylist()


def iter_split_rows(
    output_dir: str | Path, split: str, with_png: bool = True
) -> Iterator[dict[str, Any]]:
    """Rows of a split as dicts (``COLUMNS``), shard by shard."""
    import pyarrow.parquet as pq

    columns = [c for c in COLUMNS if with_png or c != "png"]
    for path in split_files(output_dir, split):
        yield from pq.read_table(path, columns=columns).to_pylist()


def load_split(output_dir: str | Path, split: str, with_png: bool = True) -> list[McqSample]:
    """A prepared split as McqSamples, in shard order (training and evaluation use this).

    Args:
        output_dir: A folder written by ``prepare_dataset``.
        split: ``"train"``, ``"val"``, ``"test"`` (or the config's names).
        with_png: Load the image bytes (False leaves ``png`` empty: faster for metadata).
    """
    return [McqSample.from_row(row) for row in iter_split_rows(output_dir, split, with_png)]
