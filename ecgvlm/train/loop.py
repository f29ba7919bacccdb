"""What every Ray Train worker runs: :func:`train_loop_per_worker` and its parts."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ecgvlm.config import config_from_dict, config_to_dict
from ecgvlm.prompt import build_prompt, parse_answer
from ecgvlm.train.config import (
    CHECKPOINT_ADAPTER,
    CHECKPOINT_DEEPSPEED,
    CHECKPOINT_RANK,
    CHECKPOINT_STATE,
    DEEPSPEED_TAG,
    IGNORE_INDEX,
    REQUIRED_COLUMNS,
    RNG_STATE,
    TrainConfig,
    checkpoint_rank,
    resolve_deepspeed_config,
)
from ecgvlm.train.data import Collator, _as_list, decode_png


def _to_device(inputs: Mapping[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    import torch

    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


@dataclass
class _Position:
    """Where training stands: optimizer steps, epoch, micro-batches consumed in the epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0

    def trained_on(self, place: tuple[int, int]) -> None:
        """Count the micro-batch at ``place`` (epoch, micro-batches of it before this one)."""
        self.epoch, self.batches_in_epoch = place[0], place[1] + 1


class _StepTimes:
    """Seconds spent per phase since the last reset, summed over micro-batches."""

    PHASES = ("data", "forward", "backward", "optimizer", "comm")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.samples = 0
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()

    def metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        wall = max(time.perf_counter() - self.started, 1e-9)
        out = {f"time_{k}_s": v / steps for k, v in self.seconds.items()}
        out["time_step_s"] = wall / steps
        out["samples_per_s"] = self.samples / wall
        out["tokens_per_s"] = self.tokens / wall
        return out


def _comm_ms_total() -> float:
    """Milliseconds DeepSpeed's comms logger has recorded so far (0 when it is off).

    Its per-op timers are never reset, so the largest latency recorded per op name is that
    op's running total.
    """
    from deepspeed.comm import comms_logger

    if not comms_logger.enabled:
        return 0.0
    total = 0.0
    for sizes in comms_logger.comms_dict.values():
        total += max((max(v[1]) for v in sizes.values() if v[1]), default=0.0)
    return total


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_tokens(
    module: Any, processor: Any, prompt: str, image: Any, max_new_tokens: int, device: Any, dtype: Any
) -> list[int]:
    """Greedy-decode exactly ``max_new_tokens`` token ids after ``prompt`` (no early stop).

    One forward over the prompt and image fills the KV cache; each further token is one
    forward of that token against the cache (the image encoder and the 2-3k prompt tokens
    run once, not once per token). Every rank runs the same number of forward passes, which
    ZeRO-3 needs: its parameters are gathered collectively on each forward.
    """
    import torch

    from ecgvlm.model.pulse import CACHE_KWARG, kv_cache

    inputs = _to_device(processor([prompt], [image]), device, dtype)
    out = module(**inputs, use_cache=True)
    # The image merge changes the sequence length: the mask grows from the merged one.
    length = int(out.logits.shape[1])
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if len(new) == max_new_tokens:
            break
        length += 1
        out = module(
            input_ids=torch.tensor([[token]], device=device),
            attention_mask=torch.ones((1, length), dtype=torch.long, device=device),
            **{CACHE_KWARG: kv_cache(out)},
            use_cache=True,
        )
    return new


def greedy_answer(
    module: Any, processor: Any, prompt: str, image: Any, max_new_tokens: int, device: Any, dtype: Any
) -> str:
    """The text of :func:`greedy_tokens`, cut at the first end-of-sequence token."""
    tokenizer = getattr(processor, "tokenizer", processor)
    new = greedy_tokens(module, processor, prompt, image, max_new_tokens, device, dtype)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True)


