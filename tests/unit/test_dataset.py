"""Prepare-job pieces that need no Ray: config, scan rows, splits, shard plans."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from ecgvlm.config import ConfigError, load_config
from ecgvlm.dataset import (
    PrepareConfig,
    SourceConfig,
    Unit,
    assign_splits,
    plan_shards,
    safe_name,
    scan_path,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["prepare_demo.yaml", "prepare_study.yaml", "prepare_study_original.yaml"])
def test_configs_load_and_name_their_command(name):
    path = REPO / "configs" / name
    assert path.read_text().startswith("#") and "jobs.prepare" in path.read_text().split("\n\n")[0]
    config = load_config(PrepareConfig, path)
    assert config.sources and config.render.layout == "auto"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sources": ()}, "sources"),
        ({"fractions": (0.5, 0.5)}, "same, non-zero length"),
        ({"fractions": (0.5, 0.3, 0.3)}, "sum to 1"),
        # Refused by the splitter after Ray had scanned the records, where it was first said.
        ({"fractions": (1.0, 0.0, 0.0)}, re.escape(
            "fractions give val, test no records; leave such a split out of splits instead "
            "(splits=[train] fractions=[1])")),
        ({"splits": ("train", "train", "test")}, "distinct"),
        ({"splits": ("train", "llava", "test")}, "distinct"),
        ({"shard_size": 0}, "shard_size"),
        ({"questions_per_record": 0}, "questions_per_record"),
    ],
)
def test_prepare_config_validation(kwargs, match):
    base = {"sources": (SourceConfig("data/samples"),)}
    with pytest.raises(ConfigError, match=match):
        PrepareConfig(**{**base, **kwargs})


def test_overrides_reach_nested_configs(tmp_path):
    config = load_config(
        PrepareConfig,
        REPO / "configs" / "prepare_demo.yaml",
        ["mcq.n_options=6", "sources=[{root: x, max_records: 2}]", "llava=true"],
    )
    assert config.mcq.n_options == 6 and config.llava
    assert config.sources == (SourceConfig("x", None, 2),)
    # Where and how fast do not change what is built.
    assert config.identity() == load_config(
        PrepareConfig, REPO / "configs" / "prepare_demo.yaml",
        ["mcq.n_options=6", "sources=[{root: x, max_records: 2}]", "output_dir=/elsewhere"],
    ).identity()


def test_scan_rows_for_real_records():
    rows = scan_path({"path": str(REPO / "data/samples/cpsc2018/A0043"), "dataset": ""}, 10.0)
    unit = json.loads(rows[0]["unit"])
    assert unit["record_id"] == "cpsc2018/A0043" and unit["labels"] == ["AF", "RBBB"]
    assert not unit["windowed"]
    bad = scan_path({"path": str(REPO / "data/samples/cpsc2018/NOPE"), "dataset": ""}, 10.0)
    reject = json.loads(bad[0]["reject"])
    assert reject["stage"] == "read" and reject["error_type"] == "MissingFileError"


def _unit(i: int, patient: str, labels=("NSR",)) -> Unit:
    return Unit(f"p/{i}", "georgia", f"georgia/E{i:05d}", patient, tuple(labels), 0.0, False)


def test_splits_keep_patients_together_and_shards_are_fixed():
    units = [_unit(i, f"pt{i // 3}", ["NSR", "AF", "RBBB"][i % 3:i % 3 + 1]) for i in range(60)]
    config = PrepareConfig(sources=(SourceConfig("x"),), shard_size=7)
    parts = assign_splits(units, config)
    owner = {}
    for name, members in parts.items():
        assert members, name
        for u in members:
            assert owner.setdefault(u.patient_id, name) == name
    assert sum(len(v) for v in parts.values()) == 60
    shards = plan_shards(parts, config.shard_size)
    assert shards == plan_shards(assign_splits(list(reversed(units)), config), 7)
    assert shards[0]["shard"] == "train/part-00000"
    assert all(len(json.loads(s["units"])) <= 7 for s in shards)


def test_safe_names():
    assert safe_name("mitdb/106@90s#q0") == "mitdb_106_90s_q0"


def _windows(split_counts: dict[str, int], record: str, start=0) -> list[Unit]:
    out = []
    for finding, n in split_counts.items():
        for i in range(n):
            t = float(start + len(out) * 10)
            out.append(Unit("p/x", "mitdb", f"mitdb/{record}@{t:g}s", record, (finding,), t, True))
    return out


def test_held_out_splits_are_answer_balanced_and_train_is_not():
    from ecgvlm.dataset import balance_answers
    from ecgvlm.mcq import allowed_distractors, asked_finding

    train = _windows({"NSR": 150, "PVC": 20}, "100")
    test = _windows({"NSR": 80, "PVC": 10, "AF": 6, "AFL": 5}, "201")
    val = _windows({"NSR": 30, "AF": 2}, "202")
    config = PrepareConfig(sources=(SourceConfig("x"),))
    kept, report = balance_answers({"train": train, "val": val, "test": test}, config)
    assert kept["train"] == train  # the first split keeps every unit
    asked = Counter(asked_finding(u.record_id, u.labels, 0) for u in kept["test"])
    n = sum(asked.values())
    assert max(asked.values()) <= n / 4  # no answer above 1 / n_options
    assert asked["NSR"] <= asked["AF"] + asked["AFL"]  # its distractor uses come only from those
    assert report["test"]["mitdb"]["dropped"]["NSR"] >= 70
    assert report["test"]["mitdb"]["kept"] == dict(asked)
    assert set(kept["test"]) <= set(test) and kept["test"] == [u for u in test if u in kept["test"]]
    # Two findings cannot be fair with four options: each is capped at an equal share instead.
    assert Counter(u.labels[0] for u in kept["val"]) == {"NSR": 2, "AF": 2}
    # Seeded: the same kept windows every time, spread over the recording, not its start.
    assert balance_answers({"train": train, "val": val, "test": test}, config)[0] == kept
    nsr_starts = [u.start_s for u in kept["test"] if u.labels == ("NSR",)]
    assert max(nsr_starts) > 400
    # The study's style keeps everything; an unknown split name is refused.
    study = PrepareConfig(sources=(SourceConfig("x"),), balanced_splits=())
    assert balance_answers({"train": train, "val": val, "test": test}, study)[0]["test"] == test
    with pytest.raises(ConfigError, match="balanced_splits names"):
        PrepareConfig(sources=(SourceConfig("x"),), balanced_splits=("holdout",))
    assert allowed_distractors(("PVC",), "PVC", ["NSR", "AF"]) == ["AF"]


def test_ray_data_settings_are_restored_after_the_block_and_after_an_error():
    import ray.data

    from ecgvlm.dataset import ray_data_settings

    context = ray.data.DataContext.get_current()
    before = (context.target_max_block_size, context.use_datasource_v2)
    with ray_data_settings(target_max_block_size=4096, use_datasource_v2=False) as inside:
        assert inside is context
        assert (context.target_max_block_size, context.use_datasource_v2) == (4096, False)
    assert (context.target_max_block_size, context.use_datasource_v2) == before
    with pytest.raises(KeyError), ray_data_settings(target_max_block_size=1):
        raise KeyError("a failure inside")
    assert context.target_max_block_size == before[0]
    # A misspelt name fails and leaves every setting as it was.
    with pytest.raises(AttributeError), ray_data_settings(target_max_block_size=1,
                                                          no_such_setting=True):
        pass
    assert context.target_max_block_size == before[0]


def test_data_hash_follows_the_shards_not_the_runs_timings():
    """The manifest file holds the run's timings, so its own hash changed with every rerun of
    prepare: a second `make demo` then refused to resume its training run."""
    import copy

    from ecgvlm.dataset import data_hash

    manifest = {
        "dataset_id": "d1", "wall_time_s": 9.3, "phase_wall_s": {"scan_s": 9.2},
        "task_time_s": {"read_s": 5.2}, "code_version": {"git_sha": "a"},
        "splits": {"train": {"n_samples": 2, "shards": [
            {"file": "train/part-00000.parquet", "n_samples": 2, "sha256": "aa"}]}},
    }
    rerun = {**manifest, "wall_time_s": 18.0, "phase_wall_s": {"scan_s": 10.0},
             "task_time_s": {"read_s": 0.0}, "code_version": {"git_sha": "b"}}
    assert data_hash(rerun) == data_hash(manifest)
    rebuilt = copy.deepcopy(manifest)
    rebuilt["splits"]["train"]["shards"][0]["sha256"] = "bb"  # a shard with other content
    assert data_hash(rebuilt) != data_hash(manifest)
    assert data_hash({**manifest, "dataset_id": "d2"}) != data_hash(manifest)
