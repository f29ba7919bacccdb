"""Batch evaluation over HTTP: predictions from the endpoint, metrics, judge, report.

``evaluate(config)`` is the whole job (``jobs/evaluate.py`` and ``ecgvlm evaluate`` call it
after ``ray.init``):

1. read the prepared split's metadata (no images) and decide which (sample, model) pairs
   still need a prediction: pairs already stored in the output directory without an error
   are skipped, so a rerun after an interruption resumes where it stopped;
2. stream the split's Parquet shards through Ray Data: a task expands each row into one row
   per pending model, and an actor pool of HTTP clients (``concurrency`` actors) asks the
   OpenAI-compatible endpoint (``POST /v1/chat/completions``, the question text plus the
   printout as a PNG data URL, built by ``ecgvlm.prompt.chat_messages``), with time-outs and
   retries with exponential backoff, and parses the reply with ``ecgvlm.prompt.parse_answer``;
3. the driver writes predictions as they arrive (an atomically renamed Parquet part file
   every ``flush_every`` rows in ``predictions/``) and, at the end, consolidates them into
   ``predictions.parquet``, one row per (sample_id, model);
4. metrics (``ecgvlm.metrics``) with intervals that resample patients (or source
   recordings), the blind baseline fitted on the training split, the LLM judge on a seeded
   sample (``ecgvlm.judge``), and the report (``ecgvlm.report``).

A rerun refuses an output directory whose stored predictions come from another split or
prompt version: mixing them would score two different experiments as one.

Models the endpoint does not list, or whose every request failed, are reported as not
evaluated, with the reason, instead of scoring as zero.

Nothing here starts Ray or opens a connection on import.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecgvlm import storage
from ecgvlm.config import check_choice, check_range, config_to_dict, save_config
from ecgvlm.evaluate.calibration import CalibrationConfig, calibrate_models
from ecgvlm.evaluate.claims import ClaimConfig
from ecgvlm.evaluate.client import (
    _MAX_BACKOFF_S,
    ANSWER_MODES,
    ChatClient,
    explanation_of,
    list_model_cards,
    predict_one,
)
from ecgvlm.evaluate.conditions import (
    ASKED_COLUMNS,
    CONTROLS,
    RERENDER_COLUMNS,
    RobustnessConfig,
    blank_png,
    compare_conditions,
    condition_inputs,
    lead_names,
    rerendered,
    true_label_of,
)
from ecgvlm.evaluate.errors import EvaluationError
from ecgvlm.evaluate.judge import JudgeConfig
from ecgvlm.evaluate.memory import release_arrow_memory
from ecgvlm.evaluate.store import PredictionStore, prediction_schema

#: Split columns an evaluation needs (the pipeline reads them, with ``png``).
SPLIT_REQUIRED_COLUMNS: tuple[str, ...] = (*ASKED_COLUMNS, "target_text")
#: Split columns the driver holds for each selected sample for the whole run: what the
#: metrics, the clusters and the controls' donors need. The texts (question, options, the
#: reference explanation, the measurements' JSON: about 2.5 kB a sample of a real record,
#: fifteen times these) are read by the stage that needs them, for the samples it needs.
SPLIT_META_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "option_labels", "answer_letter")
#: Split columns read when present: the unit the intervals resample and the limit spreads
#: over, and where the sweep re-renders from.
SPLIT_OPTIONAL_COLUMNS: tuple[str, ...] = ("record_id", "patient_id", "source_path")
#: Split columns the claim check reads when present (the record's measurements and labels).
SPLIT_CLAIM_COLUMNS: tuple[str, ...] = ("measurements", "labels")
#: Records the claim check sorts and reads back at a time (a record's measurements are
#: about 1 kB; see :func:`sort_split_rows`).
RECORDS_WINDOW_ROWS = 1024
#: The fields of a stored prediction that calibration reads (``ecgvlm.evaluate.calibration``).
CALIBRATION_COLUMNS: tuple[str, ...] = (
    "sample_id", "model", "dataset", "option_probs", "answer_letter", "error")
#: Stored prediction columns the report's analysis holds for every row: what the metrics,
#: the controls, calibration and the counts read. Not the texts (the claim check and the
#: judge read them from the stored file), nor what no table shows (latency, attempts, the
#: finishing time: a unique string per row, the prompt version, the split).
ANALYSIS_COLUMNS: tuple[str, ...] = (
    "sample_id", "dataset", "model", "true_label", "answer_letter", "predicted_letter",
    "predicted_label", "answer_mode", "condition", "option_probs", "error")

# Predictions are also flushed when this long has passed, so slow models lose little on a kill.
_FLUSH_S = 10.0


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        data_dir: Prepared data set root (``<data_dir>/<split>/*.parquet``) or a folder of
            the split's Parquet shards.
        split: Which split to evaluate.
        output_dir: Where predictions, metrics, judge scores, report and plots go.
        endpoint: Base URL of the OpenAI-compatible API, ending in ``/v1``.
        endpoint_api_key_env: Environment variable with the endpoint's bearer token: the
            variable ``ecgvlm serve`` reads its token from, so one export serves both
            (unset: no token sent, as an endpoint without auth needs).
        models: Model names the endpoint serves (``pulse``, ``pulse-lora``, ``gpt-4o``).
        datasets: Only these data sets (empty: all in the split).
        limit_per_dataset: Evaluate at most this many samples per data set (0: all): a
            sample seeded by ``seed``, spread evenly across source recordings, so reruns
            pick the same ones and one long recording does not fill the quota.
        concurrency: HTTP client actors in the Ray Data actor pool.
        requests_per_actor: Requests each actor keeps in flight (threads); the endpoint sees
            up to ``concurrency * requests_per_actor`` concurrent requests.
        actor_num_cpus: Logical CPUs reserved per client actor (they mostly wait on I/O).
        batch_size: Rows handed to an actor at once.
        timeout_s: Per-request time-out.
        max_retries: Retries after the first attempt on connection errors, time-outs, 429
            and 5xx replies.
        backoff_s: First retry delay; doubles each retry (with jitter, at most 30 s), or the
            server's ``Retry-After`` when it sends one.
        answer_mode: How each model answers, one or both of ``choice`` (a constrained choice
            among the option letters, every option's probability stored: Table 1 and the
            calibration read these) and ``generate`` (free text with an explanation, the
            letter parsed out of it: the judge reads these). With both, Table 1 shows the
            choices and a second table the parsed answers.
        calibration: Calibration metrics, temperature scaling and abstention of the
            ``choice`` answers (``ecgvlm.evaluate.calibration``).
        claims: Thresholds and tolerances of the check of the ``generate`` explanations
            against the record's measurements (``ecgvlm.evaluate.claims``).
        controls: Image controls, each one more pass over the split in Table 1's answer
            mode (``CONTROLS``): ``text_only`` asks the question with no image (what the
            language model alone gets), ``blank`` about the same page and grid with no trace,
            ``mismatched`` about the printout of another sample of the data set whose
            correct finding is not among this question's options. The report compares each
            with the normal images, paired per sample ("Does it read the ECG?").
        robustness: The printout-artefact sweep (``conditions.RobustnessConfig``): each
            artefact at each strength is one more pass in Table 1's answer mode, on the
            printout re-rendered from the record's signal ("Robust to printout artefacts?").
        max_tokens: Cap on generated tokens per answer.
        temperature: Sampling temperature (0: greedy).
        flush_every: Predictions buffered by the driver before a part file is written; an
            interruption loses at most this many finished requests.
        retry_errors: On resume, ask again the pairs whose stored prediction is an error.
        n_boot: Bootstrap resamples for the CIs.
        seed: Seed of the bootstrap, of the ``limit_per_dataset`` sample and of the blind
            baseline's tie-breaks (the judge has its own).
        prior_split: The split the blind baseline's prior is counted on (the training
            split of the same prepared set); empty: no baseline.
        judge: The LLM judge.
        progress: Show progress bars.
    """

    data_dir: str
    split: str = "test"
    output_dir: str = "runs/eval"
    endpoint: str = "http://127.0.0.1:8000/v1"
    endpoint_api_key_env: str = "ECGVLM_API_TOKEN"
    models: tuple[str, ...] = ("pulse", "pulse-lora", "gpt-4o")
    datasets: tuple[str, ...] = ()
    limit_per_dataset: int = 0
    concurrency: int = 4
    requests_per_actor: int = 1
    actor_num_cpus: float = 0.25
    batch_size: int = 8
    timeout_s: float = 120.0
    max_retries: int = 3
    backoff_s: float = 1.0
    answer_mode: tuple[str, ...] | str = ANSWER_MODES
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    claims: ClaimConfig = field(default_factory=ClaimConfig)
    controls: tuple[str, ...] = ()
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    max_tokens: int = 256
    temperature: float = 0.0
    flush_every: int = 32
    retry_errors: bool = True
    n_boot: int = 1000
    seed: int = 0
    prior_split: str = "train"
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir must name the prepared data set")
        if not self.models:
            raise ValueError("models must list at least one model")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models must not repeat, got {list(self.models)}")
        modes = (self.answer_mode,) if isinstance(self.answer_mode, str) else tuple(self.answer_mode)
        for mode in modes:
            check_choice("answer_mode", mode, ANSWER_MODES)
        if not modes or len(set(modes)) != len(modes):
            raise ValueError(f"answer_mode must list choice and/or generate once each, got {list(modes)}")
        object.__setattr__(self, "answer_mode", modes)
        for control in self.controls:
            check_choice("controls", control, CONTROLS)
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls must not repeat, got {list(self.controls)}")
        if not re.match(r"^https?://", self.endpoint):
            raise ValueError(f"endpoint must be an http(s) URL ending in /v1, got {self.endpoint!r}")
        check_range("limit_per_dataset", self.limit_per_dataset, 0)
        check_range("concurrency", self.concurrency, 1, 4096)
        check_range("requests_per_actor", self.requests_per_actor, 1, 256)
        check_range("actor_num_cpus", self.actor_num_cpus, 0.0, 64.0)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("timeout_s", self.timeout_s, 0.001)
        check_range("max_retries", self.max_retries, 0, 20)
        check_range("backoff_s", self.backoff_s, 0.0, _MAX_BACKOFF_S)
        check_range("max_tokens", self.max_tokens, 1)
        check_range("temperature", self.temperature, 0.0, 2.0)
        check_range("flush_every", self.flush_every, 1)
        check_range("n_boot", self.n_boot, 0)

    def in_flight(self) -> int:
        """Requests the endpoint sees at once at most."""
        return self.concurrency * self.requests_per_actor

    @property
    def table1_mode(self) -> str:
        """The answer mode Table 1 scores: ``choice`` when it runs, else ``generate``."""
        return "choice" if "choice" in self.answer_mode else "generate"