def evaluate(
    engine: Any,
    collator: Collator,
    rows: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    device: Any,
    dtype: Any,
    group: Any = None,
) -> dict[str, float]:
    """Val loss (answer tokens) and MCQ accuracy (greedy answer + ``parse_answer``).

    Accuracy is also reported per data set (``val_accuracy_<dataset>``, from the rows'
    ``dataset`` field) so that one source cannot hide behind the others.

    ``rows`` is the whole val subset; rank r takes rows r, r + world, ... and every rank
    runs the same number of samples (a rank short of one repeats a row with weight 0), so
    collective ops under ZeRO-3 stay in step. Sums are all-reduced across the ranks of
    ``group`` (one that takes CPU tensors, :func:`_metric_group`; None: the default group).
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_rank = math.ceil(len(rows) / world)
    # Every rank holds the same rows, so the same data set names in the same order.
    names = sorted({str(row.get("dataset", "")) for row in rows})
    # loss x tokens, tokens, correct, samples; then correct and samples per data set
    sums = torch.zeros(4 + 2 * len(names), dtype=torch.float64)
    module = engine.module
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for k in range(per_rank):
            index = rank + k * world
            weight = 1.0 if index < len(rows) else 0.0
            row = rows[min(index, len(rows) - 1)]
            batch = {key: [row[key]] for key in REQUIRED_COLUMNS}
            inputs = _to_device(collator(batch), device, dtype)
            out = engine(**inputs)
            n_tokens = int((inputs["labels"] != IGNORE_INDEX).sum())
            image = decode_png(bytes(row["png"]))
            options = _as_list(row["options"])
            text = greedy_answer(
                module, collator.processor, build_prompt(str(row["question"]), options),
                image, config.eval_max_new_tokens, device, dtype,
            )
            correct = parse_answer(text, options) == str(row["answer_letter"])
            sums[:4] += torch.tensor(
                [float(out.loss) * n_tokens * weight, n_tokens * weight, correct * weight, weight],
                dtype=torch.float64,
            )
            d = 4 + 2 * names.index(str(row.get("dataset", "")))
            sums[d : d + 2] += torch.tensor([correct * weight, weight], dtype=torch.float64)
    if was_training:
        module.train()
    if dist.is_initialized():
        dist.all_reduce(sums, group=group)
    metrics = {
        "val_loss": float(sums[0] / max(sums[1], 1.0)),
        "val_accuracy": float(sums[2] / max(sums[3], 1.0)),
        "val_samples": int(sums[3]),
    }
    for i, name in enumerate(names):
        if name:
            metrics[f"val_accuracy_{name}"] = float(sums[4 + 2 * i] / max(sums[5 + 2 * i], 1.0))
    return metrics


#: The local folders checkpoints are written to before Ray Train uploads them; the writing
#: process's id is in the name (see :func:`remove_orphaned_staging`).
STAGING_PREFIX = "ecgvlm-ckpt-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_staging(root: str | None = None) -> list[str]:
    """Delete the checkpoint staging folders under ``root`` (the temp dir) whose writing
    process is gone, and return them.

    A worker removes its folder once Ray Train has uploaded it, but a worker killed while it
    reports (a trial ASHA stopped, a run whose other rank failed, Ctrl-C) leaves it behind:
    a PULSE-7B LoRA checkpoint with its optimizer state is hundreds of MB. A folder whose
    process is alive is being written or uploaded and is kept; so is one whose dead process's
    id has been taken by another (the safe side of that mistake).
    """
    root = root or tempfile.gettempdir()
    removed = []
    with os.scandir(root) as entries:
        for entry in entries:
            pid_text = entry.name.removeprefix(f"{STAGING_PREFIX}p").split("-", 1)[0]
            if (not entry.name.startswith(f"{STAGING_PREFIX}p") or not pid_text.isdigit()
                    or not entry.is_dir(follow_symlinks=False)
                    or _process_alive(int(pid_text))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def staging_dir(step: int, rank: int, root: str | None = None) -> str:
    """A new local folder for this rank's part of the checkpoint at ``step``, under ``root``
    (the temp dir), once the folders that killed workers left there are deleted."""
    remove_orphaned_staging(root)
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}p{os.getpid()}-s{step}-r{rank}-",
                            dir=root)


def _save_checkpoint(
    engine: Any,
    position: _Position,
    metrics: Mapping[str, float],
    artifact: Mapping[str, Any],
    config: TrainConfig,
    zero_stage: int,
) -> str:
    """Write this rank's part of a checkpoint to a fresh local directory and return it."""
    import deepspeed
    import torch.distributed as dist

    from ecgvlm.adapter import AdapterArtifact

    rank = dist.get_rank() if dist.is_initialized() else 0
    local = staging_dir(position.step, rank)
    state = {"step": position.step, "epoch": position.epoch,
             "batches_in_epoch": position.batches_in_epoch}
    engine.save_checkpoint(
        os.path.join(local, CHECKPOINT_DEEPSPEED),
        tag=DEEPSPEED_TAG,
        client_state=state,
        exclude_frozen_parameters=True,
    )
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    if zero_stage == 3:
        # ZeRO-3 keeps a 1/world slice of every parameter per rank; gather the adapter's
        # full tensors (all ranks take part) before rank 0 writes them.
        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather:
        if rank == 0:
            manifest = AdapterArtifact(
                base_model=config.model_dir,
                label_set=tuple(artifact.get("label_set", ())),
                render_config_hash=artifact.get("render_config_hash"),
                data_manifest_hash=artifact.get("data_manifest_hash"),
                git_sha=artifact.get("git_sha"),
                train_config=config_to_dict(config),
                step=position.step,
                metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            )
            manifest.save(engine.module, os.path.join(local, CHECKPOINT_ADAPTER))
    _save_rng_state(local, rank)
    if rank == 0:
        Path(local, CHECKPOINT_STATE).write_text(
            json.dumps({**state, "metrics": dict(metrics)}, indent=2, default=float)
        )
    return local


