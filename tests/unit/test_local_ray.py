"""The HAProxy ingress settings of a private head (``ecgvlm serve --ingress haproxy``), and the
checks the commands make before Ray starts (a cluster address that answers, ``--num-cpus``).

``tests/integration/test_serve.py`` starts such an endpoint for real; these check the settings
themselves, without Ray.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ecgvlm.local_ray import (
    RayUnreachableError,
    check_ray_reachable,
    haproxy_binary,
    haproxy_ingress_env,
    start_head,
)

REPO = Path(__file__).resolve().parents[2]

#: Serve's fixed defaults: stats, metrics, fallback proxy (HTTP, gRPC).
SERVE_DEFAULT_PORTS = {8404, 9101, 8500, 9500}


def test_each_head_gets_free_ports_and_files_of_its_own() -> None:
    first = haproxy_ingress_env("/tmp/ecgvlm-ray-aaaaaaaa")
    second = haproxy_ingress_env("/tmp/ecgvlm-ray-bbbbbbbb")
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = [int(v) for k, v in first.items() if k.endswith("_PORT")]
    assert len(ports) == len(set(ports)) == 4
    assert not set(ports) & SERVE_DEFAULT_PORTS
    for env, state_dir in ((first, "/tmp/ecgvlm-ray-aaaaaaaa"),
                           (second, "/tmp/ecgvlm-ray-bbbbbbbb")):
        paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
        assert len(paths) == 5 and all(Path(p).is_relative_to(state_dir) for p in paths), env


def test_a_state_dir_too_long_for_haproxys_socket_is_named() -> None:
    # Serve puts the admin socket at DIR/<56-digit node id>/admin.sock; HAProxy takes 97 bytes.
    longest = "/tmp/" + "x" * 24
    assert len(longest) == 29
    haproxy_ingress_env(longest)
    with pytest.raises(ValueError, match=r"'/tmp/x{25}' is 30 characters"):
        haproxy_ingress_env(longest + "x")


def test_an_unknown_ingress_is_refused_before_anything_starts(tmp_path, monkeypatch) -> None:
    made = []  # no temp dir is made (nor left behind), no `ray start` run
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: made.append(a) or str(tmp_path))
    with pytest.raises(ValueError, match="ingress 'nginx': choose from proxy, haproxy"):
        start_head(num_cpus=1, ingress="nginx")
    assert not made


def test_serve_with_haproxy_and_none_found_fails_in_one_line_before_ray(
        tmp_path, tiny_pulse_dir) -> None:
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(not_executable),
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "ecgvlm.cli", "serve", "--model-dir", str(tiny_pulse_dir),
         "--ingress", "haproxy"], env=env, capture_output=True, text=True, timeout=120,
        check=False)
    # One line and nothing else: no Ray was started (it would have logged its start).
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip() == (
        f"ecgvlm serve: error: --ingress haproxy: RAY_SERVE_HAPROXY_BINARY_PATH="
        f"'{not_executable}' is not an executable file"), run.stderr[-2000:]


def test_haproxy_is_looked_for_as_serve_looks(tmp_path, monkeypatch) -> None:
    named = tmp_path / "my-haproxy"
    named.write_text("#!/bin/sh\n")
    named.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(named))
    assert haproxy_binary() == str(named)  # the variable first
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH")
    # ray[serve]'s own package on Linux (this suite runs there), else PATH.
    assert Path(haproxy_binary()).name == "haproxy"


def test_a_cluster_address_where_nothing_answers_is_named_before_ray(tmp_path):
    """``ray.init`` had not given up on such an address after 120 s here, and logged Ray's
    C++ lines (a shell that kept the README's RAY_ADDRESS after ``ray stop``, say)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port = listening.getsockname()[1]
        check_ray_reachable(f"127.0.0.1:{open_port}", "RAY_ADDRESS")
        check_ray_reachable(f"ray://127.0.0.1:{open_port}", "--address")
    closed = f"127.0.0.1:{open_port}"  # nothing listens there any more
    with pytest.raises(RayUnreachableError) as raised:
        check_ray_reachable(closed, "RAY_ADDRESS")
    assert str(raised.value) == (
        f"no Ray cluster answers at {closed} (from RAY_ADDRESS: Connection refused): start it "
        "(README: `ray start --head ...`) or unset RAY_ADDRESS for a private local Ray")
    for left_to_ray in ("local", "auto", "http://127.0.0.1:8265"):
        check_ray_reachable(left_to_ray, "RAY_ADDRESS")

    # In a process of its own: in this one a test's Ray may be connected, which the command
    # would use as it is.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "ecgvlm.cli", "prepare", "--config", "configs/prepare_demo.yaml",
         "--address", closed, f"output_dir={tmp_path / 'prepared'}"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, check=False)
    assert (run.returncode, run.stderr) == (2, (
        f"ecgvlm prepare: error: no Ray cluster answers at {closed} (from --address: Connection "
        "refused): start it (README: `ray start --head ...`) or leave out --address for a "
        "private local Ray\n"))
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("command", ["prepare", "train", "tune", "serve", "evaluate", "demo"])
def test_num_cpus_below_one_is_refused_by_the_parser(command, capsys):
    """A local Ray with no CPU runs no task: ``prepare --num-cpus 0`` had not finished after
    120 s."""
    from ecgvlm.cli import build_parser
    from jobs.demo import build_parser as demo_parser

    if command == "demo":  # `python -m jobs.demo`, which `make demo` runs
        parse, argv = demo_parser().parse_args, ["--num-cpus", "0"]
    else:
        required = ["--model-dir", "m"] if command == "serve" else ["--config", "c"]
        parse, argv = build_parser().parse_args, [command, "--num-cpus", "0", *required]
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: argument --num-cpus: must be a whole number of at least 1, got '0'\n")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(port, capsys):
    """``ecgvlm serve --port 99999`` ended in the socket's OverflowError traceback."""
    from ecgvlm.cli import build_parser
    from jobs.demo import build_parser as demo_parser

    for parse, argv in ((build_parser().parse_args, ["serve", "--model-dir", "m", "--port", port]),
                        (demo_parser().parse_args, ["--port", port])):
        with pytest.raises(SystemExit) as raised:
            parse(argv)
        assert raised.value.code == 2
        assert capsys.readouterr().err.endswith(
            f"error: argument --port: must be a port number, 0-65535, got '{port}'\n")
    assert build_parser().parse_args(["serve", "--model-dir", "m", "--port", "8000"]).port == 8000
