"""The data the workers get from ``build_datasets``: train blocks in seeded order, val subset.

Prepared splits are sorted by record id, so by source; here three sources of four shards
each, read with Ray Data's ``preserve_order`` as the trainer reads them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgvlm.train import (
    REQUIRED_COLUMNS,
    DataSummary,
    TrainConfig,
    build_datasets,
    read_val_rows,
    val_rows,
)

pytestmark = pytest.mark.integration

SOURCES = ("chapman", "cpsc2018", "mitbih")


def _write_split(root: Path, split: str, shards_per_source: int, rows_per_shard: int) -> list[str]:
    files = []
    for s, source in enumerate(SOURCES):
        for k in range(shards_per_source):
            ids = [f"{source}/{split}{k:02d}{i:02d}" for i in range(rows_per_shard)]
            table = pa.table({
                "sample_id": ids, "png": [b""] * len(ids), "question": ["q"] * len(ids),
                "options": [["a", "b"]] * len(ids), "target_text": ["t"] * len(ids),
                "answer_letter": ["A"] * len(ids), "dataset": [source] * len(ids),
            })
            path = root / f"{split}-part-{s * shards_per_source + k:05d}.parquet"
            pq.write_table(table, path)
            files.append(str(path))
    return files


def _order(dataset) -> list[str]:
    return [row["sample_id"] for row in dataset.iter_rows()]


@pytest.fixture
def preserve_order(ray_local):
    context = ray_local.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield
    context.execution_options.preserve_order = before


def test_train_blocks_come_in_a_seeded_order_and_val_is_stratified(
    preserve_order, tmp_path: Path
) -> None:
    summary = DataSummary(rows={}, files={
        "train": _write_split(tmp_path, "train", 4, 3),
        "val": _write_split(tmp_path, "val", 2, 10),  # 20 rows per source
    })
    config = TrainConfig(model_dir="m", data_dir=str(tmp_path), eval_max_samples=12, seed=0)
    order = _order(build_datasets(config, summary)["train"])
    assert len(order) == 36 and set(order) == {r for f in summary.files["train"]
                                               for r in pq.read_table(f)["sample_id"].to_pylist()}
    # The first third of an epoch draws on more than one source.
    assert len({sample.split("/")[0] for sample in order[:12]}) >= 2, order
    # The same order on every run (and so on resume); another seed, another order.
    assert _order(build_datasets(config, summary)["train"]) == order
    # Kept in the object store (this tiny split) or re-read every epoch: the same order.
    uncached = replace(config, cache_train_below_mb=0.0)
    assert _order(build_datasets(uncached, summary)["train"]) == order
    # train_repeat passes come one after another (not each block repeated in a row).
    repeated = replace(config, train_repeat=3)
    assert _order(build_datasets(repeated, summary)["train"]) == order * 3
    other = TrainConfig(model_dir="m", data_dir=str(tmp_path), eval_max_samples=12, seed=1)
    assert _order(build_datasets(other, summary)["train"]) != order

    assert set(build_datasets(config, summary)) == {"train"}
    val = val_rows(config, summary)
    assert {k for k in REQUIRED_COLUMNS} <= set(val[0])
    per_source = {s: sum(row["dataset"] == s for row in val) for s in SOURCES}
    assert per_source == {s: 4 for s in SOURCES}, per_source


def test_val_rows_come_in_the_order_asked_and_a_missing_one_is_named(tmp_path: Path) -> None:
    files = _write_split(tmp_path, "val", 1, 3)
    rows = read_val_rows(files, ["mitbih/val0002", "chapman/val0000"])
    assert [r["sample_id"] for r in rows] == ["mitbih/val0002", "chapman/val0000"]
    assert rows[0]["options"] == ["a", "b"] and rows[0]["dataset"] == "mitbih"
    with pytest.raises(Exception, match="mitbih/val0099"):
        read_val_rows(files, ["mitbih/val0099"])