# ---------------------------------------------------------------------------------------------
# Reading the split
# ---------------------------------------------------------------------------------------------


def prepared_dataset_id(data_dir: str | Path) -> str | None:
    """The id ``ecgvlm prepare`` gave the data set (its ``manifest.json``'s): it changes with
    every setting that changes a sample. None for a folder of shards without a manifest."""
    from ecgvlm.dataset import read_manifest

    try:
        return read_manifest(data_dir).get("dataset_id")
    except FileNotFoundError:
        return None


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """The Parquet shards of ``split``: ``<data_dir>/<split>/**.parquet``,
    ``<data_dir>/<split>.parquet``, or ``data_dir`` itself when it holds the shards (a
    local path or a URI; URIs stay URIs).

    Raises:
        EvaluationError: when no shard is found (the message lists where it looked).
    """
    root = str(data_dir)
    tried = [storage.join(root, split), storage.join(root, f"{split}.parquet"), root]
    if storage.is_dir(tried[0]):
        files = storage.list_files(tried[0], ".parquet", recursive=True)
    elif storage.is_file(tried[1]):
        files = [tried[1]]
    elif storage.is_dir(root):
        files = storage.list_files(root, ".parquet")
    elif root.endswith(".parquet") and storage.is_file(root):
        files = [root]
    else:
        files = []
    if not files:
        raise EvaluationError(
            f"no Parquet shards for split {split!r}; looked in {', '.join(map(str, tried))}"
        )
    return files


def read_split_meta(
    files: list[str], columns: Iterable[str] = SPLIT_META_COLUMNS,
    required: Iterable[str] = SPLIT_REQUIRED_COLUMNS,
) -> Any:
    """``columns`` of the split (and ``SPLIT_OPTIONAL_COLUMNS`` where present) as a pandas
    DataFrame, one row per sample, whose columns stay in Arrow memory (``pd.ArrowDtype``):
    as Python objects they took about ten times their Arrow size. Rows read with
    ``to_dict("records")`` are plain Python values (None for a null).

    Raises:
        EvaluationError: when a ``required`` column or one of ``columns`` is missing, or
            sample ids repeat.
    """
    import pandas as pd

    from ecgvlm.dataset import check_shards_readable, shard_dataset

    try:
        check_shards_readable(files)
    except ValueError as e:
        raise EvaluationError(str(e)) from e
    dataset = shard_dataset(files)
    columns = list(columns)
    missing = [c for c in dict.fromkeys([*required, *columns]) if c not in dataset.schema.names]
    if missing:
        raise EvaluationError(
            f"split shards lack column(s) {', '.join(missing)}; they have "
            f"{', '.join(dataset.schema.names)}"
        )
    columns += [c for c in SPLIT_OPTIONAL_COLUMNS
                if c in dataset.schema.names and c not in columns]
    frame = dataset.to_table(columns=columns).to_pandas(types_mapper=pd.ArrowDtype)
    dup = frame["sample_id"][frame["sample_id"].duplicated()]
    if len(dup):
        raise EvaluationError(f"sample_id repeats in the split, e.g. {dup.iloc[0]!r}")
    return frame


def source_recording(sample_id: str, record_id: str | None = None) -> str:
    """The source recording of a sample: its record id without the window offset."""
    rid = record_id if isinstance(record_id, str) and record_id else sample_id.split("#", 1)[0]
    return rid.split("@", 1)[0]


def sample_cluster(row: Any) -> str:
    """What the intervals resample for a sample: ``patient:<id>``, or ``recording:<id>``
    where the split has no patient id (windows of one recording are one patient)."""
    patient = row.get("patient_id")
    if isinstance(patient, str) and patient:
        return f"patient:{row['dataset']}/{patient}"
    return f"recording:{source_recording(str(row['sample_id']), row.get('record_id'))}"


