"""The evaluation configs load, validate by field name, and the pure helpers behave."""

from pathlib import Path

import pytest

from ecgvlm.config import ConfigError, load_config
from ecgvlm.evaluate import EvalConfig, EvaluationError, PredictionStore, explanation_of, split_files

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["evaluate.yaml", "evaluate_demo.yaml"])
def test_configs_load(name):
    path = CONFIGS / name
    assert path.read_text().startswith("#")  # opens with the command that runs it
    config = load_config(EvalConfig, path)
    assert config.models and config.judge.model == "gpt-4o" and config.in_flight() >= 1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"concurrency must be in \[1, 4096\], got 0"):
        load_config(EvalConfig, CONFIGS / "evaluate.yaml", ["concurrency=0"])
    with pytest.raises(ConfigError, match="prior_strategy must be one of 'majority', 'sample'"):
        load_config(EvalConfig, CONFIGS / "evaluate.yaml", ["prior_strategy=mode"])
    with pytest.raises(ConfigError, match="judge: judge.n_samples must be in"):
        load_config(EvalConfig, CONFIGS / "evaluate.yaml", ["judge.n_samples=0"])
    with pytest.raises(ConfigError, match="endpoint must be an http"):
        load_config(EvalConfig, CONFIGS / "evaluate.yaml", ["endpoint=localhost:8000"])


def test_explanation_strips_the_answer_statement():
    assert explanation_of("The answer is B. Irregular RR.") == "Irregular RR."
    assert explanation_of("**Answer: (C)** wide QRS") == "wide QRS"
    assert explanation_of("Wide QRS in V1, so C.") == "Wide QRS in V1, so C."


def test_split_files_and_store_round_trip(tmp_path):
    with pytest.raises(EvaluationError, match="no Parquet shards for split 'test'"):
        split_files(tmp_path, "test")
    store = PredictionStore(tmp_path)
    row = {"sample_id": "s1", "dataset": "d", "model": "m", "true_label": "AF",
           "answer_letter": "A", "predicted_letter": None, "predicted_label": None,
           "explanation": "", "raw_text": "", "error": "Timeout", "latency_s": 1.0,
           "attempts": 4}
    store.append([row])
    # An errored row is asked again on resume (unless retry_errors is off)...
    assert store.done_keys() == set()
    assert store.done_keys(retry_errors=False) == {("s1", "m")}
    # ...and the newer answer replaces it: one row per key, nulls as None.
    store.append([{**row, "error": None, "predicted_letter": "A", "predicted_label": "AF"}])
    frame = store.consolidate()
    assert len(frame) == 1 and frame.loc[0, "predicted_letter"] == "A"
    assert frame.loc[0, "error"] is None
    assert store.done_keys() == {("s1", "m")}
    assert list((tmp_path / "predictions").glob("*.parquet")) == []
