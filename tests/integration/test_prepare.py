"""The prepare job on real records and real Ray: shards, manifest, rejects, reruns, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ecgvlm import cli
from ecgvlm.dataset import (
    COLUMNS,
    PrepareConfig,
    PrepareError,
    SourceConfig,
    _prepare_settings,
    data_hash,
    load_split,
    prepare_dataset,
    read_manifest,
    read_sample_record,
    split_files,
)
from ecgvlm.mcq import McqConfig, make_mcq
from ecgvlm.measure import MEASURE_VERSION, Measurements, measure_record
from ecgvlm.prompt import conversation_turns, parse_answer
from ecgvlm.render import RenderConfig, render_printout
from ecgvlm.signal import read_record

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Sample records plus a truncated one and one whose only label is an unknown code."""
    root = tmp_path_factory.mktemp("ecg")
    for name in ("cpsc2018", "chapman_shaoxing"):
        shutil.copytree(SAMPLES / name, root / name)
    (root / "mitdb").mkdir()
    for ext in ("hea", "dat", "atr"):
        shutil.copy(SAMPLES / "mitdb" / f"106.{ext}", root / "mitdb" / f"106.{ext}")
    mat = root / "cpsc2018" / "A0048.mat"
    mat.write_bytes(mat.read_bytes()[: mat.stat().st_size // 3])  # fewer samples than the header
    hea = root / "chapman_shaoxing" / "JS00002.hea"
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join("#Dx: 999999999" if ln.startswith("#Dx") else ln for ln in lines) + "\n")
    return root


def _config(sources: Path, out: Path, **overrides) -> PrepareConfig:
    config = PrepareConfig(
        sources=(
            SourceConfig(str(sources / "cpsc2018")),
            SourceConfig(str(sources / "chapman_shaoxing")),
            SourceConfig(str(sources / "mitdb")),
        ),
        output_dir=str(out),
        fractions=(0.6, 0.2, 0.2),
        shard_size=24,
        render=RenderConfig(layout="auto", dpi=50),
        mcq=McqConfig(n_options=5),
        progress=False,
        # Two tasks at a time on the fixture's 8 logical CPUs: on a 2-core machine more
        # workers only add cold-start imports.
        num_cpus_per_task=4.0,
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def prepared(ray_local, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    config = _config(sources, out)
    return config, prepare_dataset(config)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_counts_match_the_shards(prepared):
    config, result = prepared
    manifest = read_manifest(config.output_dir)
    assert manifest == result.manifest
    assert set(manifest["splits"]) == {"train", "val", "test"}
    # 10 CPSC + 5 Chapman + 180 windows of 106, less the two rejected records and the units
    # the held-out splits left out to keep their questions fair (balanced_splits).
    dropped = result.summary()["answer_balance_dropped"]
    assert set(manifest["answer_balance"]) == {"val", "test"}
    assert result.n_samples == 9 + 4 + 180 - sum(n for by_ds in dropped.values() for n in by_ds.values())
    assert manifest["code_version"]["ecgvlm"]
    assert manifest["render_config_hash"] == config.render.config_hash()
    assert manifest["measure_version"] == MEASURE_VERSION
    for name, split in manifest["splits"].items():
        rows = [r for f in split_files(config.output_dir, name) for r in pq.read_table(f).to_pylist()]
        assert len(rows) == split["n_samples"]
        assert sum(split["answer_letters"].values()) == len(rows)
        # Every sample carries its record's measurements (rate at least, or the reason).
        for r in rows:
            m = Measurements.from_dict(json.loads(r["measurements"]))
            assert m.heart_rate_bpm is not None or m.reasons["heart_rate_bpm"]
        label_counts = {}
        for r in rows:
            for lab in r["labels"]:
                label_counts[lab] = label_counts.get(lab, 0) + 1
        assert label_counts == split["labels"]
    assert pq.read_schema(split_files(config.output_dir, "train")[0]).names == list(COLUMNS)
    assert (Path(config.output_dir) / "prepare_config.yaml").is_file()


def test_no_patient_in_two_splits(prepared):
    config, _ = prepared
    owner = {}
    for name in config.splits:
        for s in load_split(config.output_dir, name, with_png=False):
            patient = s.patient_id or s.record_id.split("@")[0]
            assert owner.setdefault(patient, name) == name, f"{patient} in {owner[patient]} and {name}"
    assert len(set(owner.values())) == 3, "every split should hold someone"


def test_bad_records_land_in_rejects_and_the_rest_finishes(prepared):
    config, result = prepared
    lines = (Path(config.output_dir) / "rejects.jsonl").read_text().splitlines()
    rejects = [json.loads(line) for line in lines]
    assert result.n_rejects == len(rejects) == 2
    by_stage = {r["stage"]: r for r in rejects}
    assert by_stage["read"]["path"].endswith("cpsc2018/A0048")
    assert by_stage["read"]["error_type"] == "TruncatedSignalError"
    assert by_stage["mcq"]["record_id"] == "chapman_shaoxing/JS00002"
    assert "UNK:999999999" in by_stage["mcq"]["error"]
    ids = {s.record_id for n in config.splits for s in load_split(config.output_dir, n, with_png=False)}
    assert "cpsc2018/A0048" not in ids and "chapman_shaoxing/JS00002" not in ids
    assert "cpsc2018/A0043" in ids


def test_rows_round_trip_into_the_same_samples(prepared, sources):
    config, _ = prepared
    samples = {s.record_id: s for n in config.splits for s in load_split(config.output_dir, n)}
    rec = read_record(sources / "cpsc2018" / "A0043")
    stored = samples["cpsc2018/A0043"]
    split = next(n for n in config.splits
                 if any(s.record_id == "cpsc2018/A0043"
                        for s in load_split(config.output_dir, n, with_png=False)))
    weights = read_manifest(config.output_dir)["mcq_distractor_weights"][split]["cpsc2018"]
    expected = make_mcq(
        rec, config.seed, config.mcq, weights, measurements=measure_record(rec, config.measure)
    )
    assert stored.options == expected.options and stored.target_text == expected.target_text
    assert stored.answer_letter == expected.answer_letter and stored.labels == ("AF", "RBBB")
    assert stored.png == render_printout(rec, config.render, seed=config.seed).png
    assert parse_answer(stored.target_text, stored.options) == stored.answer_letter
    row = next(
        r for f in split_files(config.output_dir, "train") + split_files(config.output_dir, "val")
        + split_files(config.output_dir, "test")
        for r in pq.read_table(f).to_pylist() if r["record_id"] == "cpsc2018/A0043"
    )
    assert json.loads(row["conversation"]) == conversation_turns(
        stored.question, stored.options, stored.target_text
    )
    window = samples["mitdb/106@90s"]
    assert window.start_s == 90.0 and window.patient_id and window.png.startswith(b"\x89PNG")
    # Each row names the record it came from: read again, it is the record prepare drew.
    assert Path(row["source_path"]).resolve() == (sources / "cpsc2018" / "A0043").resolve()
    again = read_sample_record(row["source_path"], row["dataset"], row["record_id"], config.window_s)
    assert render_printout(again, config.render, seed=config.seed).png == stored.png
    window_row = next(r for n in config.splits for f in split_files(config.output_dir, n)
                      for r in pq.read_table(f).to_pylist() if r["record_id"] == "mitdb/106@90s")
    again = read_sample_record(window_row["source_path"], "mitdb", "mitdb/106@90s", config.window_s)
    assert render_printout(again, config.render, seed=config.seed).png == window.png


def test_rerun_skips_finished_shards_and_rebuilds_identical_ones(prepared):
    config, first = prepared
    again = prepare_dataset(config)
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    assert again.manifest["splits"] == first.manifest["splits"]
    # What a training run checks on --resume: the same data, whatever the rerun's timings.
    assert data_hash(again.manifest) == data_hash(first.manifest)
    shard = Path(split_files(config.output_dir, "train")[-1])
    digest = _sha(shard)
    shard.unlink()
    shard.with_suffix(".done.json").unlink()
    third = prepare_dataset(config)
    assert third.shards_written == 1
    assert _sha(shard) == digest and data_hash(third.manifest) == data_hash(first.manifest)
    # A shard of an older format (before source_path) is built again, not skipped.
    marker = shard.with_suffix(".done.json")
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in old.items() if k != "format"}))
    assert prepare_dataset(config).shards_written == 1
    assert json.loads(marker.read_text())["format"] == old["format"] and _sha(shard) == digest
    # A shard cut short after its marker was written (a full disk, a bad copy) is built
    # again, not taken as finished.
    shard.write_bytes(shard.read_bytes()[:1000])
    assert prepare_dataset(config).shards_written == 1 and _sha(shard) == digest


