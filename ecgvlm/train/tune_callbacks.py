"""The Ray Tune callback of ``ecgvlm tune``, in a module of its own: it subclasses
``ray.tune.Callback`` at import (a class Tune pickles with the search must live at module
level), and ``ecgvlm.train.tune`` stays importable without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.tune

from ecgvlm.train.tune import TRIALS_DIR, free_run_resources


class FreeStoppedRuns(ray.tune.Callback):
    """Frees the resources of a trial's run as the trial ends (stopped by the scheduler,
    failed or finished: :func:`ecgvlm.train.tune.free_run_resources`)."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment

    def _free(self, trial: Any) -> None:
        experiment = Path(self.experiment)
        free_run_resources(experiment / TRIALS_DIR / f"{experiment.name}-{trial.trial_id}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)
