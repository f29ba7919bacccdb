"""benchmarks/train_bench.py's GPU path, as far as a CPU can run it.

Its defaults must match the GPU config (gradient checkpointing on), and its reductions must
go through the group the job's loop uses, under a process group that, like NCCL's, has no
CPU backend (simulated with ``backend="cuda:gloo"``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ecgvlm.train import REQUIRED_COLUMNS, Collator, TrainConfig
from tests.unit.test_train import tiny_rows
from tests.unit.test_train_loop import _Engine, cuda_only_group  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("train_bench", REPO / "benchmarks" / "train_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_checkpoints_by_default() -> None:
    parser = _bench().build_parser()
    assert parser.parse_args(["--gpu"]).checkpointing is True
    assert parser.parse_args(["--gpu", "--no-checkpointing"]).checkpointing is False


def test_gpu_bench_reductions_run_under_a_cuda_only_process_group(
    cuda_only_group, tiny_pulse_dir: Path  # noqa: F811
) -> None:
    from ecgvlm.model import load_pulse

    model, processor = load_pulse(tiny_pulse_dir)
    rows = [{k: r[k] for k in REQUIRED_COLUMNS} for r in tiny_rows("val", 2)]
    config = TrainConfig(model_dir=str(tiny_pulse_dir), data_dir="d", eval_max_new_tokens=2)
    checks = _bench().reduce_and_validate(
        _Engine(model), Collator(processor), rows, config, torch.device("cpu"), torch.float32
    )
    assert checks["val_samples"] == 2 and checks["validation_s"] > 0