def _rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank (its dropout masks), derived from the run's seed."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _seed_rank(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's generators with this rank's seed."""
    import random

    import numpy as np
    import torch

    rank_seed = _rank_seed(seed, rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)


def _save_rng_state(directory: str | Path, rank: int) -> None:
    """Write this rank's generator states next to its checkpoint files."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(state, os.path.join(directory, RNG_STATE.format(rank=rank)))


def _load_rng_state(directory: str | Path, rank: int) -> bool:
    """Restore this rank's generator states; False when the checkpoint holds none."""
    import random

    import numpy as np
    import torch

    path = os.path.join(directory, RNG_STATE.format(rank=rank))
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _load_checkpoint(engine: Any, checkpoint: Any, rank: int = 0) -> _Position:
    """Restore LoRA weights, optimizer, scheduler and this rank's generator states."""
    with checkpoint.as_directory() as directory:
        path, client_state = engine.load_checkpoint(
            os.path.join(directory, CHECKPOINT_DEEPSPEED),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
        )
        if path is None:
            raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state to resume from")
        _load_rng_state(directory, rank)
    return _Position(
        int(client_state["step"]), int(client_state["epoch"]), int(client_state["batches_in_epoch"])
    )


def _print_metrics(prefix: str, metrics: Mapping[str, Any]) -> None:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    # Written to the stream, not print()ed: Ray Train replaces print in its workers with one
    # that logs the text through the root logger and also prints it: each line would show twice.
    sys.stdout.write(f"[ecgvlm.train] {prefix} " + " ".join(parts) + "\n")
    sys.stdout.flush()


HISTORY_NAME = "metrics.jsonl"


