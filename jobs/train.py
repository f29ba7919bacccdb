"""LoRA-fine-tune PULSE with Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python -m jobs.train --config configs/train_pulse_lora.yaml
    python -m jobs.train --config configs/train_tiny_cpu.yaml [--resume] [key=value ...]

Validates the config and the prepared data before any worker starts, runs the
``TorchTrainer``, and copies the best checkpoint's adapter to ``output_dir``. ``--resume``
continues the run named ``run_name`` under ``storage_path`` from its latest checkpoint (Ray
Train restores a run from its storage folder when the name and path match).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecgvlm.adapter import current_git_sha
from ecgvlm.config import ConfigError, load_config, save_config
from ecgvlm.train import (
    CHECKPOINT_ADAPTER,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TrainConfig,
    check_training_data,
    load_deepspeed_config,
    make_loop_config,
    train_loop_per_worker,
)

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

    Starts a local Ray unless one is running or an address is given (``RAY_ADDRESS``, as
    ``ray job submit`` sets).
    """
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    git_sha = current_git_sha(Path(__file__).resolve().parent)

    if not ray.is_initialized():
        accelerator = os.environ.get("DS_ACCELERATOR", "cuda" if config.use_gpu else "cpu")
        ray.init(runtime_env={"env_vars": {"DS_ACCELERATOR": accelerator}})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML TrainConfig")
    parser.add_argument("--resume", action="store_true", help="continue run_name's latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
        run_training(config, resume=args.resume)
    except ConfigError as e:
        print(f"jobs.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
