"""Hyperparameter search over the training config with Ray Tune (``ecgvlm tune``).

Each trial is a whole training run, :func:`ecgvlm.train.run_training` with the trial's values
(a ``TorchTrainer`` with DeepSpeed, as ``ecgvlm train`` runs it: no second training loop),
launched from a Ray Tune function trial, Ray Train's documented pattern. Every evaluation the
run reports reaches Tune through a Ray Train callback, and ASHA stops the trials whose
validation score trails at its rungs (``eval_every_steps`` apart).

The score ASHA compares and the best trial is chosen by: ``val_accuracy`` with ``val_loss``
breaking ties (``val_accuracy - val_loss / 1e6``; a val subset of a few samples ties often),
or ``-val_loss`` when ``metric: val_loss``.

Layout under ``<storage_path>/<name>/``: Tune's own experiment folder (what ``--resume``
restores), ``train/<name>-<trial id>/`` each trial's Ray Train run (checkpoints,
``metrics.jsonl``), and the output: ``trials.csv``, ``trials.png``, ``best_train_config.yaml``
and the best trial's adapter in ``output_dir``.

Ray is imported inside functions: importing this module is cheap and does no I/O.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import posixpath
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ecgvlm import storage
from ecgvlm.config import (
    ConfigError,
    check_choice,
    check_range,
    coerce_value,
    config_to_dict,
    load_config,
    save_config,
)
from ecgvlm.train.config import TrainConfig, checkpoint_rank
from ecgvlm.train.loop import HISTORY_NAME, PLACEMENT_GROUP_NAME
from ecgvlm.train.run import _RUN_SNAPSHOT, check_output_dir, run_training

#: Distributions a ``search`` entry may name, with the values each takes.
DISTRIBUTIONS = {"loguniform": "[low, high]", "uniform": "[low, high]",
                 "randint": "[low, high] (high included)", "choice": "[value, ...]",
                 "grid": "[value, ...] (each value num_samples times)"}
#: Ray Tune's switch for its own SIGINT handler (read when ``Tuner.fit`` starts).
_NO_TUNE_SIGINT_HANDLER = "TUNE_DISABLE_SIGINT_HANDLER"

#: Training fields a search may not vary: where things are, the run's identity and its size
#: on the cluster (one trial's resources are fixed for the whole search).
FIXED_FIELDS = frozenset({
    *TrainConfig.PATH_FIELDS, "run_name", "train_split", "val_split", "num_workers", "use_gpu",
    "cpus_per_worker", "data_cpus", "lora_alpha", "fail_at_step", "max_failures",
})
METRICS = ("val_accuracy", "val_loss")
#: Logical CPUs each trial's driver function holds (its run's workers hold their own).
TRIAL_DRIVER_CPU = 0.01


class SearchError(RuntimeError):
    """A search that ran and gave nothing to choose from (``ecgvlm tune`` says it in one
    line: it was a traceback, the builtin RuntimeError not being a user error)."""


#: The folder, under the search's, of the trials' Ray Train runs.
TRIALS_DIR = "train"
#: The search's config as it started, in its folder.
SEARCH_CONFIG = "tune_config.yaml"
#: What a resumed search cannot change: Tune restores its space, draws and scheduler as they
#: were and would ignore new ones, while the table and the count of trials read the new.
FIXED_ON_RESUME = ("search", "num_samples", "metric", "seed", "grace_period_steps",
                   "reduction_factor", "train")


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune search over a training config's fields.

    Attributes:
        train_config: The training YAML every trial starts from.
        search: Field -> ``{distribution: values}``: ``loguniform``/``uniform`` ``[low, high]``,
            ``randint`` ``[low, high]`` (both included), ``choice`` ``[v, ...]``, ``grid``
            ``[v, ...]`` (every value, ``num_samples`` times each). Searching
            ``lora_r`` ties ``lora_alpha`` to twice the rank.
        train: Fixed overrides of the training config for every trial (``max_steps`` ...).
        name: The search's name (a folder under ``storage_path``).
        storage_path: Where Tune's experiment and the trials' runs are kept.
        output_dir: Where the best trial's adapter is copied.
        num_samples: Trials drawn (times the values of each ``grid`` entry).
        max_concurrent_trials: Trials running at once; 0 = as many as the cluster's CPUs
            (and GPUs) hold at one trial's size.
        metric: ``val_accuracy`` (val_loss breaks ties) or ``val_loss``.
        grace_period_steps: Steps every trial runs before ASHA may stop it; 0 = the
            training config's ``eval_every_steps``.
        reduction_factor: ASHA keeps the best 1/``reduction_factor`` at each rung.
        seed: Seeds the draws of the search (the trials' own seed is the training config's).
    """

    train_config: str
    search: dict[str, dict[str, list[Any]]]
    train: dict[str, Any] = field(default_factory=dict)
    name: str = "tune"
    storage_path: str = "runs/tune"
    output_dir: str = "runs/tune/best-adapter"
    num_samples: int = 4
    max_concurrent_trials: int = 0
    metric: str = "val_accuracy"
    grace_period_steps: int = 0
    reduction_factor: int = 2
    seed: int = 0

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("train_config", "storage_path", "output_dir")

    def __post_init__(self) -> None:
        check_choice("metric", self.metric, METRICS)
        check_range("num_samples", self.num_samples, 1, 10_000)
        check_range("max_concurrent_trials", self.max_concurrent_trials, 0, 10_000)
        check_range("grace_period_steps", self.grace_period_steps, 0, 10**9)
        check_range("reduction_factor", self.reduction_factor, 2, 100)
        if not self.search:
            raise ConfigError("search: name at least one training field to search over")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        for key, spec in self.search.items():
            where = f"search.{key}"
            if key not in names:
                raise ConfigError(f"{where}: TrainConfig has no field {key!r}")
            if key in FIXED_FIELDS:
                raise ConfigError(f"{where}: {key} is fixed for a whole search (paths, run "
                                  "identity and trial size; lora_alpha follows lora_r)")
            if not isinstance(spec, Mapping) or len(spec) != 1:
                raise ConfigError(f"{where}: one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}; "
                                  f"known: {', '.join(DISTRIBUTIONS)}")
            (kind, values), = spec.items()
            if kind not in DISTRIBUTIONS:
                raise ConfigError(f"{where}: unknown distribution {kind!r}; known: "
                                  f"{', '.join(DISTRIBUTIONS)}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{kind}: expected {DISTRIBUTIONS[kind]}, got {values!r}")
            values = _typed_values(key, kind, values)
            self.search[key] = {kind: values}
            if kind not in ("choice", "grid") and (len(values) != 2 or not values[0] < values[1]
                                     or (kind == "loguniform" and values[0] <= 0)):
                raise ConfigError(f"{where}.{kind}: expected {DISTRIBUTIONS[kind]} with "
                                  f"0 < low < high for loguniform, got {values!r}")
        for key in self.train:
            if key not in names:
                raise ConfigError(f"train.{key}: TrainConfig has no field {key!r}")

    def base_train_config(self) -> TrainConfig:
        """The training config every trial starts from (the file plus ``train``)."""
        overrides = [f"{k}={json.dumps(v)}" for k, v in self.train.items()]
        return load_config(TrainConfig, self.train_config, overrides)

    def experiment_dir(self) -> str:
        """The search's folder: a local path or a URI, as ``storage_path`` is."""
        return storage.join(self.storage_path, self.name)


