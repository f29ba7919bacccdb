"""Evaluate models through the HTTP endpoint: predictions, metrics, judge, report.

Run on a cluster:
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/evaluate.yaml
or locally (starts a local Ray):
    python -m jobs.evaluate --config configs/evaluate_demo.yaml output_dir=runs/eval-demo

A rerun with the same ``output_dir`` resumes: stored predictions are not asked again.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/evaluate.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    args = parser.parse_args(argv)

    import ray

    from ecgvlm.config import load_config
    from ecgvlm.evaluate import EvalConfig, evaluate
    from ecgvlm.report import console_tables

    config = load_config(EvalConfig, args.config, args.overrides)
    # Joins the cluster under `ray job submit` (RAY_ADDRESS), else starts a local one.
    ray.init(log_to_driver=False, configure_logging=False)
    try:
        report, written = evaluate(config)
    finally:
        ray.shutdown()
    print(console_tables(report))
    print(f"report: {written['report.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