def _append_history(config: TrainConfig, metrics: Mapping[str, Any]) -> None:
    """Rank 0 appends every report to ``<storage_path>/<run_name>/metrics.jsonl``.

    Ray Train's Result keeps only the checkpointed reports; this file is the whole curve
    (resumed runs append, so a step may appear twice). An object store has no append: there
    the file is rewritten whole, a few kilobytes once per evaluation.
    """
    from ecgvlm import storage

    path = storage.join(config.run_dir(), HISTORY_NAME)
    line = json.dumps(dict(metrics), default=float) + "\n"
    local = storage.local_path(path)
    if local is None:
        before = storage.read_text(path) if storage.is_file(path) else ""
        storage.write_text(path, before + line)
        return
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    with open(local, "a") as f:
        f.write(line)


PLACEMENT_GROUP_NAME = "placement_group.txt"


def _record_placement_group(config: TrainConfig) -> None:
    """Rank 0 writes the id of the run's placement group (the CPUs/GPUs its workers hold) to
    ``<storage_path>/<run_name>/placement_group.txt``; a restarted worker group rewrites it.

    Ray Train removes the group when the run ends, but a run killed with its Ray Tune trial
    (the scheduler stopped it) keeps it until the search's driver exits: the search removes
    it by this id (``ecgvlm.train.tune``).
    """
    import ray.util

    from ecgvlm import storage

    group = ray.util.get_current_placement_group()
    if group is not None:
        storage.write_text(storage.join(config.run_dir(), PLACEMENT_GROUP_NAME),
                           group.id.hex() + "\n")


def _metric_group() -> Any:
    """A process group that all-reduces CPU tensors (metric sums), or None for the default.

    On GPU workers Ray Train creates the default group with NCCL only (backend config
    ``cuda:nccl``), which has no CPU backend: an ``all_reduce`` of a CPU tensor raises "No
    backend type associated with device type cpu". There a gloo group over the same ranks
    carries the loop's metric reductions and its final barrier. ``new_group`` is collective:
    every rank calls this at the same point.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or "cpu:" in str(dist.get_backend_config()):
        return None
    return dist.new_group(backend="gloo")


def _mean_across_ranks(values: Sequence[float], group: Any = None) -> list[float]:
    """Mean of each value over the ranks of ``group`` (see :func:`_metric_group`)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.tolist()


def train_step(
    engine: Any, inputs: Mapping[str, Any], device: Any, dtype: Any, times: _StepTimes,
) -> tuple[float, bool]:
    """One collated micro-batch: to the device, forward, backward, DeepSpeed step; phases
    timed into ``times`` (the copy to the device counts as data).

    Returns:
        (loss, whether an optimizer step happened, i.e. an accumulation boundary).
    """
    t0 = time.perf_counter()
    inputs = _to_device(inputs, device, dtype)
    _sync(device)
    t1 = time.perf_counter()
    loss = engine(**inputs).loss
    _sync(device)
    t2 = time.perf_counter()
    engine.backward(loss)
    _sync(device)
    t3 = time.perf_counter()
    steps_before = engine.global_steps
    engine.step()
    _sync(device)
    t4 = time.perf_counter()
    times.seconds["data"] += t1 - t0
    times.seconds["forward"] += t2 - t1
    times.seconds["backward"] += t3 - t2
    times.seconds["optimizer"] += t4 - t3
    times.samples += int(inputs["input_ids"].shape[0])
    times.tokens += int(inputs["attention_mask"].sum())
    stepped = engine.global_steps != steps_before
    if stepped:
        times.steps += 1
    return float(loss.detach()), stepped


def build_model(config: TrainConfig, device: Any, dtype: Any) -> tuple[Any, Any]:
    """Load the base model and processor and attach the LoRA adapter."""
    from ecgvlm import storage
    from ecgvlm.model import load_pulse
    from ecgvlm.model.lora import attach_lora

    # A model in an object store is copied to this node's disk once (weights are mmapped).
    model, processor = load_pulse(storage.node_local(config.model_dir), dtype=dtype,
                                  device=device)
    model = attach_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        bias=config.lora_bias,
        target=tuple(config.lora_target_modules),
    )
    if config.gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            # With a frozen embedding, checkpointed blocks would see inputs without grad.
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