class SampleClusters(Mapping[str, str]):
    """Sample id -> its :func:`sample_cluster`, for the samples of a split's metadata.

    Held as two numpy arrays of UTF-8 bytes, the ids sorted (a lookup is a binary search)
    and each one's cluster beside it: about 40 bytes a sample of eval_scale's split, against
    about 170 for a dict of Python strings, held from the metrics to the report.
    """

    def __init__(self, meta: Any) -> None:
        import numpy as np

        columns = [c for c in ("sample_id", "dataset", "patient_id", "record_id") if c in meta]
        ids, names = [], []
        for row in iter_rows(meta, columns):
            ids.append(str(row["sample_id"]).encode())
            names.append(sample_cluster(row).encode())
        by_id = np.array(ids, dtype=bytes)
        order = np.argsort(by_id)
        self._ids = by_id[order]
        self._names = np.array(names, dtype=bytes)[order]

    def __getitem__(self, sample_id: str) -> str:
        if isinstance(sample_id, str):
            key = sample_id.encode()
            i = int(self._ids.searchsorted(key))
            if i < len(self._ids) and self._ids[i] == key:
                return self._names[i].decode()
        raise KeyError(sample_id)

    def __iter__(self) -> Iterator[str]:
        return (sample_id.decode() for sample_id in self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _spread_order(ids: list[str], recordings: list[str], seed: int) -> list[int]:
    """Positions of ``ids`` in round-robin order over recordings (seeded shuffles of the
    recordings and of each recording's samples), so any prefix is spread across them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_rec: dict[str, list[int]] = {}
    for i in sorted(range(len(ids)), key=lambda i: ids[i]):
        by_rec.setdefault(recordings[i], []).append(i)
    queues = []
    for rec in [sorted(by_rec)[k] for k in rng.permutation(len(by_rec))]:
        members = by_rec[rec]
        queues.append([members[k] for k in rng.permutation(len(members))])
    order = []
    depth = 0
    while len(order) < len(ids):
        order += [q[depth] for q in queues if depth < len(q)]
        depth += 1
    return order


def select_samples(
    meta: Any, datasets: tuple[str, ...], limit_per_dataset: int, seed: int = 0
) -> Any:
    """Filter by data set and keep a seeded ``limit_per_dataset`` samples of each, spread
    across source recordings (see ``EvalConfig.limit_per_dataset``)."""
    import pandas as pd

    if datasets:
        unknown = sorted(set(datasets) - set(meta["dataset"]))
        if unknown:
            raise EvaluationError(
                f"datasets {unknown} not in the split; it has {sorted(set(meta['dataset']))}"
            )
        meta = meta[meta["dataset"].isin(datasets)]
    meta = meta.sort_values(["dataset", "sample_id"])
    if limit_per_dataset:
        parts = []
        for _, group in meta.groupby("dataset", sort=True):
            ids = list(group["sample_id"])
            rec_ids = group["record_id"] if "record_id" in group else [None] * len(ids)
            recordings = [source_recording(s, r) for s, r in zip(ids, rec_ids)]
            keep = _spread_order(ids, recordings, seed)[:limit_per_dataset]
            parts.append(group.iloc[sorted(keep)])
        meta = pd.concat(parts) if parts else meta
    return meta.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline
# ---------------------------------------------------------------------------------------------


def expand_pending(
    batch: Any,
    pending: dict[tuple[str, str, str], list[str]],
    recipients: Any = None,
    render_json: str = "{}",
    window_s: float = 10.0,
    seed: int = 0,
    sweep: Sequence[str] = (),
    source_roots: Sequence[str] = (),
) -> Any:
    """One row per (sample, model, answer mode, condition) still to ask, with ``model``,
    ``answer_mode`` and ``condition`` columns (pyarrow batch).

    ``text_only`` rows carry no image (an empty ``png``: the question is asked alone);
    ``blank`` rows carry the blank page for the sample's leads (from the batch's
    ``measurements`` column; the 12 standard leads without it) instead of its printout;
    ``mismatched`` rows are made from the donors in this batch: ``recipients`` is a table of
    split rows (without ``png``) with the ``donor`` whose printout each gets.
    Conditions of the ``sweep`` carry the printout re-rendered from the sample's record
    (``conditions.rerendered``: read once, drawn once per condition whatever the models).
    Arguments after ``pending`` come from ``conditions.condition_inputs``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def tagged(table: Any, model: str, mode: str, condition: str) -> Any:
        for name, value in (("model", model), ("answer_mode", mode), ("condition", condition)):
            table = table.append_column(name, pa.array([value] * len(table), pa.string()))
        return table

    def with_png(table: Any, pngs: list[bytes]) -> Any:
        return table.set_column(table.schema.get_field_index("png"), "png",
                                pa.array(pngs, table.schema.field("png").type))

    swept = {condition: set(ids) for (_, _, condition), ids in pending.items() if condition in sweep}
    images: dict[tuple[str, str], bytes] = {}
    if swept:
        wanted = set().union(*swept.values())
        rows = [r for r in batch.drop_columns(["png"]).to_pylist() if r["sample_id"] in wanted]
        for row in rows:
            conditions = [c for c, ids in swept.items() if row["sample_id"] in ids]
            images.update(rerendered([row], conditions, render_json, window_s, seed,
                                     source_roots))
    tables = []
    for (model, mode, condition), ids in pending.items():
        if condition == "mismatched":
            chosen = batch.slice(0, 0)
            if recipients is not None:
                donors = batch.column("sample_id").combine_chunks()
                mine = recipients.filter(pc.and_(
                    pc.is_in(recipients["donor"], value_set=donors),
                    pc.is_in(recipients["sample_id"], value_set=pa.array(ids, pa.string()))))
                donor_row = pc.index_in(mine["donor"], value_set=donors)
                pngs = batch["png"].take(donor_row)
                chosen = pa.table(
                    [pngs if f.name == "png" else mine[f.name] if f.name in mine.column_names
                     else pa.nulls(len(mine), f.type) for f in batch.schema],
                    schema=batch.schema)
        else:
            chosen = batch.filter(pc.is_in(batch["sample_id"], value_set=pa.array(ids, pa.string())))
            if condition == "text_only" and len(chosen):
                chosen = with_png(chosen, [b""] * len(chosen))  # asked with no image part
            elif condition == "blank" and len(chosen):
                measured = (chosen["measurements"].to_pylist() if "measurements" in chosen.column_names
                            else [None] * len(chosen))
                chosen = with_png(chosen, [blank_png(lead_names(m), render_json) for m in measured])
            elif condition in swept and len(chosen):
                chosen = with_png(chosen, [images[(sid, condition)]
                                           for sid in chosen["sample_id"].to_pylist()])
        if len(chosen):
            tables.append(tagged(chosen, model, mode, condition))
    if not tables:
        return tagged(batch.slice(0, 0), "", "", "")
    return pa.concat_tables(tables)


class ChatCaller:
    """A Ray Data actor: answers a batch of (sample, model) rows through the endpoint."""

    def __init__(self, client_kwargs: dict[str, Any], requests_per_actor: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.client = ChatClient(**client_kwargs)
        self.pool = ThreadPoolExecutor(requests_per_actor) if requests_per_actor > 1 else None

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()

        def one(row: dict[str, Any]) -> dict[str, Any]:
            out = predict_one(self.client, row, row["model"], row["answer_mode"])
            return {**out, "condition": row["condition"]}

        out = list(self.pool.map(one, rows)) if self.pool else [one(r) for r in rows]
        schema = prediction_schema()
        return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in out], schema)


def pending_pairs(
    meta: Any, tasks: Iterable[tuple[str, str, str]], done: set[tuple[str, str, str, str]]
) -> dict[tuple[str, str, str], list[str]]:
    """(model, answer mode, condition) -> sample ids still to ask."""
    ids = list(meta["sample_id"])
    return {task: [s for s in ids if (s, *task) not in done] for task in tasks}


def block_bytes(files: list[str], batch_size: int) -> int:
    """Target block size: about ``batch_size`` split rows (mostly the PNG) per block.

    Parquet shards of a few hundred ECGs would otherwise be read as one block each, and an
    actor takes one block at a time: small blocks keep every client actor busy and let
    answers reach the driver (and disk) as they are made rather than a shard at a time.
    """
    import pyarrow.parquet as pq

    rows = size = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return max(4096, int(size / max(rows, 1) * batch_size))


def queued_block_limit(concurrency: int) -> int:
    """Split blocks that may wait for the client actors at once: eight per actor, at least 64.

    Without a limit the read runs ahead of the endpoint and the whole split queues up: on a
    20k-row split with small printouts the driver, which owns every block, held 1,551 objects
    (+123 MB), against about 110 (+20 MB) with this limit; ``eval_bench.py`` found no
    throughput cost (docs/evaluate.md).
    """
    return max(64, 8 * concurrency)


