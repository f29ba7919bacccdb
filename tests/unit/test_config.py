from dataclasses import dataclass, field

import pytest

from ecgvlm.config import ConfigError, check_choice, config_to_dict, load_config


@dataclass(frozen=True)
class Inner:
    dpi: int = 100
    layout: str = "3x4+II"

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, ["3x4+II", "12x1"])


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    ratio: float = 0.5
    leads: tuple[str, ...] = ("I", "II")
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\nratio: 1\ninner:\n  dpi: 200\n")
    cfg = load_config(Outer, path, ["inner.layout=12x1", "leads=[V1, V2]"])
    assert cfg == Outer(name="run", ratio=1.0, leads=("V1", "V2"), inner=Inner(200, "12x1"))
    assert config_to_dict(cfg)["leads"] == ["V1", "V2"]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  dip: 3\n")
    with pytest.raises(ConfigError, match=r"inner\.dip.*allowed: dpi, layout"):
        load_config(Outer, path)


def test_validation_names_field_and_choices():
    with pytest.raises(ConfigError, match=r"inner: layout must be one of '3x4\+II', '12x1', got '6x9'"):
        load_config(Outer, None, ["inner.layout=6x9"])


def test_wrong_type_and_bad_override():
    with pytest.raises(ConfigError, match="inner.dpi must be int"):
        load_config(Outer, None, ["inner.dpi=high"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["nonsense"])


def test_a_number_yaml_reads_as_a_string_is_a_float_where_a_float_is_expected(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string '1e-4': a float needs a dot (1.0e-4).
    path = tmp_path / "c.yaml"
    path.write_text("ratio: 5e-3\n")
    assert load_config(Outer, path).ratio == 5e-3
    assert load_config(Outer, None, ["ratio=1e-4"]).ratio == 1e-4
    assert load_config(Outer, None, ["ratio=-2E+2"]).ratio == -200.0
    # Where a string or an int is expected, and for what is not a number, nothing changes.
    assert load_config(Outer, None, ["name=1e-4"]).name == "1e-4"
    with pytest.raises(ConfigError, match="inner.dpi must be int, got '1e2'"):
        load_config(Outer, None, ["inner.dpi=1e2"])
    with pytest.raises(ConfigError, match="ratio must be float, got '1e-4x'"):
        load_config(Outer, None, ["ratio=1e-4x"])


def test_a_relative_path_missing_from_a_ray_jobs_working_copy_is_refused(tmp_path, monkeypatch):
    """``ray job submit --working-dir .`` runs the job in Ray's temporary copy of the folder,
    without runs/: a relative output_dir was written there and deleted with the copy, after
    the job reported success. The environment and folder are those Ray gives a job's driver
    (a real job showed the same; README's job lines, with absolute paths, run in the walk)."""
    from pathlib import Path

    from ecgvlm.config import resolve_paths

    @dataclass
    class Paths:
        config: str = "configs/zero2.json"
        output_dir: str = "runs/prepared"
        data_dir: str = "s3://bucket/prepared"
        storage_path: str = "/abs/runs/train"

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (copy / "configs").mkdir(parents=True)
    (copy / "configs" / "zero2.json").write_text("{}")  # a tracked file: uploaded
    monkeypatch.chdir(copy)
    fields = ["config", "output_dir", "data_dir", "storage_path"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_paths(Paths(), fields).output_dir == str(copy / "runs" / "prepared")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "."}}')
    with pytest.raises(ConfigError) as raised:
        resolve_paths(Paths(), fields)
    assert str(raised.value) == (
        f"output_dir = runs/prepared is a relative path, and this job runs in Ray's temporary "
        f"copy of its --working-dir ({copy}), which holds no git-ignored files (runs/) and is "
        "deleted after the job: give it as an absolute path ($PWD/runs/prepared where you "
        "submit), as the README's `ray job submit` lines do")
    absolute = resolve_paths(Paths(output_dir="/abs/runs/prepared"), fields)
    assert absolute.config == str(copy / "configs" / "zero2.json")
    assert (absolute.data_dir, absolute.storage_path) == ("s3://bucket/prepared", "/abs/runs/train")
    assert Path(absolute.output_dir) == Path("/abs/runs/prepared")
