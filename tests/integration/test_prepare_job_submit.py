"""`ray job submit ... -- python -m jobs.prepare` against a `ray start --head` cluster of our own.

The cluster gets free ports and its own --temp-dir; at the end exactly its processes (those
whose command line names that temp dir) are stopped: `ray stop` would stop every Ray on the
machine, other people's included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_using(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop_cluster(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_using(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 6
        while pids and time.time() < deadline and _pids_using(temp_dir):
            time.sleep(0.5)


@pytest.fixture
def ray_head():
    if not RAY.is_file():
        pytest.skip(f"no ray command at {RAY}")
    # A short path: Ray puts unix sockets under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="r4-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token auth with a token of this test's own, given to the cluster and to the client alike
    # (nothing read from or written to ~/.ray).
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        # Ray gives its node a fixed 30 s to come up; on a busy machine a second try helps.
        for attempt in range(2):
            gcs, dash, client, objm, nodem, metrics, agent_l, agent_g, renv = _free_ports(9)
            cmd = [
                str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                f"--object-manager-port={objm}", f"--node-manager-port={nodem}",
                f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_l}",
                f"--dashboard-agent-grpc-port={agent_g}", f"--runtime-env-agent-port={renv}",
                "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ]
            started = subprocess.run(
                cmd, env=env, timeout=240, capture_output=True, text=True, check=False
            )
            if started.returncode == 0:
                break
            _stop_cluster(temp_dir)
            if attempt == 1:
                pytest.fail(f"ray start failed twice:\n{(started.stdout + started.stderr)[-2000:]}")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_builds_the_data_set(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "prepared"
    runtime_env = {"excludes": [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache"]}
    cmd = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "jobs.prepare", "--config", "configs/prepare_demo.yaml",
        f"output_dir={out}", "sources=[{root: data/samples/cpsc2018}]", "shard_size=5",
        "render.dpi=50", "progress=false",
    ]
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log, log[-3000:]
    summary = json.loads(next(ln for ln in log.splitlines() if ln.startswith('{"output_dir"')))
    assert summary["output_dir"] == str(out)
    assert sum(summary["samples"].values()) == 10 and summary["rejects"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == [{"root": "data/samples/cpsc2018", "dataset": None, "n_record_paths": 10}]
    assert sum(s["n_samples"] for s in manifest["splits"].values()) == 10
