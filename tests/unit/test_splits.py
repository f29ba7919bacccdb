"""Splits: patient-wise, deterministic, stratified; the MIT-BIH DS1/DS2 split by name."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from ecgvlm import signal as S
from ecgvlm import splits as SP
from ecgvlm.records import EcgRecord


def _rec(rid: str, labels: tuple[str, ...], patient: str | None, dataset: str = "georgia"):
    return EcgRecord(
        record_id=rid,
        dataset=dataset,
        signal_mv=np.zeros((10, 1), np.float32),
        fs_hz=500.0,
        leads=("I",),
        labels=labels,
        patient_id=patient,
    )


@pytest.fixture(scope="module")
def real_records(samples_dir):
    return list(S.iter_records(samples_dir, window_s=10.0, failures=[]))


def _ids(split):
    return {name: [r.record_id for r in recs] for name, recs in split.items()}


def test_no_patient_in_two_splits_on_real_records(real_records):
    split = SP.split_records(real_records, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=7)
    assert sum(len(v) for v in split.values()) == len(real_records)
    owners: dict[str, set[str]] = {}
    for name, recs in split.items():
        for r in recs:
            owners.setdefault(SP.patient_key(r), set()).add(name)
    assert all(len(s) == 1 for s in owners.values())
    # All 180 windows of a MIT-BIH recording stay together.
    for name, recs in split.items():
        n106 = sum(r.record_id.startswith("mitdb/106@") for r in recs)
        assert n106 in (0, 180)


def test_deterministic_and_order_independent(real_records):
    a = SP.split_records(real_records, (0.5, 0.25, 0.25), seed=3)
    b = SP.split_records(list(reversed(real_records)), (0.5, 0.25, 0.25), seed=3)
    assert {k: sorted(v) for k, v in _ids(a).items()} == {k: sorted(v) for k, v in _ids(b).items()}
    assert _ids(a) == _ids(SP.split_records(real_records, (0.5, 0.25, 0.25), seed=3))
    # Another seed gives another split of the 12-lead records.
    seeds = {
        tuple(sorted(_ids(SP.split_records(real_records, (0.5, 0.5), seed=s))["test"]))
        for s in range(6)
    }
    assert len(seeds) > 1


def test_stratified_where_labels_allow():
    # 40 patients, 2 records each; 20 with AF, 20 with NSR: a 50/50 split must halve both.
    recs = []
    for p in range(40):
        lab = ("AF",) if p % 2 else ("NSR",)
        recs += [_rec(f"georgia/P{p}a", lab, f"p{p}"), _rec(f"georgia/P{p}b", lab, f"p{p}")]
    random.Random(0).shuffle(recs)
    split = SP.split_records(recs, {"train": 0.5, "test": 0.5}, seed=11)
    for name in ("train", "test"):
        counts = Counter(r.labels[0] for r in split[name])
        assert counts == {"AF": 20, "NSR": 20}, (name, counts)
    # A rare label (2 patients) lands on both sides of a 50/50 split, not on one.
    recs = [_rec(f"georgia/Q{p}", ("NSR",), None) for p in range(18)]
    recs += [_rec("georgia/R1", ("WPW", "NSR"), None), _rec("georgia/R2", ("WPW",), None)]
    split = SP.split_records(recs, (0.5, 0.5), seed=0)
    assert [sum("WPW" in r.labels for r in split[n]) for n in ("train", "test")] == [1, 1]
    assert [len(split[n]) for n in ("train", "test")] == [10, 10]


def test_records_without_patient_are_their_own_group():
    recs = [_rec(f"ptbxl/HR{i:05d}", ("NSR",), None, "ptbxl") for i in range(10)]
    split = SP.split_records(recs, (0.8, 0.1, 0.1), seed=0)
    assert [len(split[n]) for n in ("train", "val", "test")] == [8, 1, 1]


def test_bad_arguments():
    recs = [_rec("georgia/E1", ("NSR",), None)]
    with pytest.raises(ValueError, match="sum to 1"):
        SP.split_records(recs, (0.5, 0.4), seed=0)
    with pytest.raises(ValueError, match="must be > 0"):
        SP.split_records(recs, {"train": 1.0, "test": 0.0}, seed=0)
    with pytest.raises(ValueError, match="scheme must be one of patient, mitbih_ds"):
        SP.split_records(recs, (0.5, 0.5), seed=0, scheme="random")
    with pytest.raises(ValueError, match="georgia/E1 is georgia"):
        SP.split_records(recs, scheme="mitbih_ds")


def test_mitbih_ds1_ds2(real_records):
    assert len(SP.MITBIH_DS1) == len(SP.MITBIH_DS2) == 22
    assert not set(SP.MITBIH_DS1) & set(SP.MITBIH_DS2)
    assert not (set(SP.MITBIH_DS1) | set(SP.MITBIH_DS2)) & set(SP.MITBIH_PACED)
    mit = [r for r in real_records if r.dataset == "mitdb"]
    split = SP.split_records(mit, scheme="mitbih_ds")
    assert {r.record_id.split("@")[0] for r in split["DS1"]} == {"mitdb/106"}
    assert {r.record_id.split("@")[0] for r in split["DS2"]} == {"mitdb/202"}
    assert split["excluded"] == []
    paced = _rec("mitdb/107@0s", ("PR",), "mitdb/107", "mitdb")
    assert SP.mitbih_ds_split([paced])["excluded"] == [paced]
