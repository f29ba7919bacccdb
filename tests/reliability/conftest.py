"""One live endpoint for the reliability tests: Ray Serve on loopback, the tiny PULSE, an
adapter, gpt-4o on a fake upstream, auth on, and small queues so that overload is cheap to
reach.

The PULSE replica takes at most ``PULSE_MAX_ONGOING`` requests and each caller queues
``PULSE_MAX_QUEUED`` more: past that, Serve's back-pressure sheds a request with a 503 and
``Retry-After``. The long forms (more fuzzed requests) run with ``make reliability``, which
sets ``ECGVLM_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tests.fakes.adapters import make_random_adapter
from tests.fakes.mcq_split import sample_rows, write_report_dir
from tests.fakes.openai_server import FakeOpenAIServer, Reply

#: Secrets the endpoint is given: no log line, error body or report may ever show them.
TOKEN = "reliability-token-5f2c9e"
UPSTREAM_KEY = "sk-reliability-upstream-81d7a3"
PULSE_MAX_ONGOING = 4
PULSE_MAX_QUEUED = 8
RETRY_AFTER_S = 2
APP = "ecgvlm"


@dataclass
class Live:
    url: str
    fake: FakeOpenAIServer
    samples_dir: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(f"{self.url}{path}", headers=self.auth, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return requests.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)


def replica_pids(deployment: str) -> list[int]:
    """PIDs of this endpoint's ``deployment`` replicas (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``).

    Only this process's descendants are looked at: the session's local Ray (``ray_local``)
    runs under it. Another endpoint on the machine with the same app name (``ecgvlm serve``
    in a second shell, as the README shows) has replicas of the same title, which once made
    the fault test see two PulseModel replicas.
    """
    tag = f"ServeReplica:{APP}:{deployment}"
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(tag in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def replica_rss_bytes() -> dict[str, int]:
    """Resident memory of each deployment's replicas, summed."""
    out = {}
    for deployment in ("Gateway", "PulseModel", "Gpt4oProxy"):
        total = 0
        for pid in replica_pids(deployment):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        out[deployment] = total
    return out


def _upstream(request: dict) -> Reply | str:
    """gpt-4o's stand-in: option letters with their log-probabilities when asked for one
    scored token (a constrained choice), else an answer with an explanation."""
    if request.get("max_tokens") == 1 and request.get("top_logprobs"):
        return Reply(choice_logprobs={"B": -0.1, "A": -2.5})
    return "The answer is B. Irregular RR intervals."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="package")
def live(ray_local, tiny_pulse_dir, samples_dir, tmp_path_factory) -> Iterator[Live]:
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("reliability")
    fake = FakeOpenAIServer(_upstream)
    fake.start()
    port = _free_port()
    serve.shutdown()  # a Serve left by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
        mp.setenv("ECGVLM_API_TOKEN", TOKEN)
        app = build_app({
            "model_dir": str(tiny_pulse_dir),
            "adapters": {"cpsc": str(make_random_adapter(tiny_pulse_dir, root / "lora", 1))},
            "samples_dir": str(samples_dir),
            "report_dir": str(write_report_dir(root / "report", sample_rows(3))),
            "openai": {"base_url": fake.base_url, "timeout_s": 2.0, "max_retries": 1,
                       "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            "limits": {"max_body_bytes": 4 * 1024 * 1024, "default_max_tokens": 4,
                       "max_tokens": 16},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
            "pulse": {"num_cpus": 0.5, "max_ongoing_requests": PULSE_MAX_ONGOING,
                      "max_queued_requests": PULSE_MAX_QUEUED, "retry_after_s": RETRY_AFTER_S},
            "gateway": {"num_cpus": 0.1}, "proxy": {"num_cpus": 0.1},
        })
    serve.run(app, name=APP, route_prefix="/")
    try:
        yield Live(f"http://127.0.0.1:{port}", fake, samples_dir)
    finally:
        serve.shutdown()
        fake.stop()


def logs_dir() -> Path:
    """The session's Ray log folder (every replica's and the proxy's logs)."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def fuzz_examples(default: int) -> int:
    """Examples per fuzz test: ``default`` in ``make test``, more under ``make reliability``."""
    return int(os.environ.get("ECGVLM_FUZZ_EXAMPLES", default))
