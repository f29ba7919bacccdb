"""Overload, short form (``benchmarks/load.py`` holds the long one): far more concurrent
requests than the PULSE replica takes are shed at once with a 503 ``overloaded`` and
``Retry-After``, every request is answered within its time-out, and the endpoint answers
normally again as soon as the burst is over."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability.conftest import (
    PULSE_MAX_ONGOING,
    PULSE_MAX_QUEUED,
    RETRY_AFTER_S,
    Live,
)

pytestmark = pytest.mark.integration

#: Requests sent at once: four times what the replica and the gateway's queue hold together.
BURST = 4 * (PULSE_MAX_ONGOING + PULSE_MAX_QUEUED)
TIMEOUT_S = 60


def _chat(live: Live, png_url: str) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    r = live.post("/v1/chat/completions", json={
        "model": "pulse", "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url}},
            {"type": "text", "text": "Which rhythm is this?"}]}]})
    return r.status_code, dict(r.headers), r.json(), time.monotonic() - started


@pytest.fixture(scope="module")
def png_url(samples_dir) -> str:
    from ecgvlm import serving as sv
    from ecgvlm.signal import read_record

    return sv.image_data_url(sv.render_png(read_record(samples_dir / "cpsc2018" / "A0002")))


def test_a_burst_past_the_queue_is_shed_with_retry_after_and_the_endpoint_recovers(
    live: Live, png_url: str
) -> None:
    with ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(lambda _: _chat(live, png_url), range(BURST)))
    statuses = sorted({status for status, *_ in answers})
    ok = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    print(f"\nburst of {BURST}: {len(ok)} answered, {len(shed)} shed, slowest "
          f"{max(a[3] for a in answers):.1f} s")
    assert set(statuses) <= {200, 503}, statuses
    assert ok and shed, statuses
    for _, headers, body, _ in shed:
        assert body["error"]["code"] == "overloaded", body
        assert headers.get("retry-after") == str(RETRY_AFTER_S), headers
    assert all(body["usage"]["completion_tokens"] > 0 for _, _, body, _ in ok)
    assert max(seconds for *_, seconds in answers) < TIMEOUT_S
    # Shed requests come back at once instead of waiting for a slot.
    assert min(seconds for *_, seconds in shed) < min(seconds for *_, seconds in ok) + 1.0
    # The burst is over: requests within the replica's capacity all answer.
    with ThreadPoolExecutor(PULSE_MAX_ONGOING) as pool:
        after = list(pool.map(lambda _: _chat(live, png_url), range(2 * PULSE_MAX_ONGOING)))
    assert [a[0] for a in after] == [200] * len(after), [a[2] for a in after if a[0] != 200]
