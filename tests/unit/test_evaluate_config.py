"""The evaluation configs load, validate by field name, and the pure helpers behave."""

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from ecgvlm.config import ConfigError, config_from_dict, load_config
from ecgvlm.evaluate import (
    EvalConfig,
    EvaluationError,
    PredictionStore,
    explanation_of,
    read_split_meta,
    sample_cluster,
    select_samples,
    split_files,
)

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
    with pytest.raises(ConfigError, match=r"unknown key\(s\) prior_strategy for EvalConfig"):
        load_config(EvalConfig, CONFIGS / "evaluate.yaml", ["prior_strategy=majority"])
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
    # A row without an answer mode (written before modes existed) was generated text.
    assert store.done_keys(retry_errors=False) == {("s1", "m", "generate", "normal")}
    # ...and the newer answer replaces it: one row per key, nulls as None.
    store.append([{**row, "error": None, "predicted_letter": "A", "predicted_label": "AF"}])
    frame = store.consolidate()
    assert len(frame) == 1 and frame.loc[0, "predicted_letter"] == "A"
    assert frame.loc[0, "error"] is None
    assert store.done_keys() == {("s1", "m", "generate", "normal")}
    assert list((tmp_path / "predictions").glob("*.parquet")) == []
    # The same sample and model answered by constrained choice is another prediction, and
    # its option probabilities come back as they were written.
    store.append([{**row, "error": None, "answer_mode": "choice", "predicted_letter": "B",
                   "option_probs": [0.25, 0.5, 0.125, 0.125]}])
    frame = store.consolidate()
    assert len(frame) == 2 and store.done_keys() == {("s1", "m", "generate", "normal"), ("s1", "m", "choice", "normal")}
    choice = frame[frame["answer_mode"] == "choice"].iloc[0]
    assert list(choice["option_probs"]) == [0.25, 0.5, 0.125, 0.125]
    assert frame[frame["answer_mode"] == "generate"].iloc[0]["option_probs"] is None


@pytest.mark.parametrize("window_rows", [8192, 7])
def test_consolidation_keeps_the_newest_row_per_key_in_sorted_order(tmp_path, window_rows):
    import random

    import pyarrow.parquet as pq

    from ecgvlm.evaluate.store import KEY_COLUMNS

    rng = random.Random(3)
    written = []
    store = PredictionStore(tmp_path)
    store.window_rows = window_rows  # 7: the rows go through many pieces, each source to several
    order = ["model", "answer_mode", "condition", "dataset", "sample_id"]
    for consolidation in range(2):  # the second merges the first's file with new parts
        for part in range(4):  # keys in random order, repeated within and across parts
            # A few rows without a sample id: a null key is a key like any other.
            rows = [{"sample_id": f"s{rng.randrange(40)}" if rng.random() > 0.03 else None,
                     "dataset": rng.choice(["mitdb", "cpsc2018"]),
                     "model": rng.choice(["pulse", "gpt-4o"]), "answer_mode": rng.choice(["choice", "generate"]),
                     "condition": rng.choice(["normal", "blank"]),
                     "predicted_letter": f"{consolidation}.{part}.{i}",
                     "explanation": "x" * rng.randrange(50), "split": "test", "prompt_version": "v"}
                    for i in range(60)]
            store.append(rows)
            written += rows
        # The reference: the last written row of each key, sorted by the file's order.
        expected = (pd.DataFrame(written).drop_duplicates(list(KEY_COLUMNS), keep="last")
                    .sort_values(order)[[*order, "predicted_letter", "explanation"]].reset_index(drop=True))
        frame = store.consolidate()
        assert frame[list(expected.columns)].equals(expected)
        stored = pq.read_table(tmp_path / "predictions.parquet").to_pandas()
        assert stored[list(expected.columns)].equals(expected)
        assert list((tmp_path / "predictions").glob("*.parquet")) == []
    lean = store.consolidate(columns=["predicted_letter"])
    assert list(lean.columns) == [*KEY_COLUMNS, "predicted_letter"]
    assert lean["predicted_letter"].equals(expected["predicted_letter"])


