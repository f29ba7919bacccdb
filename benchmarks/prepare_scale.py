"""Prepare's cost as the data set grows: records/s and peak memory at 1k, 10k (and 50k) records.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/prepare_scale.py [--records 1000 10000] [--cpus 2]

Each size is a fresh folder of the repo's 12-lead sample records under new names (headers
rewritten, signal files linked, so 50k records cost no disk), prepared by ``prepare_dataset``
in a fresh driver process with its own local Ray of ``--cpus`` CPUs, measurements on (the
default config). While it runs, this script samples the resident memory of the driver and of
every Ray worker process (``ray::...``) four times a second.

What it should show: records/s flat across sizes (no per-record cost that grows with the
data set) and peak memory flat: the driver holds the scanned metadata (a few hundred bytes a
record) but no signals or images, and a worker holds one shard at a time.
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
TWELVE_LEAD = ("cpsc2018", "chapman_shaoxing", "cpsc2018_extra", "georgia", "ptb-xl")


def make_inputs(root: Path, n_records: int) -> None:
    """``n_records`` records cycling through the 12-lead samples, each under a new name."""
    samples = [(folder, hea) for folder in TWELVE_LEAD
               for hea in sorted((REPO / "data" / "samples" / folder).glob("*.hea"))]
    for i in range(n_records):
        folder, hea = samples[i % len(samples)]
        name = f"{hea.stem}s{i}"
        dst = root / folder
        dst.mkdir(parents=True, exist_ok=True)
        (dst / f"{name}.hea").write_text(hea.read_text().replace(hea.stem, name))
        (dst / f"{name}.mat").symlink_to(hea.with_suffix(".mat"))


def child(root: Path, out: Path, cpus: int, shard_size: int) -> None:
    """The driver being measured: a local Ray, one prepare run, a JSON line of results."""
    sys.path.insert(0, str(REPO))
    import ray

    from ecgvlm.dataset import PrepareConfig, SourceConfig, prepare_dataset

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    config = PrepareConfig(
        sources=tuple(SourceConfig(str(root / f)) for f in TWELVE_LEAD),
        output_dir=str(out), shard_size=shard_size, progress=False,
    )
    t0 = time.perf_counter()
    result = prepare_dataset(config)
    wall_s = time.perf_counter() - t0
    samples = sum(s["n_samples"] for s in result.manifest["splits"].values())
    print(json.dumps({"wall_s": wall_s, "samples": samples, "rejects": result.n_rejects}))
    ray.shutdown()


def measure(n_records: int, cpus: int, shard_size: int) -> dict[str, float]:
    from peak_memory import run_sampled

    work = Path(tempfile.mkdtemp(prefix="prepare-scale-"))
    try:
        make_inputs(work / "in", n_records)
        stdout, peaks = run_sampled([sys.executable, __file__, "--child", str(work / "in"),
                                     str(work / "out"), str(cpus), str(shard_size)])
        out = json.loads(stdout.strip().splitlines()[-1])
        return {**out, "records": n_records, **peaks}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, out, cpus, shard_size = sys.argv[2:6]
        child(Path(root), Path(out), int(cpus), int(shard_size))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    rows = [measure(n, args.cpus, args.shard_size) for n in args.records]
    print(f"\nprepare_scale: {args.cpus} Ray CPUs, shard_size {args.shard_size}, measurements on, "
          f"{os.cpu_count()} cores, load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end\n")
    print("| records | samples | wall s | records/s | driver peak RSS MB | largest worker peak "
          "RSS MB | all workers peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['records']} | {r['samples']} | {r['wall_s']:.1f} | "
              f"{r['records'] / r['wall_s']:.1f} | {r['driver_mb']:.0f} | {r['worker_mb']:.0f} | "
              f"{r['workers_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