def _order(metric: str) -> str:
    return "min" if metric == "val_loss" else "max"


def score(metrics: Mapping[str, Any], metric: str) -> float:
    """What ASHA and the choice of the best trial maximise (see the module docstring): the
    rank a trial's run gives its checkpoints (``ecgvlm.train.config.checkpoint_rank``), so
    that the best trial's exported adapter is the evaluation the table names."""
    return checkpoint_rank(metrics, metric, _order(metric))


def _typed_values(key: str, kind: str, values: list[Any]) -> list[Any]:
    """A search entry's values as the training field's type (``1e-4``, which YAML 1.1 reads
    as a string, as a float), checked before any trial runs: a trial would fail on them."""
    field_type = typing.get_type_hints(TrainConfig)[key]
    where = f"search.{key}.{kind}"
    if kind in ("choice", "grid"):
        return [coerce_value(field_type, v, f"{where}[{i}]") for i, v in enumerate(values)]
    numeric = {t for t in (int, float) if t is field_type or t in typing.get_args(field_type)}
    draws = int if kind == "randint" else float
    if draws is float and float not in numeric or not numeric:
        name = getattr(field_type, "__name__", str(field_type))
        raise ConfigError(f"search.{key}: {kind} draws {draws.__name__}s and {key} is {name}; "
                          "use choice or grid" + (", or randint" if int in numeric else ""))
    return [coerce_value(draws, v, f"{where}[{i}]") for i, v in enumerate(values)]