def test_a_failed_consolidation_loses_no_prediction(tmp_path):
    store = PredictionStore(tmp_path)
    row = {"sample_id": "s1", "dataset": "d", "model": "m", "true_label": "AF",
           "answer_letter": "A", "predicted_letter": "A", "split": "test"}
    store.append([row])
    store.consolidate()
    before = (tmp_path / "predictions.parquet").read_bytes()
    store.append([{**row, "sample_id": "s2"}])
    store.append([{**row, "sample_id": "s3"}])
    parts = sorted((tmp_path / "predictions").glob("*.parquet"))
    # Reading the newest part's rows fails once its keys have been read.
    original = PredictionStore._normalized

    def failing(table, schema):
        if "s3" in table.column("sample_id").to_pylist() and "explanation" in schema.names:
            raise OSError("disk full")
        return original(table, schema)

    store._normalized = failing
    with pytest.raises(OSError, match="disk full"):
        store.consolidate()
    # The old file and every part are still there; a consolidation that works merges them.
    assert (tmp_path / "predictions.parquet").read_bytes() == before
    assert sorted((tmp_path / "predictions").glob("*.parquet")) == parts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions", "predictions.parquet"]
    store._normalized = original
    assert list(store.consolidate()["sample_id"]) == ["s1", "s2", "s3"]


def test_split_meta_stays_in_arrow_memory_and_reads_back_plain_rows(tmp_path):
    from ecgvlm.dataset import iter_shard_rows
    from ecgvlm.evaluate.job import SPLIT_META_COLUMNS
    from tests.fakes.mcq_split import sample_rows, write_split

    rows = sample_rows(3, measurements=True)
    rows[0]["target_text"] = None
    files = split_files(write_split(tmp_path, rows), "test")
    meta = read_split_meta(files)
    # Arrow buffers, not a Python object per field (20k rows: 107 -> 41 MB, docs/evaluate.md).
    assert all(isinstance(dtype, pd.ArrowDtype) for dtype in meta.dtypes), meta.dtypes
    # What the driver holds for every sample: no image, no texts (they are read where needed).
    assert list(meta.columns) == [*SPLIT_META_COLUMNS, "record_id"]
    first = meta[meta["sample_id"] == rows[0]["sample_id"]].to_dict("records")[0]
    assert first == {k: rows[0][k] for k in meta.columns} and isinstance(first["option_labels"], list)
    # The texts of some samples, read by filter: those samples only, nulls as None.
    wanted = {rows[0]["sample_id"], rows[4]["sample_id"]}
    read = list(iter_shard_rows(files, ["sample_id", "target_text", "options", "not_a_column"], wanted))
    assert sorted(r["sample_id"] for r in read) == sorted(wanted)
    by_id = {r["sample_id"]: r for r in read}
    assert by_id[rows[0]["sample_id"]] == {k: rows[0][k] for k in ("sample_id", "target_text", "options")}
    assert by_id[rows[0]["sample_id"]]["target_text"] is None
    assert list(iter_shard_rows(files, ["sample_id"], set())) == []
    # A split without a column the pipeline needs is refused before anything runs.
    bare = split_files(write_split(tmp_path / "bare", [{k: v for k, v in r.items() if k != "question"}
                                                        for r in rows]), "test")
    with pytest.raises(EvaluationError, match="lack column.*question"):
        read_split_meta(bare)


def test_answer_mode_takes_a_list_or_one_mode():
    base = {"data_dir": "d"}
    assert config_from_dict(EvalConfig, base).answer_mode == ("choice", "generate")
    assert config_from_dict(EvalConfig, base).table1_mode == "choice"
    one = config_from_dict(EvalConfig, {**base, "answer_mode": "generate"})
    assert one.answer_mode == ("generate",) and one.table1_mode == "generate"
    with pytest.raises(ConfigError, match="answer_mode must be one of 'choice', 'generate', got 'greedy'"):
        config_from_dict(EvalConfig, {**base, "answer_mode": ["greedy"]})
    with pytest.raises(ConfigError, match="answer_mode must list"):
        config_from_dict(EvalConfig, {**base, "answer_mode": []})
    with pytest.raises(ConfigError, match="calibration: .*not both"):
        config_from_dict(EvalConfig, {**base, "calibration": {"abstain_below": 0.5,
                                                              "target_accuracy": 0.9}})


def _long_recordings_meta():
    """Windows of two long recordings and one short one, MIT-BIH style ids."""
    rows = []
    for rec, n in (("mitdb/100", 60), ("mitdb/101", 60), ("mitdb/102", 4)):
        for k in range(n):
            rows.append({"sample_id": f"{rec}@{k * 10}s#q0", "dataset": "mitdb",
                         "record_id": f"{rec}@{k * 10}s", "patient_id": ""})
    rows.append({"sample_id": "cpsc2018/A0001#q0", "dataset": "cpsc2018",
                 "record_id": "cpsc2018/A0001", "patient_id": "A0001"})
    return pd.DataFrame(rows)


