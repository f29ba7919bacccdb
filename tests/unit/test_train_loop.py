"""Unit tests of the worker loop's parts (ecgvlm.train.loop) without Ray.

GPU workers differ from CPU ones in their process group: Ray Train creates it with NCCL
only, which has no backend for CPU tensors. That is simulated here by registering gloo for
the ``cuda`` device type only (``backend="cuda:gloo"``), under which an ``all_reduce`` of a
CPU tensor raises exactly as NCCL does.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ecgvlm.train import REQUIRED_COLUMNS, Collator, TrainConfig, collated_ahead, evaluate
from ecgvlm.train.loop import _mean_across_ranks, _metric_group, _Position, _train_batches
from tests.unit.test_train import tiny_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda_only_group():
    """A one-rank process group whose only backend is for ``cuda`` tensors, as NCCL's is."""
    assert not dist.is_initialized()
    dist.init_process_group(backend="cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        # The simulation is faithful: the default group refuses CPU tensors.
        with pytest.raises(RuntimeError, match="device type cpu"):
            dist.all_reduce(torch.ones(1))
        yield
    finally:
        dist.destroy_process_group()


def test_metric_reduction_works_under_a_cuda_only_process_group(cuda_only_group) -> None:
    group = _metric_group()
    assert _mean_across_ranks([1.5, 4.0], group) == [1.5, 4.0]


def test_metric_group_is_the_default_where_it_takes_cpu_tensors() -> None:
    assert _metric_group() is None  # no process group at all
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert _metric_group() is None
    finally:
        dist.destroy_process_group()


class _Engine:
    """What evaluate() uses of a DeepSpeed engine: calling it and its ``module``."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)


def test_validation_works_under_a_cuda_only_process_group(
    cuda_only_group, tiny_pulse_dir: Path
) -> None:
    from ecgvlm.model import load_pulse

    model, processor = load_pulse(tiny_pulse_dir)
    rows = [{k: r[k] for k in (*REQUIRED_COLUMNS, "dataset")} for r in tiny_rows("val", 3)]
    for row, name in zip(rows, ("cpsc2018", "ptbxl", "cpsc2018")):
        row["dataset"] = name
    config = TrainConfig(model_dir=str(tiny_pulse_dir), data_dir="d", eval_max_new_tokens=2)
    metrics = evaluate(
        _Engine(model), Collator(processor), rows, config, torch.device("cpu"), torch.float32,
        group=_metric_group(),
    )
    assert metrics["val_samples"] == 3 and metrics["val_loss"] > 0
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    # Accuracy per data set too, consistent with the overall one.
    by_set = {k: v for k, v in metrics.items() if k.startswith("val_accuracy_")}
    assert set(by_set) == {"val_accuracy_cpsc2018", "val_accuracy_ptbxl"}
    total = 2 * by_set["val_accuracy_cpsc2018"] + by_set["val_accuracy_ptbxl"]
    assert total / 3 == pytest.approx(metrics["val_accuracy"])


class _Shard:
    """A data shard of ``n`` numbered batches, iterated as Ray Data's ``iter_batches`` is."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs_started = 0

    def iter_batches(self, **_: Any):
        self.epochs_started += 1
        return iter(range(self.n))


def _consume(shard: _Shard, config: TrainConfig, position: _Position, n: int) -> list[int]:
    out = []
    for place, batch in itertools.islice(_train_batches(shard, config, position), n):
        out.append(batch)
        position.trained_on(place)  # as the loop counts a micro-batch it trained on
    return out


@pytest.mark.parametrize("epoch_size", [4, 1])
def test_resuming_exactly_at_an_epoch_boundary_starts_the_next_epoch(epoch_size: int) -> None:
    config = TrainConfig(model_dir="m", data_dir="d")
    # A checkpoint taken on the last batch of epoch 2 holds {epoch 2, all batches consumed}.
    position = _Position(step=3 * epoch_size, epoch=2, batches_in_epoch=epoch_size)
    shard = _Shard(epoch_size)
    assert _consume(shard, config, position, epoch_size + 1) == [*range(epoch_size), 0]
    assert (position.epoch, position.batches_in_epoch) == (4, 1)


def test_resuming_mid_epoch_skips_the_consumed_batches() -> None:
    config = TrainConfig(model_dir="m", data_dir="d")
    position = _Position(step=6, epoch=1, batches_in_epoch=2)
    assert _consume(_Shard(4), config, position, 3) == [2, 3, 0]
    assert (position.epoch, position.batches_in_epoch) == (2, 1)


def test_a_shard_without_a_batch_fails_by_name() -> None:
    config = TrainConfig(model_dir="m", data_dir="d", per_device_batch_size=3)
    with pytest.raises(RuntimeError, match="split 'train'.*no batch of 3"):
        _consume(_Shard(0), config, _Position(), 1)


class _Collate:
    """Records which batches were collated, on which thread; ``fail_on`` raises for one."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.changed = threading.Condition()

    def __call__(self, batch: int) -> dict[str, Any]:
        if batch == self.fail_on:
            raise ValueError(f"batch {batch} is not a PNG")
        with self.changed:
            self.batches.append(batch)
            self.threads.add(threading.current_thread().name)
            self.changed.notify_all()
        return {"rows": batch}

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.batches) >= n, timeout=30), self.batches


@pytest.mark.parametrize("ahead", [1, 2])
def test_the_next_batches_are_collated_on_a_thread_while_one_trains(ahead: int) -> None:
    collate = _Collate()
    fed = collated_ahead(((i, 10 + i) for i in range(6)), collate, ahead)
    assert next(fed) == (0, {"rows": 10})
    # While batch 0 trains, the next `ahead` are collated, and no more than that.
    collate.wait_for(1 + ahead)
    assert collate.batches == [10 + i for i in range(1 + ahead)]
    assert list(fed) == [(i, {"rows": 10 + i}) for i in range(1, 6)]
    assert collate.batches == [10 + i for i in range(6)]
    assert all(name.startswith("collate-ahead") for name in collate.threads), collate.threads


def test_without_collating_ahead_each_batch_is_collated_when_asked_for() -> None:
    collate = _Collate()
    fed = collated_ahead(((i, i) for i in range(3)), collate, 0)
    assert next(fed) == (0, {"rows": 0}) and collate.batches == [0]
    assert list(fed) == [(1, {"rows": 1}), (2, {"rows": 2})]
    assert collate.threads == {threading.current_thread().name}


def test_a_batch_that_fails_to_collate_fails_when_it_is_asked_for() -> None:
    collate = _Collate(fail_on=2)
    fed = collated_ahead(((i, i) for i in range(5)), collate, 1)
    assert [next(fed)[0], next(fed)[0]] == [0, 1]  # batch 2 failed on the thread meanwhile
    with pytest.raises(ValueError, match="batch 2 is not a PNG"):
        next(fed)


def test_batches_collated_ahead_do_not_move_the_resume_point() -> None:
    """The thread reads into the next epoch while the loop trains on this one's last batch;
    the position a checkpoint would save is still this epoch's end."""
    config = TrainConfig(model_dir="m", data_dir="d")
    shard, position, collate = _Shard(2), _Position(), _Collate()
    # Bounded as the loop bounds it: the micro-batches of the remaining steps, here five.
    batches = itertools.islice(_train_batches(shard, config, position), 5)
    fed = collated_ahead(batches, collate, 1)
    for expected in [(0, 0), (0, 1)]:
        place, _ = next(fed)
        assert place == expected
        position.trained_on(place)
    collate.wait_for(3)  # the thread has fetched epoch 1's first batch
    assert shard.epochs_started == 2
    assert (position.epoch, position.batches_in_epoch) == (0, 2)
    for expected in [(1, 0), (1, 1), (2, 0)]:
        place, _ = next(fed)
        assert place == expected
        position.trained_on(place)
    assert (position.epoch, position.batches_in_epoch) == (2, 1)
    # Nothing past the bound: epoch 2's second batch was never fetched.
    assert next(fed, None) is None
    assert collate.batches == [0, 1, 0, 1, 0] and shard.epochs_started == 3


def test_a_metric_line_is_printed_once_under_ray_trains_print_patch(capsys) -> None:
    """Ray Train's workers replace ``print``: it logs the text through the root logger (whose
    console handler Ray Train installs) and also prints it when stdout is wrapped, as Ray's
    worker processes wrap it (pytest's capture does too)."""
    import builtins
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import _original_print, patch_print_function

    from ecgvlm.train.loop import _print_metrics

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)  # stands in for Ray Train's console handler
    level = root.level
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        patch_print_function()
        assert builtins.print is not _original_print
        _print_metrics("step 5/20", {"step": 5, "train_loss": 1.25})
    finally:
        builtins.print = _original_print
        root.removeHandler(console)
        root.setLevel(level)
    out = capsys.readouterr().out
    assert out.count("[ecgvlm.train] step 5/20 step=5 train_loss=1.25") == 1, out


