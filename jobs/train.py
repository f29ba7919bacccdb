"""LoRA-fine-tune PULSE with Ray Train + DeepSpeed (what ``ray job submit`` runs).

    ray job submit --working-dir . -- python -m jobs.train --config configs/train_pulse_lora.yaml
    python -m jobs.train --config configs/train_tiny_cpu.yaml [--resume] [--num-cpus N] [key=value ...]

The same as ``ecgvlm train``: this entrypoint hands its arguments to that command, which
validates the config and data before any worker starts, runs the ``TorchTrainer``
(``ecgvlm.train.run_training``) and copies the best adapter to ``output_dir``. Under
``ray job submit`` it connects to the job's cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import sys

from ecgvlm.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
