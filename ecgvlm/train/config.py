"""The training run's config (:class:`TrainConfig`) and its DeepSpeed config.

Both are validated and resolved on the driver, before any worker starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ecgvlm.config import ConfigError, check_choice, check_range

IGNORE_INDEX = -100
# Columns the loop reads from the prepared Parquet shards.
REQUIRED_COLUMNS = ("sample_id", "png", "question", "options", "target_text", "answer_letter")
# Columns read when present (the adapter's label set comes from option_labels).
OPTIONAL_COLUMNS = ("option_labels", "dataset")
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_ADAPTER = "adapter"
CHECKPOINT_DEEPSPEED = "deepspeed"
# Each rank's generator states in a checkpoint (Ray Train merges the ranks' files).
RNG_STATE = "rng_state_rank{rank}.pt"
DEEPSPEED_TAG = "state"
SCORE_METRICS = ("val_accuracy", "val_loss")
#: The metric Ray Train ranks a run's checkpoints by (which to keep, which to export), added
#: to each evaluation: :func:`checkpoint_rank` of the configured one.
CHECKPOINT_RANK = "checkpoint_rank"


def checkpoint_rank(metrics: Mapping[str, Any], attribute: str = "val_accuracy",
                    order: str = "max") -> float:
    """How good an evaluation is, higher better: ``attribute`` in ``order``, the lower
    ``val_loss`` breaking ties (``val_accuracy - val_loss / 1e6`` by default). A val subset of
    a few hundred samples often gives tied accuracies, and Ray Train ranking by the accuracy
    alone made the earliest of tied checkpoints a run's best, while ``ecgvlm tune`` named the
    later one of lower loss: the search's table and its exported adapter disagreed. The
    search's score is this rank. A NaN (a diverged loss) ranks last."""
    loss = float(metrics.get("val_loss", math.inf))
    sign = 1.0 if order == "max" else -1.0
    rank = sign * loss if attribute == "val_loss" else sign * float(metrics[attribute]) - loss / 1e6
    return -math.inf if math.isnan(rank) else rank


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
        data_cpus: Logical CPUs left free for Ray Data's read tasks, which feed the workers
            (with none free they never run and training waits forever).
        schedule_timeout_s: How long the driver waits for the cluster to have the run's CPUs
            (and GPUs) free before failing with the reason, instead of hanging.
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
        eval_max_samples: Val samples per evaluation: a subset of the split drawn with
            ``seed`` and stratified by data set, the same at every evaluation.
        eval_max_new_tokens: Tokens generated per val sample for the MCQ accuracy.
        log_every_steps: Print and log (``metrics.jsonl``) train metrics every this many steps.
        checkpoint_num_to_keep: Checkpoints kept (the best by the score metric, plus the
            latest, which Ray Train never deletes).
        checkpoint_score_attribute: Val metric ranking checkpoints (ties: the lower
            ``val_loss``; :func:`checkpoint_rank`).
        checkpoint_score_order: ``max`` or ``min``.
        max_failures: Worker-group restarts (from the latest checkpoint) before giving up.
        shuffle_buffer_size: Local shuffle buffer (rows) per worker; 0 keeps the data order.
        collate_ahead: Micro-batches each worker fetches and collates (decodes, tiles,
            tokenises) on a thread of its own while it trains on the current one; 0 collates
            on the training thread, between steps. Unset: 1 on GPUs, whose workers' CPUs
            wait on the GPU, and 0 on CPUs, whose forward and backward need the cores the
            thread would take.
        train_repeat: Passes over the train split per Ray Data epoch. Each epoch restarts
            Ray Data's streaming split (seconds); on a tiny data set repeat it so that cost is
            paid once per many steps rather than every step.
        cache_train_below_mb: A train split whose Parquet files total less than this is
            read once and kept in Ray's object store for every epoch: re-reading costs
            seconds of task start-up per epoch even for a few rows. 0: always re-read.
        seed: Seed of model init, LoRA init, the train blocks' order, the val subset and
            shuffling.
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
    data_cpus: float = 1.0
    schedule_timeout_s: float = 60.0
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
    collate_ahead: int | None = None
    train_repeat: int = 1
    cache_train_below_mb: float = 256.0
    seed: int = 0
    profile_comm: bool = False
    fail_at_step: int | None = None
    fail_marker: str | None = None

    # Fields holding local paths: made absolute on the driver before any worker starts
    # (Ray Train workers run in a directory of their own).
    PATH_FIELDS: ClassVar[tuple[str, ...]] = (
        "model_dir", "data_dir", "storage_path", "output_dir", "deepspeed_config", "fail_marker",
    )

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
        check_range("data_cpus", self.data_cpus, 0.01)
        check_range("schedule_timeout_s", self.schedule_timeout_s, 0.0)
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
        if self.collate_ahead is not None:
            check_range("collate_ahead", self.collate_ahead, 0)
        check_range("train_repeat", self.train_repeat, 1)
        check_range("cache_train_below_mb", self.cache_train_below_mb, 0.0)
        if self.fail_at_step is not None:
            check_range("fail_at_step", self.fail_at_step, 1, self.max_steps - 1)
            if not self.fail_marker:
                raise ConfigError("fail_marker must be set with fail_at_step (it makes the failure happen once)")

    def derived_batch_size(self) -> int:
        """Samples per optimizer step over all workers."""
        return self.per_device_batch_size * self.num_workers * self.gradient_accumulation_steps

    def cpus_needed(self) -> float:
        """Logical CPUs the run holds: its workers' plus those kept for the data pipeline."""
        return self.num_workers * self.cpus_per_worker + self.data_cpus

    def run_dir(self) -> str:
        """Ray Train's folder for this run: a local path or a URI, as ``storage_path`` is."""
        from ecgvlm import storage

        return storage.join(self.storage_path, self.run_name)


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
