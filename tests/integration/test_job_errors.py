"""Every ``jobs/*`` entrypoint reports the library's errors as the ``ecgvlm`` command does.

One line on stderr, ``ecgvlm <command>: error: <message naming the bad input>``, exit status
2, no traceback, and before Ray starts: a config value, a data folder that holds no split or
a shard cut short, an output folder that cannot be made, an endpoint that does not answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**env, **env_vars},
                          capture_output=True, text=True, timeout=240, check=False)


def _assert_one_line_error(done: subprocess.CompletedProcess[str], command: str, named: str):
    lines = [ln for ln in done.stderr.splitlines() if f"ecgvlm {command}: error:" in ln]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and named in lines[0], done.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("module, command, args, named", [
    ("jobs.prepare", "prepare", ["--config", "configs/prepare_demo.yaml", "fractions=[0.5, 0.6, 0.1]"],
     "fractions"),
    ("jobs.train", "train", ["--config", "configs/train_tiny_cpu.yaml", "lora_r=0"], "lora_r"),
    ("jobs.tune", "tune", ["--config", "configs/tune_tiny_cpu.yaml",
                           "search={run_name: {choice: [a, b]}}"], "search.run_name"),
    ("jobs.evaluate", "evaluate",
     ["--config", "configs/evaluate_demo.yaml", "data_dir=no/such/prepared", "--num-cpus", "1"],
     "no/such/prepared"),
    ("jobs.train", "train", ["--config", "configs/train_tiny_cpu.yaml", "data_dir=no/such/prepared"],
     "no/such/prepared"),
    ("jobs.tune", "tune", ["--config", "configs/tune_tiny_cpu.yaml",
                           "train.data_dir=no/such/prepared"], "no/such/prepared"),
    ("jobs.demo", "demo", ["--prepare-config", "no/such/prepare.yaml", "--num-cpus", "1"],
     "no/such/prepare.yaml"),
    ("jobs.demo", "demo", ["--data-root", "no/such/records", "--num-cpus", "1"],
     f"{ROOT / 'no/such/records'}: no such file or directory"),
    ("jobs.prepare", "prepare", ["--config", "configs/prepare_demo.yaml",
                                 "sources=[{root: no/such/records}]", "--num-cpus", "1"],
     f"{ROOT / 'no/such/records'}: no such file or directory"),
    # An output folder that cannot be written (here: under a file; a full or read-only disk
    # is the same kind of OSError): one line naming it.
    ("jobs.prepare", "prepare", ["--config", "configs/prepare_demo.yaml",
                                 "output_dir=README.md/prepared", "--num-cpus", "1"],
     f"cannot create the folder {ROOT / 'README.md' / 'prepared'}: {ROOT / 'README.md'} is not a folder"),
])
def test_job_reports_library_error_in_one_line(module, command, args, named, tmp_path):
    # From the repository root, as the docs run them; outputs would go to runs/ (none written).
    # Nothing listens at RAY_ADDRESS: a job that connected to Ray before finding the bad input
    # would wait there for minutes instead (the demo starts a local Ray of its own).
    done = _run(["-m", module, *args], cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, command, named)
    assert "=== [1/5]" not in done.stdout, done.stdout  # the demo's own Ray, not started


@pytest.mark.integration
def test_the_demo_on_a_port_in_use_says_so_before_ray_starts():
    import socket

    with socket.socket() as taken:  # an endpoint already there, say
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(["-m", "jobs.demo", "--port", str(port), "--num-cpus", "1"], cwd=ROOT)
    _assert_one_line_error(done, "demo", f"127.0.0.1:{port} is in use")
    assert "=== [1/5]" not in done.stdout, done.stdout


@pytest.mark.integration
def test_a_shard_cut_short_after_prepare_is_named_by_train_and_evaluate(tmp_path, tiny_pulse_dir):
    from tests.unit.test_train import write_prepared

    data = write_prepared(tmp_path / "prepared", {"train": 4, "val": 4, "test": 4})
    # A wrong model_dir beside good data: named before Ray starts (nothing listens there),
    # not by each worker's traceback once they have started.
    done = _run(["-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
                 f"data_dir={data}", "model_dir=no/such/model"], cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "train", f"model_dir {ROOT}/no/such/model: no config.json there")
    # A checkpoint whose weights are missing: the loader's own check, on the driver.
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_pulse_dir, no_weights,
                    ignore=shutil.ignore_patterns("model.safetensors*"))
    done = _run(["-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
                 f"data_dir={data}", f"model_dir={no_weights}"], cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "train",
                           f"model_dir {no_weights}: {no_weights} has no model.safetensors(.index.json)")
    # Good data and nothing listening at the endpoint: said before Ray starts, and before the
    # output folder is made.
    done = _run(["-m", "jobs.evaluate", "--config", "configs/evaluate_demo.yaml",
                 f"data_dir={data}", f"output_dir={tmp_path / 'eval'}",
                 "endpoint=http://127.0.0.1:1/v1"], cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "evaluate", "endpoint http://127.0.0.1:1/v1 did not list its "
                           "models: nothing answered there (Connection error.); start one with "
                           "`ecgvlm serve` (README step 6) or set endpoint=URL")
    assert not (tmp_path / "eval").exists()
    # Good inputs, and a RAY_ADDRESS where no cluster runs (kept after `ray stop`, say): said
    # at once (`ray.init` had not given up on such an address after 120 s).
    done = _run(["-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
                 f"data_dir={data}", f"model_dir={tiny_pulse_dir}",
                 f"storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'adapter'}"],
                cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "train", "no Ray cluster answers at 127.0.0.1:1 (from "
                           "RAY_ADDRESS: Connection refused): start it (README: `ray start "
                           "--head ...`) or unset RAY_ADDRESS for a private local Ray")
    # A search whose best adapter would replace the folder holding its trials: said before
    # Ray starts (it was said once Ray had started, about 5 s here).
    done = _run(["-m", "jobs.tune", "--config", "configs/tune_tiny_cpu.yaml",
                 f"train.data_dir={data}", f"train.model_dir={tiny_pulse_dir}",
                 f"storage_path={tmp_path / 'tune'}", f"output_dir={tmp_path / 'tune'}"],
                cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "tune", f"output_dir {tmp_path / 'tune'} holds storage_path "
                           f"{tmp_path / 'tune'}: the adapter replaces that folder whole, which "
                           "would delete it; give the adapter a folder of its own "
                           "(configs/tune_tiny_cpu.yaml: runs/tune/tiny-cpu-best-adapter)")
    # The adapter's folder set to the runs' own (a slip): replacing it with the adapter would
    # have deleted every run's checkpoints when the run ended.
    done = _run(["-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
                 f"data_dir={data}", f"model_dir={tiny_pulse_dir}",
                 f"storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'runs'}"],
                cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "train", f"output_dir {tmp_path / 'runs'} holds storage_path "
                           f"{tmp_path / 'runs'}: the adapter replaces that folder whole")
    for split in ("val", "test"):
        shard = next((data / split).glob("*.parquet"))
        shard.write_bytes(shard.read_bytes()[:500])
    done = _run(["-m", "jobs.train", "--config", "configs/train_tiny_cpu.yaml",
                 f"data_dir={data}", f"model_dir={tiny_pulse_dir}",
                 f"storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'adapter'}"],
                cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "train", f"{data}/val/part-00000.parquet is not a readable")
    done = _run(["-m", "jobs.evaluate", "--config", "configs/evaluate_demo.yaml",
                 f"data_dir={data}", f"output_dir={tmp_path / 'eval'}"],
                cwd=ROOT, RAY_ADDRESS="127.0.0.1:1")
    _assert_one_line_error(done, "evaluate", f"{data}/test/part-00000.parquet is not a readable")