def test_a_different_config_does_not_mix_into_the_folder(prepared, sources):
    config, _ = prepared
    with pytest.raises(PrepareError, match="holds another data set"):
        prepare_dataset(_config(sources, Path(config.output_dir), seed=1))


def test_cli_prepare_with_llava_format(ray_local, sources, tmp_path, capsys):
    config_path = tmp_path / "prepare.yaml"
    config_path.write_text(
        f"sources:\n  - root: {sources / 'cpsc2018'}\noutput_dir: {tmp_path / 'out'}\n"
        "fractions: [0.5, 0.25, 0.25]\nshard_size: 4\nprogress: false\nnum_cpus_per_task: 4\n"
        "render:\n  layout: auto\n  dpi: 50\n"
    )
    assert cli.main(["prepare", "--config", str(config_path), "--format", "llava", "seed=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(summary["samples"].values()) == 9 and summary["rejects"] == 1
    llava = tmp_path / "out" / "llava"
    entries = [e for n in ("train", "val", "test") for e in json.loads((llava / f"{n}.json").read_text())]
    assert len(entries) == 9
    for e in entries:
        assert (llava / e["image"]).read_bytes().startswith(b"\x89PNG")
        human, gpt = e["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"].startswith("The answer is ")
    assert read_manifest(tmp_path / "out")["config"]["seed"] == 3


def test_a_killed_prepare_keeps_its_finished_shards_and_a_rerun_completes_them(
    ray_local, prepared, sources, tmp_path
):
    """``jobs.prepare`` killed (SIGKILL) once its first shard is finished: the rerun keeps
    that shard, builds the rest, and ends with the same data set as an uninterrupted run
    (byte-identical shards, each listed once)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ecgvlm.config import save_config

    config, first = prepared
    out = tmp_path / "killed"
    killed_config = _config(sources, out)
    save_config(killed_config, tmp_path / "prepare.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--config",
                            str(tmp_path / "prepare.yaml")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and job.poll() is None:
            if list(out.glob("*/*.done.json")):
                break
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finished = sorted(p.name for p in out.glob("*/*.done.json"))
    total = sum(len(s["shards"]) for s in first.manifest["splits"].values())
    assert 1 <= len(finished) < total, (finished, job.stderr.read()[-2000:])
    assert not (out / "manifest.json").exists()  # killed before the end

    again = prepare_dataset(killed_config)
    assert again.shards_skipped >= len(finished)
    assert again.shards_written + again.shards_skipped == total
    assert again.manifest["splits"] == first.manifest["splits"]
    for split in config.splits:
        ours = [Path(p) for p in split_files(out, split)]
        theirs = [Path(p) for p in split_files(config.output_dir, split)]
        assert [p.name for p in ours] == [p.name for p in theirs]
        assert [_sha(p) for p in ours] == [_sha(p) for p in theirs]


def _nap(batch: dict) -> dict:
    started = time.time()
    time.sleep(1.0)
    return {"span": [f"{started} {time.time()}"]}


def test_prepare_datasets_run_as_many_tasks_as_there_are_cpus_for(ray_local):
    # Ray Data 2.60 budgets tasks by what its rate-based autoscaler has granted, which on a
    # fixed-size cluster reads zero at times: tasks of 4 CPUs on the session's 8 then ran
    # about 1.4-1.6 at a time on average (shard tasks on 2 CPUs: alone for a third of the
    # build). One-second tasks: Ray's dispatch gaps on a loaded machine weigh less.
    import ray.data

    context = ray.data.DataContext.get_current()

    def settings() -> tuple[bool, bool, object]:
        return (context.op_resource_reservation_enabled, context.enable_progress_bars,
                context.execution_options)

    before = settings()
    with _prepare_settings():
        ds = ray.data.from_items([{"x": i} for i in range(12)], override_num_blocks=12)
        ds = ds.map_batches(_nap, batch_size=1, num_cpus=4)
    # Only the datasets made inside see the settings: the caller's context is as it was.
    assert settings() == before
    spans = [tuple(map(float, row["span"].split())) for row in ds.iter_rows()]
    busy_s = sum(end - start for start, end in spans)
    wall_s = max(end for _, end in spans) - min(start for start, _ in spans)
    assert busy_s / wall_s > 1.7, f"tasks ran {busy_s / wall_s:.2f} at a time on average"