@dataclass
class _Worker:
    """What one worker's loop functions share: its config, engine and place in the group."""

    config: TrainConfig
    engine: Any
    collator: Collator
    device: Any
    dtype: Any
    rank: int
    world: int
    zero_stage: int
    artifact: Mapping[str, Any]
    group: Any = None  # reduces CPU tensors (_metric_group)
    val_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Window:
    """Train loss and phase times accumulated since the last report."""

    times: _StepTimes = field(default_factory=_StepTimes)
    loss_sum: float = 0.0
    loss_count: int = 0
    comm_before: float = 0.0


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when it starts.

    On CPU, DeepSpeed's communication backend loads ``deepspeed_shm_comm`` when it starts,
    compiling it (C++, with the ``c++`` and ``ninja`` it finds) unless a build of the same
    sources, flags and paths is cached in ``TORCH_EXTENSIONS_DIR``. The op serves
    ``inference_all_reduce`` (tensor-parallel inference), which training never calls. Its
    build took 45-119 s of both cores in this machine's test runs (ninja's log), on the first
    run after a checkout at another path had built it; with no compiler,
    ``deepspeed.initialize`` failed. Marked incompatible, it is never built; training's
    all-reduces went through torch.distributed already and still do.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _build_engine(
    config: TrainConfig, ds_config: Mapping[str, Any], device: Any, dtype: Any
) -> tuple[Any, Collator]:
    """Model with LoRA, torch AdamW, cosine schedule with warm-up, DeepSpeed engine."""
    import deepspeed
    import torch
    from transformers import get_cosine_schedule_with_warmup

    # Same seed on every rank: identical LoRA init (DeepSpeed also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model, processor = build_model(config, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    skip_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=dict(ds_config),
        dist_init_required=False,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pulse_config = getattr(base, "pulse_config", None)
    max_length = getattr(pulse_config, "tokenizer_model_max_length", None)
    collator = Collator(
        processor, max_length, base.num_image_features if max_length is not None else None
    )
    return engine, collator


def _train_batches(
    shard: Any, config: TrainConfig, start: _Position
) -> Iterator[tuple[tuple[int, int], Any]]:
    """Micro-batches of this worker's train shard from ``start`` on, epoch after epoch, each
    with its place: (epoch, micro-batches of that epoch before it).

    ``start`` is read, not moved: the loop moves its position to the place of each batch it
    trains on (:meth:`_Position.trained_on`), so batches fetched ahead of training do not
    move the point a checkpoint resumes from.

    Raises:
        RuntimeError: when an epoch of the shard yields no batch at all.
    """
    epoch, skip = start.epoch, start.batches_in_epoch
    while True:
        batches = iter(
            shard.iter_batches(
                batch_size=config.per_device_batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=config.shuffle_buffer_size or None,
                local_shuffle_seed=(config.seed + epoch) if config.shuffle_buffer_size else None,
            )
        )
        # Resuming mid-epoch: skip what the checkpointed run had consumed (not decoded). A
        # checkpoint taken on an epoch's last batch skips all of it and goes on to the next.
        for _ in range(skip):
            next(batches, None)
        index = skip
        for batch in batches:
            yield (epoch, index), batch
            index += 1
        if index == 0:
            raise RuntimeError(
                f"split {config.train_split!r}: this worker's shard yielded no batch of "
                f"{config.per_device_batch_size}; use fewer workers or a smaller batch"
            )
        epoch, skip = epoch + 1, 0


Key = TypeVar("Key")