def test_each_rank_draws_its_own_masks_and_resumes_its_own_stream(tmp_path: Path) -> None:
    import random

    import numpy as np

    from ecgvlm.train.loop import _load_rng_state, _save_rng_state, _seed_rank

    draws = {}
    for rank in (0, 1):
        _seed_rank(7, rank)
        draws[rank] = torch.rand(8)
    assert not torch.equal(draws[0], draws[1])  # dropout masks differ across ranks
    _seed_rank(7, 0)
    assert torch.equal(torch.rand(8), draws[0])  # and are reproducible for the seed

    # A checkpoint mid-stream: after restoring, rank 1 continues exactly where it was.
    _seed_rank(7, 1)
    torch.rand(5)
    _save_rng_state(tmp_path, 1)
    expected = (torch.rand(4), random.random(), np.random.rand())
    _seed_rank(7, 1)  # what a restarted worker does before loading its checkpoint
    assert _load_rng_state(tmp_path, 1)
    assert torch.equal(torch.rand(4), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert not _load_rng_state(tmp_path, 0)  # rank 0 saved nothing here


def _greedy_without_cache(model: Any, processor: Any, prompt: str, image: Any, n: int) -> list[int]:
    """The reference: a full forward over prompt, image and answer so far for every token."""
    inputs = dict(processor([prompt], [image]))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    new: list[int] = []
    for _ in range(n):
        token = int(model(input_ids=ids, attention_mask=mask, **inputs).logits[0, -1].argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], 1)
    return new