def test_limit_per_dataset_is_a_seeded_sample_spread_across_recordings():
    meta = _long_recordings_meta()
    chosen = select_samples(meta, (), 12, seed=0)
    mitdb = chosen[chosen["dataset"] == "mitdb"]
    per_rec = mitdb["record_id"].str.split("@").str[0].value_counts().to_dict()
    # 12 over three recordings: 4 each (the short one has exactly 4), not 12 of one.
    assert per_rec == {"mitdb/100": 4, "mitdb/101": 4, "mitdb/102": 4}
    # Not the alphabetical first windows ("@0s, @100s, @110s, ...") of a recording.
    first = sorted(meta[meta["record_id"].str.startswith("mitdb/100@")]["sample_id"])[:4]
    assert set(mitdb["sample_id"]) != set(first) and not set(first) <= set(mitdb["sample_id"])
    # Seeded: the same again, another seed another sample; no limit keeps everything.
    assert chosen.equals(select_samples(meta, (), 12, seed=0))
    assert set(select_samples(meta, (), 12, seed=1)["sample_id"]) != set(chosen["sample_id"])
    assert len(select_samples(meta, (), 0)) == len(meta)
    assert list(chosen[chosen["dataset"] == "cpsc2018"]["sample_id"]) == ["cpsc2018/A0001#q0"]


def test_clusters_are_patients_else_source_recordings():
    assert sample_cluster({"sample_id": "mitdb/100@10s#q0", "dataset": "mitdb",
                           "record_id": "mitdb/100@10s", "patient_id": ""}) == "recording:mitdb/100"
    assert sample_cluster({"sample_id": "ptbxl/1#q0", "dataset": "ptbxl", "record_id": "ptbxl/1",
                           "patient_id": "15709"}) == "patient:ptbxl/15709"
    # Splits written without record_id still give the recording (from the sample id).
    assert sample_cluster({"sample_id": "mitdb/100@10s#q0", "dataset": "mitdb"}) == "recording:mitdb/100"


def test_the_clusters_of_a_split_are_each_samples_own():
    from ecgvlm.evaluate.job import SampleClusters

    meta = pd.DataFrame({
        "sample_id": ["ptbxl/9#q0", "mitdb/100@10s#q0", "ptbxl/1#q0", "mitdb/100@20s#q1",
                      "chapman/Müller#q0"],
        "dataset": ["ptbxl", "mitdb", "ptbxl", "mitdb", "chapman"],
        "record_id": ["ptbxl/9", "mitdb/100@10s", "ptbxl/1", "mitdb/100@20s", "chapman/Müller"],
        "patient_id": ["15709", "", "15709", None, ""],
    }, dtype="string[pyarrow]")
    clusters = SampleClusters(meta)
    expected = {"ptbxl/9#q0": "patient:ptbxl/15709", "ptbxl/1#q0": "patient:ptbxl/15709",
                "mitdb/100@10s#q0": "recording:mitdb/100", "mitdb/100@20s#q1": "recording:mitdb/100",
                "chapman/Müller#q0": "recording:chapman/Müller"}
    assert dict(clusters) == expected and len(clusters) == 5
    assert clusters["chapman/Müller#q0"] == "recording:chapman/Müller"
    # Not a sample of the split: absent, also an id that a stored one begins with or extends.
    for missing in ("ptbxl/9", "ptbxl/9#q0 ", "zzz", "", 7):
        assert missing not in clusters and clusters.get(missing) is None
    with pytest.raises(KeyError, match="ptbxl/2#q0"):
        clusters["ptbxl/2#q0"]
    assert dict(SampleClusters(meta.iloc[:0])) == {}


def test_resume_refuses_predictions_of_another_split_or_prompt_version(tmp_path):
    store = PredictionStore(tmp_path)
    store.check_resumable("test", "v1")  # nothing stored: anything goes
    row = {"sample_id": "s1", "dataset": "d", "model": "m", "true_label": "AF",
           "answer_letter": "A", "prompt_version": "v1", "split": "test"}
    store.append([row])
    store.check_resumable("test", "v1")
    with pytest.raises(EvaluationError, match="holds predictions of split test, this run asks split val"):
        store.check_resumable("val", "v1")
    with pytest.raises(EvaluationError, match="prompt_version v1, this run asks prompt_version v2"):
        store.check_resumable("test", "v2")
    # Rows that never recorded their split cannot be vouched for either.
    store.append([{**row, "sample_id": "s2", "split": None}])
    with pytest.raises(EvaluationError, match="split test, unrecorded"):
        store.check_resumable("test", "v1")


