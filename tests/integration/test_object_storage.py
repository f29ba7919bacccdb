"""Past one machine: the demo's pipeline on a two-node Ray cluster with every path in an
S3-compatible store (moto's server on loopback), reruns that resume, and local paths refused.

The cluster is two ``ray start`` nodes on this machine, each with its own environment and
model cache (``ECGVLM_CACHE_DIR``), standing in for two machines that share nothing but the
bucket. Jobs run as their own driver processes, as ``ray job submit`` would start them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ecgvlm import storage
from ecgvlm.local_ray import join_node, start_head, stop_head
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUCKET = "s3://ecgvlm/two-node"
# Enough of the samples for every stage (a few records of three data sets, MIT-BIH windows).
SAMPLE_SETS = ("cpsc2018", "chapman_shaoxing", "mitdb")


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """``(client env, {node: cache dir})`` of a two-node cluster that reaches the store."""
    base = tmp_path_factory.mktemp("two-nodes")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_server.env, DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    caches = {"head": base / "head-cache", "second": base / "second-cache"}
    try:
        head = start_head(num_cpus=2, env={**env, "ECGVLM_CACHE_DIR": str(caches["head"])},
                          dashboard=False)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        join_node(head, num_cpus=2, env={**env, "ECGVLM_CACHE_DIR": str(caches["second"])})
        # The driver runs on the head's machine and uses its cache.
        client = {**env, **head.env, "RAY_ADDRESS": head.address, "PYTHONPATH": str(REPO),
                  "ECGVLM_CACHE_DIR": str(caches["head"])}
        yield client, caches
    finally:
        stop_head(head)


def _run(env: dict[str, str], *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    if ok:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _cached(cache: Path, name: str) -> list[Path]:
    return sorted((cache / "remote").glob(f"*/{name}"))


def test_the_pipeline_runs_on_two_nodes_with_every_path_in_object_storage(
    cluster, s3_server, tmp_path: Path, tiny_pulse_dir: Path
) -> None:
    env, caches = cluster
    for name in SAMPLE_SETS:
        storage.upload_dir(REPO / "data" / "samples" / name, f"{BUCKET}/samples/{name}")
    storage.upload_dir(tiny_pulse_dir, f"{BUCKET}/tiny-pulse")
    prepared, runs, adapter = f"{BUCKET}/prepared", f"{BUCKET}/runs", f"{BUCKET}/adapter"

    # Prepare: sources and output in the bucket; shards built on both nodes.
    config = yaml.safe_load((REPO / "configs" / "prepare_demo.yaml").read_text())
    config.update(sources=[{"root": f"{BUCKET}/samples/{name}"} for name in SAMPLE_SETS],
                  output_dir=prepared, progress=False)
    prepare_yaml = tmp_path / "prepare.yaml"
    prepare_yaml.write_text(yaml.safe_dump(config))
    first = _last_json(_run(env, "-m", "jobs.prepare", "--config", str(prepare_yaml)).stdout)
    assert first["output_dir"] == prepared and first["shards_skipped"] == 0
    manifest = json.loads(storage.read_text(f"{prepared}/manifest.json"))
    markers = [json.loads(storage.read_text(m))
               for m in storage.list_files(prepared, ".done.json", recursive=True)]
    assert len(markers) == first["shards_written"] >= 2
    assert len({m["node_id"] for m in markers}) == 2, "every shard was built on one node"
    assert all(m["sha256"] for m in markers)
    # Each record was recognised as from its data set (by its folder, as on a disk).
    datasets = {d for split in manifest["splits"].values() for d in split["datasets"]}
    assert datasets == set(SAMPLE_SETS)
    assert first["rejects"] == 0
    sources = {row["source_path"] for split in manifest["splits"] for row in pq.read_table(
        storage.join(prepared, manifest["splits"][split]["shards"][0]["file"]),
        columns=["source_path"]).to_pylist()}
    assert all(s.startswith(f"{BUCKET}/samples/") for s in sources)  # records named by URI
    for cache in caches.values():  # each node read the records from its own copy
        assert _cached(cache, "cpsc2018"), f"no copy of the sources in {cache}"
    again = _last_json(_run(env, "-m", "jobs.prepare", "--config", str(prepare_yaml)).stdout)
    assert (again["shards_written"], again["shards_skipped"]) == (0, first["shards_written"])

    # Train: model, data, checkpoints and adapter in the bucket; one worker per node (1.5 CPUs
    # each on 2-CPU nodes), each loading the model from its node's copy.
    train = [
        "-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
        f"model_dir={BUCKET}/tiny-pulse", f"data_dir={prepared}", f"storage_path={runs}",
        f"output_dir={adapter}", "max_steps=2", "eval_every_steps=2", "log_every_steps=1",
        "cpus_per_worker=1.5", "data_cpus=0.5",
    ]
    _run(env, *train)
    assert storage.is_file(f"{adapter}/adapter_config.json")
    assert storage.list_files(f"{runs}/tiny-cpu/checkpoint_step_000002", recursive=True)
    history = storage.read_text(f"{runs}/tiny-cpu/metrics.jsonl").splitlines()
    assert [json.loads(h)["step"] for h in history if "val_loss" in h] == [2]
    for cache in caches.values():
        assert _cached(cache, "tiny-pulse"), f"no copy of the model in {cache}"
    resumed = _run(env, *train, "--resume")
    assert "nothing to resume" in resumed.stdout

    # Evaluate: split read from the bucket, predictions and report written there, the noise
    # sweep re-rendered from the sources in the bucket; a rerun asks nothing again.
    with FakeOpenAIServer(models=("pulse",)) as endpoint:
        evaluate = [
            "-m", "jobs.evaluate", "--config", "configs/evaluate_demo.yaml",
            f"data_dir={prepared}", f"output_dir={BUCKET}/eval", f"endpoint={endpoint.base_url}",
            "models=[pulse]", "answer_mode=[generate]", "limit_per_dataset=2", "controls=[]",
            "calibration.split=", "judge.enabled=false", "progress=false",
        ]
        _run(env, *evaluate)
        asked = len(endpoint.chat_requests)
        run = json.loads(storage.read_text(f"{BUCKET}/eval/run.json"))
        assert run["new_predictions"] == asked > 0
        assert run["robustness"] == ["noise@1"] and run["robustness_note"] is None
        assert storage.is_file(f"{BUCKET}/eval/report.md")
        assert storage.is_file(f"{BUCKET}/eval/predictions.parquet")
        _run(env, *evaluate)
        assert len(endpoint.chat_requests) == asked
        assert json.loads(storage.read_text(f"{BUCKET}/eval/run.json"))["new_predictions"] == 0


def test_local_paths_are_refused_on_a_cluster_of_two_nodes(cluster, tmp_path: Path) -> None:
    env, _ = cluster
    out = tmp_path / "prepared"
    done = _run(env, "-m", "jobs.prepare", "--config", "configs/prepare_demo.yaml",
                f"output_dir={out}", ok=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ecgvlm prepare: error:")]
    assert len(lines) == 1 and f"output_dir = {out} is a path on one machine" in lines[0]
    assert "2 nodes" in lines[0] and "s3://" in lines[0]
    assert not out.exists()  # refused before anything was written


def test_the_endpoint_refuses_a_local_model_on_two_nodes(cluster, tiny_pulse_dir: Path) -> None:
    env, _ = cluster
    check = ("import ray; from ecgvlm.serving import ServeArgs, check_paths; ray.init(); "
             f"check_paths(ServeArgs(model_dir={str(tiny_pulse_dir)!r}))")
    done = _run(env, "-c", check, ok=False)
    assert done.returncode != 0
    assert f"model_dir = {tiny_pulse_dir} is a path on one machine" in done.stderr
