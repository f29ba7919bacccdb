"""A `ray start --head` cluster of the suite's own, shared by the `ray job submit` tests.

It gets free ports, `--node-ip-address=127.0.0.1` (so the head's job agent registers on
loopback) and its own --temp-dir; at the end exactly its processes (those whose command line
or working directory names that temp dir) are stopped: `ray stop` would stop every Ray on
the machine, other people's included. Starting one cluster per session instead of one per
test saves a minute or more of start-up on a 2-core machine.
"""

from __future__ import annotations

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
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        # Workers rename themselves ``ray::...`` but keep their cwd inside the temp dir.
        if temp_dir in cmdline or cwd.startswith(temp_dir):
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
        deadline = time.time() + 10
        while pids and time.time() < deadline and _pids_using(temp_dir):
            time.sleep(0.5)


def _wait_for_job_agent(address: str, env: dict[str, str], timeout_s: float = 120.0) -> None:
    """`ray start` returns before the head's job agent answers; `ray job list` tells."""
    deadline = time.time() + timeout_s
    while True:
        probe = subprocess.run(
            [str(RAY), "job", "list", "--address", address],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        if probe.returncode == 0:
            return
        if time.time() > deadline:
            pytest.fail(f"job agent of {address} never answered:\n{probe.stderr[-2000:]}")
        time.sleep(2)


@pytest.fixture(scope="session")
def ray_head():
    """``(dashboard address, env)`` of a private local cluster with 4 logical CPUs."""
    # The `ray` command comes with the ray dependency: without it the install is broken.
    assert RAY.is_file(), f"no ray command at {RAY}"
    # A short path: Ray puts unix sockets under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="r4-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["DS_ACCELERATOR"] = "cpu"
    # Token auth with a token of this cluster's own, given to the cluster and to the client
    # alike (nothing read from or written to ~/.ray).
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
                "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ]
            started = subprocess.run(
                cmd, env=env, timeout=240, capture_output=True, text=True, check=False
            )
            if started.returncode == 0:
                break
            _stop_cluster(temp_dir)
            if attempt == 1:
                pytest.fail(f"ray start failed twice:\n{(started.stdout + started.stderr)[-2000:]}")
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_agent(address, env)
        yield address, env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
