"""Build the MCQ data set on Ray: ``python -m jobs.prepare --config configs/prepare_demo.yaml``.

Submitted to a cluster:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.prepare --config configs/prepare_demo.yaml output_dir=/shared/prepared

A thin wrapper: it parses the config, connects to Ray and calls
``ecgvlm.dataset.prepare_dataset``, as ``ecgvlm prepare`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ecgvlm.config import load_config, save_config
from ecgvlm.dataset import PrepareConfig, prepare_dataset


def run(config_path: str, overrides: list[str], address: str | None = None,
        num_cpus: int | None = None) -> int:
    """Load the config, connect to Ray, prepare, print a summary; returns an exit status."""
    import ray

    config = load_config(PrepareConfig, config_path, overrides)
    # Under `ray job submit` RAY_ADDRESS names the cluster; elsewhere start a private local
    # Ray rather than attach to whatever cluster happens to run on this machine.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=num_cpus if address == "local" else None,
            include_dashboard=False if address == "local" else None,
            log_to_driver=False,
        )
    try:
        result = prepare_dataset(config)
    finally:
        if started_here:
            ray.shutdown()
    save_config(config, os.path.join(result.output_dir, "prepare_config.yaml"))
    counts = {name: s["n_samples"] for name, s in result.manifest["splits"].items()}
    print(
        json.dumps(
            {
                "output_dir": result.output_dir,
                "samples": counts,
                "shards_written": result.shards_written,
                "shards_skipped": result.shards_skipped,
                "rejects": result.n_rejects,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file (configs/prepare_*.yaml)")
    parser.add_argument("--format", choices=["parquet", "llava"], default=None,
                        help="llava: also write LLaVA JSON + image folder (same as llava=true)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["llava=true"] if args.format == "llava" else [])
    return run(args.config, overrides, address=args.address, num_cpus=args.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
