"""Loading frozen dataclass configs from one YAML file per job plus ``key=value`` overrides.

Each stage defines its own frozen dataclass config (``RenderConfig`` in ``render.py``,
``McqConfig`` in ``mcq.py``, ...) and validates it in ``__post_init__``; this module only
turns YAML and overrides into those dataclasses, rejecting unknown keys by name. YAML is
parsed with ``yaml.safe_load``: a config file is data, never code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass; the message names the field."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``, naming field and choices."""
    allowed = list(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (either bound may be None)."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


#: A number as Python writes it. PyYAML follows YAML 1.1, whose floats need a dot:
#: ``learning_rate: 1e-4`` (or the override ``learning_rate=1e-4``) reads as the string
#: ``'1e-4'``, where ``1.0e-4`` reads as a float.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce_value(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` where the conversion is unambiguous:
    an int to a float, a number YAML 1.1 read as a string (``1e-4``) to a float, a mapping
    to a config dataclass, a list to a tuple, item by item.

    Raises:
        ConfigError: naming ``where`` and the value, when it is not of that type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return config_from_dict(tp, value, prefix=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return coerce_value(non_none[0], value, where)
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(coerce_value(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): coerce_value(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Raises:
        ConfigError: on unknown keys (listing the allowed ones) or values of the wrong type;
            errors raised by the dataclass's own validation are re-raised with the field path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"allowed: {', '.join(sorted(known))}"
        )
    kwargs = {k: coerce_value(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix:
            raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping at top level, got {type(loaded).__name__}")
        data = dict(loaded)
    return config_from_dict(cls, apply_overrides(data, overrides))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A resolved config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML next to a job's outputs (a path or a URI)."""
    from ecgvlm import storage

    storage.write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def absolute_path(path: str | Path, base: str | Path | None = None) -> str:
    """``path`` made absolute against ``base`` (default: the caller's working directory).

    Ray Train workers, Ray Data tasks and ``ray job submit`` entrypoints do not run in the
    caller's directory, so every path in a job config is made absolute on the caller before
    anything is launched. URIs (``s3://...``, ``file://...``) pass through unchanged.
    """
    text = str(path)
    if "://" in text:
        return text
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = Path(base if base is not None else Path.cwd()) / p
    return str(Path(os.path.normpath(p)))


def job_working_copy() -> Path | None:
    """The folder a ``ray job submit --working-dir DIR`` job runs in, or None elsewhere: Ray's
    temporary copy of DIR (``.../runtime_resources/working_dir_files/_ray_pkg_...``), without
    DIR's git-ignored files and deleted once no job uses it."""
    cwd = Path.cwd()
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    return cwd if in_job and "working_dir_files" in cwd.parts else None


def resolve_paths(config: T, fields: Iterable[str], base: str | Path | None = None) -> T:
    """A copy of dataclass ``config`` with the named path fields made absolute.

    Fields that are None or empty stay as they are; a field holding a tuple or list of paths
    (e.g. prepare's ``sources``) has each entry resolved, and a dict (e.g. serve's
    ``adapters``) has each value resolved.

    Raises:
        ConfigError: in a ``ray job submit --working-dir`` job (:func:`job_working_copy`), for
            a relative path that is not in the job's copy of the folder: an input is not
            there (``runs/`` is not uploaded), and an output written there would be deleted
            with the copy, after the job had reported success.
    """
    copy = job_working_copy() if base is None else None

    def resolve(name: str, value: Any) -> str:
        path = absolute_path(value, base)
        relative = "://" not in str(value) and not Path(str(value)).expanduser().is_absolute()
        if copy is not None and relative and not Path(path).exists():
            raise ConfigError(
                f"{name} = {value} is a relative path, and this job runs in Ray's temporary "
                f"copy of its --working-dir ({copy}), which holds no git-ignored files "
                f"(runs/) and is deleted after the job: give it as an absolute path "
                f"($PWD/{value} where you submit), as the README's `ray job submit` lines do")
        return path

    changes: dict[str, Any] = {}
    for name in fields:
        value = getattr(config, name)
        if value is None or value == "":
            continue
        if isinstance(value, (tuple, list)):
            changes[name] = type(value)(resolve(name, v) for v in value)
        elif isinstance(value, Mapping):
            changes[name] = {k: resolve(f"{name}.{k}", v) for k, v in value.items()}
        else:
            changes[name] = resolve(name, value)
    return dataclasses.replace(config, **changes)
