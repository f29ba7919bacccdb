"""Starting a training run as a new user does: relative paths, a 2-core machine, busy CPUs.

The first test lays out a directory as docs/train.md does (``configs/``, ``runs/tiny-pulse``,
``runs/prepared-tiny``) and runs ``jobs.train`` from there with the shipped config's relative
paths (Ray Train workers run in a directory of their own, so every path must be made absolute
before they start), kills its driver mid-run (or stops it with Ctrl-C) and resumes it. The
others check that a run the cluster cannot hold (a 2-CPU Ray, CPUs held by other work) fails
with a one-line reason instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ctrl_c_able, driver_lines

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["DS_ACCELERATOR"] = "cpu"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _train(cwd: Path, *args: str, timeout_s: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout_s, check=False,
    )


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_relative_paths_and_resume_from_the_users_directory(
    ray_local, user_dir: Path, monkeypatch, stop
) -> None:
    """``python -m jobs.train`` with the shipped config's relative paths, run from the user's
    directory, its driver killed (SIGKILL) or stopped with Ctrl-C (Ray Train aborts the run;
    one line says how to resume) after the step-2 checkpoint; ``--resume`` from the same
    directory reaches the configured steps. The Ray Train workers run in directories of their
    own."""
    from jobs.train import main

    common = ["--config", "configs/train_tiny_cpu.yaml", "max_steps=6", "eval_every_steps=2",
              "log_every_steps=1"]
    run_dir = user_dir / "runs" / "train" / "tiny-cpu"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    driver = subprocess.Popen(
        [*ctrl_c_able("jobs.train"), *common], cwd=user_dir,
        env={**_env(), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            # Killed once the controller has recorded the step-2 checkpoint (steps 3-6, two
            # evaluations and two checkpoints, are still ahead of it).
            if snapshot.is_file() and "checkpoint_step_000002" in snapshot.read_text():
                break
            time.sleep(0.05)
    finally:
        driver.send_signal(stop)
        driver.wait(timeout=60)
    stderr = driver.stderr.read()
    if stop == signal.SIGKILL:
        assert driver.returncode == -9, stderr[-3000:]  # killed, not finished
    else:
        assert driver.returncode == 130, stderr[-3000:]
        # The command's own output; Ray's actors may log tracebacks of their own as they stop.
        assert not any("Traceback" in ln for ln in driver_lines(stderr)), stderr[-3000:]
        # Stopped once the run had recorded a checkpoint: the line says --resume, and where.
        assert stderr.strip().splitlines()[-1] == (
            "ecgvlm train: interrupted; rerun with --resume to continue from the last "
            f"checkpoint {run_dir} recorded"), stderr[-3000:]
    monkeypatch.chdir(user_dir)
    assert main(["--resume", *common]) == 0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = [r["step"] for r in history if r["resumed_from_step"] == -1]
    resumed = [r["step"] for r in history if r["resumed_from_step"] != -1]
    assert first[:2] == [1, 2] and first == list(range(1, len(first) + 1)), history
    # From the checkpoint the run's snapshot held last (step 2 when killed at once; Ctrl-C's
    # abort takes a moment, in which step 4's may be recorded) to max_steps.
    (since,) = {r["resumed_from_step"] for r in history if r["resumed_from_step"] != -1}
    assert since in (2, 4) and resumed == list(range(since + 1, 7)), history
    adapter = user_dir / "runs" / "train" / "tiny-cpu-adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "ecgvlm.json").is_file()
    # The resolved config written next to the run names absolute paths only.
    saved = (run_dir / "train_config.yaml").read_text()
    assert f"model_dir: {user_dir}/runs/tiny-pulse" in saved


def test_too_few_cpus_for_workers_and_data_fail_in_one_line(user_dir: Path) -> None:
    # 2 workers x 1 CPU take both CPUs of a 2-CPU Ray: the reads would never run. Said before
    # the local Ray of --num-cpus 2 is started at all.
    run = _train(user_dir, "--num-cpus", "2", timeout_s=240)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("ecgvlm train: error")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "needs 3 CPUs" in errors[0] and "data_cpus" in errors[0] and "has 2" in errors[0]
    assert "Started a local Ray instance" not in run.stderr, run.stderr[-2000:]


def test_cpus_held_by_other_work_fail_within_the_timeout(ray_local, user_dir: Path) -> None:
    from ecgvlm.train import TrainConfig, run_training
    from ecgvlm.train.run import TrainResourcesError

    ray = ray_local
    free = ray.available_resources().get("CPU", 0)

    @ray.remote(num_cpus=free - 2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    config = TrainConfig(
        model_dir=str(user_dir / "runs" / "tiny-pulse"),
        data_dir=str(user_dir / "runs" / "prepared-tiny"),
        storage_path=str(user_dir / "runs" / "train"), output_dir=str(user_dir / "adapter"),
        deepspeed_config=str(user_dir / "configs" / "deepspeed" / "zero2.json"),
        schedule_timeout_s=2,
    )
    started = time.monotonic()
    try:
        with pytest.raises(TrainResourcesError, match=r"needs 3 CPUs free .* only 2 of \d+ CPUs are free"):
            run_training(config)
    finally:
        ray.kill(holder)
    assert time.monotonic() - started < 30


def test_a_workers_state_api_finds_its_own_ray_beside_another(ray_local, ray_head_info) -> None:
    """With two Rays on the machine (the session's in-process one and its ``ray start``
    cluster), Ray's state API in a worker that was not told its address cannot choose: Ray
    Train's placement-group cleaner died of that, with a traceback on the user's console,
    whenever ``ecgvlm train`` or ``tune`` ran beside another Ray (``ecgvlm serve``'s). The
    private Ray's worker setup hook, ``pin_ray_address``, tells each worker its own."""
    from ecgvlm.train.run import pin_ray_address

    @ray_local.remote(max_calls=1)  # the worker exits after it: its environment goes with it
    def state_api_address(pin: bool) -> str:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        os.environ.pop("RAY_ADDRESS", None)
        if pin:
            pin_ray_address()
        try:
            return canonicalize_bootstrap_address_or_die(None)
        except ConnectionError as e:
            return f"error: {e}"

    assert "multiple active Ray instances" in ray_local.get(state_api_address.remote(False))
    own = ray_local.get_runtime_context().gcs_address
    assert ray_local.get(state_api_address.remote(True)) == own


def test_a_ray_start_clusters_workers_know_its_address(ray_head_info) -> None:
    """The same for a ``ray start`` head (``ecgvlm serve``'s, the suite's cluster, and the
    README's recipe, which exports ``RAY_ADDRESS`` before ``ray start``): its workers inherit
    ``RAY_ADDRESS`` naming it, so a job's placement-group cleaner finds its own Ray too."""
    head, env = ray_head_info
    code = ("import os, ray; ray.init(); print(ray.get(ray.remote("
            "lambda: os.environ.get('RAY_ADDRESS')).remote()))")
    run = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_ADDRESS": head.address},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == head.address, run.stdout