def param_space(config: TuneConfig) -> dict[str, Any]:
    """The search block as Ray Tune distributions."""
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(v[0], v[1]),
        "uniform": lambda v: tune.uniform(v[0], v[1]),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: make[kind](values) for key, spec in config.search.items()
            for kind, values in spec.items()}


def trial_train_config(base: TrainConfig, values: Mapping[str, Any], experiment: str,
                       trial_id: str, metric: str | None = None) -> TrainConfig:
    """The training config of one trial: the base with the drawn values, its own run, and
    its checkpoints ranked by the search's ``metric`` (when given)."""
    changes = dict(values)
    if metric is not None:
        changes |= {"checkpoint_score_attribute": metric,
                    "checkpoint_score_order": _order(metric)}
    if "lora_r" in changes:
        changes["lora_alpha"] = 2 * int(changes["lora_r"])
    run_name = trial_run_name(experiment, trial_id)
    trials = storage.join(experiment, TRIALS_DIR)
    # No restarts inside a trial's run: a failed run fails its trial, which Tune starts again
    # from the run's checkpoint (the search's failure_config); and a run whose placement group
    # the search removed after stopping its trial must not start a new one.
    changes |= {"run_name": run_name, "storage_path": trials,
                "output_dir": storage.join(trials, f"{run_name}-adapter"), "max_failures": 0}
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"trial {trial_id} {dict(values)}: {e}") from e


def _trial(values: dict[str, Any], base: dict[str, Any], experiment: str, metric: str,
           searched: tuple[str, ...] = ()) -> None:
    """One Tune trial: a training run whose evaluations are reported to Tune.

    Raises:
        ConfigError: Tune handed the trial none of a ``searched`` field's value, as when its
            restore fails and it starts a new experiment without the search space (see
            :func:`search_saved`): the trial would train the base config's values as if
            they had been drawn.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReport(TuneReportCallback):
        """Adds ``score`` (what ASHA compares) to each evaluation handed to Tune."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and "val_loss" in metrics[0]:
                metrics = [{**metrics[0], "score": score(metrics[0], metric)}, *metrics[1:]]
                super().after_report(run_context, metrics, checkpoint)

    from ecgvlm.config import config_from_dict

    trial_id = ray.tune.get_context().get_trial_id()
    lost = [k for k in searched if k not in values]
    if lost:
        raise ConfigError(f"trial {trial_id} was handed no value of {', '.join(lost)}: Tune "
                          "could not restore the search and started it again without its "
                          "search space (its log says why); start the search again under a "
                          "new name")
    config = trial_train_config(config_from_dict(TrainConfig, base), values, experiment,
                                trial_id, metric)
    # A restored search restarts unfinished trials: their runs continue from their checkpoint.
    resume = storage.exists(storage.join(config.run_dir(), _RUN_SNAPSHOT))
    run_training(config, resume=resume, callbacks=(ScoreReport(),))


def trial_run_name(experiment: str, trial_id: str) -> str:
    """The training run of a trial: ``<search name>-<trial id>``."""
    return f"{experiment.rstrip('/').rsplit('/', 1)[-1]}-{trial_id}"


def trial_run_dir(experiment: str, trial_id: str) -> str:
    return storage.join(experiment, TRIALS_DIR, trial_run_name(experiment, trial_id))


