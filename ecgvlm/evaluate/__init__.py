"""The evaluation stage: batch predictions over HTTP, metrics, the LLM judge, the report.

Modules:

* :mod:`ecgvlm.evaluate.job`: ``EvalConfig`` and ``evaluate(config)``, the whole job
  (reading the split, the Ray Data pipeline, the judge run, the report);
* :mod:`ecgvlm.evaluate.client`: the HTTP client (retries, model list, one prediction row);
* :mod:`ecgvlm.evaluate.conditions`: the image controls and the printout-artefact sweep
  (the images besides the printout, and their paired comparison);
* :mod:`ecgvlm.evaluate.calibration`: calibration, temperature scaling, abstention;
* :mod:`ecgvlm.evaluate.claims`: explanations checked against the signal's measurements;
* :mod:`ecgvlm.evaluate.memory`: the driver process's allocators (freed memory goes back);
* :mod:`ecgvlm.evaluate.store`: ``predictions.parquet`` and its part files (resume);
* :mod:`ecgvlm.evaluate.metrics`: classification metrics, intervals, the blind baseline;
* :mod:`ecgvlm.evaluate.judge`: the LLM judge and its summaries;
* :mod:`ecgvlm.evaluate.report`: ``report.md``, ``metrics.json``, plots.

``ecgvlm.metrics``, ``ecgvlm.judge`` and ``ecgvlm.report`` are the same modules under their
older names. Nothing here starts Ray or opens a connection on import.
"""

from __future__ import annotations

from ecgvlm.evaluate.client import ChatClient, ChatResult, explanation_of, list_models, predict_one
from ecgvlm.evaluate.conditions import CONTROLS, RobustnessConfig, compare_conditions
from ecgvlm.evaluate.errors import EvaluationError
from ecgvlm.evaluate.job import (
    SPLIT_META_COLUMNS,
    SPLIT_REQUIRED_COLUMNS,
    ChatCaller,
    EvalConfig,
    EvalInputs,
    blind_baseline_rows,
    block_bytes,
    chance_by_dataset,
    check_inputs,
    evaluate,
    expand_pending,
    judge_items,
    pending_pairs,
    read_split_meta,
    reference_description,
    run_judge,
    run_predictions,
    sample_cluster,
    select_samples,
    source_recording,
    split_files,
)
from ecgvlm.evaluate.memory import (
    release_arrow_memory,
    settings_env_vars,
    use_fixed_mmap_threshold,
    use_returning_arrow_pool,
)
from ecgvlm.evaluate.store import PREDICTION_COLUMNS, PredictionStore, prediction_schema

__all__ = [
    "CONTROLS",
    "PREDICTION_COLUMNS",
    "SPLIT_META_COLUMNS",
    "SPLIT_REQUIRED_COLUMNS",
    "ChatCaller",
    "ChatClient",
    "ChatResult",
    "EvalConfig",
    "EvalInputs",
    "EvaluationError",
    "PredictionStore",
    "RobustnessConfig",
    "blind_baseline_rows",
    "block_bytes",
    "chance_by_dataset",
    "check_inputs",
    "compare_conditions",
    "evaluate",
    "expand_pending",
    "explanation_of",
    "judge_items",
    "list_models",
    "pending_pairs",
    "predict_one",
    "prediction_schema",
    "read_split_meta",
    "reference_description",
    "release_arrow_memory",
    "run_judge",
    "run_predictions",
    "sample_cluster",
    "select_samples",
    "settings_env_vars",
    "source_recording",
    "split_files",
    "use_fixed_mmap_threshold",
    "use_returning_arrow_pool",
]
