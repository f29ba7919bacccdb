"""A real Ray Tune search of the tiny training config: ASHA, a search stopped and resumed.

One search of three trials (one at a time, one worker each, three steps each, an evaluation
every step) runs as a user runs it, ``python -m jobs.tune`` from a directory laid out as
docs/train.md leaves it, with the shipped config's relative paths. Its driver is stopped with
Ctrl-C (SIGINT) once the first trial has finished: one line says how to resume, and no best
config is written; ``--resume`` runs the other two without running the first again. ASHA must
stop at least one of them early (which one depends on whether Tune's last experiment checkpoint
before the stop held the first trial's rung records), every trial must run without error (a
trial after a stopped one gets the CPUs the stopped run held back), the best config must load
as a ``TrainConfig`` and the best adapter with PEFT. (``ecgvlm tune`` of the shipped config,
uninterrupted, is run by the README walk.)
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecgvlm.config import load_config
from tests.conftest import ctrl_c_able, driver_lines
from tests.integration.test_train_launch import _env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Learning rates far apart and no warm-up, so that the validation losses differ: the 0.05
# trial leads and the other two trail it at ASHA's rungs.
SEARCH = "search={learning_rate: {grid: [0.05, 1.0e-5, 1.0e-6]}}"
# One training worker a trial, not the config's two: what is tested here is Tune's (ASHA, the
# resume), and a second worker's start-up cost about 26 CPU-seconds over the search. The README
# walk runs a trial of the shipped config's two workers.
COMMON = ["--config", "configs/tune_tiny_cpu.yaml", SEARCH, "num_samples=1", "train.max_steps=3",
          "train.warmup_steps=0", "train.num_workers=1", "train.global_batch_size=2"]


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_search_stops_weak_trials_and_a_stopped_search_resumes(ray_head_info, user_dir: Path) -> None:
    # The suite's `ray start` cluster: a trial ASHA stops is freed by Ray Train's
    # placement-group cleaner, which needs the dashboard (the in-process ray_local has none).
    head, _ = ray_head_info
    # Only the cluster's client variables (its token) on top of _env: the fixture's env is a
    # copy of the caller's whole environment and would undo _env's PYTHONPATH (repo first).
    env = {**_env(), **head.env, "RAY_ADDRESS": head.address}
    trials_dir = user_dir / "runs" / "tune" / "tiny-cpu" / "train"
    driver = subprocess.Popen(
        [*ctrl_c_able("jobs.tune"), *COMMON], cwd=user_dir, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    try:
        # Stopped once the second trial's run exists: the first has finished by then.
        while time.monotonic() < deadline and driver.poll() is None:
            runs = sorted(p for p in trials_dir.glob("tiny-cpu-*") if not p.name.endswith("adapter"))
            if len(runs) >= 2:
                break
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        driver.wait(timeout=60)
    stderr = driver.stderr.read()
    assert driver.returncode == 130, stderr[-3000:]
    # The command's own output; Ray's actors may log tracebacks of their own as they stop.
    assert not any("Traceback" in ln for ln in driver_lines(stderr)), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "ecgvlm tune: interrupted; rerun with --resume to continue the search"), stderr[-3000:]
    # Nothing of the unfinished search is written as if it had ended.
    assert not (user_dir / "runs" / "tune" / "tiny-cpu" / "best_train_config.yaml").exists()
    runs = sorted(p for p in trials_dir.glob("tiny-cpu-*") if not p.name.endswith("adapter"))
    first = _history(runs[0])
    assert max(r["step"] for r in first) == 3  # the first trial had finished

    resumed = subprocess.run([sys.executable, "-m", "jobs.tune", "--resume", *COMMON],
                             cwd=user_dir, env=env, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Run again without --resume: refused before Ray starts (nothing listens at RAY_ADDRESS).
    again = subprocess.run([sys.executable, "-m", "jobs.tune", *COMMON], cwd=user_dir,
                           env={**env, "RAY_ADDRESS": "127.0.0.1:1"}, capture_output=True,
                           text=True, timeout=120, check=False)
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == (
        "ecgvlm tune: error: search 'tiny-cpu' already exists under "
        f"{user_dir / 'runs' / 'tune'}; pass --resume to continue it or choose another name"
    ), again.stderr[-3000:]

    # The finished trial was not run again: its history is as it was at the stop.
    assert _history(runs[0]) == first
    experiment = user_dir / "runs" / "tune" / "tiny-cpu"
    with (experiment / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and not any(r["error"] for r in rows), rows
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and {r["learning_rate"] for r in stopped} <= {"1e-05", "1e-06"}, rows
    assert all(r["steps"] == "3" for r in rows if r["stopped_early"] == "False"), rows
    for row in rows:  # each trial's steps ran once
        steps = [r["step"] for r in _history(Path(row["run_dir"]))]
        assert steps == list(range(1, len(steps) + 1)), (row["trial"], steps)
    assert (experiment / "trials.png").stat().st_size > 0

    from ecgvlm.train import TrainConfig

    best = load_config(TrainConfig, experiment / "best_train_config.yaml")
    assert best.learning_rate == pytest.approx(float(rows[0]["learning_rate"]))
    assert best.run_name == "tiny-cpu" and best.max_steps == 3
    # A trial's run does not restart itself; the config to train on keeps the base's restarts.
    assert best.max_failures == load_config(TrainConfig, user_dir / "configs"
                                            / "train_tiny_cpu.yaml").max_failures == 1
    adapter = user_dir / "runs" / "tune" / "tiny-cpu-best-adapter"
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(adapter)).r == best.lora_r
    # The adapter is the evaluation the table names as the best trial's best (the tiny
    # model's accuracies tie, and by the accuracy alone an earlier step's was exported).
    assert json.loads((adapter / "ecgvlm.json").read_text())["step"] == int(rows[0]["best_step"])
