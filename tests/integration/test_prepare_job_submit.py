"""`ray job submit ... -- python -m jobs.prepare` against a `ray start --head` cluster of our own
(the session's ``ray_head`` fixture in tests/integration/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"



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
