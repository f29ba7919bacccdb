"""Build the MCQ data set on Ray: ``python -m jobs.prepare --config configs/prepare_demo.yaml``.

Submitted to a cluster:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.prepare --config configs/prepare_demo.yaml output_dir=/shared/prepared

Arguments are those of ``ecgvlm prepare`` (``--config``, ``--format llava``, ``--address``,
``--num-cpus``, ``key=value`` overrides), and so is the code path: load the config, connect to
Ray (``RAY_ADDRESS`` under ``ray job submit``, else a new local Ray), run
``ecgvlm.dataset.prepare_dataset``, print a one-line JSON summary.
"""

from __future__ import annotations

import sys

from ecgvlm.cli import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
