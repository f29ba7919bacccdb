"""ecgvlm.storage against a local folder, a file:// URI and a real S3-compatible server (moto
on loopback): the same calls, the same results."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ecgvlm import storage
from ecgvlm.evaluate.store import PredictionStore


@pytest.fixture(params=["local", "file", "s3"])
def location(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return f"file://{tmp_path}/out"
    server = request.getfixturevalue("s3_server")
    assert server.endpoint.startswith("http://127.0.0.1:")
    return f"s3://ecgvlm/unit/{tmp_path.name}"


def test_files_round_trip_on_every_store(location: str) -> None:
    storage.check_writable(location)
    storage.write_text(storage.join(location, "a", "b.json"), '{"x": 1}')
    storage.write_bytes(storage.join(location, "c.parquet"), b"PAR1")
    assert storage.read_text(storage.join(location, "a", "b.json")) == '{"x": 1}'
    assert storage.size(storage.join(location, "c.parquet")) == 4
    assert storage.size(storage.join(location, "nothing")) is None
    assert storage.is_dir(storage.join(location, "a"))
    assert not storage.is_file(storage.join(location, "a"))
    # Listings give locations of the caller's kind: a URI's files as URIs.
    assert storage.list_files(location) == [storage.join(location, "c.parquet")]
    assert storage.list_files(location, recursive=True) == [
        storage.join(location, "a", "b.json"), storage.join(location, "c.parquet")]
    assert storage.list_files(location, ".json", recursive=True) == [
        storage.join(location, "a", "b.json")]
    assert storage.list_files(storage.join(location, "missing")) == []
    storage.write_text(storage.join(location, "a", "b.json"), "replaced")
    assert storage.read_text(storage.join(location, "a", "b.json")) == "replaced"
    storage.delete(storage.join(location, "a"))
    assert storage.list_files(location, recursive=True) == [storage.join(location, "c.parquet")]
    storage.delete(storage.join(location, "a"))  # nothing there: no error


def test_a_local_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"1")
    storage.write_bytes(str(target), b"22")
    assert target.read_bytes() == b"22"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_a_whole_file_output_replaces_the_file_or_leaves_the_old_one(location: str) -> None:
    target = storage.join(location, "sub", "p.bin")
    with storage.whole_file_output(target) as sink:
        sink.write(b"old")
    assert storage.read_bytes(target) == b"old"
    # A failure in the middle leaves the old file and, on a disk, no temporary file.
    with pytest.raises(RuntimeError, match="half way"):
        with storage.whole_file_output(target) as sink:
            sink.write(b"new, ")
            raise RuntimeError("half way")
    assert storage.read_bytes(target) == b"old"
    assert storage.list_files(storage.join(location, "sub")) == [target]
    local = storage.local_path(target)
    if local is not None:
        assert sorted(p.name for p in Path(local).parent.iterdir()) == ["p.bin"]
    with storage.whole_file_output(target) as sink:
        sink.write(b"new, whole")
    assert storage.read_bytes(target) == b"new, whole"


def test_join_keeps_the_scheme() -> None:
    assert storage.join("s3://b/prefix/", "x", "y.parquet") == "s3://b/prefix/x/y.parquet"
    assert storage.join("/data/run", "x") == "/data/run/x"
    assert storage.local_path("file:///data/run") == "/data/run"
    assert storage.local_path("s3://b/run") is None


def test_a_missing_bucket_is_named_before_anything_runs(s3_server) -> None:
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket'"):
        storage.check_writable("s3://no-such-bucket/prepared")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket'"):
        storage.check_creatable("s3://no-such-bucket/prepared")


def test_the_shipped_configs_placeholder_bucket_is_named_at_once(capsys) -> None:
    """configs/*_pulse_lora.yaml and prepare_study.yaml name s3://YOUR-BUCKET until edited; an
    unedited one failed after seconds of retries with AWS's "Could not resolve host"."""
    from ecgvlm.cli import main

    with pytest.raises(storage.StorageError, match=r"^s3://YOUR-BUCKET/x/y: YOUR-BUCKET is the "
                       "shipped configs' placeholder: put your bucket there"):
        storage.is_file("s3://YOUR-BUCKET/x/y")
    config = Path(__file__).resolve().parents[2] / "configs" / "train_pulse_lora.yaml"
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "ecgvlm train: error: s3://YOUR-BUCKET/prepared/study-v1/manifest.json: YOUR-BUCKET is "
        "the shipped configs' placeholder: put your bucket there (README, \"On a GPU cluster\": "
        "the sed line) or give the path as an override\n")


def test_a_folder_that_could_be_made_is_not_made_by_the_check_and_both_checks_say_one_thing(tmp_path: Path) -> None:
    storage.check_creatable(tmp_path / "runs" / "prepared")
    storage.check_creatable(f"file://{tmp_path}/runs/prepared")
    assert not (tmp_path / "runs").exists()  # a job refused later leaves nothing behind
    storage.check_writable(tmp_path / "runs" / "prepared")
    assert (tmp_path / "runs" / "prepared").is_dir()
    (tmp_path / "notes.txt").write_text("a file")
    # One message for one error, whether the CLI checks before Ray starts or the library after.
    for check in (storage.check_creatable, storage.check_writable):
        with pytest.raises(storage.StorageError,
                           match=f"folder {tmp_path}/notes.txt/prepared: {tmp_path}/notes.txt is not a folder"):
            check(tmp_path / "notes.txt" / "prepared")
        with pytest.raises(storage.StorageError, match="notes.txt is not a folder"):
            check(tmp_path / "notes.txt")


def test_an_unreadable_location_is_a_clear_error(s3_server) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://ecgvlm/unit/never-written.json")


def test_a_folder_goes_up_and_comes_back(s3_server, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.safetensors").write_bytes(b"\0" * 1000)
    flat = tmp_path / "adapter"  # files only, as a checkpoint's adapter folder
    flat.mkdir()
    (flat / "config.json").write_text("{}")
    # To a bucket, and to local folders that do not exist yet (training's adapter export).
    for dest in (f"s3://ecgvlm/unit/{tmp_path.name}/model", str(tmp_path / "new" / "model"),
                 f"file://{tmp_path}/new/file-uri"):
        storage.upload_dir(src, dest)
        back = tmp_path / "back" / dest.rsplit("/", 1)[1]
        storage.download_dir(dest, back)
        assert (back / "sub" / "w.safetensors").read_bytes() == b"\0" * 1000, dest
        assert (back / "config.json").read_text() == "{}", dest
        storage.upload_dir(flat, f"{dest}-flat")
        assert storage.read_text(storage.join(f"{dest}-flat", "config.json")) == "{}", dest


def test_an_exported_folder_replaces_the_old_one_whole(location: str, tmp_path: Path,
                                                       monkeypatch) -> None:
    import pyarrow.fs

    old, new = tmp_path / "old", tmp_path / "new"
    for folder, weights in ((old, b"old"), (new, b"new")):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(weights)
    (old / "stale.json").write_text("{}")
    dest = storage.join(location, "adapter")
    storage.replace_dir(old, dest)
    storage.replace_dir(new, dest)
    weights = storage.join(dest, "adapter_model.safetensors")
    assert storage.list_files(dest) == [weights]  # nothing of the old folder is left
    assert storage.read_bytes(weights) == b"new"
    if storage.local_path(dest) is None:
        return  # an object store has no rename: deleted, then uploaded (the docstring)

    # A copy cut short by a full disk after its first file: the old folder stays as it
    # was, and nothing is left beside it.
    def copy_one_then_fail(source, destination, **kwargs):
        Path(destination).mkdir(parents=True, exist_ok=True)
        (Path(destination) / "adapter_model.safetensors").write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pyarrow.fs, "copy_files", copy_one_then_fail)
    with pytest.raises(storage.StorageError, match="No space left on device"):
        storage.replace_dir(old, dest)
    assert storage.read_bytes(weights) == b"new"
    assert sorted(p.name for p in Path(storage.local_path(location)).iterdir()) == ["adapter"]


def test_a_remote_folder_is_copied_once_per_node(s3_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ECGVLM_CACHE_DIR", str(tmp_path / "cache"))
    remote = f"s3://ecgvlm/unit/{tmp_path.name}/adapter"
    storage.write_text(storage.join(remote, "adapter_config.json"), "v1")
    local_dir = tmp_path / "plain"
    local_dir.mkdir()
    assert storage.node_local(str(local_dir)) == str(local_dir)  # local: used in place

    # Four loaders at once on one node (a replica's threads, a node's training workers):
    # one copy, whole, and every loader gets it.
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(storage.node_local(remote)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    copy = Path(results[0])
    # Under the cache, by URI, keeping the folder's own name.
    assert copy.parent.parent == tmp_path / "cache" / "remote" and copy.name == "adapter"
    assert (copy / "adapter_config.json").read_text() == "v1"
    assert [p.name for p in copy.parent.iterdir() if p.name != ".lock"] == ["adapter"]
    # Later loads use the copy without reading the store again.
    storage.write_text(storage.join(remote, "adapter_config.json"), "v2")
    assert Path(storage.node_local(remote), "adapter_config.json").read_text() == "v1"
    with pytest.raises(storage.StorageError, match="holds no files"):
        storage.node_local(f"s3://ecgvlm/unit/{tmp_path.name}/empty")


def test_predictions_are_stored_and_consolidated_in_the_store(location: str) -> None:
    row = {"sample_id": "s1", "dataset": "d", "model": "pulse", "answer_mode": "choice",
           "condition": "normal", "split": "test", "prompt_version": "v"}
    store = PredictionStore(location)
    store.append([row])
    store.append([{**row, "sample_id": "s2"}, {**row, "predicted_letter": "B"}])
    assert store.done_keys() == {("s1", "pulse", "choice", "normal"),
                                 ("s2", "pulse", "choice", "normal")}
    frame = store.consolidate()
    assert list(frame["predicted_letter"]) == ["B", None]  # the latest row per key
    assert storage.list_files(storage.join(location, "predictions")) == []
    assert storage.is_file(storage.join(location, "predictions.parquet"))
    assert PredictionStore(location).load()["sample_id"].tolist() == ["s1", "s2"]
    # The checks before a run read the key columns and what they ask for, nothing more.
    few = PredictionStore(location).load(["error"])
    assert list(few.columns) == ["sample_id", "model", "answer_mode", "condition", "error"]
    assert few.equals(frame[list(few.columns)])

    # A rewrite a row at a time (the claim check's) replaces one column and keeps the rest.
    def mark(batch):
        import pyarrow as pa

        claims = [f"[{sid}]" for sid in batch.column("sample_id").to_pylist()]
        return batch.set_column(batch.schema.get_field_index("claims"), "claims", pa.array(claims))

    store.rewrite(mark, batch_rows=1)
    again = PredictionStore(location).load()
    assert again["claims"].tolist() == ["[s1]", "[s2]"]
    assert again.drop(columns="claims").equals(frame.drop(columns="claims"))
    # The judge reads the texts of the few rows it judges, with a filter on the sample ids.
    judged = PredictionStore(location).rows_of({"s2", "s9"}, ["claims", "raw_text"])
    assert list(judged.columns) == ["sample_id", "model", "answer_mode", "condition", "claims",
                                    "raw_text"]
    assert judged.to_dict("records") == [{**again.loc[1, list(judged.columns)].to_dict()}]
    assert PredictionStore(location).rows_of(set(), ["raw_text"]).empty
    # Consolidating again (nothing new) keeps the file and returns only what is asked for.
    lean = PredictionStore(location).consolidate(columns=["error"])
    assert lean.equals(again[list(lean.columns)])


def test_one_node_clusters_take_local_paths(ray_local) -> None:
    storage.check_shared({"output_dir": "/tmp/anywhere"})


def test_the_endpoint_serves_a_model_and_adapter_kept_in_a_bucket(
    s3_server, tiny_pulse_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import io

    from PIL import Image

    from ecgvlm import serving as sv
    from ecgvlm.prompt import build_prompt
    from tests.fakes.adapters import make_random_adapter

    monkeypatch.setenv("ECGVLM_CACHE_DIR", str(tmp_path / "cache"))
    adapter = make_random_adapter(tiny_pulse_dir, tmp_path / "adapter", seed=1)
    remote = f"s3://ecgvlm/unit/{tmp_path.name}"
    storage.upload_dir(tiny_pulse_dir, f"{remote}/tiny-pulse")
    storage.upload_dir(adapter, f"{remote}/adapter")
    args = sv.ServeArgs(model_dir=f"{remote}/tiny-pulse", adapters={"lora": f"{remote}/adapter"})
    sv.check_paths(args)  # a prefix with files under it passes, as a folder does
    with pytest.raises(ValueError, match="adapters.gone"):
        sv.check_paths(args.model_copy(update={"adapters": {"gone": f"{remote}/gone"}}))
    with pytest.raises(ValueError, match="report_dir: .* must be a local folder"):
        sv.check_paths(args.model_copy(update={"report_dir": f"{remote}/eval"}))

    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 30, 30)).save(buf, format="PNG")
    asks = [sv.GenerateRequest(build_prompt("Which?", ["x", "y"]), buf.getvalue(), name, 4)
            for name in (None, "lora")]
    remote_runner = sv.PulseRunner(args.model_dir, args.adapters, device="cpu")
    local_runner = sv.PulseRunner(str(tiny_pulse_dir), {"lora": str(adapter)}, device="cpu")
    assert remote_runner.generate(asks) == local_runner.generate(asks)
    copies = sorted(p.name for p in (tmp_path / "cache" / "remote").glob("*/*") if p.is_dir())
    assert copies == ["adapter", "tiny-pulse"]
    # /v1/models' fingerprints: the bucket's copy hashes as the folder does, and an adapter
    # of another seed (another training run, say) under the same name does not.
    local_args = sv.ServeArgs(model_dir=str(tiny_pulse_dir), adapters={"lora": str(adapter)})
    fingerprints = sv.model_fingerprints(args)
    assert fingerprints == sv.model_fingerprints(local_args)
    assert set(fingerprints) == {"pulse", "pulse-lora", "pulse-lora:lora"}
    other = make_random_adapter(tiny_pulse_dir, tmp_path / "adapter2", seed=2)
    retrained = sv.model_fingerprints(local_args.model_copy(update={"adapters": {"lora": str(other)}}))
    assert retrained["pulse"] == fingerprints["pulse"]
    assert retrained["pulse-lora"] != fingerprints["pulse-lora"]