def free_run_resources(run_dir: str) -> bool:
    """Remove the placement group a trial's run recorded, if it still holds resources.

    Returns whether one was removed. Ray Train removes a run's group when the run ends; a run
    killed with its trial (the scheduler stopped it) keeps it, and its CPUs/GPUs, until the
    search's driver exits (Ray Train's own cleaner did not free them within a minute here).
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = storage.join(run_dir, PLACEMENT_GROUP_NAME)
    if not storage.is_file(path):
        return False
    group = PlacementGroup(ray.PlacementGroupID.from_hex(storage.read_text(path).strip()))
    if ray.util.placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(group)
    return True


def concurrent_trials(config: TuneConfig, base: TrainConfig) -> int:
    """Trials at once: the configured number, or as many as the cluster holds."""
    import ray

    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0.0) // (base.cpus_needed() + TRIAL_DRIVER_CPU))
    if base.use_gpu:
        fits = min(fits, int(total.get("GPU", 0.0) // base.num_workers))
    return max(1, fits)


def search_saved(experiment: str) -> bool:
    """Whether Tune can resume the search in ``experiment``: it wrote ``tuner.pkl`` when the
    search started and an ``experiment_state-<session>.json`` at its first checkpoint of the
    trials, a few seconds later. With only the first, ``Tuner.restore`` (which looks for that
    one) goes on, Tune's controller finds no state, logs "Failed to restore the run state"
    and starts a new experiment from what the restore was given: no search space and one
    sample. A search stopped in its first seconds and resumed ran one trial of the base
    config that way."""
    import ray.tune  # can_restore only looks for tuner.pkl: Ray need not run

    if not ray.tune.Tuner.can_restore(experiment):
        return False
    return any(posixpath.basename(path).startswith("experiment_state-")
               for path in storage.list_files(experiment, suffix=".json"))


def check_search(config: TuneConfig, resume: bool = False) -> tuple[TuneConfig, TrainConfig]:
    """The search and its base training config with their paths resolved, once what would
    stop the search has been checked: an ``output_dir`` whose replacement would delete data
    (:func:`ecgvlm.train.run.check_output_dir`), a search that exists without ``resume`` or
    is missing with it. A search stopped before Tune saved its trials (:func:`search_saved`)
    has nothing to resume: it starts again without ``resume``. Needs no Ray, so a command
    can say it before Ray starts.

    Raises:
        ConfigError: naming the path or the search.
    """
    from ecgvlm.config import resolve_paths

    config = resolve_paths(config, TuneConfig.PATH_FIELDS)
    base = resolve_paths(config.base_train_config(), TrainConfig.PATH_FIELDS)
    check_output_dir(config.output_dir, {"storage_path": config.storage_path,
                                         "data_dir": base.data_dir, "model_dir": base.model_dir},
                     "configs/tune_tiny_cpu.yaml: runs/tune/tiny-cpu-best-adapter")
    experiment = config.experiment_dir()
    exists = search_saved(experiment)
    if resume and not exists:
        import ray.tune  # can_restore only looks for tuner.pkl: Ray need not run

        if ray.tune.Tuner.can_restore(experiment):
            raise ConfigError(f"--resume: search {config.name!r} under {config.storage_path} "
                              "was stopped before Tune saved its trials, so there is nothing "
                              "to resume: rerun without --resume to start it again")
        raise ConfigError(f"--resume: no search {config.name!r} under {config.storage_path}")
    if not resume and exists:
        raise ConfigError(f"search {config.name!r} already exists under {config.storage_path}; "
                          "pass --resume to continue it or choose another name")
    saved = storage.join(experiment, SEARCH_CONFIG)
    if resume and storage.is_file(saved):
        started = load_config(TuneConfig, saved)
        for name, was, now in (d for field_name in FIXED_ON_RESUME for d in _differences(
                field_name, getattr(started, field_name), getattr(config, field_name))):
            raise ConfigError(
                f"--resume: {name} = {now!r} differs from the search's {was!r} ({saved}); a "
                "search's space, trials and scheduler are fixed when it starts (Tune would "
                "go on with the old ones): resume with its values, or start a new name")
    return config, base


def _differences(name: str, was: Any, now: Any) -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, was, now) of each value that differs, nested mappings key by key."""
    if isinstance(was, Mapping) and isinstance(now, Mapping):
        for key in sorted(set(was) | set(now)):
            yield from _differences(f"{name}.{key}", was.get(key), now.get(key))
    elif was != now:
        yield name, was, now


