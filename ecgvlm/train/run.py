"""The driver side: validate, run the ``TorchTrainer``, copy the best adapter."""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ecgvlm import storage
from ecgvlm.config import ConfigError, config_to_dict, resolve_paths, save_config
from ecgvlm.dataset import read_shards
from ecgvlm.train.config import (
    CHECKPOINT_ADAPTER,
    CHECKPOINT_RANK,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TrainConfig,
    checkpoint_rank,
    load_deepspeed_config,
)
from ecgvlm.train.data import DataSummary, check_training_data, read_val_rows, val_sample_ids
from ecgvlm.train.loop import train_loop_per_worker


def make_loop_config(
    config: TrainConfig,
    deepspeed_config: Mapping[str, Any],
    summary: DataSummary,
    git_sha: str | None,
    val: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The plain-data ``train_loop_config`` handed to every worker (``val``: the val rows)."""
    return {
        "train": config_to_dict(config),
        "deepspeed": dict(deepspeed_config),
        "val_rows": list(val or []),
        "artifact": {
            "label_set": list(summary.label_set),
            "data_manifest_hash": summary.data_hash,
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
# The resolved config, written into the run folder when a run starts.
RUN_CONFIG = "train_config.yaml"
# Config fields that shape the learning-rate schedule.
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "max_steps")
# Config fields that decide what a run's evaluations measure: its checkpoints are ranked
# against each other by them (checkpoint_rank), so a resume must keep them.
EVALUATION_FIELDS = ("val_split", "eval_max_samples", "eval_max_new_tokens", "seed",
                     "checkpoint_score_attribute", "checkpoint_score_order")
# What the run started on (run_inputs), written into the run folder when a run starts.
RUN_INPUTS = "run_inputs.json"


def run_inputs(config: TrainConfig, summary: DataSummary) -> dict[str, str | None]:
    """What a run trains on, beyond its config's paths: the prepared data's hash
    (``ecgvlm.dataset.data_hash``) and a fingerprint of the model folder's files
    (``ecgvlm.storage.fingerprint``). Runs started before the data's hash was kept under
    ``data_hash`` hold the manifest file's hash, which a rerun of prepare changed: it is not
    compared."""
    return {"data_hash": summary.data_hash,
            "model_fingerprint": storage.fingerprint(config.model_dir)}


def check_run_dir(config: TrainConfig, resume: bool,
                  inputs: Mapping[str, str | None] | None = None) -> None:
    """Refuse to silently mix a new run into an old one, to resume nothing, or to change
    the learning-rate schedule of a run on resume, or (given ``inputs``, :func:`run_inputs`)
    its data or base model: the same paths may hold a data set prepared again or other
    weights since the run started, and the resumed run would go on on those."""
    run_dir = config.run_dir()
    exists = storage.exists(storage.join(run_dir, _RUN_SNAPSHOT))
    if resume and not exists:
        raise ConfigError(
            f"--resume: no run {config.run_name!r} to resume under {config.storage_path} "
            f"({storage.join(run_dir, _RUN_SNAPSHOT)} is missing)"
        )
    if not resume and exists:
        raise ConfigError(
            f"run_name {config.run_name!r} already has a run under {config.storage_path}; "
            "pass --resume to continue it or choose another run_name"
        )
    saved = storage.join(run_dir, RUN_CONFIG)
    if resume and storage.is_file(saved):
        before = yaml.safe_load(storage.read_text(saved)) or {}
        # The resumed scheduler continues the saved one's step count under the new config's
        # formula: a new horizon or peak would make the learning rate jump.
        schedule = (f"the learning-rate schedule ({', '.join(SCHEDULE_FIELDS)}) is fixed when "
                    "a run starts")
        ranking = ("the run's checkpoints are ranked against each other by evaluations on its "
                   "val subset, chosen when it starts")
        for fields, why in ((SCHEDULE_FIELDS, schedule), (EVALUATION_FIELDS, ranking)):
            for name in fields:
                if name in before and before[name] != getattr(config, name):
                    raise ConfigError(
                        f"--resume: {name} = {getattr(config, name)!r} differs from the run's "
                        f"{before[name]!r} ({saved}); {why}: resume with the run's values, or "
                        "start a new run_name")
    started = storage.join(run_dir, RUN_INPUTS)
    if resume and inputs is not None and storage.is_file(started):
        before = json.loads(storage.read_text(started))
        for name, what, path in (("data_hash", "the prepared data in data_dir",
                                  config.data_dir),
                                 ("model_fingerprint", "the weights in model_dir",
                                  config.model_dir)):
            was, now = before.get(name), inputs.get(name)
            if was and now and was != now:
                raise ConfigError(
                    f"--resume: {what} {path} are not those the run started on ({name} "
                    f"{was} then, {now} now; {started}): the resumed run would mix the two. "
                    "Resume on what the run started on, or start a new run_name")


def check_output_dir(output_dir: str, inputs: Mapping[str, str],
                     example: str = "configs/train_tiny_cpu.yaml: runs/train/tiny-cpu-adapter",
                     ) -> None:
    """Refuse an adapter ``output_dir`` whose replacement would delete something else.

    The best adapter replaces ``output_dir`` whole (``storage.replace_dir``, a rename locally,
    delete-then-upload in an object store), so ``output_dir=runs/train`` (the runs' own
    storage_path) would have deleted every run's checkpoints once the run ended, and
    ``output_dir=runs`` the prepared data too. It must be a new or empty folder, or an
    adapter's (which a new run replaces), and not hold any of ``inputs`` (name -> location).
    ``example``: a shipped config's choice, for the message.

    Raises:
        ConfigError: naming ``output_dir`` and what it holds.
    """
    out = str(output_dir).rstrip("/")
    for name, location in inputs.items():
        path = str(location).rstrip("/")
        if path == out or path.startswith(f"{out}/"):
            raise ConfigError(
                f"output_dir {output_dir} holds {name} {location}: the adapter replaces that "
                f"folder whole, which would delete it; give the adapter a folder of its own "
                f"({example})")
    if storage.is_file(storage.join(out, "adapter_config.json")):
        return
    held = storage.list_files(out, recursive=True)
    if held:
        names = [posixpath.relpath(path, out) for path in held]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(
            f"output_dir {output_dir} already holds files ({shown}) and no adapter: the "
            "adapter replaces that folder whole; give a new folder, or an adapter's to replace")


class TrainResourcesError(ConfigError):
    """The cluster cannot hold the run: too few CPUs or GPUs, or they stay busy."""


def _resources_needed(config: TrainConfig) -> dict[str, float]:
    return {"CPU": config.cpus_needed(), "GPU": float(config.num_workers if config.use_gpu else 0)}


def _cpu_parts(config: TrainConfig) -> str:
    return (f"num_workers x cpus_per_worker = {config.num_workers} x {config.cpus_per_worker:g} "
            f"+ data_cpus {config.data_cpus:g}")


def check_cluster_cpus(config: TrainConfig, cluster_cpus: float) -> None:
    """Raise TrainResourcesError when a cluster of ``cluster_cpus`` logical CPUs can never hold
    the run (its workers and its data reads). ``ecgvlm train`` and ``ecgvlm tune`` call it
    before they start a local Ray (of ``--num-cpus N`` CPUs), which would take seconds to tell
    the same."""
    need_cpus = config.cpus_needed()
    if cluster_cpus < need_cpus - 1e-9:
        raise TrainResourcesError(
            f"the run needs {need_cpus:g} CPUs ({_cpu_parts(config)}) but the cluster has "
            f"{cluster_cpus:g}; lower cpus_per_worker or give Ray more CPUs "
            f"(ecgvlm train --num-cpus {math.ceil(need_cpus)})"
        )


def wait_for_resources(config: TrainConfig) -> None:
    """Return once the cluster has the run's CPUs (and GPUs) free; fail with the reason.

    The workers hold ``num_workers x cpus_per_worker`` CPUs and Ray Data's read tasks need
    ``data_cpus`` more: with the workers holding every CPU the reads never run and Ray Train
    waits forever, so both are counted. A cluster that is too small fails at once; one whose
    CPUs are held by other work fails after ``schedule_timeout_s``.

    Raises:
        TrainResourcesError: naming what the run needs and what the cluster has.
    """
    import ray

    need = _resources_needed(config)
    total = ray.cluster_resources()
    check_cluster_cpus(config, total.get("CPU", 0.0))
    if total.get("GPU", 0.0) < need["GPU"]:
        raise TrainResourcesError(
            f"num_workers = {config.num_workers} GPU workers, but the cluster has "
            f"{total.get('GPU', 0.0):g} GPUs"
        )
    deadline = time.monotonic() + config.schedule_timeout_s
    while True:
        free = ray.available_resources()
        short = {k: v for k, v in need.items() if v and free.get(k, 0.0) < v - 1e-9}
        if not short:
            return
        if time.monotonic() >= deadline:
            have = ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}s" for k in short)
            needs = ", ".join(f"{need[k]:g} {k}s" for k in short)
            raise TrainResourcesError(
                f"the run needs {needs} free ({_cpu_parts(config)}), but after waiting "
                f"{config.schedule_timeout_s:g} s only {have} are free (other tasks or actors "
                "hold the rest)"
            )
        time.sleep(0.5)


def _data_config() -> Any:
    """The train split sharded over workers in a fixed order.

    ``preserve_order`` makes block-to-worker assignment deterministic, so a run is
    reproducible for a seed and a resumed run skips exactly the batches it had consumed.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def build_datasets(config: TrainConfig, summary: DataSummary) -> dict[str, Any]:
    """The Ray dataset the workers read: ``{"train": ...}``.

    Prepared splits are sorted by record id, i.e. grouped by source data set. The train
    split's Parquet shards and blocks are put in an order drawn from ``seed``, the same on
    every run and resume, so that a step does not see one source only; the workers' local
    shuffle buffer then mixes rows across blocks. A split smaller than
    ``cache_train_below_mb`` is read once and kept for every epoch. (The val subset is not
    a Ray dataset: :func:`val_rows` reads it on the driver.)
    """
    import pyarrow.parquet as pq
    import ray.data

    # Data tasks fit in the CPUs kept for them (Ray Data's default is a whole CPU each).
    data_cpus = min(1.0, config.data_cpus)
    files = summary.files[config.train_split]
    names = set(pq.ParquetFile(files[0]).schema_arrow.names)
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
    # Small shards are read several to a block, so the shards' order is drawn at the read (and
    # the blocks' after it); the same seed every epoch and after a resume.
    files_order = ray.data.FileShuffleConfig(seed=config.seed, reseed_after_execution=False)
    train = read_shards(
        files, columns=columns, num_cpus=data_cpus, shuffle=files_order
    ).randomize_block_order(seed=config.seed)
    split_mb = sum(storage.size(f) or 0 for f in files) / 2**20
    if config.train_repeat > 1 or split_mb < config.cache_train_below_mb:
        # Materialised once, so that epochs (and the repeats' copies) do not re-read files.
        train = train.materialize()
    if config.train_repeat > 1:
        # Copy after copy: ``union`` would interleave the copies' blocks, so that one block's
        # rows came train_repeat times in a row.
        train = ray.data.from_arrow_refs(train.to_arrow_refs() * config.train_repeat)
    return {"train": train}


def val_rows(config: TrainConfig, summary: DataSummary) -> list[dict[str, Any]]:
    """The val subset every worker evaluates on: ``eval_max_samples`` rows, a seeded sample
    stratified by data set (:func:`val_sample_ids`)."""
    files = summary.files[config.val_split]
    return read_val_rows(files, val_sample_ids(files, config.eval_max_samples, config.seed))


def pin_ray_address() -> None:
    """Worker setup hook of the private Ray of ``ecgvlm train`` and ``ecgvlm tune``: the
    worker's state-API calls go to its own Ray, also with another Ray on the machine.

    Ray Train's placement-group cleaner asks the state API every second whether the run's
    controller is alive (to free the workers' CPUs if the driver died).
    Without ``RAY_ADDRESS`` the state API finds its Ray by looking for running ones, and with
    two on the machine (``ecgvlm serve``'s in a second shell, as the README has it, or a
    ``ray start`` cluster) it raises "Found multiple active Ray instances", which the cleaner
    does not catch: its thread died with a traceback on the user's console, once per run.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def check_model_dir(config: TrainConfig) -> None:
    """Raise ConfigError naming ``model_dir`` when it is no usable PULSE checkpoint
    (``ecgvlm.model.check_model_dir``, also ``ecgvlm serve``'s check)."""
    from ecgvlm.model import CheckpointError
    from ecgvlm.model import check_model_dir as check_checkpoint_dir

    try:
        check_checkpoint_dir(config.model_dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from e


def check_inputs(config: TrainConfig, resume: bool | None = None) -> DataSummary:
    """Check, without Ray, what a run reads before it launches anything: the DeepSpeed
    config, the prepared data (manifest, Parquet footers, the train split's labels), the
    model folder, the adapter's ``output_dir`` (:func:`check_output_dir`) and, unless
    ``resume`` is None, the run folder (:func:`check_run_dir`).

    ``ecgvlm train`` calls it before Ray starts and hands the summary to
    :func:`run_training`, which otherwise calls it itself; a search's trials each check
    again, in their own processes.

    Raises:
        ConfigError: naming the first input that is missing or cannot be used.
    """
    config = resolve_paths(config, TrainConfig.PATH_FIELDS)  # the summary's paths absolute
    load_deepspeed_config(config.deepspeed_config)
    summary = check_training_data(config)
    check_model_dir(config)
    check_output_dir(config.output_dir, {name: getattr(config, name)
                                         for name in ("storage_path", "data_dir", "model_dir")})
    if resume is not None:
        check_run_dir(config, resume, run_inputs(config, summary) if resume else None)
    return summary


def run_training(config: TrainConfig, resume: bool = False, callbacks: tuple[Any, ...] = (),
                 summary: DataSummary | None = None) -> Any:
    """Validate, train, copy the best adapter to ``config.output_dir``; return the Result.

    The caller has connected to Ray (this module never calls ``ray.init``). ``callbacks`` are
    Ray Train ``UserCallback``s (a search passes one that hands each evaluation to Ray Tune).
    ``summary``: what :func:`check_inputs` returned for this config and ``resume``.
    """
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ecgvlm.adapter import current_git_sha

    # Workers run in a directory of their own (and a job's driver in a temporary copy of the
    # working dir): every path is made absolute here, before anything is launched.
    config = resolve_paths(config, TrainConfig.PATH_FIELDS)
    # The DeepSpeed config is read here, on the driver; the rest is read or written by workers.
    storage.check_shared({name: getattr(config, name)
                          for name in ("model_dir", "data_dir", "storage_path", "output_dir")})
    summary = summary or check_inputs(config, resume)
    deepspeed_config = load_deepspeed_config(config.deepspeed_config)
    git_sha = current_git_sha(Path.cwd())

    if not ray.is_initialized():
        raise RuntimeError("run_training needs a connected Ray (ray.init) first")
    finished = _finished_run(config) if resume else None
    if finished is not None:  # nothing left to train: no worker is started
        print(f"[jobs.train] run {config.run_name!r} already reached max_steps "
              f"{config.max_steps}; nothing to resume", flush=True)
        return _export_best_adapter(config, finished)
    wait_for_resources(config)

    # The loop prints its own metric lines; Ray Data's bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = build_datasets(config, summary)

    save_config(config, storage.join(config.run_dir(), RUN_CONFIG))
    started = storage.join(config.run_dir(), RUN_INPUTS)
    if not resume or not storage.is_file(started):  # a resume keeps the start's
        storage.write_text(started, json.dumps(run_inputs(config, summary), indent=2) + "\n")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=make_loop_config(
            config, deepspeed_config, summary, git_sha, val_rows(config, summary)
        ),
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
                checkpoint_score_attribute=CHECKPOINT_RANK,  # the configured one, ties broken
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    try:
        result = trainer.fit()
    except SystemExit as e:
        # Ctrl-C: fit's own SIGINT handler aborts the run (its checkpoints are kept), and the
        # driver's wait on the aborted controller then ends in SystemExit. It is the user's
        # interruption, said as one (`ecgvlm train` prints how to resume).
        raise KeyboardInterrupt from e
    return _export_best_adapter(config, result)


def _finished_run(config: TrainConfig) -> Any:
    """The run's Ray Train ``Result`` when it already reached ``max_steps``, else None."""
    import logging

    from ray.train import Result

    # Reading the run logs Ray Train's "a run snapshot was found ... will be loaded" notice,
    # which is about a resumed training function: none starts here.
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        result = Result.from_path(config.run_dir())
    finally:
        quiet.setLevel(level)
    return result if (result.metrics or {}).get("step", -1) >= config.max_steps else None


def _export_best_adapter(config: TrainConfig, result: Any) -> Any:
    """Copy the best checkpoint's adapter to ``config.output_dir`` (a folder or a URI);
    return ``result``."""
    # Ranked here from each checkpoint's metrics (checkpoints of runs started before the rank
    # was reported hold none), the earliest of exact ties first, as Ray Train would.
    ranked = [(checkpoint_rank(metrics, config.checkpoint_score_attribute,
                               config.checkpoint_score_order), checkpoint)
              for checkpoint, metrics in result.best_checkpoints or []
              if config.checkpoint_score_attribute in metrics]
    best = max(ranked, key=lambda pair: pair[0])[1] if ranked else result.checkpoint
    if best is None:
        raise RuntimeError(f"run {config.run_name!r} finished without a checkpoint")
    output = config.output_dir
    with best.as_directory() as directory:
        storage.replace_dir(Path(directory) / CHECKPOINT_ADAPTER, output)
    print(f"[jobs.train] best checkpoint {best.path}; adapter copied to {output}", flush=True)
    print(f"[jobs.train] final metrics {result.metrics}", flush=True)
    return result