def test_a_folders_fingerprint_follows_its_files_not_where_they_are(location: str, tmp_path: Path) -> None:
    edge = 1024
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"hidden_size": 8}')
    weights = bytearray(range(256)) * 40  # 10 KiB: its first and last KiB are hashed
    (src / "sub" / "w.safetensors").write_bytes(bytes(weights))
    storage.upload_dir(src, location)
    assert storage.fingerprint(location, edge) == storage.fingerprint(src, edge)

    def changed(offset: int) -> str:
        copy = bytearray(weights)
        copy[offset] ^= 0xFF
        (src / "sub" / "w.safetensors").write_bytes(bytes(copy))
        return storage.fingerprint(src, edge)

    before = storage.fingerprint(src, edge)
    (src / ".cache").mkdir()
    (src / ".cache" / "lock").write_text("hidden files are not the weights")
    assert storage.fingerprint(src, edge) == before
    assert changed(100) != before and changed(len(weights) - 1) != before
    assert changed(5000) == before  # a change in the middle alone is not seen (the docstring)
    (src / "sub" / "w.safetensors").rename(src / "sub" / "v.safetensors")
    assert storage.fingerprint(src, edge) != before
    with pytest.raises(storage.StorageError, match="to fingerprint it"):
        storage.fingerprint(tmp_path / "missing")


def test_a_search_on_object_storage_keeps_its_trials_there() -> None:
    from ecgvlm.train import TrainConfig
    from ecgvlm.train.tune import trial_run_dir, trial_train_config

    base = TrainConfig(model_dir="s3://b/m", data_dir="s3://b/d")
    trial = trial_train_config(base, {"learning_rate": 1e-4}, "s3://b/tune/search", "ab_00001")
    assert trial.storage_path == "s3://b/tune/search/train"
    assert trial.output_dir == "s3://b/tune/search/train/search-ab_00001-adapter"
    assert trial.run_dir() == trial_run_dir("s3://b/tune/search", "ab_00001")
    assert trial.run_dir() == "s3://b/tune/search/train/search-ab_00001"