def test_resume_refuses_predictions_of_another_data_set_or_other_weights(tmp_path):
    store = PredictionStore(tmp_path)
    asked = {"pulse": "aaaa", "pulse-lora": "bbbb"}
    store.record_inputs("runs/prepared", "d1", asked)
    store.check_same_inputs("d2", {"pulse-lora": "cccc"})  # no predictions yet: anything goes
    store.append([{"sample_id": "s1", "dataset": "d", "model": "pulse", "split": "test"}])
    store.check_same_inputs("d1", asked)
    store.check_same_inputs(None, {"gpt-4o": "x"})  # unknown on one side: nothing compared
    with pytest.raises(EvaluationError) as raised:
        store.check_same_inputs("d2", asked)
    assert str(raised.value) == (
        f"{tmp_path} holds predictions on the prepared data set d1 (runs/prepared); this "
        "run's data_dir holds d2: use another output_dir (resuming would mix two experiments)")
    with pytest.raises(EvaluationError) as raised:
        store.check_same_inputs("d1", {"pulse": "aaaa", "pulse-lora": "cccc"})
    assert str(raised.value) == (
        f"{tmp_path} holds pulse-lora's answers from other weights (fingerprint bbbb); the "
        "endpoint serves pulse-lora with cccc now (a retrained adapter or another checkpoint "
        "under the same name): use another output_dir (resuming would mix the two), or leave "
        "pulse-lora out of models")
    from ecgvlm.evaluate.job import prepared_dataset_id

    assert prepared_dataset_id(tmp_path) is None  # a folder of shards, no manifest
    (tmp_path / "manifest.json").write_text('{"dataset_id": "d1", "splits": {}}')
    assert prepared_dataset_id(tmp_path) == "d1"
    # A later run that asks another model adds it; one without a manifest keeps the id.
    store.record_inputs("runs/prepared", None, {"pulse-lora:b": "dddd"})
    store.check_same_inputs("d1", {**asked, "pulse-lora:b": "dddd"})
    with pytest.raises(EvaluationError, match="pulse-lora:b's answers from other weights"):
        store.check_same_inputs("d1", {"pulse-lora:b": "eeee"})


def test_resume_refuses_answers_generated_with_other_settings(tmp_path):
    """A quick run with max_tokens 8 into the output_dir of the real one left its cut
    answers as the real run's."""
    from ecgvlm.evaluate.job import generation_settings

    config = EvalConfig(data_dir="runs/prepared", max_tokens=8)
    store = PredictionStore(tmp_path)
    store.record_inputs("runs/prepared", "d1", {}, generation_settings(config))
    store.append([{"sample_id": "s1", "dataset": "d", "model": "pulse", "split": "test"}])
    store.check_same_inputs("d1", {}, generation_settings(config))
    longer = generation_settings(dataclasses.replace(config, max_tokens=256))
    with pytest.raises(EvaluationError) as raised:
        store.check_same_inputs("d1", {}, longer)
    assert str(raised.value) == (
        f"{tmp_path} holds answers generated with max_tokens 8; this run asks max_tokens "
        "256: use another output_dir (resuming would keep the old answers as this run's), or "
        "set max_tokens: 8")
    sampled = generation_settings(dataclasses.replace(config, temperature=0.7))
    with pytest.raises(EvaluationError, match="generated with temperature 0.0; this run asks"):
        store.check_same_inputs("d1", {}, sampled)
    # A folder written before the settings were kept compares nothing.
    (tmp_path / "inputs.json").write_text('{"dataset_id": "d1", "fingerprints": {}}')
    store.check_same_inputs("d1", {}, longer)


def test_an_endpoint_without_its_v1_is_named_with_the_likely_fix():
    from ecgvlm.evaluate.client import list_models
    from tests.fakes.openai_server import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        assert list_models(server.base_url)  # the models it serves
        root = server.base_url.removesuffix("/v1")
        for given in (root, f"{root}/"):
            with pytest.raises(EvaluationError) as raised:
                list_models(given)
            assert str(raised.value).endswith(f"; did you mean endpoint={root}/v1?")
            assert str(raised.value).startswith(f"endpoint {given} did not list its models: ")
