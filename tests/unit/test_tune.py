"""The search config and the pieces of a search that need no Ray (ecgvlm.train.tune)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from ecgvlm.config import ConfigError, load_config
from ecgvlm.train import TrainConfig
from ecgvlm.train.tune import TuneConfig, score, trial_train_config

REPO = Path(__file__).resolve().parents[2]


def _config(**fields) -> TuneConfig:
    return TuneConfig(**{"train_config": "t.yaml",
                         "search": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}, **fields})


def test_shipped_configs_load_with_their_training_configs(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    for name in ("tune_tiny_cpu.yaml", "tune_pulse_lora.yaml"):
        config = load_config(TuneConfig, REPO / "configs" / name)
        base = config.base_train_config()
        assert base.max_steps == config.train["max_steps"]
        assert config.search and set(config.search) <= {f for f in TrainConfig.__dataclass_fields__}


@pytest.mark.parametrize("search, named", [
    ({"learning_rat": {"uniform": [0, 1]}}, "search.learning_rat: TrainConfig has no field"),
    ({"model_dir": {"choice": ["a", "b"]}}, "search.model_dir: model_dir is fixed"),
    ({"lora_alpha": {"choice": [8, 16]}}, "search.lora_alpha: lora_alpha is fixed"),
    ({"learning_rate": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"learning_rate": {"loguniform": [0, 1e-3]}}, "search.learning_rate.loguniform"),
    ({"learning_rate": {"uniform": [1e-3, 1e-4]}}, "search.learning_rate.uniform"),
    ({"learning_rate": {"choice": []}}, "search.learning_rate.choice"),
    ({"learning_rate": 1e-3}, "search.learning_rate: one distribution"),
    ({"learning_rate": {"choice": [1e-4, "fast"]}},
     "search.learning_rate.choice[1] must be float, got 'fast'"),
    ({"lora_r": {"uniform": [4, 16]}},
     "search.lora_r: uniform draws floats and lora_r is int; use choice or grid, or randint"),
    ({"lora_bias": {"randint": [0, 2]}}, "search.lora_bias: randint draws ints and lora_bias is str"),
    ({}, "search: name at least one"),
])
def test_bad_search_entries_are_named(search, named) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        _config(search=search)


def test_search_values_take_the_fields_types(tmp_path: Path) -> None:
    # As a user writes them in YAML: 1e-4 without a dot is a string to PyYAML (YAML 1.1), and
    # the string '1e-4' < '1e-2' is false, so the bounds were refused (or, in a choice, each
    # trial's config was refused once Ray had started).
    path = tmp_path / "tune.yaml"
    path.write_text("train_config: t.yaml\nsearch:\n  learning_rate: {loguniform: [1e-4, 1e-2]}\n"
                    "  weight_decay: {choice: [0, 1e-2]}\n  lora_r: {randint: [4, 8]}\n")
    config = load_config(TuneConfig, path)
    assert config.search == {"learning_rate": {"loguniform": [1e-4, 1e-2]},
                             "weight_decay": {"choice": [0.0, 0.01]},
                             "lora_r": {"randint": [4, 8]}}
    assert all(type(v) is float for v in config.search["weight_decay"]["choice"])


def test_bad_train_override_and_metric_are_named() -> None:
    with pytest.raises(ConfigError, match="train.max_step: TrainConfig has no field"):
        _config(train={"max_step": 3})
    with pytest.raises(ConfigError, match="metric"):
        _config(metric="val_f1")


def test_a_trial_gets_its_own_run_and_lora_alpha_follows_the_rank(tmp_path: Path) -> None:
    base = TrainConfig(model_dir="m", data_dir="d", lora_r=4, lora_alpha=8)
    trial = trial_train_config(base, {"lora_r": 16, "learning_rate": 3e-4}, str(tmp_path / "s"),
                               "ab_00001")
    assert (trial.lora_r, trial.lora_alpha, trial.learning_rate) == (16, 32, 3e-4)
    assert trial.run_name == "s-ab_00001"
    assert Path(trial.storage_path) == tmp_path / "s" / "train"
    assert Path(trial.output_dir) == tmp_path / "s" / "train" / "s-ab_00001-adapter"
    # A trial's run never restarts itself (Tune restarts the trial): see free_run_resources.
    assert trial.max_failures == 0
    with pytest.raises(ConfigError, match="trial ab_00002"):
        trial_train_config(base, {"warmup_steps": -1}, str(tmp_path / "s"), "ab_00002")
    # Without a metric, the base's ranking; with the search's, its checkpoints are ranked by it.
    assert (trial.checkpoint_score_attribute, trial.checkpoint_score_order) == ("val_accuracy",
                                                                                  "max")
    by_loss = trial_train_config(base, {}, str(tmp_path / "s"), "ab_00003", "val_loss")
    assert (by_loss.checkpoint_score_attribute, by_loss.checkpoint_score_order) == ("val_loss",
                                                                                    "min")


def test_score_is_accuracy_with_loss_breaking_ties() -> None:
    better_loss = {"val_accuracy": 0.5, "val_loss": 1.0}
    worse_loss = {"val_accuracy": 0.5, "val_loss": 2.0}
    more_accurate = {"val_accuracy": 0.75, "val_loss": 900.0}
    assert score(better_loss, "val_accuracy") > score(worse_loss, "val_accuracy")
    assert score(more_accurate, "val_accuracy") > score(better_loss, "val_accuracy")
    assert score(better_loss, "val_loss") == -1.0


def test_a_stopped_trials_run_has_its_placement_group_removed(ray_local, tmp_path: Path) -> None:
    """A run killed with its trial keeps its placement group until the search's driver exits;
    the search's callback removes the group the run recorded when Tune ends the trial. A real
    group on the suite's local Ray; the trial is what the callback reads of Tune's: its id."""
    from types import SimpleNamespace

    from ray.util.placement_group import placement_group, placement_group_table

    from ecgvlm.train.tune import free_run_resources
    from ecgvlm.train.tune_callbacks import FreeStoppedRuns

    experiment = tmp_path / "search"
    trial = SimpleNamespace(trial_id="ab_00001")
    run_dir = experiment / "train" / "search-ab_00001"  # trial_train_config's run
    callback = FreeStoppedRuns(str(experiment))
    callback.on_trial_complete(0, [], trial)  # nothing recorded (never started): nothing to do
    group = placement_group([{"CPU": 1}, {"CPU": 1}])
    assert group.wait(60)
    free_before = ray_local.available_resources()["CPU"]
    run_dir.mkdir(parents=True)
    (run_dir / "placement_group.txt").write_text(group.id.hex() + "\n")
    callback.on_trial_error(0, [], trial)
    assert placement_group_table(group)["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while ray_local.available_resources()["CPU"] < free_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources()["CPU"] >= free_before + 2  # the CPUs came back
    assert free_run_resources(run_dir) is False  # already removed (as after a run that ended)


def _noop_trial(config: dict) -> None:
    """A trainable for a Tuner that is built and never run."""


def test_a_stopped_searchs_hint_says_what_its_rerun_will_accept(tmp_path: Path) -> None:
    """Stopped before Tune saved its trials, a search has nothing to resume: seen by hand,
    Tune's restore of such a folder started a new experiment without the search space."""
    import ray.tune

    from ecgvlm.cli import _tune_resume_hint
    from ecgvlm.train.tune import check_search, param_space

    config = _config(train_config=str(REPO / "configs" / "train_tiny_cpu.yaml"),
                     storage_path=str(tmp_path), name="s", output_dir=str(tmp_path / "best"))
    rerun = f"the search had not saved its state in {tmp_path / 's'} yet: rerun the same command"
    # Stopped before Tune wrote anything (Ray still starting, say).
    assert _tune_resume_hint(config) == rerun
    with pytest.raises(ConfigError, match="--resume: no search 's'"):
        check_search(config, resume=True)
    # Stopped once Tune had written tuner.pkl (building the Tuner writes it) and before its
    # first experiment state: Tuner.can_restore says yes, there is nothing to resume.
    ray.tune.Tuner(_noop_trial, param_space=param_space(config),
                   run_config=ray.tune.RunConfig(name="s", storage_path=str(tmp_path)))
    assert ray.tune.Tuner.can_restore(str(tmp_path / "s"))
    assert _tune_resume_hint(config) == rerun
    with pytest.raises(ConfigError, match=re.escape(
            f"--resume: search 's' under {tmp_path} was stopped before Tune saved its trials, "
            "so there is nothing to resume: rerun without --resume to start it again")):
        check_search(config, resume=True)
    check_search(config)  # the same command starts it again
    # Once Tune has saved its trials (the file its controller resumes from), --resume.
    (tmp_path / "s" / "experiment_state-2026-12-08_00-00-00.json").write_text("{}")
    assert _tune_resume_hint(config) == "rerun with --resume to continue the search"
    check_search(config, resume=True)
    with pytest.raises(ConfigError, match="already exists"):
        check_search(config)


