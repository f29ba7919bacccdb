"""Reading a prepared split's Parquet shards with Ray Data: the first datasource against the second.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/read_shards_bench.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/read_shards_bench.py --shards 64 --rows 50 --num-cpus 2

Writes ``--shards`` Parquet files of ``--rows`` rows each (a 20 kB blob standing in for the
PNG), then, on one local Ray with ``--num-cpus`` logical CPUs (8: what the test suite's and a
2-worker ``ecgvlm train``'s local Ray have on a 2-core machine), reads them ``--repeats`` times
with each datasource and counts the rows (the read is executed: a training epoch or an
evaluation run pays the same). Reads alternate, v2 first; the first of each is shown apart: it
pays the worker processes' start-up, as a read on a busy cluster whose idle workers were
reaped does. ``ecgvlm.dataset.read_shards`` uses the first: Ray's second datasource starts
``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (32) footer-reading actors per read. Run it on a quiet
machine; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def write_shards(root: Path, n_shards: int, n_rows: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for k in range(n_shards):
        ids = [f"s{k:04d}-{i:04d}" for i in range(n_rows)]
        table = pa.table({"sample_id": ids, "png": [os.urandom(20_000)] * n_rows})
        path = root / f"part-{k:05d}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def time_reads(files: list[Path], use_v2: bool, repeats: int, n_rows: int) -> list[float]:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = use_v2
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = ray.data.read_parquet([str(f) for f in files]).count()
        seconds.append(time.perf_counter() - t0)
        if n != n_rows:
            raise SystemExit(f"read {n} rows, wrote {n_rows}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=8)
    args = parser.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        files = write_shards(Path(tmp), args.shards, args.rows)
        # Each in a fresh order of its own would need two Rays; alternate instead, v2 first.
        v2, v1 = [], []
        for _ in range(1 + args.repeats):
            v2 += time_reads(files, True, 1, args.shards * args.rows)
            v1 += time_reads(files, False, 1, args.shards * args.rows)
    ray.shutdown()
    load = os.getloadavg()[0]
    print(f"{args.shards} shards x {args.rows} rows, {os.cpu_count()} cores, Ray with "
          f"{args.num_cpus} CPUs, load average {load:.2f} at the end")
    print(f"| datasource | first read s | median of the next {args.repeats} s |")
    print("|---|---:|---:|")
    for name, s in (("v1 (read_shards)", v1), ("v2 (Ray's default)", v2)):
        print(f"| {name} | {s[0]:.2f} | {statistics.median(s[1:]):.2f} |")
    print(f"v2 / v1: first read {v2[0] / v1[0]:.1f}x, "
          f"later reads {statistics.median(v2[1:]) / statistics.median(v1[1:]):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
