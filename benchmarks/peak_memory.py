"""Peak resident memory of a benchmark's driver process and of the Ray workers it starts.

``run_sampled(cmd)`` runs ``cmd`` (a driver that starts its own local Ray) and samples, four
times a second until it exits, the RSS of the driver and of every descendant whose command
line starts with ``ray::`` (tasks and actors). Used by the scale benchmarks
(``prepare_scale.py``, ``eval_scale.py``), whose question is whether memory stays flat as the
work grows.
"""

from __future__ import annotations

import os
import subprocess
import time


def _rss_mb(proc) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - a process that just exited
        return 0.0


def run_sampled(cmd: list[str]) -> tuple[str, dict[str, float]]:
    """(the driver's stdout, peak MB of the driver, of the largest worker, of all workers
    together) for one run of ``cmd``.

    Raises:
        RuntimeError: the driver failed (its exit status).
    """
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    driver = psutil.Process(proc.pid)
    peak_driver = peak_worker = peak_workers = 0.0
    while proc.poll() is None:
        workers = []
        try:
            for p in driver.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        workers.append(_rss_mb(p))
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        peak_driver = max(peak_driver, _rss_mb(driver))
        peak_worker = max([peak_worker, *workers])
        peak_workers = max(peak_workers, sum(workers))
        time.sleep(0.25)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}")
    return stdout, {"driver_mb": peak_driver, "worker_mb": peak_worker,
                    "workers_mb": peak_workers}