def run_search(config: TuneConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or with ``resume``, continue) the search; write its outputs; return the trials.

    The caller has connected to Ray. Returns one row per trial (see :func:`trial_rows`), the
    best first.

    Raises:
        ConfigError: a bad search or training config, a search that exists without
            ``resume`` or is missing with it.
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from ecgvlm.train.tune_callbacks import FreeStoppedRuns

    config, base = check_search(config, resume)
    storage.check_shared({"storage_path": config.storage_path, "output_dir": config.output_dir})
    experiment = config.experiment_dir()
    trainable = ray.tune.with_parameters(
        _trial, base=config_to_dict(base), experiment=experiment, metric=config.metric,
        searched=tuple(config.search))
    # The trial function only waits on its TorchTrainer, whose workers hold the CPUs/GPUs
    # (Tune refuses a trial of zero resources).
    trainable = ray.tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPU})
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        # max_t past the last step: ASHA stops a trial that reaches max_t itself, which
        # would kill a run that is about to finish on its own.
        scheduler = ASHAScheduler(
            time_attr="step", metric="score", mode="max", max_t=base.max_steps + 1,
            grace_period=config.grace_period_steps or base.eval_every_steps,
            reduction_factor=config.reduction_factor,
        )
        concurrency = concurrent_trials(config, base)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(config),
            tune_config=ray.tune.TuneConfig(
                num_samples=config.num_samples, scheduler=scheduler,
                # Tune applies max_concurrent_trials only to a search algorithm of its own.
                search_alg=BasicVariantGenerator(random_state=config.seed,
                                                 max_concurrent=concurrency),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=config.name, storage_path=config.storage_path, verbose=1,
                # A trial's run does not restart itself (trial_train_config): a failed trial
                # starts again from its run's checkpoint, as often as a run would have.
                failure_config=ray.tune.FailureConfig(max_failures=base.max_failures),
                callbacks=[FreeStoppedRuns(experiment)],
            ),
        )
        save_config(config, storage.join(experiment, SEARCH_CONFIG))
    # Ctrl-C stops the search at once (KeyboardInterrupt), as it stops a training run. Tune's
    # own handler would end the search and return its trials as if it had ended (the one cut
    # short looks stopped by ASHA), and the best so far would be written as the search's best.
    # --resume continues from the state Tune saves as it goes, as after a killed driver. Tune
    # reads the switch when fit starts; the caller's environment is put back after it.
    previous = os.environ.get(_NO_TUNE_SIGINT_HANDLER)
    os.environ[_NO_TUNE_SIGINT_HANDLER] = "1"
    try:
        grid = tuner.fit()
    finally:
        if previous is None:
            os.environ.pop(_NO_TUNE_SIGINT_HANDLER, None)
        else:
            os.environ[_NO_TUNE_SIGINT_HANDLER] = previous
    rows = trial_rows(grid, experiment, config.metric)
    drawn = config.num_samples * math.prod(
        len(values) for spec in config.search.values() for kind, values in spec.items()
        if kind == "grid")
    if len(rows) < drawn:  # as when Tune's restore failed and it started a new experiment
        print(f"[ecgvlm.tune] warning: the search holds {len(rows)} of its {drawn} trials: "
              "Tune did not draw the rest when it resumed (its log says why); the table and "
              "the best trial are of those run. Start the search again under a new name for "
              "all of them", flush=True)
    write_outputs(rows, config, base)
    return rows