def run_predictions(
    config: EvalConfig,
    files: list[Path],
    pending: dict[tuple[str, str, str], list[str]],
    store: PredictionStore,
    controls: dict[str, Any] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Stream pending pairs through the endpoint and store rows as they arrive.

    Returns:
        Number of rows written by this call.
    """
    import ray.data

    from ecgvlm.dataset import ray_data_settings, read_shards, shard_dataset

    pending = {task: ids for task, ids in pending.items() if ids}
    if not pending:
        return 0
    api_key = os.environ.get(config.endpoint_api_key_env) or "EMPTY"
    client_kwargs = {
        "endpoint": config.endpoint,
        "api_key": api_key,
        "timeout_s": config.timeout_s,
        "max_retries": config.max_retries,
        "backoff_s": config.backoff_s,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    }
    columns = [*ASKED_COLUMNS, "png"]
    if (controls or {}).get("sweep"):
        columns += RERENDER_COLUMNS
    if any(condition == "blank" for _, _, condition in pending):
        # The blank page is drawn for the record's leads, named in its measurements.
        columns += [c for c in ("measurements",) if c in shard_dataset(files).schema.names]
    # Ray Data sizes blocks by bytes; this pipeline's blocks hold about batch_size rows.
    block_size = block_bytes(files, config.batch_size)
    # The read may run only a bounded queue ahead of the endpoint (never below a limit the
    # caller set): what is read waits in the object store, or, for small blocks, in the driver.
    options = copy.copy(ray.data.DataContext.get_current().execution_options)
    options.resource_limits = options.resource_limits.min(ray.data.ExecutionResources.for_limits(
        object_store_memory=queued_block_limit(config.concurrency) * block_size))
    written = 0
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    # Ray Data's own bars would interleave with the caller's bar, which counts answers. The
    # read keeps a copy of these settings (and the steps after it inherit the read's), so they
    # hold while it runs below and no other dataset of the caller's sees them.
    with ray_data_settings(target_max_block_size=block_size, execution_options=options,
                           enable_progress_bars=False):
        ds = read_shards(files).select_columns(columns)
        ds = ds.map_batches(expand_pending, batch_format="pyarrow",
                            fn_kwargs={"pending": pending, **(controls or {})},
                            batch_size=None, num_cpus=0.25)
        ds = ds.map_batches(
            ChatCaller,
            fn_constructor_kwargs={"client_kwargs": client_kwargs,
                                   "requests_per_actor": config.requests_per_actor},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_cpus=config.actor_num_cpus,
        )
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                     prefetch_batches=0):
            rows = block.to_pylist()
            for row in rows:
                row["split"] = config.split
            buffer.extend(rows)
            if on_rows is not None:
                on_rows(len(rows))
            if len(buffer) >= config.flush_every or time.monotonic() - last_flush > _FLUSH_S:
                store.append(buffer)
                written += len(buffer)
                buffer = []
                last_flush = time.monotonic()
    finally:
        # Whatever arrived is kept, also when the run is interrupted (Ctrl-C, a failed task).
        store.append(buffer)
        release_arrow_memory()
    return written + len(buffer)


# ---------------------------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------------------------


def reference_description(true_label: str, target_text: str = "") -> str:
    """The clinical description of the true finding: the knowledge base's criteria for the
    label, or (for a label it does not know) the explanation in the MCQ's target text."""
    from ecgvlm.knowledge import knowledge_base

    entry = knowledge_base().get(true_label)
    if entry is not None:
        return entry.description
    return explanation_of(target_text or "")


def judge_items(predictions: Any, files: list[str], config: JudgeConfig,
                store: PredictionStore) -> list[Any]:
    """The sampled explanations to judge, with their references (see
    ``judge.sample_for_judging``). ``predictions``: the generated answers on normal
    printouts; their raw texts are read from ``store``'s ``predictions.parquet``, and their
    questions and reference texts from the split's shards ``files``, for the judged samples
    only."""
    from ecgvlm.dataset import iter_shard_rows
    from ecgvlm.evaluate.judge import JudgeItem, reference_text, sample_for_judging
    from ecgvlm.prompt import format_question, letter_index

    chosen = sample_for_judging(iter_rows(predictions, ["sample_id", "model", "dataset", "error"]),
                                config.n_samples, config.seed)
    wanted = {sid for ids in chosen.values() for sid in ids}
    by_id = {str(r["sample_id"]): r
             for r in iter_shard_rows(files, SPLIT_REQUIRED_COLUMNS, wanted)}
    stored = store.rows_of(wanted, ["raw_text"])
    texts = {(r["sample_id"], r["model"]): r["raw_text"]
             for r in iter_rows(stored, ["sample_id", "model", "answer_mode", "condition", "raw_text"])
             if r["answer_mode"] == "generate" and r["condition"] == "normal"}
    items = []
    for (model, dataset), ids in sorted(chosen.items()):
        for sample_id in ids:
            sample = by_id[sample_id]
            options = list(sample["options"])
            index = letter_index(sample["answer_letter"], len(options))
            description = reference_description(
                str(list(sample["option_labels"])[index]), str(sample["target_text"] or "")
            )
            items.append(
                JudgeItem(
                    sample_id=sample_id,
                    dataset=dataset,
                    model=model,
                    question=format_question(str(sample["question"]), options),
                    reference=reference_text(options[index], description),
                    explanation=str(texts[(sample_id, model)]),
                )
            )
    return items


def run_judge(
    predictions: Any, files: list[str], config: JudgeConfig, output_dir: str,
    progress: bool = True,
) -> tuple[list[Any], str | None]:
    """Judge a seeded sample of explanations (``files``: the split's shards, for their
    questions and references); reuse stored successes of the same request.

    A stored score is reused only when its ``request_hash`` (the full judge messages and the
    judge's settings, see ``judge.request_hash``) equals this run's for the same sample and
    model: a changed explanation, reference, rubric, judge model, server or temperature is
    judged again.

    Returns:
        (Judgement list, a note for the report when the judge did not run, failed, or left
        a model out of a data set).
    """
    import pandas as pd

    from ecgvlm.evaluate.judge import (
        JudgeUnavailableError,
        OpenAIJudge,
        judge_all,
        request_hash,
        unanswered_groups,
    )
    from ecgvlm.records import Judgement

    if not config.enabled:
        return [], "the judge is disabled in the config (judge.enabled: false)"
    try:
        judge = OpenAIJudge(config)
    except JudgeUnavailableError as e:
        return [], f"judge not run: {e}"
    path = storage.join(output_dir, "judge.parquet")
    cached: dict[str, Judgement] = {}
    if storage.is_file(path):
        for row in pd.read_parquet(io.BytesIO(storage.read_bytes(path))).to_dict("records"):
            row = {k: (None if _isnan(v) else v) for k, v in row.items()}
            j = Judgement.from_row(row)
            if j.failure is None and row.get("request_hash"):
                cached[str(row["request_hash"])] = j
    items = judge_items(predictions, files, config, PredictionStore(output_dir))
    hashes = [request_hash(it, config) for it in items]
    todo = [it for it, h in zip(items, hashes) if h not in cached]
    bar = _progress(len(todo), "judge", progress)
    fresh = judge_all(judge, todo, config.concurrency, progress=bar.update)
    bar.close()
    new = {(j.sample_id, j.model): j for j in fresh}
    judgements = [cached.get(h) or new[(it.sample_id, it.model)] for it, h in zip(items, hashes)]
    frame = pd.DataFrame([{**j.to_row(), "request_hash": h} for j, h in zip(judgements, hashes)])
    if len(frame):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        storage.write_bytes(path, buf.getvalue())
    failed = sum(j.failure is not None for j in judgements)
    notes = []
    if judgements and failed == len(judgements):
        notes.append(f"every judgement failed, e.g. {judgements[0].failure}")
    left_out = unanswered_groups(iter_rows(predictions, ["sample_id", "model", "dataset", "error"]))
    if left_out:
        named = ", ".join(f"{m} on {d}" for m, d in left_out)
        notes.append(f"not judged, every request failed: {named} (left out of the pairing)")
    return judgements, "; ".join(notes) or None


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def iter_rows(frame: Any, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The rows of ``frame``'s ``columns`` as dicts of plain Python values (None for a
    null), made one at a time: ``to_dict("records")`` makes a dict per row at once, about
    0.5 kB a row alive together."""
    values = [frame[c].to_numpy(dtype=object, na_value=None) for c in columns]
    for row in zip(*values):
        yield dict(zip(columns, row))


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, dynamic_ncols=True)


def chance_by_dataset(meta: Any) -> dict[str, float]:
    """Data set -> the accuracy of a uniform guess: the mean of 1 / number of options."""
    return {
        str(dataset): float((1.0 / group["option_labels"].map(len)).mean())
        for dataset, group in meta.groupby("dataset", sort=True)
    }


def blind_baseline_rows(config: EvalConfig, meta: Any) -> tuple[list[dict[str, Any]], str]:
    """Prediction rows of the blind baseline (``metrics.PRIOR_MODEL``) and how it was fitted.

    Its prior counts the correct answers' findings in ``config.prior_split`` of the same
    prepared set (see ``metrics.option_prior_baseline``); without that split there is no
    baseline, and the note says why.
    """
    from ecgvlm.evaluate.metrics import PRIOR_MODEL, option_prior_baseline

    if not config.prior_split:
        return [], "not run (prior_split is empty)"
    try:
        prior_meta = read_split_meta(
            split_files(config.data_dir, config.prior_split), SPLIT_META_COLUMNS, required=()
        )
    except EvaluationError as e:
        return [], f"not run: no {config.prior_split!r} split to fit its prior on ({e})"
    # Rows made one at a time, of the columns read here: a dict of every column per sample
    # (the measurements' JSON is about 1 kB) was held for the whole split.
    asked = ["sample_id", "dataset", "option_labels", "answer_letter"]
    train = ({"dataset": r["dataset"], "true_label": true_label_of(r)}
             for r in iter_rows(prior_meta, asked))
    n_train = len(prior_meta)
    del prior_meta
    chosen = option_prior_baseline(iter_rows(meta, asked), train, seed=config.seed)
    rows = []
    for sample in iter_rows(meta, asked):
        rows.append({"sample_id": sample["sample_id"], "dataset": sample["dataset"],
                     "model": PRIOR_MODEL, "true_label": true_label_of(sample),
                     "predicted_label": chosen[str(sample["sample_id"])]})
    note = (f"the offered option whose finding is most frequent among the {n_train} "
            f"correct answers of the {config.prior_split!r} split (per data set; seed "
            f"{config.seed} breaks ties)")
    if config.prior_split == config.split:
        note += "; fitted on the evaluated split itself, so it is optimistic"
    return rows, note


def validation_choices(
    config: EvalConfig, models: list[str], output_dir: str
) -> tuple[list[dict[str, Any]], str | None]:
    """``choice`` answers of ``models`` on the calibration split (``calibration.split``),
    asked through the same pipeline and stored in ``<output_dir>/calibration/`` (resumable
    like the evaluated split). The same data sets and per-data-set limit as the evaluation.

    Returns:
        (prediction rows with option probabilities, a note when there are none or when they
        come from the evaluated split itself).
    """
    from ecgvlm.prompt import PROMPT_VERSION

    split = config.calibration.split
    if not split:
        return [], "calibration.split is empty: raw probabilities, no fitted threshold"
    if not config.calibration.temperature_scaling and config.calibration.target_accuracy is None:
        return [], ("nothing to fit on the validation split (temperature_scaling is off and "
                    "no target_accuracy): raw probabilities")
    try:
        files = split_files(config.data_dir, split)
    except EvaluationError as e:
        return [], f"nothing fitted: no {split!r} split to fit on ({e})"
    meta = read_split_meta(files)
    datasets = tuple(d for d in config.datasets if d in set(meta["dataset"]))
    if config.datasets and not datasets:
        return [], f"nothing fitted: the {split!r} split has none of the data sets {list(config.datasets)}"
    meta = select_samples(meta, datasets, config.limit_per_dataset, config.seed)
    store = PredictionStore(storage.join(output_dir, "calibration"))
    store.check_resumable(split, PROMPT_VERSION)
    pending = pending_pairs(meta, [(m, "choice", "normal") for m in models],
                            store.done_keys(config.retry_errors))
    bar = _progress(sum(len(v) for v in pending.values()), f"predict ({split})", config.progress)
    try:
        run_predictions(dataclasses.replace(config, split=split), files, pending, store,
                        on_rows=bar.update)
    finally:
        bar.close()
    rows = store.consolidate(columns=CALIBRATION_COLUMNS)
    rows = rows[rows["sample_id"].isin(set(meta["sample_id"])) & rows["model"].isin(models)
                & (rows["answer_mode"] == "choice") & (rows["condition"] == "normal")]
    note = None
    if split == config.split:
        note = f"fitted on the evaluated split {split!r} itself: optimistic"
    # The fields calibration reads, not all nineteen: a dict of every column per answer.
    return list(iter_rows(rows, CALIBRATION_COLUMNS)), note


def sort_split_rows(
    files: list[str], columns: Sequence[str], sample_ids: Any, dest: str, window_rows: int,
) -> list[str]:
    """Write the split rows of ``sample_ids`` (an Arrow array) to the Parquet file ``dest``
    in (``dataset``, ``sample_id``) order: those two columns and those of ``columns`` the
    shards ``files`` have (returned). Only the two key columns of the shards are held at
    once; the rows go through ``store.write_in_order``'s temporary pieces."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ecgvlm.evaluate.store import parquet_file, write_in_order

    if isinstance(sample_ids, pa.ChunkedArray):
        sample_ids = sample_ids.combine_chunks()
    keys, rows, offsets = [], [], [0]
    first = None  # the schema of the first shard: the columns' types
    for location in files:
        with parquet_file(location) as shard:
            first = first or shard.schema_arrow
            ids = shard.read(columns=["dataset", "sample_id"])
        mine = pc.is_in(ids["sample_id"], value_set=sample_ids)
        keys.append(ids.filter(mine))
        rows.append(np.flatnonzero(mine.to_numpy(zero_copy_only=False)) + offsets[-1])
        offsets.append(offsets[-1] + len(ids))
    names = ["dataset", "sample_id", *(c for c in columns if c in first.names
                                         and c not in ("dataset", "sample_id"))]
    schema = pa.schema([first.field(name) for name in names])
    table = pa.concat_tables(keys)
    order = np.concatenate(rows)[
        pc.sort_indices(table, [("dataset", "ascending"), ("sample_id", "ascending")]).to_numpy()]
    del table, keys, rows
    write_in_order(files, np.array(offsets, dtype=np.int64), order, schema, dest, window_rows,
                   lambda t, s: t.select(s.names).cast(s))
    return names


class _SortedRows:
    """Rows in (data set, sample id) order, from ``rows()`` (a fresh generator each call),
    looked up in that order: a look-up before the last starts a new generator, so a run of
    look-ups in order reads the rows once."""

    def __init__(self, rows: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self.rows = rows
        self._restart()

    def _restart(self) -> None:
        self._iter = self.rows()
        self._row: dict[str, Any] | None = None
        self._at: tuple[str, str] | None = None  # the key of the last row read

    def get(self, dataset: str, sample_id: str) -> dict[str, Any] | None:
        """The row of ``sample_id`` in ``dataset``, or None when there is none."""
        key = (dataset, sample_id)
        if self._at is not None and key < self._at:
            self._restart()
        while True:
            if self._row is None:
                self._row = next(self._iter, None)
                if self._row is None:
                    return None
                self._at = (self._row["dataset"], self._row["sample_id"])
            if self._at >= key:
                return self._row if self._at == key else None
            self._row = None


def check_explanations(
    config: EvalConfig, store: PredictionStore, models: set[str], meta: Any,
    clusters: Mapping[str, str], files: list[str], examples_per_model: int = 3,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], str | None]:
    """Check every generated explanation against its record (``ecgvlm.evaluate.claims``) and
    store the verdicts in ``predictions.parquet``'s ``claims`` column. The records'
    measurements and labels are read from the split's shards ``files`` for this check only
    (``meta``, the driver's metadata of the selected samples, holds neither).

    The rows checked are the stored generated answers on normal printouts of ``meta``'s
    samples by ``models`` that did not fail; every other row keeps its claims.
    The store is read and rewritten a batch of rows at a time (``PredictionStore.rewrite``),
    and of each explanation only what the report needs is kept: three counts (in one array
    per model and data set). The records are first written in the store's order, (data set,
    sample id), to a local temporary file (:func:`sort_split_rows`) and read beside it, so
    no more than a batch of them is in memory. The reference rows
    (``claims.REFERENCE_MODEL``, ``claims.MOVED_REFERENCE_MODEL``) check the grounded
    reference explanations against their own record and against another's (drawn from a
    ``claims.ReferencePool``).

    Returns:
        (``{model: {dataset: ClaimStats}}``, per model a few explanations with contradicted
        claims (``ClaimExamples``), a note when the split has no measurements).

    Raises:
        EvaluationError: a stored prediction's data set is not its sample's in the split.
    """
    import json
    import tempfile
    from array import array

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ecgvlm.evaluate.claims import (
        MOVED_REFERENCE_MODEL,
        REFERENCE_MODEL,
        ReferencePool,
        check_explanation,
        claim_stats,
        count_verdicts,
        measurements_of,
    )
    from ecgvlm.measure import grounded_text

    # (model, dataset) -> (supported, contradicted, unverifiable of each explanation, in
    # turn; the cluster of each): a dataclass per explanation was about 200 bytes.
    groups: dict[tuple[str, str], tuple[array, list[str]]] = {}
    examples = ClaimExamples(examples_per_model, config.seed)

    def tally(sid: str, model: str, dataset: str, text: str, verdicts: list[Any]) -> None:
        counts = count_verdicts(verdicts)
        found, cluster = groups.setdefault((model, dataset), (array("q"), []))
        found.extend((counts.supported, counts.contradicted, counts.unverifiable))
        cluster.append(clusters[sid])
        examples.offer(model, sid, dataset, text, verdicts, counts.contradicted)

    def record(row: dict[str, Any]) -> tuple[Any, list[str]]:
        labels = row.get("labels")
        return (measurements_of(row.get("measurements")),
                [str(x) for x in labels] if isinstance(labels, list) else [])

    read = ("sample_id", "model", "dataset", "answer_mode", "condition", "explanation", "error")
    # In Arrow, not a set of Python strings: about 130 bytes a sample held through the check.
    selected = pa.array(meta["sample_id"])
    with tempfile.TemporaryDirectory(prefix="ecgvlm-claims-") as tmp:
        sorted_path = f"{tmp}/records.parquet"
        stored = sort_split_rows(
            files, ("option_labels", "answer_letter", *SPLIT_CLAIM_COLUMNS),
            selected, sorted_path, RECORDS_WINDOW_ROWS)

        def split_rows() -> Iterator[dict[str, Any]]:
            for batch in pq.ParquetFile(sorted_path).iter_batches(batch_size=RECORDS_WINDOW_ROWS):
                yield from batch.to_pylist()

        records = _SortedRows(split_rows)

        def check_batch(batch: Any) -> Any:
            columns = [batch.column(name).to_pylist() for name in read]
            claims = batch.column("claims").to_pylist()
            of_selected = pc.is_in(batch.column("sample_id"), value_set=selected).to_pylist()
            for i, (sid, model, dataset, mode, condition, text, error) in enumerate(zip(*columns)):
                if (mode != "generate" or condition != "normal" or not of_selected[i]
                        or model not in models or (isinstance(error, str) and error)):
                    continue
                row = records.get(str(dataset), sid)
                if row is None:
                    raise EvaluationError(
                        f"the stored prediction of {sid} by {model} is of data set {dataset!r}, "
                        "which the split does not give this sample: was the split prepared "
                        "again into the same data_dir?")
                text = text if isinstance(text, str) else ""
                verdicts = check_explanation(text, *record(row), config.claims)
                claims[i] = json.dumps([v.to_json() for v in verdicts])
                tally(sid, model, str(dataset), text, verdicts)
            index = batch.schema.get_field_index("claims")
            return batch.set_column(index, "claims", pa.array(claims, pa.string()))

        # Every stored row is rewritten, also those of samples or models this run did not
        # select: predictions.parquet is replaced whole, nothing may be lost.
        store.rewrite(check_batch)

        # Two passes: the references checked against their own record, and kept in a
        # bounded pool; then each record against a reference of another finding.
        pool = ReferencePool(seed=config.seed)
        for row in split_rows():
            label, (m, labels) = true_label_of(row), record(row)
            text = grounded_text(str(label), m) if m is not None else None
            if text:
                pool.add(label, text)
                tally(row["sample_id"], REFERENCE_MODEL, row["dataset"], text,
                      check_explanation(text, m, labels, config.claims))
        for row in split_rows():
            other = pool.draw(true_label_of(row))
            if other:
                tally(row["sample_id"], MOVED_REFERENCE_MODEL, row["dataset"], other,
                      check_explanation(other, *record(row), config.claims))
    note = None
    if "measurements" not in stored:
        note = ("the split has no measurements column (prepared before measurements existed): "
                "only named findings are checked, against the labels")
    summary: dict[str, Any] = {}
    for (model, dataset), (found, cluster) in sorted(groups.items()):
        summary.setdefault(model, {})[dataset] = claim_stats(
            np.array(found, dtype=np.int64).reshape(-1, 3), cluster, n_boot=config.n_boot,
            seed=config.seed)
    return summary, examples.picked(), note


class ClaimExamples:
    """Per model, up to ``per_model`` explanations for the report: those with the most
    contradicted claims first, ties broken by a seeded hash of the sample id, so the pick
    does not depend on the order rows arrive in and only ``per_model`` are ever held."""

    def __init__(self, per_model: int = 3, seed: int = 0) -> None:
        self.per_model, self.seed = per_model, seed
        # model -> heap of (contradicted, -tie, sample_id, arrival, example): its root is the
        # worst kept (the arrival number keeps two offers of one sample from comparing dicts).
        self._heaps: dict[str, list[tuple[int, int, str, int, dict[str, Any]]]] = {}
        self._offers = 0

    def _tie(self, sample_id: str) -> int:
        import hashlib

        digest = hashlib.blake2b(f"{self.seed}:{sample_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def offer(self, model: str, sample_id: str, dataset: str, text: str, verdicts: list[Any],
              contradicted: int) -> None:
        import heapq

        if not verdicts or self.per_model <= 0:
            return
        heap = self._heaps.setdefault(model, [])
        key = (contradicted, -self._tie(sample_id), sample_id)
        if len(heap) == self.per_model and key <= heap[0][:3]:
            return  # no better than the worst kept: its verdicts are never serialised
        example = {"sample_id": sample_id, "dataset": dataset, "text": text,
                   "verdicts": [v.to_json() for v in verdicts]}
        self._offers += 1
        entry = (*key, -self._offers, example)
        if len(heap) < self.per_model:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    def picked(self) -> dict[str, list[dict[str, Any]]]:
        """Model -> its examples, the most contradicted first."""
        return {model: [entry[-1] for entry in sorted(heap, key=lambda e: e[:4], reverse=True)]
                for model, heap in sorted(self._heaps.items())}


def judge_claim_agreement(
    judgements: list[Any], rates: dict[tuple[str, str], float], clusters: Mapping[str, str],
    n_boot: int, seed: int,
) -> dict[str, dict[str, Any]]:
    """Per model: Spearman's rank correlation, over the judged explanations with a checkable
    claim, between the judge's factual accuracy (and hallucination) and the share of the
    explanation's checkable claims that are contradicted (``rates``, from
    :func:`contradicted_shares`), with a cluster-bootstrap CI."""
    import numpy as np
    from scipy.stats import spearmanr

    from ecgvlm.evaluate.metrics import bootstrap_intervals

    out: dict[str, dict[str, Any]] = {}
    for model in sorted({str(j.model) for j in judgements}):
        pairs = [(j.factual_accuracy, j.hallucination,
                  rates[(j.sample_id, model)], clusters.get(j.sample_id))
                 for j in judgements if j.model == model and j.failure is None
                 and (j.sample_id, model) in rates]
        if len(pairs) < 3:
            continue
        x = np.array([p[:3] for p in pairs], dtype=np.float64)

        def rho(rows_: np.ndarray, x: np.ndarray = x) -> dict[str, float]:
            sub = x[rows_]
            return {name: float(spearmanr(sub[:, k], sub[:, 2]).statistic) if
                    np.ptp(sub[:, k]) and np.ptp(sub[:, 2]) else float("nan")
                    for k, name in ((0, "factual_accuracy"), (1, "hallucination"))}

        point = rho(np.arange(len(x)))
        out[model] = {"n": len(pairs), **{k: (None if math.isnan(v) else v) for k, v in point.items()},
                      "ci": bootstrap_intervals(rho, len(x), [p[3] for p in pairs], n_boot, seed)}
    return out


def contradicted_shares(store: PredictionStore, judgements: list[Any]) -> dict[tuple[str, str], float]:
    """(sample_id, model) -> the share of its checkable claims contradicted, for the judged
    explanations with one or more, from the verdicts the claim check stored (read by filter:
    a few rows, not a share per explanation held through the run)."""
    import json

    from ecgvlm.evaluate.claims import count_verdicts

    judged = {(j.sample_id, j.model) for j in judgements}
    stored = store.rows_of({sid for sid, _ in judged}, ["claims"])
    shares = {}
    for row in iter_rows(stored, ["sample_id", "model", "answer_mode", "condition", "claims"]):
        key = (row["sample_id"], row["model"])
        if (key not in judged or row["answer_mode"] != "generate"
                or row["condition"] != "normal" or not row["claims"]):
            continue
        counts = count_verdicts(json.loads(row["claims"]))
        if counts.supported + counts.contradicted:
            shares[key] = counts.contradicted / (counts.supported + counts.contradicted)
    return shares


def _unavailable_models(predictions: Any, models: Iterable[str]) -> dict[str, str]:
    """Models with rows that all failed: not evaluated (with the first error as the reason)."""
    out = {}
    for model in models:
        rows = predictions[predictions["model"] == model]
        if len(rows) and rows["error"].notna().all():
            out[model] = f"every request failed, e.g. {rows['error'].iloc[0]}"
    return out


@dataclass(frozen=True)
class EvalInputs:
    """What :func:`evaluate` reads before it writes anything: the split's shards, the
    selected samples' metadata (:func:`read_split_meta`, :func:`select_samples`) and the
    models the endpoint lists (id -> None, or why it cannot answer)."""

    shards: list[str]
    meta: Any
    served: dict[str, str | None]
    #: The prepared data set's id (its manifest's), None without a manifest.
    dataset_id: str | None = None
    #: The asked models' weights, where the endpoint gives them (``list_model_cards``).
    fingerprints: dict[str, str] = field(default_factory=dict)


def generation_settings(config: EvalConfig) -> dict[str, Any]:
    """The request settings an answer depends on, kept with the stored answers."""
    return {"max_tokens": config.max_tokens, "temperature": config.temperature}


def check_inputs(config: EvalConfig) -> EvalInputs:
    """Read and check, without Ray and writing nothing, what an evaluation needs from
    outside: the split (its shards whole, its columns, samples selected), an ``output_dir``
    that can be made and holds no other experiment's predictions, and an endpoint that lists
    its models.

    ``ecgvlm evaluate`` calls it before Ray starts and hands the result to :func:`evaluate`,
    which otherwise calls it itself.

    Raises:
        EvaluationError: naming the split, ``output_dir`` or endpoint that cannot be used.
        StorageError: an ``output_dir`` that cannot be made.
    """
    from ecgvlm.prompt import PROMPT_VERSION

    shards = split_files(config.data_dir, config.split)
    storage.check_creatable(config.output_dir)
    store = PredictionStore(config.output_dir)
    store.check_resumable(config.split, PROMPT_VERSION)
    meta = select_samples(
        read_split_meta(shards), config.datasets, config.limit_per_dataset, config.seed
    )
    if not len(meta):
        raise EvaluationError(f"split {config.split!r} in {config.data_dir} selects no samples")
    api_key = os.environ.get(config.endpoint_api_key_env) or "EMPTY"
    cards = list_model_cards(config.endpoint, api_key, key_env=config.endpoint_api_key_env)
    fingerprints = {m: cards[m]["fingerprint"] for m in config.models
                    if m in cards and cards[m]["fingerprint"]}
    dataset_id = prepared_dataset_id(config.data_dir)
    store.check_same_inputs(dataset_id, fingerprints, generation_settings(config))
    return EvalInputs(shards, meta, {m: card["reason"] for m, card in cards.items()},
                      dataset_id, fingerprints)


def evaluate(config: EvalConfig, inputs: EvalInputs | None = None) -> tuple[Any, dict[str, str]]:
    """Run the whole evaluation (Ray must be initialised by the caller).

    ``data_dir`` and ``output_dir`` may be local paths or URIs (``s3://...``): predictions
    and the judge's cache are stored there as they arrive, the report is written locally and
    then copied there. A process that evaluates large splits should call
    ``use_returning_arrow_pool()`` and ``use_fixed_mmap_threshold()``
    (``ecgvlm.evaluate.memory``) before it imports pyarrow, as ``ecgvlm evaluate`` does.

    ``inputs``: what :func:`check_inputs` returned for this ``config`` (checked again here
    when not given).

    Returns:
        (the ``ecgvlm.report.EvalReport``, name -> location of the report files written).

    Raises:
        EvaluationError: no split shards, an unreachable endpoint, or no model to evaluate.
    """
    import pyarrow as pa

    from ecgvlm.evaluate.judge import RUBRIC_VERSION, paired_differences, summarize_judgements
    from ecgvlm.evaluate.metrics import metrics_by_model_and_dataset
    from ecgvlm.evaluate.report import EvalReport, git_sha, write_report
    from ecgvlm.prompt import PROMPT_VERSION

    started = time.perf_counter()
    out = config.output_dir
    storage.check_shared({"data_dir": config.data_dir, "output_dir": out})
    inputs = inputs or check_inputs(config)  # before anything is written
    release_arrow_memory()  # what reading the split's shards freed
    files, meta, served = inputs.shards, inputs.meta, inputs.served
    storage.check_writable(out)
    store = PredictionStore(out)
    save_config(config, storage.join(out, "config.yaml"))
    store.record_inputs(config.data_dir, inputs.dataset_id, inputs.fingerprints,
                        generation_settings(config))

    unavailable = {}
    for m in config.models:
        if m not in served:
            listed = ", ".join(served) or "none"
            unavailable[m] = f"the endpoint {config.endpoint} does not serve it (it lists {listed})"
        elif served[m] is not None:
            unavailable[m] = f"the endpoint says it is unavailable: {served[m]}"
    models = [m for m in config.models if m not in unavailable]

    tasks = [(m, mode, "normal") for m in models for mode in config.answer_mode]
    sweep = config.robustness.conditions()
    control_kwargs, condition_notes = condition_inputs(config, meta, files, sweep)
    tasks += [(m, config.table1_mode, c) for m in models
              for c in (*config.controls, *control_kwargs["sweep"])]
    done = store.done_keys(config.retry_errors)
    pending = pending_pairs(meta, tasks, done)
    if "mismatched" in config.controls:  # samples without a donor are not asked
        asked = set(control_kwargs["recipients"]["sample_id"].to_pylist())
        pending.update({t: [s for s in ids if s in asked] for t, ids in pending.items()
                        if t[2] == "mismatched"})
    n_pending = sum(len(v) for v in pending.values())
    resumed = {task: sum((s, *task) in done for s in meta["sample_id"]) for task in tasks}
    bar = _progress(n_pending, "predict", config.progress)
    t0 = time.perf_counter()
    try:
        n_new = run_predictions(config, files, pending, store, on_rows=bar.update,
                                controls=control_kwargs)
    finally:
        bar.close()
    predict_s = time.perf_counter() - t0
    del pending, done  # a sample id per request: not needed past here

    # No text is read into this table: the claim check reads and rewrites the explanations
    # and their verdicts in the stored file, a batch of rows at a time, and the judge reads
    # the raw text of the few it judges.
    stored_rows = store.consolidate(columns=ANALYSIS_COLUMNS)
    release_arrow_memory()
    predictions = stored_rows[
        stored_rows["sample_id"].isin(meta["sample_id"]) & stored_rows["model"].isin(models)
        & stored_rows["answer_mode"].isin(config.answer_mode)
    ].reset_index(drop=True)
    del stored_rows
    clusters = SampleClusters(meta)
    normal = predictions[predictions["condition"] == "normal"]
    by_mode = {mode: normal[normal["answer_mode"] == mode] for mode in config.answer_mode}
    failed = {mode: _unavailable_models(rows, models) for mode, rows in by_mode.items()}
    table1_mode = config.table1_mode
    unavailable.update({m: f"{why} ({table1_mode} answers)" for m, why in failed[table1_mode].items()})
    scored = {mode: rows[~rows["model"].isin(list(failed[mode]))] for mode, rows in by_mode.items()}
    del normal, by_mode  # copies of the table's rows, as scored is: one is held, not three
    if not any(len(rows) for rows in scored.values()):
        reasons = "; ".join(f"{m}: {why}" for m, why in unavailable.items())
        raise EvaluationError(f"no model could be evaluated ({reasons})")

    # The metrics read these five fields of a row (and its cluster), one row at a time.
    scored_columns = ["sample_id", "model", "dataset", "true_label", "predicted_label"]

    def scored_rows(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            row["cluster"] = clusters[str(row["sample_id"])]
            yield row

    baseline, baseline_note = blind_baseline_rows(config, meta)
    metrics = metrics_by_model_and_dataset(
        scored_rows(itertools.chain(iter_rows(scored[table1_mode], scored_columns), baseline)),
        n_boot=config.n_boot, seed=config.seed)
    del baseline
    release_arrow_memory()  # the bootstrap's arrays
    answered = predictions[~predictions["model"].isin(list(unavailable))]
    n_bins = config.calibration.n_bins
    controls = compare_conditions(answered, table1_mode, config.controls, clusters,
                                  config.n_boot, config.seed, n_bins)
    robustness = compare_conditions(answered, table1_mode, control_kwargs["sweep"], clusters,
                                    config.n_boot, config.seed, n_bins)
    del answered
    generated_metrics: dict[str, Any] = {}
    generated_note = None
    if table1_mode != "generate" and "generate" in config.answer_mode:
        generated_metrics = metrics_by_model_and_dataset(
            scored_rows(iter_rows(scored["generate"], scored_columns)), n_boot=config.n_boot,
            seed=config.seed)
        if failed["generate"]:
            generated_note = "; ".join(f"{m}: {why}" for m, why in sorted(failed["generate"].items()))

    calibration: dict[str, Any] = {}
    calibration_note = None
    if "choice" in config.answer_mode and len(scored["choice"]):
        choice_models = sorted(set(scored["choice"]["model"]))
        val_rows, calibration_note = validation_choices(config, choice_models, out)
        test_rows = [{**r, "cluster": clusters[str(r["sample_id"])]}
                     for r in iter_rows(scored["choice"], CALIBRATION_COLUMNS)]
        calibration = calibrate_models(test_rows, val_rows, config.calibration,
                                       n_boot=config.n_boot, seed=config.seed)
        del test_rows, val_rows

    claims: dict[str, Any] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    claims_note = None
    claims_s = 0.0
    if "generate" in config.answer_mode and len(scored["generate"]):
        t_claims = time.perf_counter()
        claims, examples, claims_note = check_explanations(
            config, store, set(scored["generate"]["model"]), meta, clusters, files)
        release_arrow_memory()
        claims_s = time.perf_counter() - t_claims

    if "generate" in config.answer_mode:
        judgements, judge_note = run_judge(scored["generate"], files, config.judge, out,
                                           config.progress)
    else:
        judgements, judge_note = [], "no explanations to judge: answer_mode has no 'generate'"
    release_arrow_memory()  # the judge's reads, before the report's plots
    judge_boot = config.n_boot or 1000
    # The verdicts read back are this run's: the judged rows are among those it checked.
    judge_agreement = judge_claim_agreement(
        judgements, contradicted_shares(store, judgements) if claims else {}, clusters,
        judge_boot, config.seed)

    counts: dict[str, dict[str, dict[str, int]]] = {}
    for model, mode, condition in tasks:
        rows = predictions[(predictions["model"] == model) & (predictions["answer_mode"] == mode)
                           & (predictions["condition"] == condition)]
        name = mode if condition == "normal" else f"{mode} ({condition})"
        counts.setdefault(model, {})[name] = {
            "n": len(rows),
            "unparseable": int((rows["predicted_letter"].isna() & rows["error"].isna()).sum()),
            "errors": int(rows["error"].notna().sum()),
            "resumed": int(resumed.get((model, mode, condition), 0)),
        }
    report = EvalReport(
        metrics=metrics,
        judge=summarize_judgements(judgements, n_boot=judge_boot, seed=config.judge.seed,
                                   clusters=clusters),
        judge_pairs=paired_differences(judgements, n_boot=judge_boot, seed=config.judge.seed,
                                       clusters=clusters),
        unavailable=unavailable,
        judge_note=judge_note,
        baseline_note=baseline_note,
        chance=chance_by_dataset(meta),
        answer_mode=table1_mode,
        generated=generated_metrics,
        generated_note=generated_note,
        calibration=calibration,
        calibration_note=calibration_note,
        claims=claims,
        claims_note=claims_note,
        controls=controls,
        controls_note=condition_notes.get("controls"),
        robustness=robustness,
        robustness_note=condition_notes.get("robustness"),
        claim_examples=examples,
        judge_agreement=judge_agreement,
        meta={
            "run_name": out.rstrip("/").rsplit("/", 1)[-1],
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "models": list(config.models),
            "answer_mode": list(config.answer_mode),
            "controls": list(config.controls),
            "robustness": list(sweep),
            "endpoint": config.endpoint,
            "split": config.split,
            "data_dir": config.data_dir,
            "n_samples": len(meta),
            "samples_per_dataset": {str(k): int(v) for k, v in meta["dataset"].value_counts().sort_index().items()},
            "judge_model": config.judge.model,
            "judge_base_url": config.judge.base_url or "https://api.openai.com/v1",
            "judge_n_samples": config.judge.n_samples,
            "judge_seed": config.judge.seed,
            "rubric_version": RUBRIC_VERSION,
            "prompt_version": PROMPT_VERSION,
            "bootstrap_seed": config.seed,
            "n_boot": config.n_boot,
            "concurrency": config.in_flight(),
            "git_sha": git_sha(Path(__file__).resolve().parent),
            "counts": counts,
            "new_predictions": n_new,
            "predict_s": round(predict_s, 3),
            "claims_s": round(claims_s, 3),
            "throughput_ecg_per_s": round(n_new / predict_s, 3) if n_new and predict_s else None,
            "wall_s": round(time.perf_counter() - started, 3),
            "arrow_memory_pool": pa.default_memory_pool().backend_name,
            # What use_fixed_mmap_threshold() (or the user) set; absent: glibc's own rule.
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "config": config_to_dict(config),
        },
    )
    with storage.staged_dir(out) as local_out:
        written = write_report(report, local_out)
    return report, {name: storage.join(out, str(Path(path).relative_to(local_out)))
                    for name, path in written.items()}
