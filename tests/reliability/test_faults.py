"""The PULSE replica's process killed (SIGKILL) while clients keep sending: requests caught
in it get a 503 naming the cause (no hang, no 500 with a traceback), ``/readyz`` says
not-ready while Serve starts a new replica, and the endpoint answers again within
``RECOVERY_BOUND_S``."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from tests.reliability.conftest import Live, replica_pids

pytestmark = pytest.mark.integration

CLIENTS = 3
#: From the kill to the first answer of the new replica (the tiny model loads in seconds;
#: Serve notices the death and schedules a replacement).
RECOVERY_BOUND_S = 90.0
TIMEOUT_S = 60


def test_killed_replica_is_a_503_then_restarted_and_answering(live: Live) -> None:
    pids = replica_pids("PulseModel")
    assert len(pids) == 1, pids
    stop = threading.Event()
    seen: list[tuple[float, int, str | None, float]] = []  # (sent at, status, code, seconds)

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = live.post("/v1/chat/completions", json={
                    "model": "pulse", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Which rhythm is this?"}]})
                code = r.json()["error"]["code"] if r.status_code != 200 else None
                seen.append((sent, r.status_code, code, time.monotonic() - sent))
            except requests.Timeout:
                seen.append((sent, 0, "timeout", time.monotonic() - sent))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)  # load running
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        not_ready = None
        recovered = None
        deadline = killed_at + RECOVERY_BOUND_S
        while time.monotonic() < deadline:
            ready = requests.get(f"{live.url}/readyz", timeout=30).status_code
            if ready == 503 and not_ready is None:
                not_ready = time.monotonic() - killed_at
            served = [s for s in seen if s[0] > killed_at and s[1] == 200]
            if ready == 200 and served and replica_pids("PulseModel") not in ([], pids):
                recovered = min(s[0] + s[3] for s in served) - killed_at
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=TIMEOUT_S + 5)
    statuses = {(status, code) for _, status, code, _ in seen}
    print(f"\nreplica killed: {len(seen)} requests, answers {sorted(statuses, key=str)}, "
          f"/readyz not ready after {not_ready} s, answering again after {recovered} s")
    assert recovered is not None, f"no answer within {RECOVERY_BOUND_S} s of the kill: {statuses}"
    assert not_ready is not None, "/readyz never said not-ready while the replica was gone"
    assert statuses <= {(200, None), (503, "replica_unavailable"), (503, "overloaded")}, statuses
    assert max(seconds for *_, seconds in seen) < TIMEOUT_S
    assert requests.get(f"{live.url}/healthz", timeout=10).status_code == 200
