"""Stored predictions: part files written as they arrive, consolidated at the end.

Nothing here opens a file on import.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecgvlm import storage
from ecgvlm.evaluate.errors import EvaluationError

#: What identifies a stored prediction: one row per sample, model, answer mode and image
#: condition (``normal``, or a control such as ``blank``).
KEY_COLUMNS: tuple[str, ...] = ("sample_id", "model", "answer_mode", "condition")

#: Columns of predictions.parquet, in order (DESIGN.md names the first eight).
PREDICTION_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "dataset",
    "model",
    "true_label",
    "answer_letter",
    "predicted_letter",
    "predicted_label",
    "answer_mode",
    "condition",
    "option_probs",
    "explanation",
    "claims",
    "raw_text",
    "error",
    "latency_s",
    "attempts",
    "prompt_version",
    "finished_utc",
    "split",
)


#: Where an output directory records what its predictions were made from: the prepared data
#: set's id and each model's weights (``PredictionStore.check_same_inputs``).
INPUTS_NAME = "inputs.json"

#: The order of ``predictions.parquet``'s rows.
SORT_COLUMNS: tuple[str, ...] = ("model", "answer_mode", "condition", "dataset", "sample_id")


@contextmanager
def parquet_file(location: str) -> Iterator[Any]:
    """A stored file as a ``pyarrow.parquet.ParquetFile`` (its footer read once), on a disk
    or in an object store (the store's cached filesystem)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(location)
    with fs.open_input_file(path) as source:
        yield pq.ParquetFile(source)


def prediction_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("dataset", pa.string()),
            ("model", pa.string()),
            ("true_label", pa.string()),
            ("answer_letter", pa.string()),
            ("predicted_letter", pa.string()),
            ("predicted_label", pa.string()),
            ("answer_mode", pa.string()),
            ("condition", pa.string()),
            ("option_probs", pa.list_(pa.float64())),
            ("explanation", pa.string()),
            ("claims", pa.string()),
            ("raw_text", pa.string()),
            ("error", pa.string()),
            ("latency_s", pa.float64()),
            ("attempts", pa.int32()),
            ("prompt_version", pa.string()),
            ("finished_utc", pa.string()),
            ("split", pa.string()),
        ]
    )


