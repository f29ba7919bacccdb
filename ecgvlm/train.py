"""LoRA fine-tuning of PULSE under Ray Train with DeepSpeed.

``jobs/train.py`` validates a :class:`TrainConfig` and the prepared data on the driver
(:func:`check_training_data`), then runs :func:`train_loop_per_worker` on every worker. Each
worker streams its shard of the prepared Parquet data, turns rows into model inputs with
:class:`Collator` (loss on the assistant's answer only), trains a DeepSpeed engine (ZeRO-2 by
default, ZeRO-3 selectable; torch AdamW; cosine schedule with warm-up; gradient
accumulation), evaluates on the val split every ``eval_every_steps`` (loss and MCQ accuracy
through greedy generation and ``parse_answer``), and reports metrics and a checkpoint with
``ray.train.report``.

A checkpoint directory holds ``adapter/`` (PEFT directory + ``ecgvlm.json``), ``deepspeed/``
(optimizer, scheduler and LoRA weights, one optimizer shard file per rank under ZeRO) and
``trainer_state.json`` (step, epoch, batches consumed in that epoch, metrics). Every rank
writes its own files into its own local directory; Ray Train merges them into one directory
in storage.

Torch, DeepSpeed, Ray and PIL are imported inside functions: importing this module is cheap
and does no I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgvlm.config import (
    ConfigError,
    check_choice,
    check_range,
    config_from_dict,
    config_to_dict,
    save_config,
)
from ecgvlm.prompt import build_prompt, build_training_text, parse_answer

IGNORE_INDEX = -100
# Columns the loop reads from the prepared Parquet shards.
REQUIRED_COLUMNS = ("sample_id", "png", "question", "options", "target_text", "answer_letter")
# Columns read when present (the adapter's label set comes from option_labels).
OPTIONAL_COLUMNS = ("option_labels", "dataset")
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_ADAPTER = "adapter"
CHECKPOINT_DEEPSPEED = "deepspeed"
DEEPSPEED_TAG = "state"
SCORE_METRICS = ("val_accuracy", "val_loss")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one fine-tuning run needs; validated before any worker starts.

    Attributes:
        model_dir: Local PULSE checkpoint directory (never a hub id: nothing is downloaded).
        data_dir: Prepared data set (``ecgvlm prepare`` output) with Parquet shards per split.
        train_split: Split trained on.
        val_split: Split evaluated on during training.
        run_name: Ray Train run name; a run resumes when resubmitted with the same name.
        storage_path: Where Ray Train keeps checkpoints (``<storage_path>/<run_name>``).
        output_dir: Where the best adapter is copied when the run ends.
        num_workers: Ray Train workers (one per GPU on a GPU cluster).
        use_gpu: Train on GPUs (bf16) rather than CPUs (fp32).
        cpus_per_worker: Logical CPUs each worker reserves.
        lora_r, lora_alpha, lora_dropout, lora_bias, lora_target_modules: The LoRA update,
            applied to the language model's attention projections only.
        learning_rate, weight_decay, adam_beta1, adam_beta2, max_grad_norm: torch AdamW and
            gradient clipping.
        warmup_steps: Linear warm-up steps before the cosine decay to zero at ``max_steps``.
        max_steps: Optimizer steps of the run (the data is cycled through epochs).
        per_device_batch_size: Samples per worker per micro-batch.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        global_batch_size: Optional; when set it must equal per-device batch x workers x
            accumulation (a guard against silently training with another batch size).
        gradient_checkpointing: Recompute activations in backward to save memory.
        deepspeed_config: DeepSpeed JSON (``configs/deepspeed/zero2.json`` or ``zero3.json``);
            batch sizes, clipping and precision are filled in from this config and the device.
        eval_every_steps: Evaluate, report and checkpoint every this many optimizer steps (and
            at the last step).
        eval_max_samples: Val samples per evaluation (the first ones of the split).
        eval_max_new_tokens: Tokens generated per val sample for the MCQ accuracy.
        log_every_steps: Report train metrics every this many steps.
        checkpoint_num_to_keep: Checkpoints kept (the best by the score metric, plus the
            latest, which Ray Train never deletes).
        checkpoint_score_attribute: Val metric ranking checkpoints.
        checkpoint_score_order: ``max`` or ``min``.
        max_failures: Worker-group restarts (from the latest checkpoint) before giving up.
        shuffle_buffer_size: Local shuffle buffer (rows) per worker; 0 keeps the data order.
        train_repeat: Passes over the train split per Ray Data epoch. Each epoch restarts
            Ray Data's streaming split (seconds); on a tiny data set repeat it so that cost is
            paid once per many steps rather than every step.
        seed: Seed of model init, LoRA init and shuffling.
        profile_comm: Time DeepSpeed's collectives (adds a synchronisation per collective).
        fail_at_step: Tests only: rank 1 raises once after this step (see ``fail_marker``).
        fail_marker: Tests only: file created at the injected failure, so it happens once.
    """

    model_dir: str
    data_dir: str
    train_split: str = "train"
    val_split: str = "val"
    run_name: str = "pulse-lora"
    storage_path: str = "runs/train"
    output_dir: str = "runs/train/adapter"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    lora_bias: str = "lora_only"
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    max_steps: int = 100
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    gradient_checkpointing: bool = False
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    eval_every_steps: int = 50
    eval_max_samples: int = 32
    eval_max_new_tokens: int = 8
    log_every_steps: int = 1
    checkpoint_num_to_keep: int = 2
    checkpoint_score_attribute: str = "val_accuracy"
    checkpoint_score_order: str = "max"
    max_failures: int = 1
    shuffle_buffer_size: int = 0
    train_repeat: int = 1
    seed: int = 0
    profile_comm: bool = False
    fail_at_step: int | None = None
    fail_marker: str | None = None

    def __post_init__(self) -> None:
        for name in ("model_dir", "data_dir", "run_name", "storage_path", "output_dir"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{name} must not be empty")
        if self.train_split == self.val_split:
            raise ConfigError(
                f"val_split must differ from train_split, both are {self.train_split!r}"
            )
        check_range("num_workers", self.num_workers, 1)
        check_range("cpus_per_worker", self.cpus_per_worker, 0.01)
        check_range("lora_r", self.lora_r, 1)
        check_range("lora_alpha", self.lora_alpha, 1)
        check_range("lora_dropout", self.lora_dropout, 0.0, 0.99)
        check_choice("lora_bias", self.lora_bias, ("none", "all", "lora_only"))
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one projection")
        check_range("learning_rate", self.learning_rate, 1e-12, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("adam_beta1", self.adam_beta1, 0.0, 0.999999)
        check_range("adam_beta2", self.adam_beta2, 0.0, 0.999999)
        check_range("max_grad_norm", self.max_grad_norm, 0.0)
        check_range("max_steps", self.max_steps, 1)
        check_range("warmup_steps", self.warmup_steps, 0, self.max_steps)
        check_range("per_device_batch_size", self.per_device_batch_size, 1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        if self.global_batch_size is not None and self.global_batch_size != self.derived_batch_size():
            raise ConfigError(
                f"global_batch_size must equal per_device_batch_size x num_workers x "
                f"gradient_accumulation_steps = {self.per_device_batch_size} x "
                f"{self.num_workers} x {self.gradient_accumulation_steps} = "
                f"{self.derived_batch_size()}, got {self.global_batch_size}"
            )
        if not self.deepspeed_config.endswith(".json"):
            raise ConfigError(
                f"deepspeed_config must be a .json file, got {self.deepspeed_config!r}"
            )
        check_range("eval_every_steps", self.eval_every_steps, 1)
        check_range("eval_max_samples", self.eval_max_samples, 1)
        check_range("eval_max_new_tokens", self.eval_max_new_tokens, 1)
        check_range("log_every_steps", self.log_every_steps, 1)
        check_range("checkpoint_num_to_keep", self.checkpoint_num_to_keep, 1)
        check_choice("checkpoint_score_attribute", self.checkpoint_score_attribute, SCORE_METRICS)
        check_choice("checkpoint_score_order", self.checkpoint_score_order, ("max", "min"))
        check_range("max_failures", self.max_failures, -1)
        check_range("shuffle_buffer_size", self.shuffle_buffer_size, 0)
        check_range("train_repeat", self.train_repeat, 1)
        if self.fail_at_step is not None:
            check_range("fail_at_step", self.fail_at_step, 1, self.max_steps - 1)
            if not self.fail_marker:
                raise ConfigError("fail_marker must be set with fail_at_step (it makes the failure happen once)")

    def derived_batch_size(self) -> int:
        """Samples per optimizer step over all workers."""
        return self.per_device_batch_size * self.num_workers * self.gradient_accumulation_steps

    def run_dir(self) -> Path:
        """Ray Train's directory for this run."""
        return Path(self.storage_path) / self.run_name


# ---------------------------------------------------------------------------------------------
# Data: files, checks before workers start
# ---------------------------------------------------------------------------------------------


class TrainDataError(ConfigError):
    """Prepared data that the run cannot use (missing split, columns or rows)."""


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The Parquet shards of one split, as the prepared data set's manifest lists them.

    Raises:
        TrainDataError: naming the data set and split when there is no manifest, no such
            split or a listed shard is missing.
    """
    from ecgvlm.dataset import split_files as manifest_split_files

    try:
        files = manifest_split_files(data_dir, split)
    except (FileNotFoundError, ValueError) as e:
        raise TrainDataError(f"data_dir {data_dir}: split {split!r}: {e}") from e
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise TrainDataError(f"split {split!r}: shard(s) listed in the manifest are missing: {missing}")
    if not files:
        raise TrainDataError(f"split {split!r} is empty (no shards in {data_dir}/manifest.json)")
    return files


@dataclass(frozen=True)
class DataSummary:
    """What the driver learns about the prepared data before workers start."""

    rows: dict[str, int]
    label_set: tuple[str, ...] = ()
    manifest_hash: str | None = None
    render_config_hash: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)


def check_training_data(config: TrainConfig) -> DataSummary:
    """Check the train and val splits exist, hold rows and carry the needed columns.

    Reads the manifest and the Parquet footers (schema, row counts) plus the
    ``option_labels`` column of the train split (for the adapter's label set); no image is
    decoded.

    Raises:
        TrainDataError: naming the split and the missing column, or the empty split.
    """
    import pyarrow.parquet as pq

    from ecgvlm.adapter import hash_file
    from ecgvlm.dataset import MANIFEST_NAME, read_manifest

    rows: dict[str, int] = {}
    files: dict[str, list[str]] = {}
    labels: set[str] = set()
    for split in (config.train_split, config.val_split):
        paths = split_files(config.data_dir, split)
        files[split] = [str(p) for p in paths]
        n = 0
        for path in paths:
            meta = pq.ParquetFile(path)
            names = set(meta.schema_arrow.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise TrainDataError(
                    f"split {split!r}: {path.name} lacks column(s) {', '.join(missing)}; "
                    f"required: {', '.join(REQUIRED_COLUMNS)}"
                )
            n += meta.metadata.num_rows
            if split == config.train_split and "option_labels" in names:
                table = pq.read_table(path, columns=["option_labels"])
                for value in table.column("option_labels").to_pylist():
                    labels.update(value or ())
        if n == 0:
            raise TrainDataError(f"split {split!r} is empty ({len(paths)} shard(s), 0 rows)")
        rows[split] = n
    manifest = read_manifest(config.data_dir)
    return DataSummary(
        rows,
        tuple(sorted(labels)),
        hash_file(Path(config.data_dir) / MANIFEST_NAME),
        manifest.get("render_config_hash"),
        files,
    )


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (on the driver, so workers need no file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"deepspeed_config: file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from e
    stage = data.get("zero_optimization", {}).get("stage", 0)
    check_choice("deepspeed_config zero_optimization.stage", stage, (0, 1, 2, 3))
    return data


def resolve_deepspeed_config(
    base: Mapping[str, Any], config: TrainConfig, use_gpu: bool
) -> dict[str, Any]:
    """Fill the batch sizes, clipping and precision of a DeepSpeed config from ``config``.

    bf16 on GPUs; fp32 on CPUs (the CPU backend's bf16 matmuls are slow and DeepSpeed's CPU
    path expects fp32 master weights).
    """
    ds = json.loads(json.dumps(dict(base)))
    ds["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
    ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    ds["train_batch_size"] = config.derived_batch_size()
    ds["gradient_clipping"] = config.max_grad_norm
    ds["bf16"] = {"enabled": bool(use_gpu)}
    ds["fp16"] = {"enabled": False}
    # A torch AdamW is passed in; ZeRO accepts it only with this flag on some versions.
    ds["zero_allow_untested_optimizer"] = True
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    if config.profile_comm:
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    return ds


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return list(value.tolist() if hasattr(value, "tolist") else value)


def decode_png(png: bytes) -> Any:
    """PNG bytes to an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB")


class Collator:
    """Rows of the prepared data to model inputs with the loss on the answer only.

    Each row becomes the ``llava_v1`` text ``prompt + " " + target_text + "</s>"``
    (``ecgvlm.prompt.build_training_text``) and its image, run through the model's processor
    as one batch. Labels copy ``input_ids`` except that the prompt (system line, image
    tokens, question, ``ASSISTANT:``) and padding are ``-100``: only the answer and its
    closing ``</s>`` are trained on.

    The answer's length is measured with the tokenizer alone, as the token count of the full
    text minus that of the prompt (the image expansion, if the processor does one, happens in
    the prompt and cancels out). The prompt's tokens must be a prefix of the full text's
    tokens, which holds for ``llava_v1`` because the prompt ends with ``ASSISTANT:``.

    Args:
        processor: ``processor(prompts, images) -> dict`` with ``input_ids`` and
            ``attention_mask`` (padded to a rectangle, either side) plus image tensors, and
            either ``encode_prompts(texts)`` (token ids without images, as
            ``ecgvlm.model.PulseProcessor`` has) or a callable ``tokenizer`` attribute.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def texts(self, batch: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """(prompts, full texts) for a batch of rows."""
        prompts, fulls = [], []
        for question, options, target in zip(
            _as_list(batch["question"]), _as_list(batch["options"]), _as_list(batch["target_text"])
        ):
            prompt, completion = build_training_text(str(question), _as_list(options), str(target))
            prompts.append(prompt)
            fulls.append(prompt + completion)
        return prompts, fulls

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of texts without touching images (``encode_prompts`` where it exists)."""
        if hasattr(self.processor, "encode_prompts"):
            return self.processor.encode_prompts(list(texts))
        return self.tokenizer(list(texts))["input_ids"]

    def answer_lengths(self, prompts: Sequence[str], fulls: Sequence[str]) -> list[int]:
        """Tokens of each answer (target + ``</s>``), measured with the tokenizer alone."""
        prompt_ids = self.token_ids(prompts)
        full_ids = self.token_ids(fulls)
        lengths = []
        for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
            p, f = list(p), list(f)
            if f[: len(p)] != p:
                raise RuntimeError(
                    f"row {i}: the prompt's tokens are not a prefix of prompt+answer's tokens; "
                    "the answer mask would be misplaced"
                )
            if len(f) == len(p):
                raise RuntimeError(f"row {i}: the answer tokenises to nothing")
            lengths.append(len(f) - len(p))
        return lengths

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        prompts, fulls = self.texts(batch)
        images = [decode_png(bytes(png)) for png in _as_list(batch["png"])]
        inputs = dict(self.processor(fulls, images))
        input_ids = torch.as_tensor(inputs["input_ids"])
        attention = torch.as_tensor(inputs["attention_mask"])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, n_answer in enumerate(self.answer_lengths(prompts, fulls)):
            real = torch.nonzero(attention[i], as_tuple=False).flatten()
            # The last n_answer real tokens are the answer, whatever side the padding is on.
            answer_pos = real[-n_answer:]
            labels[i, answer_pos] = input_ids[i, answer_pos]
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = attention
        inputs["labels"] = labels
        return inputs


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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


def greedy_answer(
    module: Any, processor: Any, prompt: str, image: Any, max_new_tokens: int, device: Any, dtype: Any
) -> str:
    """Greedy-decode exactly ``max_new_tokens`` tokens after ``prompt`` (no early stop).

    Every rank runs the same number of forward passes, which ZeRO-3 needs: its parameters
    are gathered collectively on each forward. The text is cut at the first end-of-sequence
    token afterwards.
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = _to_device(processor([prompt], [image]), device, dtype)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = module(input_ids=ids, attention_mask=mask, **inputs).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.ones((1, 1), device=mask.device, dtype=mask.dtype)], 1)
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
) -> dict[str, float]:
    """Val loss (answer tokens) and MCQ accuracy (greedy answer + ``parse_answer``).

    ``rows`` is the whole val subset; rank r takes rows r, r + world, ... and every rank
    runs the same number of samples (a rank short of one repeats a row with weight 0), so
    collective ops under ZeRO-3 stay in step. Sums are all-reduced across ranks.
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_rank = math.ceil(len(rows) / world)
    sums = torch.zeros(4, dtype=torch.float64)  # loss x tokens, tokens, correct, samples
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
            sums += torch.tensor(
                [float(out.loss) * n_tokens * weight, n_tokens * weight, correct * weight, weight],
                dtype=torch.float64,
            )
    if was_training:
        module.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return {
        "val_loss": float(sums[0] / max(sums[1], 1.0)),
        "val_accuracy": float(sums[2] / max(sums[3], 1.0)),
        "val_samples": int(sums[3]),
    }


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
    local = tempfile.mkdtemp(prefix=f"ecgvlm-ckpt-s{position.step}-r{rank}-")
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
    if rank == 0:
        Path(local, CHECKPOINT_STATE).write_text(
            json.dumps({**state, "metrics": dict(metrics)}, indent=2, default=float)
        )
    return local


def _load_checkpoint(engine: Any, checkpoint: Any) -> _Position:
    """Restore LoRA weights, optimizer and scheduler from a Ray Train checkpoint."""
    with checkpoint.as_directory() as directory:
        path, client_state = engine.load_checkpoint(
            os.path.join(directory, CHECKPOINT_DEEPSPEED),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
        )
        if path is None:
            raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state to resume from")
    return _Position(
        int(client_state["step"]), int(client_state["epoch"]), int(client_state["batches_in_epoch"])
    )


def _print_metrics(prefix: str, metrics: Mapping[str, Any]) -> None:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    print(f"[ecgvlm.train] {prefix} " + " ".join(parts), file=sys.stdout, flush=True)


HISTORY_NAME = "metrics.jsonl"


def _append_history(config: TrainConfig, metrics: Mapping[str, Any]) -> None:
    """Rank 0 appends every report to ``<storage_path>/<run_name>/metrics.jsonl``.

    Ray Train's Result keeps only the checkpointed reports; this file is the whole curve
    (resumed runs append, so a step may appear twice). Skipped for URI storage paths.
    """
    if "://" in config.storage_path:
        return
    path = config.run_dir() / HISTORY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(dict(metrics), default=float) + "\n")


def _mean_across_ranks(values: Sequence[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_step(
    engine: Any, collator: Collator, batch: Mapping[str, Any], device: Any, dtype: Any,
    times: _StepTimes,
) -> tuple[float, bool]:
    """One micro-batch: collate, forward, backward, DeepSpeed step; phases timed into ``times``.

    Returns:
        (loss, whether an optimizer step happened, i.e. an accumulation boundary).
    """
    t0 = time.perf_counter()
    inputs = _to_device(collator(batch), device, dtype)
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
    from ecgvlm.model import load_pulse
    from ecgvlm.model.lora import attach_lora

    model, processor = load_pulse(config.model_dir, dtype=dtype, device=device)
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


def train_loop_per_worker(loop_config: Mapping[str, Any]) -> None:
    """Ray Train worker function.

    Args:
        loop_config: ``{"train": TrainConfig as a dict, "deepspeed": DeepSpeed config dict,
            "artifact": {"label_set", "data_manifest_hash", "render_config_hash", "git_sha"}}``
            as built by :func:`make_loop_config`.
    """
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import get_cosine_schedule_with_warmup

    config = config_from_dict(TrainConfig, loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if use_gpu else torch.float32
    ds_config = resolve_deepspeed_config(loop_config["deepspeed"], config, use_gpu)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    # Same seed on every rank: identical LoRA init (DeepSpeed also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model, processor = build_model(config, device, dtype)
    collator = Collator(processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )

    position = _Position()
    resumed_from = -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        position = _load_checkpoint(engine, checkpoint)
        resumed_from = position.step
        if rank == 0:
            _print_metrics("resumed", {"step": position.step, "epoch": position.epoch,
                                       "batches_in_epoch": position.batches_in_epoch})

    val_rows: list[dict[str, Any]] = []
    for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=64, batch_format="numpy"):
        n = len(batch["sample_id"])
        val_rows += [{k: batch[k][i] for k in REQUIRED_COLUMNS} for i in range(n)]
        if len(val_rows) >= config.eval_max_samples:
            break
    val_rows = val_rows[: config.eval_max_samples]

    train_shard = ray.train.get_dataset_shard("train")
    times = _StepTimes()
    loss_sum, loss_count = 0.0, 0
    comm_before = _comm_ms_total()
    engine.train()
    while position.step < config.max_steps:
        batches = iter(
            train_shard.iter_batches(
                batch_size=config.per_device_batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=config.shuffle_buffer_size or None,
                local_shuffle_seed=(config.seed + position.epoch) if config.shuffle_buffer_size else None,
            )
        )
        # Resuming mid-epoch: skip what the checkpointed run had consumed (not decoded).
        for _ in range(position.batches_in_epoch):
            next(batches, None)
        consumed_any = False
        while position.step < config.max_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            consumed_any = True
            times.seconds["data"] += time.perf_counter() - t0
            loss, stepped = train_step(engine, collator, batch, device, dtype, times)
            loss_sum += loss
            loss_count += 1
            position.batches_in_epoch += 1
            if not stepped:
                continue  # inside a gradient accumulation window
            position.step += 1

            if (
                config.fail_at_step is not None
                and position.step == config.fail_at_step
                and rank == min(1, world - 1)
                and config.fail_marker
                and not os.path.exists(config.fail_marker)
            ):
                Path(config.fail_marker).write_text(f"failed at step {position.step}\n")
                raise RuntimeError(f"injected failure at step {position.step} (fail_at_step)")

            is_eval = position.step % config.eval_every_steps == 0 or position.step == config.max_steps
            is_log = position.step % config.log_every_steps == 0
            if not (is_eval or is_log):
                continue
            comm_now = _comm_ms_total()
            times.seconds["comm"] = (comm_now - comm_before) / 1000.0
            comm_before = comm_now
            timing = times.metrics()
            mean_loss, *mean_timing = _mean_across_ranks(
                [loss_sum / max(loss_count, 1)] + list(timing.values())
            )
            metrics: dict[str, Any] = {
                "step": position.step,
                "epoch": position.epoch,
                "train_loss": mean_loss,
                "learning_rate": float(engine.get_lr()[0]),
                "resumed_from_step": resumed_from,
                **dict(zip(timing, mean_timing)),
            }
            # samples/s and tokens/s are per worker above; the run's rate is world x that.
            metrics["samples_per_s"] *= world
            metrics["tokens_per_s"] *= world
            loss_sum, loss_count = 0.0, 0
            times.reset()
            if not is_eval:
                if rank == 0:
                    _print_metrics(f"step {position.step}/{config.max_steps}", metrics)
                    _append_history(config, metrics)
                ray.train.report(metrics)
                continue
            metrics.update(evaluate(engine, collator, val_rows, config, device, dtype))
            if rank == 0:
                _print_metrics(f"step {position.step}/{config.max_steps} eval", metrics)
                _append_history(config, metrics)
            local = _save_checkpoint(
                engine, position, metrics, loop_config.get("artifact", {}), config, zero_stage
            )
            try:
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(local),
                    checkpoint_dir_name=f"checkpoint_step_{position.step:06d}",
                )
            finally:
                shutil.rmtree(local, ignore_errors=True)
            times.reset()
        if position.step >= config.max_steps:
            break
        if not consumed_any:
            raise RuntimeError(
                f"split {config.train_split!r}: this worker's shard yielded no batch of "
                f"{config.per_device_batch_size}; use fewer workers or a smaller batch"
            )
        position.epoch += 1
        position.batches_in_epoch = 0
    if dist.is_initialized():
        dist.barrier()


def make_loop_config(
    config: TrainConfig, deepspeed_config: Mapping[str, Any], summary: DataSummary, git_sha: str | None
) -> dict[str, Any]:
    """The plain-data ``train_loop_config`` handed to every worker."""
    return {
        "train": config_to_dict(config),
        "deepspeed": dict(deepspeed_config),
        "artifact": {
            "label_set": list(summary.label_set),
            "data_manifest_hash": summary.manifest_hash,
            "render_config_hash": summary.render_config_hash,
            "git_sha": git_sha,
        },
    }


# ---------------------------------------------------------------------------------------------
# The driver side: validate, run the TorchTrainer, copy the best adapter
# ---------------------------------------------------------------------------------------------


# The file Ray Train keeps in a run folder once the run has started (used to tell a fresh
# run from one that can be resumed).
_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def check_run_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to silently mix a new run into an old one, or to resume nothing."""
    run_dir = config.run_dir()
    exists = (run_dir / _RUN_SNAPSHOT).exists()
    if resume and not exists:
        raise ConfigError(
            f"--resume: no run {config.run_name!r} to resume under {config.storage_path} "
            f"({run_dir / _RUN_SNAPSHOT} is missing)"
        )
    if not resume and exists:
        raise ConfigError(
            f"run_name {config.run_name!r} already has a run under {config.storage_path}; "
            "pass --resume to continue it or choose another run_name"
        )


def _data_config() -> Any:
    """Train split sharded over workers in a fixed order; val whole on every worker.

    ``preserve_order`` makes block-to-worker assignment deterministic, so a run is
    reproducible for a seed and a resumed run skips exactly the batches it had consumed.
    evaluate() strides the unsplit val rows by rank.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def run_training(config: TrainConfig, resume: bool = False) -> Any:
    """Validate, train, copy the best adapter to ``config.output_dir``; return the Result.

    The caller has connected to Ray (this module never calls ``ray.init``).
    """
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecgvlm.adapter import current_git_sha

    # Workers (and a job's driver, whose cwd is a temporary copy of the working dir) must
    # see the same directories: make local paths absolute here.
    if "://" not in config.storage_path:
        config = dataclasses.replace(
            config,
            storage_path=str(Path(config.storage_path).resolve()),
            output_dir=str(Path(config.output_dir).resolve()),
        )
    deepspeed_config = load_deepspeed_config(config.deepspeed_config)
    summary = check_training_data(config)
    check_run_dir(config, resume)
    git_sha = current_git_sha(Path.cwd())

    if not ray.is_initialized():
        raise RuntimeError("run_training needs a connected Ray (ray.init) first")
    available = ray.cluster_resources()
    need = config.num_workers * config.cpus_per_worker
    if available.get("CPU", 0) < need:
        raise ConfigError(
            f"num_workers x cpus_per_worker = {need:g} CPUs, but the cluster has "
            f"{available.get('CPU', 0):g}"
        )
    if config.use_gpu and available.get("GPU", 0) < config.num_workers:
        raise ConfigError(
            f"num_workers = {config.num_workers} GPU workers, but the cluster has "
            f"{available.get('GPU', 0):g} GPUs"
        )

    # The loop prints its own metric lines; Ray Data's bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    for key, split in (("train", config.train_split), ("val", config.val_split)):
        files = summary.files[split]
        names = set(pq.ParquetFile(files[0]).schema_arrow.names)
        columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
        dataset = ray.data.read_parquet(files, columns=columns)
        if key == "train" and config.train_repeat > 1:
            # Materialised once, so the copies do not re-read the files.
            dataset = dataset.materialize()
            dataset = dataset.union(*[dataset] * (config.train_repeat - 1))
        datasets[key] = dataset

    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "train_config.yaml")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=make_loop_config(config, deepspeed_config, summary, git_sha),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint_num_to_keep,
                checkpoint_score_attribute=config.checkpoint_score_attribute,
                checkpoint_score_order=config.checkpoint_score_order,
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(
        config.checkpoint_score_attribute, config.checkpoint_score_order
    ) or result.checkpoint
    if best is None:
        raise RuntimeError(f"run {config.run_name!r} finished without a checkpoint")
    output = Path(config.output_dir)
    with best.as_directory() as directory:
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(Path(directory) / CHECKPOINT_ADAPTER, output)
    print(f"[jobs.train] best checkpoint {best.path}; adapter copied to {output}", flush=True)
    print(f"[jobs.train] final metrics {result.metrics}", flush=True)
    return result
