"""Search training hyperparameters with Ray Tune (what ``ray job submit`` runs).

    ray job submit --working-dir . -- python -m jobs.tune --config configs/tune_pulse_lora.yaml
    python -m jobs.tune --config configs/tune_tiny_cpu.yaml [--resume] [--num-cpus N] [key=value ...]

The same as ``ecgvlm tune``: every trial is a training run (``ecgvlm.train.run_training``)
with the values Tune drew, ASHA stops the weak ones, and the best trial's config and adapter
are written out (``ecgvlm.train.tune``).
"""

from __future__ import annotations

import sys

from ecgvlm.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