def test_validation_decoding_runs_the_image_encoder_once_and_matches_full_recompute(
    tiny_pulse_dir: Path,
) -> None:
    from ecgvlm.model import load_pulse
    from ecgvlm.prompt import build_prompt
    from ecgvlm.train import decode_png
    from ecgvlm.train.loop import greedy_tokens

    torch.manual_seed(0)
    model, processor = load_pulse(tiny_pulse_dir)
    model.eval()
    # Sharpen the random LM head so that greedy picks are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    row = tiny_rows("val", 1)[0]
    prompt, image = build_prompt(row["question"], row["options"]), decode_png(row["png"])
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        cached = greedy_tokens(model, processor, prompt, image, 6, torch.device("cpu"),
                               torch.float32)
        hook.remove()
        reference = _greedy_without_cache(model, processor, prompt, image, 6)
    assert len(calls) == 1
    assert cached == reference


def test_collator_refuses_a_sample_whose_answer_the_length_limit_would_cut(
    tiny_pulse_dir: Path,
) -> None:
    from ecgvlm.model import load_pulse
    from ecgvlm.train import TrainDataError

    model, processor = load_pulse(tiny_pulse_dir)
    rows = tiny_rows("train", 2)
    batch = {k: [r[k] for r in rows] for k in REQUIRED_COLUMNS}
    inputs = Collator(processor)(batch)
    # What the model's merge really makes of each row (text with image features spliced in).
    merged = []
    for i in range(2):
        mask = inputs["attention_mask"][i : i + 1]
        _, out_mask, _, _ = model.merge_inputs(
            inputs["input_ids"][i : i + 1], mask, inputs["pixel_values"][i : i + 1],
            inputs["image_sizes"][i : i + 1],
        )
        merged.append(int(out_mask.sum()))
    limit = max(merged)
    longest = rows[merged.index(limit)]["sample_id"]
    # At the limit every answer token fits; one position less cuts the longest row's </s>.
    Collator(processor, limit, model.num_image_features)(batch)
    with pytest.raises(TrainDataError, match=f"sample {longest}: .* take {limit} positions.*"
                                             f"{limit - 1}; 1 of its"):
        Collator(processor, limit - 1, model.num_image_features)(batch)


def test_log_steps_are_logged_but_not_reported_to_ray_train(tmp_path: Path, monkeypatch) -> None:
    """Ray Train's controller takes one report per health check (2 s) and a report waits for
    the previous one: a report at every log step held each step to 2 s. Log steps go to the
    console and ``metrics.jsonl`` only."""
    import json

    import ray.train

    from ecgvlm.train.loop import _report, _Worker

    reported: list[dict] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: reported.append(metrics))
    config = TrainConfig(model_dir="m", data_dir="d", storage_path=str(tmp_path), run_name="r",
                         max_steps=20, eval_every_steps=10, log_every_steps=1)
    worker = _Worker(config, None, None, "cpu", torch.float32, 0, 2, 2, {})
    for step in (1, 2, 3):
        _report(worker, {"step": step, "train_loss": 1.0}, _Position(step=step), is_eval=False)
    assert reported == []
    history = (Path(config.run_dir()) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3]


def test_a_cpu_engine_is_built_without_compiling_anything(
    tmp_path: Path, tiny_pulse_dir: Path
) -> None:
    """A CPU worker's DeepSpeed engine (``_build_engine``, as in every training run) starts
    with no C++ compiler and builds nothing in ``TORCH_EXTENSIONS_DIR``: DeepSpeed's CPU
    backend would otherwise compile its shared-memory all-reduce op there first."""
    extensions = tmp_path / "torch_extensions"
    code = (
        "import sys, torch, torch.distributed as dist; "
        "from ecgvlm.train import TrainConfig; "
        "from ecgvlm.train.config import load_deepspeed_config, resolve_deepspeed_config; "
        "from ecgvlm.train.loop import _build_engine; "
        "dist.init_process_group(backend='gloo', store=dist.HashStore(), rank=0, world_size=1); "
        "config = TrainConfig(model_dir=sys.argv[1], data_dir=sys.argv[1], num_workers=1); "
        "ds = resolve_deepspeed_config(load_deepspeed_config(config.deepspeed_config), config, False); "
        "engine, _ = _build_engine(config, ds, torch.device('cpu'), torch.float32); "
        "print(type(engine).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_pulse_dir)], cwd=REPO, capture_output=True,
        text=True, timeout=300, check=False,
        # The rank variables are those Ray Train's workers have.
        env={**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions),
             "CXX": str(tmp_path / "no-compiler"), "RANK": "0", "LOCAL_RANK": "0",
             "WORLD_SIZE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1:] == ["DeepSpeedEngine"], done.stdout[-2000:]
    assert not extensions.exists(), sorted(p.name for p in extensions.rglob("*"))
