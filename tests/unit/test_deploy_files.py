"""cluster.yaml, Dockerfile and requirements.lock agree with each other and with Ray's schema."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock line not pinned with ==: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((files("ray.autoscaler") / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # Ray's own validator on the config as `ray up` sees it (defaults filled in).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_uses_the_dockerfile_image_and_four_gpu_workers():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["docker"]["image"].endswith("-gpu")
    workers = [
        t for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    ]
    assert workers and all(t["resources"]["GPU"] == 4 for t in workers)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    # Everything is baked into the image: no installs (and so no git installs) at node start.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c or "git+" in c for c in config.get(key, []))


def test_dockerfile_base_image_matches_locked_ray_and_python():
    match = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu\s*$", _dockerfile(), re.M)
    assert match, "Dockerfile must start FROM a pinned rayproject/ray:<version>-py<ver>-gpu"
    ray_version, py_major, py_minor = match.groups()
    assert _lock()["ray"] == ray_version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = re.match(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups()
    assert (int(py_major), int(py_minor)) >= tuple(map(int, floor))


def test_lock_satisfies_every_pyproject_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} from pyproject.toml is missing in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_dockerfile_installs_the_lock_as_non_root_with_a_healthcheck():
    text = _dockerfile()
    assert "-r requirements.lock" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)


@pytest.mark.parametrize("name", ["cluster.yaml", "Dockerfile", "requirements.lock"])
def test_deploy_files_exist(name):
    assert (ROOT / name).is_file()