def collated_ahead(
    batches: Iterator[tuple[Key, Any]], collate: Callable[[Any], dict[str, Any]], ahead: int
) -> Iterator[tuple[Key, dict[str, Any]]]:
    """``(key, collate(batch))`` for each of ``batches``, in order, the next ``ahead`` of them
    fetched and collated on a thread of their own while the caller trains on the current one.

    On a GPU, collating on the training thread (decoding the PNG, tiling and normalising it,
    tokenising: 24-29 ms a 1181x591 printout at PULSE-7B's settings on one CPU core)
    leaves the GPU idle at every micro-batch. Nothing is fetched beyond what ``batches``
    yields, so bound it to the batches the run trains on: Ray Data's streaming split starts
    an epoch only when every worker asks for it, and a worker that read into an epoch its
    peers never start would wait there. An error fetching or collating a batch is raised
    when that batch is asked for. ``ahead`` 0: each batch is collated in the caller's thread
    when asked for. The collator must be safe to call from two threads (the loop's
    validation collates on the training thread meanwhile): ``Collator`` keeps no state
    between calls.
    """
    if ahead == 0:
        for key, batch in batches:
            yield key, collate(batch)
        return

    def fetch() -> tuple[Key, dict[str, Any]] | None:
        item = next(batches, None)
        return None if item is None else (item[0], collate(item[1]))

    pool = ThreadPoolExecutor(1, thread_name_prefix="collate-ahead")
    pending = deque(pool.submit(fetch) for _ in range(ahead))
    try:
        while (item := pending.popleft().result()) is not None:
            pending.append(pool.submit(fetch))
            yield item
    finally:
        # Not waiting: a caller that stops early (an error, the last step) does not wait on
        # batches it will not train on; the thread ends after the one it is on.
        pool.shutdown(wait=False, cancel_futures=True)


