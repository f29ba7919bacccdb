"""The data the workers get from ``build_datasets``: train blocks in seeded order, val subset.

Prepared splits are sorted by record id, so by source; here three sources of four shards
each, read with Ray Data's ``preserve_order`` as the trainer reads them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgvlm.train import REQUIRED_COLUMNS, DataSummary, TrainConfig, build_datasets

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
    other = TrainConfig(model_dir="m", data_dir=str(tmp_path), eval_max_samples=12, seed=1)
    assert _order(build_datasets(other, summary)["train"]) != order

    val = build_datasets(config, summary)["val"].take_all()
    assert {k for k in REQUIRED_COLUMNS} <= set(val[0])
    per_source = {s: sum(row["dataset"] == s for row in val) for s in SOURCES}
    assert per_source == {s: 4 for s in SOURCES}, per_source
