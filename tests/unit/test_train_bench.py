"""benchmarks/train_bench.py's GPU path, as far as a CPU can run it.

Its defaults must match the GPU config (gradient checkpointing on), its reductions must
go through the group the job's loop uses, under a process group that, like NCCL's, has no
CPU backend (simulated with ``backend="cuda:gloo"``), and its timed steps must train.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
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


class _PlainEngine:
    """What a training step uses of a DeepSpeed engine, over a plain torch optimizer."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        self.global_steps = 0
        self.losses: list[float] = []

    def __call__(self, **inputs):
        out = self.module(**inputs)
        self.losses.append(float(out.loss.detach()))
        return out

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_steps += 1


@pytest.mark.parametrize("ahead", [0, 1])
def test_gpu_bench_steps_train_on_batches_collated_ahead(tiny_pulse_dir: Path, ahead: int) -> None:
    """The GPU path's timed loop, on a CPU: every step trains on the collated batch, and the
    steps after the warm-up are timed by phase."""
    from ecgvlm.model import load_pulse

    model, processor = load_pulse(tiny_pulse_dir)
    model.train()
    rows = tiny_rows("train", 2)
    batch = {k: [r[k] for r in rows] for k in REQUIRED_COLUMNS}
    args = _bench().build_parser().parse_args(
        ["--gpu", "--steps", "4", "--warmup", "1", "--collate-ahead", str(ahead)]
    )
    engine = _PlainEngine(model)
    times = _bench().timed_steps(
        engine, Collator(processor), batch, torch.device("cpu"), torch.float32, args
    )
    assert engine.global_steps == 4 and len(engine.losses) == 4
    # The same batch every step: its loss falls as the model fits it.
    assert engine.losses[-1] < engine.losses[0]
    assert (times.steps, times.samples) == (3, 6)
    metrics = times.metrics()
    assert all(metrics[f"time_{phase}_s"] > 0 for phase in ("data", "forward", "backward"))
