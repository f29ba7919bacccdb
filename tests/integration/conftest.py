"""A `ray start --head` cluster of the suite's own, shared by the `ray job submit` tests.

It is ``ecgvlm.local_ray``'s private head (what ``ecgvlm serve`` runs on): free ports,
``--node-ip-address=127.0.0.1`` (so the head's job agent registers on loopback), its own
--temp-dir and auth token; at the end exactly its processes (those whose command line or
working directory names that temp dir) are stopped: `ray stop` would stop every Ray on the
machine, other people's included. Starting one cluster per session instead of one per test
saves a minute or more of start-up on a 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ecgvlm.local_ray import ray_command, start_head, stop_head

RAY = ray_command()
REPO = Path(__file__).resolve().parents[2]


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
def ray_head_info():
    """``(LocalHead, env)`` of a private local cluster with 4 logical CPUs.

    ``env`` is what a client needs: the ``ray`` command on PATH and the cluster's token
    (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), nothing read from or written to ``~/.ray``.
    """
    # The `ray` command comes with the ray dependency: without it the install is broken.
    assert RAY.is_file(), f"no ray command at {RAY}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["DS_ACCELERATOR"] = "cpu"
    try:
        head = start_head(num_cpus=4, env=env)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        env.update(head.env)
        _wait_for_job_agent(head.dashboard_url, env)
        yield head, env
    finally:
        stop_head(head)


@pytest.fixture(scope="session")
def ray_head(ray_head_info):
    """``(dashboard address, env)`` of ``ray_head_info``'s cluster, for ``ray job submit``."""
    head, env = ray_head_info
    return head.dashboard_url, env


@pytest.fixture
def user_dir(tmp_path: Path, tiny_pulse_dir: Path) -> Path:
    """A directory laid out as docs/train.md leaves it (``configs/``, ``runs/tiny-pulse``,
    ``runs/prepared-tiny``), which is not the repository."""
    from tests.unit.test_train import write_prepared

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_pulse_dir, tmp_path / "runs" / "tiny-pulse")
    write_prepared(tmp_path / "runs" / "prepared-tiny", {"train": 4, "val": 4})
    return tmp_path
