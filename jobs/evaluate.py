"""Evaluate models through the HTTP endpoint: predictions, metrics, judge, report.

Run on a cluster:
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/evaluate.yaml
or locally (starts a private local Ray):
    python -m jobs.evaluate --config configs/evaluate_demo.yaml

Arguments are those of ``ecgvlm evaluate`` (``--config``, ``--address``, ``--num-cpus``,
``key=value`` overrides), and so is the code path and the error reporting. A rerun with the
same ``output_dir`` resumes: stored predictions are not asked again.
"""

from __future__ import annotations

import sys

from ecgvlm.cli import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
