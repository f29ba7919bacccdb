"""The Ray Tune callback of ``ecgvlm tune``, in a module of its own: it subclasses
``ray.tune.Callback`` at import (a class Tune pickles with the search must live at module
level), and ``ecgvlm.train.tune`` stays importable without Ray."""

from __future__ import annotations

from typing import Any

import ray.tune

from ecgvlm.train.tune import free_run_resources, trial_run_dir


class FreeStoppedRuns(ray.tune.Callback):
    """Frees the resources of a trial's run as the trial ends (stopped by the scheduler,
    failed or finished: :func:`ecgvlm.train.tune.free_run_resources`)."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment

    def _free(self, trial: Any) -> None:
        free_run_resources(trial_run_dir(self.experiment, trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)
