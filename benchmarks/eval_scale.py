"""The evaluation job's cost as the split grows: rows/s and peak memory at 1k, 10k, 50k rows.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/eval_scale.py [--rows 1000 10000 50000]

Each size is a split of synthetic samples (small printouts, measurements that fit each
finding: ``tests/fakes/mcq_split.py``) evaluated by ``ecgvlm.evaluate.evaluate`` in a fresh
driver process with its own local Ray, against a fake OpenAI-compatible endpoint in a
separate process (``--service-ms`` per request), one model, generated answers, no judge, no
controls, no sweep. While it runs, the driver's and the Ray workers' resident memory is
sampled four times a second (``peak_memory.py``). The driver allocates memory as
``ecgvlm evaluate``'s does (``ecgvlm.evaluate.memory``): Arrow from the system allocator, for
Arrow's readers too, and glibc's mmap threshold fixed at 128 KiB, both also in the local
Ray's workers. ``ARROW_DEFAULT_MEMORY_POOL=mimalloc`` in the environment measures pyarrow's
default pool instead, and ``--mmap-threshold 0`` glibc's own adjusting threshold.

What it should show: rows/s flat across sizes, the workers' memory flat (each client actor
holds one block of rows), and the driver's growing only by what the report needs: the
split's ids and answer columns (in Arrow; the texts and measurements are read by the stage
that needs them) and a table of the stored predictions without their texts, never the
images. The consolidation sorts the stored predictions through a local temporary folder a
piece at a time, the claim check reads and rewrites them a batch of rows at a time (and
reads the records beside them, sorted the same way through that folder), the
judge reads the texts it judges by filter, and the metrics' bootstrap scores its resamples
in chunks of bounded size. docs/evaluate.md has the tables this printed, and what still
grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(split_dir: Path, out: Path, endpoint: str, cpus: int, concurrency: int,
          mmap_threshold: int) -> None:
    """The driver being measured: a local Ray, one evaluation, a JSON line of results."""
    sys.path.insert(0, str(REPO))
    import ray

    from ecgvlm.config import config_from_dict
    from ecgvlm.evaluate import (
        EvalConfig,
        evaluate,
        use_fixed_mmap_threshold,
        use_returning_arrow_pool,
    )

    use_returning_arrow_pool()  # as `ecgvlm evaluate` does
    if mmap_threshold:
        use_fixed_mmap_threshold(mmap_threshold)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    config = config_from_dict(EvalConfig, {
        "data_dir": str(split_dir), "output_dir": str(out), "endpoint": endpoint,
        "models": ["pulse"], "answer_mode": ["generate"], "controls": [],
        "calibration": {"split": ""}, "judge": {"enabled": False}, "prior_split": "",
        "concurrency": concurrency, "batch_size": 16, "flush_every": 256, "max_retries": 0,
        "n_boot": 100, "progress": False,
    })
    t0 = time.perf_counter()
    report, _ = evaluate(config)
    wall_s = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall_s, "predict_s": report.meta["predict_s"],
                      "new": report.meta["new_predictions"],
                      "pool": report.meta["arrow_memory_pool"],
                      "mmap": report.meta["malloc_mmap_threshold"]}))
    ray.shutdown()


def measure(n_rows: int, endpoint: str, cpus: int, concurrency: int,
            mmap_threshold: int) -> dict[str, float]:
    from peak_memory import run_sampled

    sys.path.insert(0, str(REPO))
    from tests.fakes.mcq_split import sample_rows, write_split

    work = Path(tempfile.mkdtemp(prefix="eval-scale-"))
    try:
        rows = sample_rows(n_rows // 2 + n_rows % 2, measurements=True)[:n_rows]
        write_split(work / "prepared", rows, shards=max(2, n_rows // 2000))
        del rows
        stdout, peaks = run_sampled([sys.executable, __file__, "--child", str(work / "prepared"),
                                     str(work / "out"), endpoint, str(cpus), str(concurrency),
                                     str(mmap_threshold)])
        out = json.loads(stdout.strip().splitlines()[-1])
        if out["new"] != n_rows:
            raise RuntimeError(f"{out['new']} predictions for {n_rows} rows")
        return {**out, "rows": n_rows, **peaks}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        split_dir, out, endpoint, cpus, concurrency, mmap_threshold = sys.argv[2:8]
        child(Path(split_dir), Path(out), endpoint, int(cpus), int(concurrency),
              int(mmap_threshold))
        return 0
    sys.path.insert(0, str(REPO))
    from eval_bench import start_fake_endpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--service-ms", type=float, default=0.0, help="fake endpoint's time")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc's fixed mmap threshold in bytes (default: the one "
                             "`ecgvlm evaluate` fixes, MMAP_THRESHOLD_BYTES in "
                             "ecgvlm/evaluate/memory.py); 0: glibc's own adjusting threshold")
    args = parser.parse_args()
    if args.mmap_threshold is None:
        # Imported only now: the package loads pandas and pyarrow, which --help does not need.
        from ecgvlm.evaluate.memory import MMAP_THRESHOLD_BYTES

        args.mmap_threshold = MMAP_THRESHOLD_BYTES

    load_start = os.getloadavg()[0]
    proc, endpoint = start_fake_endpoint(args.service_ms / 1000)
    try:
        rows = [measure(n, endpoint, args.cpus, args.concurrency, args.mmap_threshold)
                for n in args.rows]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"\neval_scale: {args.cpus} Ray CPUs, concurrency {args.concurrency}, fake endpoint "
          f"{args.service_ms:g} ms/request, {os.cpu_count()} cores, load average "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; the driver's Arrow "
          f"memory pool: {', '.join(sorted({r['pool'] for r in rows}))}; glibc's mmap "
          f"threshold: {', '.join(sorted({str(r['mmap'] or 'adjusting') for r in rows}))}\n")
    print("| rows | wall s | rows/s (whole job) | rows/s (predict phase) | driver peak RSS MB | "
          "largest worker peak RSS MB | all workers peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rows']} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:.1f} | "
              f"{r['rows'] / r['predict_s']:.1f} | {r['driver_mb']:.0f} | {r['worker_mb']:.0f} | "
              f"{r['workers_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