class PredictionStore:
    """Predictions of one output directory, keyed by ``KEY_COLUMNS``.

    New rows go to ``predictions/part-<run>-<n>.parquet``, each written whole
    (``storage.write_bytes``: a killed run leaves whole files or none, on a disk or an object
    store); ``consolidate`` merges the parts
    and any earlier ``predictions.parquet`` into a new ``predictions.parquet``, keeping the
    latest row per key, and removes the merged parts.
    """

    #: Rows of ``predictions.parquet`` put together in memory at a time by
    #: :meth:`consolidate` (more when there are over 32 times as many rows), and the size of
    #: its row groups.
    window_rows: int = 8192

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = str(output_dir)
        self.parts_dir = storage.join(self.output_dir, "predictions")
        self.path = storage.join(self.output_dir, "predictions.parquet")
        self._run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self._seq = 0

    def _sources(self) -> list[str]:
        parts = [p for p in storage.list_files(self.parts_dir, ".parquet")
                 if p.rsplit("/", 1)[-1].startswith("part-")]
        return ([self.path] if storage.is_file(self.path) else []) + parts

    @staticmethod
    def _schema(columns: Sequence[str] | None) -> Any:
        """The stored schema, or the key columns and ``columns`` of it."""
        import pyarrow as pa

        schema = prediction_schema()
        if columns is None:
            return schema
        wanted = [*KEY_COLUMNS, *(c for c in columns if c not in KEY_COLUMNS)]
        return pa.schema([schema.field(name) for name in wanted])

    @staticmethod
    def _normalized(table: Any, schema: Any) -> Any:
        """``table`` (rows of one stored file) with ``schema``'s columns and types."""
        import pyarrow as pa
        import pyarrow.compute as pc

        # Older files may lack newer columns: add them as nulls.
        for name in schema.names:
            if name not in table.schema.names:
                table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
        # Written before answer modes and controls existed: generated text, normal images.
        for name, default in (("answer_mode", "generate"), ("condition", "normal")):
            if table.column(name).null_count:
                filled = pc.fill_null(table.column(name), default)
                table = table.set_column(table.schema.get_field_index(name), name, filled)
        return table.select(schema.names).cast(schema)

    def _read_all(self, sources: list[str], columns: Sequence[str] | None) -> tuple[Any, Any]:
        """Every row of ``sources`` (superseded ones included), oldest source first, and the
        first row of each source in that table (numpy, one more entry: the total)."""
        import numpy as np
        import pyarrow as pa

        schema = self._schema(columns)
        tables = []
        for location in sources:
            with parquet_file(location) as stored:
                present = [name for name in schema.names if name in stored.schema_arrow.names]
                tables.append(self._normalized(stored.read(columns=present), schema))
        offsets = np.cumsum([0, *(len(t) for t in tables)], dtype=np.int64)
        return (pa.concat_tables(tables) if tables else schema.empty_table()), offsets

    @staticmethod
    def _newest(table: Any) -> Any:
        """Indices of the newest row per key in ``table`` (read by :meth:`_read_all`: the
        last row of a key is the newest), ascending."""
        import numpy as np
        import pyarrow.compute as pc

        # Sorted by key (a stable sort: a key's rows stay in the order stored), the newest
        # row of a key is the last of its run. Not Arrow's group_by: its hash table took
        # about 0.5 kB a row outside Arrow's pool that the process kept (47 MB for 80k
        # rows, against 8 MB this way).
        keys = table.select(list(KEY_COLUMNS))
        order = pc.sort_indices(keys, [(name, "ascending") for name in KEY_COLUMNS])
        ordered = keys.take(order)
        order = order.to_numpy().astype(np.int64)  # row numbers, as the callers count them
        n_rows = len(order)
        same_as_next = np.ones(max(n_rows - 1, 0), dtype=bool)
        for name in KEY_COLUMNS if n_rows > 1 else ():
            column = ordered.column(name)
            here, after = column.slice(0, n_rows - 1), column.slice(1)
            equal = pc.or_(pc.fill_null(pc.equal(here, after), False),
                           pc.and_(pc.is_null(here), pc.is_null(after)))  # a null key is a key
            same_as_next &= equal.to_numpy(zero_copy_only=False)
        last = np.append(~same_as_next, n_rows > 0)[:n_rows]
        return np.sort(order[last])

    def _read(self, columns: Sequence[str] | None = None) -> Any:
        """All stored rows, latest per key, as an Arrow table in the order stored (the key
        columns and ``columns``, or PREDICTION_COLUMNS)."""
        table, _ = self._read_all(self._sources(), columns)
        return table.take(self._newest(table))

    @staticmethod
    def _frame(table: Any) -> Any:
        import pandas as pd
        import pyarrow as pa

        if not len(table):
            return pd.DataFrame({name: pd.Series(dtype=object) for name in table.schema.names})
        frame = table.to_pandas()
        # Nulls of text columns as None (pandas reads them as NaN), so rows read back as the
        # Prediction records they were written from.
        for field in table.schema:
            if pa.types.is_string(field.type):
                frame[field.name] = frame[field.name].astype(object).where(frame[field.name].notna(), None)
        return frame

    def load(self, columns: Sequence[str] | None = None) -> Any:
        """All stored rows, latest per key (pandas DataFrame with PREDICTION_COLUMNS, or the
        key columns and ``columns``: the checks before a run read a few columns, not every
        explanation a resumed run has stored)."""
        return self._frame(self._read(columns))

    def rows_of(self, sample_ids: set[str], columns: Sequence[str]) -> Any:
        """The consolidated rows of ``sample_ids`` (the key columns and ``columns``, as
        :meth:`load` returns them), read with a filter: a few rows' texts, not every row's."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = [*KEY_COLUMNS, *(c for c in columns if c not in KEY_COLUMNS)]
        schema = pa.schema([prediction_schema().field(name) for name in names])
        if not sample_ids:
            return self._frame(schema.empty_table())
        table = pq.read_table(self.path, columns=names,
                              filters=[("sample_id", "in", sorted(sample_ids))])
        return self._frame(table.cast(schema))

    def done_keys(self, retry_errors: bool = True) -> set[tuple[str, str, str, str]]:
        """(sample_id, model, answer_mode, condition) keys that need no new request (errored
        ones only when ``retry_errors`` is off)."""
        frame = self.load(["error"])
        if retry_errors:
            frame = frame[frame["error"].isna()]
        return set(zip(*(frame[c] for c in KEY_COLUMNS)))

    def check_resumable(self, split: str, prompt_version: str) -> None:
        """Refuse to add to predictions of another split or prompt version.

        Raises:
            EvaluationError: when a stored row's ``split`` or ``prompt_version`` differs
                (or was not recorded), naming what is stored and what this run asks.
        """
        frame = self.load(["split", "prompt_version"])
        if not len(frame):
            return
        for column, wanted in (("split", split), ("prompt_version", prompt_version)):
            stored = sorted({str(v) if v is not None else "unrecorded" for v in frame[column]})
            if stored != [wanted]:
                raise EvaluationError(
                    f"{self.output_dir} holds predictions of {column} {', '.join(stored)}, "
                    f"this run asks {column} {wanted}: use another output_dir (resuming "
                    "would mix two experiments)"
                )

    def _stored_inputs(self) -> dict[str, Any]:
        import json

        path = storage.join(self.output_dir, INPUTS_NAME)
        if not storage.is_file(path):
            return {}
        return json.loads(storage.read_text(path))

    def check_same_inputs(self, dataset_id: str | None, fingerprints: dict[str, str],
                          generation: dict[str, Any] | None = None) -> None:
        """Refuse to add to predictions made on another prepared data set, or by other
        weights under one of ``fingerprints``' model names (a retrained adapter served as
        ``pulse-lora`` again). Sample ids name records, not questions, so a resumed run would
        otherwise keep answers to other questions, or another model's, as this run's.
        Where either side is unknown (no manifest, an endpoint that gives no fingerprint, a
        directory written before this was recorded) nothing is compared. ``generation``
        (``max_tokens``, ``temperature``) must be as the stored answers were generated: a
        quick run with ``max_tokens=8`` would otherwise leave its cut answers in the real one.

        Raises:
            EvaluationError: naming what is stored and what this run would use.
        """
        stored = self._stored_inputs()
        if not stored or not self._sources():
            return
        held = stored.get("dataset_id")
        if held and dataset_id and held != dataset_id:
            raise EvaluationError(
                f"{self.output_dir} holds predictions on the prepared data set {held} "
                f"({stored.get('data_dir')}); this run's data_dir holds {dataset_id}: use "
                "another output_dir (resuming would mix two experiments)")
        for name, now in sorted((generation or {}).items()):
            was = (stored.get("generation") or {}).get(name)
            if was is not None and was != now:
                raise EvaluationError(
                    f"{self.output_dir} holds answers generated with {name} {was}; this run "
                    f"asks {name} {now}: use another output_dir (resuming would keep the old "
                    f"answers as this run's), or set {name}: {was}")
        for model, now in sorted(fingerprints.items()):
            was = (stored.get("fingerprints") or {}).get(model)
            if was and now and was != now:
                raise EvaluationError(
                    f"{self.output_dir} holds {model}'s answers from other weights "
                    f"(fingerprint {was}); the endpoint serves {model} with {now} now (a "
                    "retrained adapter or another checkpoint under the same name): use "
                    f"another output_dir (resuming would mix the two), or leave {model} "
                    "out of models")

    def record_inputs(self, data_dir: str, dataset_id: str | None,
                      fingerprints: dict[str, str],
                      generation: dict[str, Any] | None = None) -> None:
        """Write what this run's predictions are made from (:meth:`check_same_inputs`), with
        the fingerprints of models asked before that this run does not ask."""
        import json

        kept = self._stored_inputs() if self._sources() else {}
        record = {"data_dir": data_dir, "dataset_id": dataset_id or kept.get("dataset_id"),
                  "fingerprints": {**(kept.get("fingerprints") or {}), **fingerprints},
                  "generation": generation or kept.get("generation")}
        storage.write_text(storage.join(self.output_dir, INPUTS_NAME),
                           json.dumps(record, indent=2, sort_keys=True) + "\n")

    def append(self, rows: list[dict[str, Any]]) -> str | None:
        """Write ``rows`` as one new part file, atomically."""
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = prediction_schema()
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema)
        self._seq += 1
        final = storage.join(self.parts_dir, f"part-{self._run}-{self._seq:06d}.parquet")
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(final, buf.getvalue())
        return final

    def consolidate(self, columns: Sequence[str] | None = None) -> Any:
        """Merge everything into ``predictions.parquet`` (sorted, one row per key).

        Only the key columns of every stored row are held at once (Arrow, tens of bytes a row):
        the rows themselves, explanations and raw texts included, go through a local
        temporary folder in pieces of :attr:`window_rows` (see :func:`write_in_order`), so
        the memory does not grow with the texts. A failure leaves the old file and the
        parts as they were.

        Returns:
            The stored rows as :meth:`load` returns them (``columns``: only the key columns
            and these), read back from the new file.
        """
        import pyarrow.compute as pc

        sources = self._sources()
        keys, offsets = self._read_all(sources, SORT_COLUMNS)
        keep = self._newest(keys)
        kept = keys.select(list(SORT_COLUMNS)).take(keep)
        del keys
        order = keep[pc.sort_indices(kept, [(name, "ascending") for name in SORT_COLUMNS]).to_numpy()]
        del kept, keep
        self._write_sorted(sources, offsets, order)
        for path in sources:
            if path != self.path:
                storage.delete(path)
        schema = self._schema(columns)
        with parquet_file(self.path) as stored:
            return self._frame(stored.read(columns=schema.names).cast(schema))

    def _write_sorted(self, sources: list[str], offsets: Any, order: Any) -> None:
        """Write ``predictions.parquet`` whole: row ``order[i]`` of the sources (counted as
        :meth:`_read_all` counts them) as its row ``i`` (:func:`write_in_order`)."""
        with storage.whole_file_output(self.path) as sink:
            write_in_order(sources, offsets, order, prediction_schema(), sink,
                           self.window_rows, self._normalized)

    def rewrite(self, transform: Callable[[Any], Any], batch_rows: int = 4096) -> None:
        """Replace ``predictions.parquet`` by ``transform`` applied to each of its record
        batches in turn (``batch_rows`` rows; ``transform`` returns the batch to store, with
        the same columns). One batch is in memory at a time, and on a disk the new file goes
        straight to a file beside the old one (``storage.whole_file_output``; in an object
        store its bytes are held until written), so a rewrite costs the same on 1k rows as on
        1M; the file is replaced whole, as by :meth:`write`."""
        import pyarrow.parquet as pq

        schema = prediction_schema()
        with (parquet_file(self.path) as stored, storage.whole_file_output(self.path) as sink,
              pq.ParquetWriter(sink, schema) as writer):
            for batch in stored.iter_batches(batch_size=batch_rows):
                writer.write_batch(transform(batch).cast(schema))


def write_in_order(
    sources: Sequence[str], offsets: Any, order: Any, schema: Any, sink: Any, window_rows: int,
    normalized: Callable[[Any, Any], Any],
) -> None:
    """Write ``order[i]``, a row of the Parquet files ``sources`` (counted across them in
    turn: ``offsets[k]`` is the first row of ``sources[k]``, one more entry the total), as
    row ``i`` of a Parquet file with ``schema`` written to ``sink`` (a path or a writable
    file), in row groups of ``window_rows`` or more.

    A distribution sort: each source is read once, a batch at a time, and its rows in
    ``order`` are appended, made ``schema``'s by ``normalized(table, schema)``, to the piece
    of the output they belong in (an Arrow file each, LZ4 compressed, in a temporary folder
    of the local disk: ``TMPDIR``); then each piece is read back, put in order and written.
    Memory holds one batch, then one piece (``window_rows``, more when over 32 pieces
    would be needed); the rows cross the local disk twice.
    """
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n_rows = len(order)
    window = max(window_rows, -(-n_rows // 32))  # at most 32 pieces open at once
    # Each row's place in the output, in the order the rows are read.
    places = np.argsort(order)
    rows = np.asarray(order)[places]
    with tempfile.TemporaryDirectory(prefix="ecgvlm-sort-") as tmp:
        pieces: dict[int, Any] = {}
        try:
            for i, location in enumerate(sources):
                lo, hi = np.searchsorted(rows, offsets[i:i + 2])
                if lo == hi:
                    continue
                wanted, place = rows[lo:hi] - offsets[i], places[lo:hi]
                with parquet_file(location) as stored:
                    present = [n for n in schema.names if n in stored.schema_arrow.names]
                    start = 0
                    for batch in stored.iter_batches(batch_size=window, columns=present):
                        a, b = np.searchsorted(wanted, [start, start + batch.num_rows])
                        if b > a:
                            rows_here = normalized(pa.Table.from_batches(
                                [batch.take(wanted[a:b] - start)]), schema)
                            piece_of = place[a:b] // window
                            rows_here = rows_here.append_column("place", pa.array(place[a:b]))
                            for p in np.unique(piece_of):
                                if p not in pieces:
                                    pieces[p] = pa.ipc.new_file(
                                        f"{tmp}/{p}.arrow", rows_here.schema,
                                        options=pa.ipc.IpcWriteOptions(compression="lz4"))
                                pieces[p].write_table(rows_here.take(np.flatnonzero(piece_of == p)))
                        start += batch.num_rows
        finally:
            for writer in pieces.values():
                writer.close()
        with pq.ParquetWriter(sink, schema) as writer:
            for p in sorted(pieces):
                with pa.OSFile(f"{tmp}/{p}.arrow") as piece:
                    rows_here = pa.ipc.open_file(piece).read_all()
                rows_here = rows_here.take(pc.sort_indices(rows_here.column("place")))
                writer.write_table(rows_here.drop_columns(["place"]), row_group_size=window)
