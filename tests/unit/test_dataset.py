"""Prepare-job pieces that need no Ray: config, scan rows, splits, shard plans."""

from __future__ import annotations

import json
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
