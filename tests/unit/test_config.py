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