def _history(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, HISTORY_NAME)
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _exported(run_dir: str) -> bool:
    """Whether a trial's run exported its adapter (to trial_train_config's output_dir)."""
    return storage.is_file(storage.join(f"{run_dir.rstrip('/')}-adapter", "adapter_config.json"))


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id, which also names its training run."""
    return str(trial.trial_id)


def trial_rows(grid: Any, experiment: str, metric: str) -> list[dict[str, Any]]:
    """One row per trial, the best first: its values, steps reached, its best evaluation,
    whether ASHA stopped it early, its error if it failed."""
    rows = []
    for result in grid:
        # Tune's folder of a trial is its id (trial_dirname), with a suffix added when a
        # restored trial starts again.
        trial_id = str((result.metrics or {}).get("trial_id")
                       or "_".join(str(result.path).rstrip("/").rsplit("/", 1)[-1].split("_")[:2]))
        run_dir = trial_run_dir(experiment, trial_id)
        history = _history(run_dir)
        evals = [r for r in history if "val_loss" in r]
        steps = max((int(r["step"]) for r in history), default=0)
        best = max(evals, key=lambda r: score(r, metric), default=None)
        values = result.config or {}
        rows.append({
            "trial": trial_id,
            **{k: values[k] for k in sorted(values)},
            "steps": steps,
            "best_step": int(best["step"]) if best else None,
            "val_accuracy": best.get("val_accuracy") if best else None,
            "val_loss": best.get("val_loss") if best else None,
            "score": score(best, metric) if best else None,
            # A run that ends by itself exports its adapter; one the scheduler stopped is
            # killed first (and may have logged a step or two past the report it was stopped
            # at). Tune's own record of a trial finished before a --resume holds no result.
            "stopped_early": result.error is None and not _exported(run_dir),
            "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:300],
            "run_dir": run_dir,
        })
    return sorted(rows, key=lambda r: -math.inf if r["score"] is None else r["score"],
                  reverse=True)


def write_outputs(rows: list[dict[str, Any]], config: TuneConfig, base: TrainConfig) -> None:
    """``trials.csv``, ``trials.png``, ``best_train_config.yaml`` and the best adapter.

    Raises:
        SearchError: no trial reached an evaluation (each trial's error is in the table).
    """
    from ray.train import Result

    from ecgvlm.train.run import _export_best_adapter

    experiment = config.experiment_dir()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(experiment, "trials.csv"), table.getvalue())
    print_table(rows)
    plot_trials(rows, storage.join(experiment, "trials.png"), config.metric)
    best = rows[0] if rows and rows[0]["score"] is not None else None
    if best is None:
        raise SearchError(f"no trial of search {config.name!r} reached an evaluation; see "
                           f"{storage.join(experiment, 'trials.csv')}")
    values = {k: best[k] for k in config.search}
    trial_config = trial_train_config(base, values, experiment, best["trial"], config.metric)
    # The best trial's values under the base config's own run name, paths and output, and
    # its restarts (a trial's run has none: Tune restarts the trial): ready for
    # `ecgvlm train --config best_train_config.yaml`.
    best_config = dataclasses.replace(
        trial_config, run_name=base.run_name, storage_path=base.storage_path,
        output_dir=base.output_dir, max_failures=base.max_failures)
    save_config(best_config, storage.join(experiment, "best_train_config.yaml"))
    result = Result.from_path(best["run_dir"])
    _export_best_adapter(dataclasses.replace(trial_config, output_dir=config.output_dir), result)
    print(f"[ecgvlm.tune] best trial {best['trial']} {values}: score {best['score']:.6f} at "
          f"step {best['best_step']}; config {storage.join(experiment, 'best_train_config.yaml')}",
          flush=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The trials as a Markdown table on the console, the best first."""
    skip = {"run_dir", "error"}
    columns = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in skip]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(k)) for k in columns) + " |")
    for row in rows:
        if row["error"]:
            print(f"trial {row['trial']} failed: {row['error']}")


def plot_trials(rows: list[dict[str, Any]], path: str, metric: str) -> None:
    """The score of every evaluation of every trial over steps (stopped trials end early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in rows:
        evals = [r for r in _history(row["run_dir"]) if "val_loss" in r]
        if evals:
            style = "--" if row["stopped_early"] else "-"
            ax.plot([r["step"] for r in evals], [score(r, metric) for r in evals], style,
                    marker="o", label=f"{row['trial']}{' (stopped)' if row['stopped_early'] else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel("val_accuracy - val_loss/1e6" if metric == "val_accuracy" else "-val_loss")
    ax.set_title("score per trial (ASHA stops the dashed ones early)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, image.getvalue())
