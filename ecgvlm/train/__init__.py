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
``trainer_state.json`` (step, epoch, batches consumed in that epoch, metrics) and
``rng_state_rank<r>.pt`` (each rank's generator states, so dropout continues exactly). Every rank
writes its own files into its own local directory; Ray Train merges them into one directory
in storage.

Torch, DeepSpeed, Ray and PIL are imported inside functions: importing this module is cheap
and does no I/O.
"""

from ecgvlm.train.config import (
    CHECKPOINT_ADAPTER,
    CHECKPOINT_DEEPSPEED,
    CHECKPOINT_STATE,
    DEEPSPEED_TAG,
    IGNORE_INDEX,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SCORE_METRICS,
    TrainConfig,
    load_deepspeed_config,
    resolve_deepspeed_config,
)
from ecgvlm.train.data import (
    Collator,
    DataSummary,
    TrainDataError,
    check_training_data,
    decode_png,
    read_val_rows,
    split_files,
    stratified_sample,
    val_sample_ids,
)
from ecgvlm.train.loop import (
    HISTORY_NAME,
    build_model,
    collated_ahead,
    evaluate,
    greedy_answer,
    train_loop_per_worker,
    train_step,
)
from ecgvlm.train.run import (
    TrainResourcesError,
    build_datasets,
    check_inputs,
    check_run_dir,
    make_loop_config,
    run_training,
    val_rows,
    wait_for_resources,
)

__all__ = [
    "CHECKPOINT_ADAPTER",
    "CHECKPOINT_DEEPSPEED",
    "CHECKPOINT_STATE",
    "DEEPSPEED_TAG",
    "HISTORY_NAME",
    "IGNORE_INDEX",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCORE_METRICS",
    "Collator",
    "DataSummary",
    "TrainConfig",
    "TrainDataError",
    "TrainResourcesError",
    "build_datasets",
    "build_model",
    "check_inputs",
    "check_run_dir",
    "check_training_data",
    "collated_ahead",
    "decode_png",
    "evaluate",
    "greedy_answer",
    "load_deepspeed_config",
    "make_loop_config",
    "read_val_rows",
    "resolve_deepspeed_config",
    "run_training",
    "split_files",
    "stratified_sample",
    "train_loop_per_worker",
    "train_step",
    "val_rows",
    "val_sample_ids",
    "wait_for_resources",
]
