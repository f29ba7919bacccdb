"""Throughput of the prepare job: records/s end to end on 1 and 2 CPUs, render share, Ray overhead.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/prepare_bench.py [--copies 4] [--cpus 1 2]

The input is the repo's 12-lead sample records (data/samples, all but MIT-BIH and PTB),
copied ``--copies`` times under new record names so there is enough work to time. Each
variant builds the whole data set (scan, split, read, render, MCQ, Parquet) into a fresh
folder:

- ``serial``: the same library functions called in one process, no Ray: the pipeline's own
  cost.
- ``ray N cpu``: ``prepare_dataset`` on a local Ray with N CPUs, timed on a second run after
  a first one has started the workers (the cold start is printed too).

Ray overhead = 1 - serial time / Ray-on-1-CPU time: the share of the 1-CPU wall time that the
pipeline itself does not explain (task scheduling, serialisation, Ray Data's executor,
driver round trips). Targets: >= 1.8x from 1 to 2 CPUs, overhead < 30%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecgvlm.dataset import (
    PrepareConfig,
    SourceConfig,
    _unit_from_json,
    assign_splits,
    build_shard,
    list_sources,
    plan_shards,
    prepare_dataset,
    scan_path,
)
from ecgvlm.render import RenderConfig

TWELVE_LEAD = ("cpsc2018", "chapman_shaoxing", "cpsc2018_extra", "georgia", "ptb-xl")


def make_inputs(root: Path, copies: int) -> int:
    """Copy the 12-lead samples ``copies`` times under new names; return the record count."""
    n = 0
    for folder in TWELVE_LEAD:
        src = REPO / "data" / "samples" / folder
        dst = root / folder
        dst.mkdir(parents=True, exist_ok=True)
        for hea in sorted(src.glob("*.hea")):
            stem = hea.stem
            for c in range(copies):
                name = f"{stem}c{c}"
                (dst / f"{name}.hea").write_text(hea.read_text().replace(stem, name))
                shutil.copy(src / f"{stem}.mat", dst / f"{name}.mat")
                n += 1
    return n


def config_for(root: Path, out: Path, shard_size: int) -> PrepareConfig:
    return PrepareConfig(
        sources=tuple(SourceConfig(str(root / f)) for f in TWELVE_LEAD),
        output_dir=str(out),
        render=RenderConfig(layout="auto"),
        shard_size=shard_size,
        progress=False,
    )


def run_serial(config: PrepareConfig) -> tuple[float, Counter]:
    t0 = time.perf_counter()
    rows = [r for item in list_sources(config) for r in scan_path(item, config.window_s)]
    units = [_unit_from_json(r["unit"]) for r in rows if r["unit"]]
    shards = plan_shards(assign_splits(units, config), config.shard_size)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    timing: Counter = Counter()
    for spec in shards:
        timing.update(build_shard(spec, config, config.output_dir, "bench")["timing"])
    return time.perf_counter() - t0, timing


def run_ray(config: PrepareConfig, cpus: int, work: Path) -> tuple[float, float, Counter]:
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            break
        except Exception as e:  # Ray waits a fixed 30 s for its node: too short on a busy machine
            print(f"ray.init failed ({e}); retrying", file=sys.stderr)
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        t0 = time.perf_counter()
        prepare_dataset(dataclasses.replace(config, output_dir=str(work / f"cold{cpus}")))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = prepare_dataset(config)
        warm = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return cold, warm, Counter(result.manifest["task_time_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of each sample record")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    try:
        n = make_inputs(work / "in", args.copies)
        results = []
        serial_s, timing = run_serial(config_for(work / "in", work / "serial", args.shard_size))
        results.append(("serial (no Ray)", None, serial_s, timing))
        for cpus in args.cpus:
            cold, warm, timing = run_ray(
                config_for(work / "in", work / f"ray{cpus}", args.shard_size), cpus, work
            )
            results.append((f"ray {cpus} cpu", cold, warm, timing))

        print(f"\nprepare_bench: {n} 12-lead records, shard_size {args.shard_size}, "
              "render 3x4+II at 100 dpi\n")
        print("| variant | cold s | wall s | records/s | task s | render share of task time |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, cold, wall, t in results:
            share = t["render_s"] / t["total_s"] if t["total_s"] else float("nan")
            cold_s = "-" if cold is None else f"{cold:.1f}"
            print(f"| {name} | {cold_s} | {wall:.1f} | {n / wall:.2f} | {t['total_s']:.1f} | "
                  f"{share:.0%} |")
        by_cpu = {name: wall for name, _, wall, _ in results}
        summary = {}
        if "ray 1 cpu" in by_cpu:
            summary["ray_overhead_1cpu"] = 1 - serial_s / by_cpu["ray 1 cpu"]
            if "ray 2 cpu" in by_cpu:
                summary["speedup_1_to_2_cpu"] = by_cpu["ray 1 cpu"] / by_cpu["ray 2 cpu"]
        print()
        for key, value in summary.items():
            target = {"ray_overhead_1cpu": "< 30%", "speedup_1_to_2_cpu": ">= 1.8x"}[key]
            shown = f"{value:.0%}" if key.startswith("ray_overhead") else f"{value:.2f}x"
            print(f"{key}: {shown} (target {target})")
        print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