def test_a_resume_that_changes_the_search_is_refused(tmp_path: Path) -> None:
    """Resumed with num_samples=5 (3 at its start), a search ran Tune's 3 and warned that
    Tune had not drawn the other 2, as if Tune had failed; a new space was ignored too."""
    import dataclasses

    from ecgvlm.config import save_config
    from ecgvlm.train.tune import SEARCH_CONFIG, check_search

    config = _config(train_config=str(REPO / "configs" / "train_tiny_cpu.yaml"), num_samples=3,
                     storage_path=str(tmp_path), name="s", output_dir=str(tmp_path / "best"))
    started, _ = check_search(config)
    experiment = tmp_path / "s"
    experiment.mkdir()
    save_config(started, experiment / SEARCH_CONFIG)  # as run_search keeps it
    (experiment / "tuner.pkl").write_bytes(b"")  # Tune's files, as once it saved the trials
    (experiment / "experiment_state-2026-12-08_00-00-00.json").write_text("{}")
    check_search(config, resume=True)
    check_search(dataclasses.replace(config, max_concurrent_trials=1), resume=True)
    for changed, said in [
        ({"num_samples": 5}, "num_samples = 5 differs from the search's 3"),
        ({"search": {"learning_rate": {"loguniform": [1e-4, 5e-2]}}},
         ("search.learning_rate.loguniform = [0.0001, 0.05] differs from the search's "
          "[0.0001, 0.01]")),
        ({"train": {"max_steps": 5}}, "train.max_steps = 5 differs from the search's None"),
        ({"metric": "val_loss"}, "metric = 'val_loss' differs from the search's 'val_accuracy'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"--resume: {said} ({experiment}")):
            check_search(dataclasses.replace(config, **changed), resume=True)


def test_a_trial_handed_no_drawn_value_refuses_to_train_the_base_config() -> None:
    """A search resumed before Tune had saved its trials (now refused) ran a trial of the base
    config's learning rate (5e-3) and warm-up (2, not even among the search's choices) as if
    Tune had drawn them: Tune's restore had started a new search without the space."""
    from ecgvlm.train.tune import _trial

    with pytest.raises(ConfigError, match="was handed no value of learning_rate, warmup_steps"):
        _trial({}, base={}, experiment="unused", metric="val_accuracy",
               searched=("learning_rate", "warmup_steps"))


def test_a_search_whose_trials_all_failed_ends_in_one_line(tmp_path: Path, capsys) -> None:
    from ecgvlm.cli import report_user_errors
    from ecgvlm.train.tune import write_outputs

    config = _config(train_config=str(REPO / "configs" / "train_tiny_cpu.yaml"),
                     storage_path=str(tmp_path), name="s")
    failed = {"trial": "ab_00000", "learning_rate": None, "steps": 0, "best_step": None,
              "val_accuracy": None, "val_loss": None, "score": None, "stopped_early": False,
              "error": "ConfigError: trial ab_00000 was handed no value", "run_dir": "x"}
    status = report_user_errors(
        "tune", lambda: write_outputs([failed], config, config.base_train_config()))
    assert status == 2
    assert capsys.readouterr().err == (
        f"ecgvlm tune: error: no trial of search 's' reached an evaluation; see "
        f"{tmp_path / 's' / 'trials.csv'}\n")
    assert "ConfigError: trial ab_00000" in (tmp_path / "s" / "trials.csv").read_text()
