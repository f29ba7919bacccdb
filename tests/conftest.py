"""Shared fixtures: paths to real records, and one local Ray per test session.

The repo's sample records (``data/samples``) travel with every clone; the larger staged set in
``../shared/data/ecg`` exists on the team's machines and in CI, and tests that sweep it skip
with a reason where it is absent.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "data" / "samples"
SHARED_ECG_DIR = REPO_ROOT.parent / "shared" / "data" / "ecg"

# DeepSpeed asks for an accelerator at import; on CPU machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end
# wait for its polls: a tiny training run took 34.1-34.6 s with 0.5 s against 36.3-38.8 s
# with 2 s (two runs each, alternating, 2026-12-07). The suite starts more than a dozen
# (the README walk alone four). A late answer to a poll is only a missed health check (Ray
# fails a worker after 10 minutes of them), so a loaded machine is no risk.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The virtualenv's tools first on PATH, for every process the suite starts (Ray's included), as
# an activated virtualenv has them and as the README walk runs its commands (`ecgvlm`, `ray`,
# `serve`).
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


#: The suite's longest test by far (the README walk, 400-750 s): collected first, so that under
#: `make test`'s two workers (one file each at a time, in collection order) it runs beside the
#: rest of the suite instead of alone at its end.
FIRST_FILE = "tests/integration/test_readme.py"

#: ``record_property`` name of a text the run's summary prints (a worker's own output is not
#: shown under pytest-xdist).
SUMMARY_PROPERTY = "summary"


def ctrl_c_able(module: str) -> list[str]:
    """The argv of ``python -m MODULE`` as a terminal runs it, Ctrl-C (SIGINT) raising
    KeyboardInterrupt: a test runner's worker may ignore SIGINT, a child inherits that, and
    Python then leaves it ignored."""
    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


#: A line Ray forwards from one of its actors or tasks to the driver: ``(Name pid=N...)``,
#: colour codes around the prefix in a terminal.
_RAY_PROCESS_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(\S+ pid=\d+")


def driver_lines(output: str) -> list[str]:
    """The lines a driver printed itself, without those Ray forwarded from its actors (whose
    logs, Ray's own tracebacks among them, are Ray's, not the command's)."""
    return [line for line in output.splitlines() if not _RAY_PROCESS_LINE.match(line)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.split("::")[0] != FIRST_FILE)  # a stable sort


def pytest_terminal_summary(terminalreporter) -> None:
    for report in terminalreporter.stats.get("passed", ()):
        for name, text in report.user_properties:
            if name == SUMMARY_PROPERTY:
                terminalreporter.write_line(f"\n{report.nodeid}:\n{text}")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES_DIR


@pytest.fixture(scope="session")
def shared_ecg_dir() -> Path:
    if not SHARED_ECG_DIR.is_dir():
        pytest.skip(f"staged ECG set not present at {SHARED_ECG_DIR}")
    return SHARED_ECG_DIR


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: start-up is paid once.

    Logical CPUs are raised above the machine's 2 so that a Serve replica and a 2-worker
    trainer can coexist (DESIGN.md: a replica holding 1 CPU starves the trainer otherwise).
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": never join a `ray start` cluster another test left behind.
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pulse_dir(tmp_path_factory) -> Path:
    """A tiny random PULSE checkpoint (flat merge, seed 0) in PULSE-7B's layout, built once."""
    from ecgvlm.model import make_tiny_pulse

    return make_tiny_pulse(tmp_path_factory.mktemp("tiny_pulse"), seed=0, merge="flat")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback, its variables set in this process for
    the session (pyarrow reads them when it first opens a bucket) and its bucket ``ecgvlm``."""
    from tests.fakes.s3_server import S3Server

    with S3Server() as server:  # moto is a dev dependency: missing, this fails, never skips
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            server.make_bucket("ecgvlm")
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