def _maybe_fail(w: _Worker, step: int) -> None:
    """Tests only: rank 1 raises once at ``fail_at_step`` (the marker file makes it once)."""
    config = w.config
    if (
        config.fail_at_step is not None
        and step == config.fail_at_step
        and w.rank == min(1, w.world - 1)
        and config.fail_marker
        and not os.path.exists(config.fail_marker)
    ):
        Path(config.fail_marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


def _train_metrics(
    w: _Worker, window: _Window, position: _Position, resumed_from: int
) -> dict[str, Any]:
    """Train loss and timings of the window, averaged over ranks; resets the window."""
    comm_now = _comm_ms_total()
    window.times.seconds["comm"] = (comm_now - window.comm_before) / 1000.0
    window.comm_before = comm_now
    timing = window.times.metrics()
    mean_loss, *mean_timing = _mean_across_ranks(
        [window.loss_sum / max(window.loss_count, 1)] + list(timing.values()), w.group
    )
    metrics: dict[str, Any] = {
        "step": position.step,
        "epoch": position.epoch,
        "train_loss": mean_loss,
        "learning_rate": float(w.engine.get_lr()[0]),
        "resumed_from_step": resumed_from,
        **dict(zip(timing, mean_timing)),
    }
    # samples/s and tokens/s are per worker above; the run's rate is world x that.
    metrics["samples_per_s"] *= w.world
    metrics["tokens_per_s"] *= w.world
    window.loss_sum, window.loss_count = 0.0, 0
    window.times.reset()
    return metrics


def _report(w: _Worker, metrics: dict[str, Any], position: _Position, is_eval: bool) -> None:
    """Print and log on rank 0; after an evaluation, report to Ray Train with a checkpoint.

    Log steps are not reported to Ray Train: its controller takes one report per worker health
    check (every 2 s) and a report waits for the previous one to be taken, so reporting every
    step held each step to 2 s (the tiny model's step is 0.1 s). Ray Train keeps only the
    reports with a checkpoint anyway; ``metrics.jsonl`` has every log step.
    """
    import ray.train

    config = w.config
    if not is_eval:
        if w.rank == 0:
            _print_metrics(f"step {position.step}/{config.max_steps}", metrics)
            _append_history(config, metrics)
        return
    metrics.update(
        evaluate(w.engine, w.collator, w.val_rows, config, w.device, w.dtype, group=w.group)
    )
    if w.rank == 0:
        _print_metrics(f"step {position.step}/{config.max_steps} eval", metrics)
        _append_history(config, metrics)
    metrics[CHECKPOINT_RANK] = checkpoint_rank(
        metrics, config.checkpoint_score_attribute, config.checkpoint_score_order)
    local = _save_checkpoint(w.engine, position, metrics, w.artifact, config, w.zero_stage)
    try:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(local),
            checkpoint_dir_name=f"checkpoint_step_{position.step:06d}",
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _resume(w: _Worker) -> tuple[_Position, int]:
    """The position to start from and the step resumed from (-1 for a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return _Position(), -1
    position = _load_checkpoint(w.engine, checkpoint, w.rank)
    if w.rank == 0:
        _print_metrics("resumed", {"step": position.step, "epoch": position.epoch,
                                   "batches_in_epoch": position.batches_in_epoch})
    return position, position.step


def train_loop_per_worker(loop_config: Mapping[str, Any]) -> None:
    """Ray Train worker function.

    Args:
        loop_config: ``{"train": TrainConfig as a dict, "deepspeed": DeepSpeed config dict,
            "artifact": {"label_set", "data_manifest_hash", "render_config_hash", "git_sha"},
            "val_rows": the val subset's rows}`` as built by :func:`ecgvlm.train.run.make_loop_config`.
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    config = config_from_dict(TrainConfig, loop_config["train"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if use_gpu else torch.float32
    ds_config = resolve_deepspeed_config(loop_config["deepspeed"], config, use_gpu)
    engine, collator = _build_engine(config, ds_config, device, dtype)
    w = _Worker(
        config, engine, collator, device, dtype, context.get_world_rank(),
        context.get_world_size(), int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        loop_config.get("artifact", {}), _metric_group(),
    )
    # The model was built with the same seed on every rank; from here each rank draws its
    # own dropout masks (restored from the checkpoint when resuming).
    _seed_rank(config.seed, w.rank)
    if w.rank == 0:
        _record_placement_group(config)
    position, resumed_from = _resume(w)
    w.val_rows = list(loop_config.get("val_rows", []))
    # Exactly the micro-batches the remaining steps train on (checkpoints fall on step
    # boundaries), so the thread collating ahead never starts an epoch that is not trained on.
    needed = (config.max_steps - position.step) * config.gradient_accumulation_steps
    batches = itertools.islice(
        _train_batches(ray.train.get_dataset_shard("train"), config, position), needed
    )
    window = _Window(comm_before=_comm_ms_total())
    engine.train()
    # On a CPU the thread would take the cores forward and backward use: measured slower.
    ahead = config.collate_ahead if config.collate_ahead is not None else int(use_gpu)
    with contextlib.closing(collated_ahead(batches, collator, ahead)) as fed:
        while position.step < config.max_steps:
            t0 = time.perf_counter()
            item = next(fed, None)
            window.times.seconds["data"] += time.perf_counter() - t0
            if item is None:
                raise RuntimeError(
                    f"step {position.step} of {config.max_steps}: the {needed} micro-batches "
                    "taken for the remaining steps are used up; DeepSpeed stepped less often "
                    f"than every {config.gradient_accumulation_steps} (gradient_accumulation_steps)"
                )
            place, inputs = item
            loss, stepped = train_step(engine, inputs, device, dtype, window.times)
            window.loss_sum += loss
            window.loss_count += 1
            position.trained_on(place)
            if not stepped:
                continue  # inside a gradient accumulation window
            position.step += 1
            _maybe_fail(w, position.step)
            is_eval = (
                position.step % config.eval_every_steps == 0 or position.step == config.max_steps
            )
            if is_eval or position.step % config.log_every_steps == 0:
                _report(w, _train_metrics(w, window, position, resumed_from), position, is_eval)
                if is_eval:
                    window.times.reset()
    if dist.is_initialized():
        dist.barrier(group=w.group)
