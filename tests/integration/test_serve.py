"""The endpoint over real HTTP: Ray Serve on loopback, the tiny PULSE checkpoint, LoRA
adapters, a fake OpenAI-compatible upstream for gpt-4o, bad requests and auth.

Two applications are started once for the module: ``ecgvlm`` at ``/`` (PULSE, two adapters,
gpt-4o routed to the fake upstream, no auth) and ``secure`` at ``/secure`` (no model, no
OpenAI key, bearer-token auth on).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

pytestmark = pytest.mark.integration

from ecgvlm import serving as sv
from tests.fakes.adapters import make_random_adapter
from tests.fakes.mcq_split import sample_rows, write_report_dir
from tests.fakes.openai_server import FakeOpenAIServer, Reply

RECORD = "cpsc2018/A0002"
OPTIONS = ["Normal sinus rhythm", "Atrial fibrillation", "Left bundle branch block",
           "Right bundle branch block"]
TOKEN = "test-token-1234"
REPORT_ROWS = sample_rows(4)  # the evaluation report the reading room's second view shows
UPSTREAM_KEY = "sk-upstream-test-key"
MAX_RETRIES = 2


ABSTAIN_BELOW = 0.9
#: What the fake gpt-4o upstream gives a constrained choice's one token: B most probable.
UPSTREAM_CHOICE = [("B", math.log(0.93)), (" B", math.log(0.02)), ("A", math.log(0.03)),
                   ("The", math.log(0.01))]


def _upstream_answer(request: dict) -> Reply | str:
    """The fake gpt-4o: a letter with its top log-probabilities when asked for one token with
    them (a constrained choice), else an answer with its explanation."""
    if request.get("max_tokens") == 1 and request.get("top_logprobs"):
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in UPSTREAM_CHOICE]
        return Reply(content="B", logprobs={"content": [{**top[0], "top_logprobs": top}]})
    return "The answer is B. Irregular RR intervals, no P waves."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def record(samples_dir):
    from ecgvlm.signal import read_record

    path = samples_dir / RECORD
    # The record ships in data/samples: its absence is a broken checkout, not a reason to skip.
    assert Path(f"{path}.hea").is_file(), f"sample record {path} missing from the repository"
    return read_record(path)


@pytest.fixture(scope="module")
def png(record) -> bytes:
    return sv.render_png(record)


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_pulse_dir, tmp_path_factory):
    """Start both applications once; yield their URLs and the fake upstream."""
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_pulse_dir
    adapters = {
        "cpsc": str(make_random_adapter(model_dir, root / "lora-cpsc", seed=1)),
        "chapman": str(make_random_adapter(model_dir, root / "lora-chapman", seed=2)),
    }
    fake = FakeOpenAIServer(_upstream_answer)
    fake.start()
    port = _free_port()
    serve.shutdown()  # a Serve left by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus": 0.1}
    common = {"gateway": small, "proxy": small}
    with pytest.MonkeyPatch.context() as mp:
        # Secrets are read by the builder: one app with the key, the other with the token.
        mp.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
        mp.delenv("ECGVLM_API_TOKEN", raising=False)
        main = build_app({
            "model_dir": str(model_dir), "adapters": adapters,
            "report_dir": str(write_report_dir(root / "report", REPORT_ROWS)),
            "openai": {"base_url": fake.base_url, "timeout_s": 1.0, "max_retries": MAX_RETRIES,
                       "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            "limits": {"max_body_bytes": 4 * 1024 * 1024, "default_max_tokens": 8},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
            "abstain_below": ABSTAIN_BELOW,
            "pulse": {"num_cpus": 0.5}, **common,
        })
        mp.delenv("OPENAI_API_KEY")
        mp.setenv("ECGVLM_API_TOKEN", TOKEN)
        secure = build_app({"openai": {"api_key_env": "OPENAI_API_KEY"}, **common})
    # Both apps deploy together: their replicas start in parallel.
    serve.run_many([serve.RunTarget(main, name="ecgvlm", route_prefix="/"),
                    serve.RunTarget(secure, name="secure", route_prefix="/secure")])
    base = f"http://127.0.0.1:{port}"
    try:
        yield {"url": base, "secure": f"{base}/secure", "fake": fake}
    finally:
        serve.shutdown()
        fake.stop()


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _image_messages(png: bytes, text: str = "Which rhythm is this?") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sv.image_data_url(png)}},
        {"type": "text", "text": text},
    ]}]


# --- PULSE and its adapters ------------------------------------------------------------------


def test_openai_client_gets_answers_from_pulse_and_its_adapters(endpoint, png):
    from ray import serve

    client = _client(endpoint["url"])
    texts = {}
    pulse = serve.get_deployment_handle("PulseModel", app_name="ecgvlm")
    before = pulse.stats.remote().result()
    for model in ("pulse", "pulse-lora", "pulse-lora:chapman", "pulse"):
        resp = client.chat.completions.create(
            model=model, messages=_image_messages(png), max_tokens=8, temperature=0, seed=0,
        )
        assert resp.model == model
        assert isinstance(resp.choices[0].message.content, str)
        assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 8
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        texts.setdefault(model, []).append(resp.choices[0].message.content)
    # Each adapter changes the answer; the base answers the same after adapters ran.
    assert texts["pulse-lora"][0] != texts["pulse"][0]
    assert texts["pulse-lora:chapman"][0] not in (texts["pulse"][0], texts["pulse-lora"][0])
    assert texts["pulse"][0] == texts["pulse"][1]
    stats = pulse.stats.remote().result()
    # One request at a time: each was a batch of its own.
    assert stats["batches"] - before["batches"] == 4
    assert stats["batched_requests"] - before["batched_requests"] == 4
    assert stats["base_loads"] == 1
    assert set(stats["adapters_loaded"]) == {"cpsc", "chapman"}
    assert stats["adapter_loads"] == {"cpsc": 1, "chapman": 1}


def test_answers_say_where_their_time_went(endpoint, png):
    from ecgvlm.serving import parse_server_timing

    client = _client(endpoint["url"])
    raw = client.chat.completions.with_raw_response.create(
        model="pulse", messages=_image_messages(png), max_tokens=4, temperature=0)
    timing = parse_server_timing(raw.headers["server-timing"])
    assert list(timing) == ["parse", "decode", "prompt", "call", "adapter", "image", "queue",
                            "model", "total"]
    assert min(timing.values()) >= 0 and timing["model"] > 0 and timing["image"] > 0, timing
    # The replica's own parts are inside the gateway's call, the call inside all.
    inside = timing["adapter"] + timing["image"] + timing["queue"] + timing["model"]
    assert inside <= timing["call"] <= timing["total"], timing
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    timing = parse_server_timing(raw.headers["server-timing"])
    assert list(timing) == ["parse", "decode", "call", "total"] and timing["call"] > 0, timing


def test_guided_choice_through_the_openai_client(endpoint, png):
    client = _client(endpoint["url"])
    messages = _image_messages(png, "Which rhythm is this?\nA. Atrial fibrillation\n"
                                    "B. Normal sinus rhythm\nC. Sinus bradycardia")
    resp = client.chat.completions.create(
        model="pulse-lora", messages=messages, logprobs=True,
        extra_body={"guided_choice": ["A", "B", "C"]})
    entry = resp.choices[0].logprobs.content[0]
    assert resp.choices[0].message.content == entry.token and entry.token in "ABC"
    ranked = [t.token for t in entry.top_logprobs]
    assert sorted(ranked) == ["A", "B", "C"] and ranked[0] == entry.token
    assert sum(math.exp(t.logprob) for t in entry.top_logprobs) == pytest.approx(1.0, abs=1e-6)
    assert resp.usage.completion_tokens == 1
    # The same request answers the same.
    again = client.chat.completions.create(model="pulse-lora", messages=messages,
                                           extra_body={"guided_choice": ["A", "B", "C"]})
    assert again.choices[0].logprobs.content[0].top_logprobs[0].logprob == pytest.approx(
        entry.top_logprobs[0].logprob, abs=1e-6)
    # Streamed, a constrained answer is one delta with the same log-probabilities.
    chunks = list(client.chat.completions.create(
        model="pulse-lora", messages=messages, stream=True,
        extra_body={"guided_choice": ["A", "B", "C"]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == entry.token
    streamed = next(c for c in chunks if c.choices[0].logprobs is not None)
    assert [t.logprob for t in streamed.choices[0].logprobs.content[0].top_logprobs] == (
        pytest.approx([t.logprob for t in entry.top_logprobs], abs=1e-6))


def test_logprobs_of_generated_text_through_the_openai_client(endpoint, png):
    client = _client(endpoint["url"])
    plain = client.chat.completions.create(model="pulse", messages=_image_messages(png),
                                           max_tokens=6, temperature=0)
    resp = client.chat.completions.create(model="pulse", messages=_image_messages(png),
                                          max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3)
    assert resp.choices[0].message.content == plain.choices[0].message.content
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6  # no end-of-sequence here
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most probable
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", "replace").strip() == resp.choices[0].message.content
    none = client.chat.completions.create(model="pulse", messages=_image_messages(png),
                                          max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in none.choices[0].logprobs.content)
    assert plain.choices[0].logprobs is None


def test_streaming_through_the_openai_clients_iterator_equals_the_plain_answer(endpoint, png):
    client = _client(endpoint["url"])
    for model, max_tokens in (("pulse-lora", 40), ("pulse", 12)):
        plain = client.chat.completions.create(model=model, messages=_image_messages(png),
                                               max_tokens=max_tokens, temperature=0)
        stream = client.chat.completions.create(
            model=model, messages=_image_messages(png), max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, logprobs=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        texts = [c.choices[0].delta.content for c in chunks if c.choices
                 and c.choices[0].delta.content]
        assert "".join(texts) == plain.choices[0].message.content
        # As it is generated, not all at the end. The replica merges the deltas that pile up
        # while its event loop is busy, so a loaded machine sends fewer, larger chunks: 40
        # tokens came as 2 at a load average of 45 (2026-12-07), where the check was > 3.
        assert len(texts) > 1
        assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        tokens = [e for c in chunks if c.choices and c.choices[0].logprobs
                  for e in c.choices[0].logprobs.content]
        assert len(tokens) == plain.usage.completion_tokens


def _pulse_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("PulseModel", app_name="ecgvlm").stats.remote().result()


def test_a_client_that_leaves_mid_stream_frees_its_slot(endpoint, png):
    before = _pulse_stats()["cancelled"]
    body = {"model": "pulse", "messages": _image_messages(png), "max_tokens": 1000,
            "stream": True}
    with requests.post(f"{endpoint['url']}/v1/chat/completions", json=body, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert first.startswith(b"data: ") and b"chat.completion.chunk" in first
    # Connection closed after the first chunk: the replica stops that answer.
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = _pulse_stats()
        if stats["in_flight"] == 0 and stats["cancelled"] > before:
            break
        time.sleep(0.2)
    assert stats["in_flight"] == 0, stats
    assert stats["cancelled"] == before + 1, stats  # stopped before its 1000 tokens


def test_concurrent_requests_to_mixed_models_all_answer(endpoint, png):
    from concurrent.futures import ThreadPoolExecutor

    client = _client(endpoint["url"])
    models = ["pulse", "pulse-lora", "pulse-lora:chapman"] * 3

    def ask(model: str) -> tuple[str, str]:
        r = client.chat.completions.create(model=model, messages=_image_messages(png),
                                           max_tokens=8, temperature=0)
        return model, r.choices[0].message.content

    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(ask, models))
    # Batched with other adapters or not, a model gives the same greedy answer.
    by_model: dict[str, set[str]] = {}
    for model, text in answers:
        by_model.setdefault(model, set()).add(text)
    assert all(len(v) == 1 for v in by_model.values()), by_model


def test_models_lists_what_is_served(endpoint):
    data = requests.get(f"{endpoint['url']}/v1/models", timeout=30).json()["data"]
    cards = {c["id"]: c for c in data}
    assert set(cards) == {"pulse", "pulse-lora", "pulse-lora:cpsc", "pulse-lora:chapman",
                          "gpt-4o"}
    assert all(c["available"] for c in cards.values())
    assert cards["pulse-lora"]["adapter"] == "cpsc"
    assert cards["pulse-lora:chapman"]["adapter"] == "chapman"
    # How PULSE runs: on this CPU-only test machine, float32 by default and SDPA attention.
    assert cards["pulse"]["runtime"] == {"device": "cpu", "dtype": "float32",
                                         "attn_implementation": "sdpa",
                                         "max_batch_tokens": None}
    assert cards["pulse-lora"]["runtime"] == cards["pulse"]["runtime"]
    assert cards["gpt-4o"]["runtime"] is None
    assert requests.get(f"{endpoint['url']}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{endpoint['url']}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"]["pulse"]["base_loads"] == 1


# --- gpt-4o through the fake upstream ------------------------------------------------------


def test_gpt4o_retries_429_and_500_then_answers(endpoint):
    fake = endpoint["fake"]
    before = len(fake.chat_requests)
    fake.script(Reply(status=429, headers={"Retry-After": "0"}), Reply(status=500))
    resp = _client(endpoint["url"]).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], temperature=0.3,
    )
    assert resp.choices[0].message.content.startswith("The answer is B.")
    sent = fake.chat_requests[before:]
    assert len(sent) == 3  # 429, 500, then the answer
    assert sent[-1].json["model"] == "gpt-4o" and sent[-1].json["temperature"] == 0.3
    headers = {k.lower(): v for k, v in sent[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_gpt4o_streams_the_upstreams_chunks_and_answers_constrained_choices(endpoint):
    client = _client(endpoint["url"])
    messages = [{"role": "user", "content": "Which rhythm? A. Sinus B. AF"}]
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "The answer is B. Irregular RR intervals, no P waves.")
    sent = endpoint["fake"].chat_requests[-1].json
    assert sent["stream"] is True
    # An upstream failing before its first chunk is a plain HTTP error, after the retries.
    endpoint["fake"].script(*[Reply(status=429)] * (MAX_RETRIES + 1))
    with pytest.raises(openai.RateLimitError):
        list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    resp = client.chat.completions.create(model="gpt-4o", messages=messages, logprobs=True,
                                          extra_body={"guided_choice": ["A", "B"]})
    entry = resp.choices[0].logprobs.content[0]
    probs = {t.token: math.exp(t.logprob) for t in entry.top_logprobs}
    assert resp.choices[0].message.content == entry.token == "B"
    # "B" and " B" count for B, "The" for neither: renormalised over A and B.
    assert probs == pytest.approx({"B": 0.95 / 0.98, "A": 0.03 / 0.98})
    sent = endpoint["fake"].chat_requests[-1].json
    assert (sent["max_tokens"], sent["top_logprobs"]) == (1, 20)
    assert sent["messages"][-1]["content"].endswith("A, B")


@pytest.mark.parametrize(
    "reply, status, code",
    [
        (Reply(status=429), 429, "upstream_rate_limited"),
        (Reply(status=503), 502, "upstream_error"),
        (Reply(content="late", delay_s=1.5), 504, "upstream_timeout"),
    ],
)
def test_gpt4o_errors_map_to_clear_responses_after_retries(endpoint, reply, status, code):
    fake = endpoint["fake"]
    before = len(fake.chat_requests)
    fake.script(*([reply] * (MAX_RETRIES + 1)))
    r = requests.post(f"{endpoint['url']}/v1/chat/completions", timeout=60, json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})
    err = r.json()["error"]
    assert r.status_code == status and err["code"] == code
    assert f"{MAX_RETRIES + 1} attempts" in err["message"]
    assert len(fake.chat_requests) - before == MAX_RETRIES + 1
    assert UPSTREAM_KEY not in r.text


def test_gpt4o_upstream_auth_failure_does_not_echo_the_key(endpoint):
    endpoint["fake"].script(Reply(status=401, body=json.dumps({"error": {
        "message": f"Incorrect API key provided: {UPSTREAM_KEY}"}}).encode()))
    r = requests.post(f"{endpoint['url']}/v1/chat/completions", timeout=60, json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 502 and "OPENAI_API_KEY" in r.json()["error"]["message"]
    assert UPSTREAM_KEY not in r.text


def test_no_key_is_503_and_models_lists_gpt4o_unavailable(endpoint):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(f"{endpoint['secure']}/v1/chat/completions", headers=auth, timeout=30,
                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and "OPENAI_API_KEY" in r.json()["error"]["message"]
    cards = {c["id"]: c for c in requests.get(f"{endpoint['secure']}/v1/models", headers=auth,
                                              timeout=30).json()["data"]}
    assert cards["gpt-4o"]["available"] is False and "OPENAI_API_KEY" in cards["gpt-4o"]["reason"]
    assert cards["pulse"]["available"] is False


# --- /v1/ecg/interpret -----------------------------------------------------------------------


def test_interpret_json_signal_with_pulse_returns_answer_and_image(endpoint, record):
    body = {"samples": record.signal_mv.tolist(), "fs_hz": record.fs_hz,
            "leads": list(record.leads), "options": OPTIONS, "model": "pulse-lora",
            "return_image": True, "max_tokens": 8}
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "pulse-lora" and out["options"] == OPTIONS
    assert out["question"] == sv.DEFAULT_QUESTION
    assert isinstance(out["text"], str) and out["usage"]["completion_tokens"] > 0
    # The option letters scored as a constrained choice: what guided_choice gives for the
    # same printout and question.
    from ecgvlm.prompt import chat_messages

    png = base64.b64decode(out["image_png_base64"])
    chosen = _client(endpoint["url"]).chat.completions.create(
        model="pulse-lora", messages=chat_messages(sv.DEFAULT_QUESTION, OPTIONS, png),
        extra_body={"guided_choice": list("ABCD")})
    expected = {t.token: math.exp(t.logprob)
                for t in chosen.choices[0].logprobs.content[0].top_logprobs}
    assert list(out["probabilities"]) == list("ABCD")
    assert out["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert out["uncertain"] is (max(expected.values()) < ABSTAIN_BELOW)
    assert out["uncertain"] is True and out["abstain_below"] == ABSTAIN_BELOW  # a random model
    # A tiny random model rarely names a letter; when it does, finding must match it.
    if out["answer_letter"] is not None:
        assert out["finding"] == OPTIONS["ABCD".index(out["answer_letter"])]
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(out["image_png_base64"])))
    assert img.format == "PNG" and img.size[0] > img.size[1] > 300
    # The signal's own measurements come with the answer, as ecgvlm.measure gives them.
    from ecgvlm.measure import MeasureConfig, measure_record

    expected = measure_record(record, MeasureConfig(delineate_waves=False))
    got = out["measurements"]
    assert got["record_id"] == "upload" and expected.heart_rate_bpm is not None
    assert got["heart_rate_bpm"] == pytest.approx(expected.heart_rate_bpm)
    assert got["qrs_ms"] == pytest.approx(expected.qrs_ms)
    assert [lead["lead"] for lead in got["leads"]] == list(record.leads)


def test_interpret_wfdb_upload_answered_by_gpt4o(endpoint, samples_dir):
    fake = endpoint["fake"]
    before = len(fake.chat_requests)
    path = samples_dir / RECORD
    files = [("files", (f"{path.name}{ext}", Path(f"{path}{ext}").read_bytes()))
             for ext in (".hea", ".mat")]
    data = {"model": "gpt-4o", "question": "What does this ECG show?",
            "options": json.dumps(OPTIONS), "return_measurements": "false"}
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=data, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer_letter"] == "B" and out["finding"] == "Atrial fibrillation"
    assert out["explanation"] == "Irregular RR intervals, no P waves."
    assert "image_png_base64" not in out and "measurements" not in out
    # The letters scored from the upstream's top log-probabilities: B is sure enough.
    assert out["probabilities"]["B"] == pytest.approx(0.95 / 0.98 / (1 + 2 * 0.01 / 20 / 0.98))
    assert out["uncertain"] is False
    sent = fake.chat_requests[before:]
    assert len(sent) == 2  # the answer, and the letters' one token
    answer = next(s for s in sent if s.json.get("max_tokens") != 1)
    parts = answer.json["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = next(p["text"] for p in parts if p["type"] == "text")
    assert "What does this ECG show?" in text and "B. Atrial fibrillation" in text


def test_interpret_wfdb_upload_with_pulse(endpoint, samples_dir):
    path = samples_dir / RECORD
    files = [("files", (f"{path.name}{ext}", Path(f"{path}{ext}").read_bytes()))
             for ext in (".hea", ".mat")]
    data = [("options", o) for o in OPTIONS] + [("max_tokens", "8"), ("return_image", "true")]
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=data, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "pulse" and r.json()["image_png_base64"]
    measured = r.json()["measurements"]
    assert measured["record_id"] == "cpsc2018/A0002" and measured["n_beats"] >= 8
    # The options as a comma-separated field: said so, not "at least 2 items, not 1".
    one = [("options", ",".join(OPTIONS)), ("max_tokens", "8")]
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=one, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "options", r.text
    assert r.json()["error"]["message"].startswith(
        f"options: one field holds {','.join(OPTIONS)!r}; give the findings as one JSON list"), r.text



def test_interpret_a_30_min_mitdb_upload_from_start_s(endpoint, samples_dir):
    path = samples_dir / "mitdb" / "106"
    files = [("files", (f"106{ext}", Path(f"{path}{ext}").read_bytes()))
             for ext in (".hea", ".dat", ".atr")]
    data = [("options", o) for o in OPTIONS[:2]] + [("max_tokens", "4"), ("start_s", "1200")]
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=data, timeout=120)
    assert r.status_code == 200, r.text
    assert (r.json()["start_s"], r.json()["duration_s"]) == (1200.0, sv.DEFAULT_WINDOW_S)
    late = data[:-1] + [("start_s", "4000")]
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=late, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "start_s", r.text

# --- the reading room's API ------------------------------------------------------------------


def test_interpret_checks_the_explanation_against_the_measurements(endpoint, samples_dir):
    # gpt-4o (the fake upstream) says "Irregular RR intervals, no P waves." about A0002, whose
    # RR intervals are regular; P waves are not measured without measure_waves.
    path = samples_dir / RECORD
    files = [("files", (f"{path.name}{ext}", Path(f"{path}{ext}").read_bytes()))
             for ext in (".hea", ".mat")]
    data = {"model": "gpt-4o", "options": json.dumps(OPTIONS), "layout": "12x1",
            "return_image": "true"}
    r = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files, data=data, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["measurements"]["rr_irregular"] is False
    verdicts = {out["explanation"][slice(*c["span"])]: c["verdict"] for c in out["claims"]}
    assert verdicts == {"Irregular RR intervals": "contradicted", "P waves": "unverifiable"}
    from PIL import Image

    width, height = Image.open(io.BytesIO(base64.b64decode(out["image_png_base64"]))).size
    assert width == height  # 12x1 is drawn on a square page, the default 3x4+II on a 2:1 one
    bad = requests.post(f"{endpoint['url']}/v1/ecg/interpret", files=files,
                        data={**data, "layout": "5x5"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "layout"


def test_reading_room_page_and_its_sample_records(endpoint, samples_dir):
    page = requests.get(f"{endpoint['url']}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    settings = json.loads(re.search(r"const SETTINGS = (\{.*?\});", page.text).group(1))
    assert settings["auth"] is False and settings["question"] == sv.DEFAULT_QUESTION
    assert len(settings["options"]) == 4 and "3x4+II" in settings["layouts"]
    assert "https://" not in page.text  # nothing from a CDN: the page works offline
    listed = requests.get(f"{endpoint['url']}/v1/ecg/samples", timeout=30).json()["data"]
    by_name = {s["name"]: s["files"] for s in listed}
    assert by_name[RECORD] == ["A0002.hea", "A0002.mat"] and "mitdb/106" in by_name
    got = requests.get(f"{endpoint['url']}/v1/ecg/samples/{RECORD}.hea", timeout=30)
    assert got.status_code == 200 and got.content == (samples_dir / f"{RECORD}.hea").read_bytes()
    for name, status in (("cpsc2018/A0002.txt", 400), ("cpsc2018/..%2F..%2Fpyproject.toml", 400),
                         ("cpsc2018/A9999.hea", 404)):
        r = requests.get(f"{endpoint['url']}/v1/ecg/samples/{name}", timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == "name", (name, r.text)
    # With auth on: the page loads without a token and asks for one; its data needs it.
    secure = requests.get(f"{endpoint['secure']}/", timeout=30)
    assert secure.status_code == 200 and '"auth": true' in secure.text
    assert requests.get(f"{endpoint['secure']}/v1/ecg/samples", timeout=30).status_code == 401
    assert requests.get(f"{endpoint['secure']}/v1/ecg/samples", timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_reading_room_report_view_serves_the_evaluation(endpoint):
    url = endpoint["url"]
    report = requests.get(f"{url}/v1/report", timeout=30).json()
    assert report["report_md"].startswith("# Evaluation report") and report["plots"] == ["metrics_bars.png"]
    assert report["filters"]["model"] == ["pulse", "pulse-lora"] and report["n_predictions"] == 16
    assert requests.get(f"{url}/v1/report/plots/metrics_bars.png", timeout=30).content[:4] == b"\x89PNG"
    assert requests.get(f"{url}/v1/report/plots/..%2Freport.md", timeout=30).status_code == 404
    by_id = {r["sample_id"]: r for r in REPORT_ROWS}

    def rows(**query):
        r = requests.get(f"{url}/v1/report/predictions", params=query, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    wrong = rows(model="pulse", correct="false")
    assert wrong["total"] == sum(r["answer_letter"] != "A" for r in REPORT_ROWS)
    assert all(w["model"] == "pulse" and w["predicted_label"] != w["true_label"] for w in wrong["data"])
    contradicted = rows(contradicted="true", dataset="mitdb")
    want = [r for r in REPORT_ROWS if r["dataset"] == "mitdb" and r["option_labels"][r["answer_index"]] != "AF"]
    assert contradicted["total"] == 2 * len(want) and all(c["contradicted"] == 1 for c in contradicted["data"])
    assert rows(limit=3, offset=15)["data"][0]["claims"][0]["verdict"] in ("supported", "contradicted")
    bad = requests.get(f"{url}/v1/report/predictions", params={"correct": "maybe"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "correct"
    bad = requests.get(f"{url}/v1/report/predictions", params={"limit": "ten"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    from urllib.parse import quote

    sid = REPORT_ROWS[1]["sample_id"]  # "cpsc2018/r001#0": the "#" is sent encoded
    png = requests.get(f"{url}/v1/report/printouts/{quote(sid, safe='')}", timeout=30)
    assert png.status_code == 200 and png.content == by_id[sid]["png"]
    assert requests.get(f"{url}/v1/report/printouts/nope%230", timeout=30).status_code == 404
    # An endpoint started without a report says how to give one.
    none = requests.get(f"{endpoint['secure']}/v1/report", timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert none.status_code == 404 and "--report-dir" in none.json()["error"]["message"]


# --- bad requests ------------------------------------------------------------------------------


def _png_bytes(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def _chat_with_url(url: str) -> dict:
    return {"model": "pulse", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]}


def _signal(**overrides) -> dict:
    body = {"samples": (np.sin(np.linspace(0, 20, 1000))[:, None] * [1.0, 0.5]).tolist(),
            "fs_hz": 250, "leads": ["I", "II"], "options": OPTIONS[:2]}
    body.update(overrides)
    return body


IMAGE_PARAM = "messages[0].content[0].image_url.url"
BAD_REQUESTS = [
    # (name, path, kwargs for requests.post, status, param)
    ("broken base64", "/v1/chat/completions",
     {"json": _chat_with_url("data:image/png;base64,iVBORw0KGgo###")}, 400, IMAGE_PARAM),
    ("text file as image", "/v1/chat/completions",
     {"json": _chat_with_url("data:image/png;base64,"
                             + base64.b64encode(b"hello, I am a text file\n").decode())},
     400, IMAGE_PARAM),
    ("huge image", "/v1/chat/completions",
     {"json": _chat_with_url(sv.image_data_url(_png_bytes((4200, 4200))))}, 400, IMAGE_PARAM),
    ("remote image url", "/v1/chat/completions",
     {"json": _chat_with_url("http://127.0.0.1:9/ecg.png")}, 400, IMAGE_PARAM),
    ("unknown model", "/v1/chat/completions",
     {"json": {"model": "llama-3", "messages": [{"role": "user", "content": "x"}]}}, 404,
     "model"),
    ("unknown adapter", "/v1/chat/completions",
     {"json": {"model": "pulse-lora:nope", "messages": [{"role": "user", "content": "x"}]}},
     404, "model"),
    ("missing messages", "/v1/chat/completions", {"json": {"model": "pulse"}}, 400, "messages"),
    ("invalid json", "/v1/chat/completions",
     {"data": b"{\"model\": ", "headers": {"content-type": "application/json"}}, 400, None),
    ("max_tokens over limit", "/v1/chat/completions",
     {"json": {"model": "pulse", "max_tokens": 10**6,
               "messages": [{"role": "user", "content": "x"}]}}, 400, "max_tokens"),
    ("prompt past the context", "/v1/chat/completions",
     {"json": {"model": "pulse", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": sv.image_data_url(_png_bytes((64, 32)))}},
         {"type": "text", "text": " ".join(["sinus"] * 5000)}]}]}}, 400, "messages"),
    ("stream past the context", "/v1/chat/completions",
     {"json": {"model": "pulse", "stream": True, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": sv.image_data_url(_png_bytes((64, 32)))}},
         {"type": "text", "text": " ".join(["sinus"] * 5000)}]}]}}, 400, "messages"),
    ("stream with n 2", "/v1/chat/completions",
     {"json": {"model": "pulse", "stream": True, "n": 2,
               "messages": [{"role": "user", "content": "x"}]}}, 400, "n"),
    ("stream_options without stream", "/v1/chat/completions",
     {"json": {"model": "gpt-4o", "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": "x"}]}}, 400, "stream_options"),
    ("top_logprobs over 20", "/v1/chat/completions",
     {"json": {"model": "pulse", "logprobs": True, "top_logprobs": 21,
               "messages": [{"role": "user", "content": "x"}]}}, 400, "top_logprobs"),
    ("body too large", "/v1/chat/completions",
     {"data": b"x" * (5 * 1024 * 1024), "headers": {"content-type": "application/json"}},
     413, None),
    ("wrong signal shape", "/v1/ecg/interpret",
     {"json": _signal(leads=["I", "II", "III"])}, 400, "samples"),
    ("ragged samples", "/v1/ecg/interpret",
     {"json": _signal(samples=[[0.1, 0.2]] * 999 + [[0.1]])}, 400, "samples"),
    ("NaN samples", "/v1/ecg/interpret",
     {"data": json.dumps(_signal(samples=[[float("nan"), 0.0]] * 1000)),
      "headers": {"content-type": "application/json"}}, 400, "samples"),
    ("missing fs_hz", "/v1/ecg/interpret",
     {"json": {k: v for k, v in _signal().items() if k != "fs_hz"}}, 400, "fs_hz"),
    ("missing options", "/v1/ecg/interpret", {"json": _signal(options=None)}, 400, "options"),
    ("unknown interpret model", "/v1/ecg/interpret", {"json": _signal(model="gpt-5")}, 404,
     "model"),
    ("plain text body", "/v1/ecg/interpret",
     {"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
    ("upload without header", "/v1/ecg/interpret",
     {"files": [("files", ("A0002.mat", b"\x00" * 100))], "data": {"options": OPTIONS[:2]}},
     400, "files"),
]


@pytest.mark.parametrize("name, path, kwargs, status, param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_their_4xx(endpoint, name, path, kwargs, status, param):
    r = requests.post(f"{endpoint['url']}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_replicas_survive_the_bad_requests(endpoint, png):
    # Runs after the table: the same replicas still answer.
    resp = _client(endpoint["url"]).chat.completions.create(
        model="pulse", messages=_image_messages(png), max_tokens=4)
    assert resp.usage.completion_tokens > 0
    usage = requests.get(f"{endpoint['url']}/v1/usage", timeout=30).json()["replica_models"]
    assert usage["pulse"]["requests"] >= 1 and usage["pulse"]["completion_tokens"] > 0


def test_a_replica_that_cannot_start_is_named_with_its_error(endpoint, tiny_pulse_dir,
                                                               tmp_path):
    """``serve.run`` raises only "Deploying application ... failed"; ``ecgvlm serve`` and the
    demo say why with ``replica_start_error`` (here: a weight file cut short, which the
    checks before Ray read only the size and names of)."""
    from ray import serve

    data = min(tiny_pulse_dir.glob("model-*.safetensors")).read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: len(data) // 2])

    # One try, not Serve's three: the message has the same form, and each try starts an actor.
    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_constructor_retry_count=1)
    class Loader:
        def __init__(self, path: str) -> None:
            from safetensors import safe_open

            with safe_open(path, framework="numpy"):
                pass

    with pytest.raises(RuntimeError, match="Deploying application cannot-start failed"):
        serve.run(Loader.bind(str(cut)), name="cannot-start", route_prefix="/cannot-start")
    try:
        error = sv.replica_start_error(serve.status(), "cannot-start")
        assert sv.replica_start_error(serve.status(), "ecgvlm") is None  # the app that runs
    finally:
        serve.delete("cannot-start")
    assert isinstance(error, sv.ReplicaStartError)
    message = str(error)
    assert message.startswith("application 'cannot-start' did not start, its replicas failed: "
                              "Loader: safetensors._safetensors_rust.SafetensorError: "), message
    assert "\n" not in message and "\x1b" not in message
    assert re.search(r"\(in __init__, test_serve\.py:\d+\)$", message), message


# --- auth --------------------------------------------------------------------------------------


def test_auth_off_needs_no_token(endpoint):
    assert requests.get(f"{endpoint['url']}/v1/models", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": TOKEN}, 401),
     ({"Authorization": f"Bearer {TOKEN}"}, 200)],
)
def test_auth_on_every_route_but_health(endpoint, headers, status):
    secure = endpoint["secure"]
    r = requests.get(f"{secure}/v1/models", headers=headers, timeout=30)
    assert r.status_code == status
    if status == 401:
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and "ECGVLM_API_TOKEN" in err["message"]
        assert TOKEN not in r.text
        r = requests.post(f"{secure}/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
        assert requests.post(f"{secure}/v1/ecg/interpret", headers=headers, json=_signal(),
                             timeout=30).status_code == 401
    assert requests.get(f"{secure}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{secure}/readyz", timeout=30).status_code == 200
    client = _client(secure, key=TOKEN)
    assert "gpt-4o" in [m.id for m in client.models.list().data]


def test_the_evaluation_sends_the_token_the_endpoint_was_started_with(endpoint, monkeypatch):
    from ecgvlm.evaluate import EvalConfig
    from ecgvlm.evaluate.client import list_models
    from ecgvlm.evaluate.errors import EvaluationError

    # One variable for both sides: `ecgvlm evaluate` read ECGVLM_API_KEY while the server
    # read ECGVLM_API_TOKEN, so with the README's one export the evaluation got a bare 401.
    key_env = EvalConfig(data_dir="d").endpoint_api_key_env
    assert key_env == sv.ServeArgs().auth_token_env == "ECGVLM_API_TOKEN"
    url = f"{endpoint['secure']}/v1"
    for sent, said in (("EMPTY", "no token was sent"), ("wrong", "it refused the token sent")):
        with pytest.raises(EvaluationError) as raised:
            list_models(url, sent, key_env=key_env)
        assert str(raised.value) == (
            f"endpoint {url} did not list its models: it asks for a token and {said} (401); "
            "set ECGVLM_API_TOKEN to the token the endpoint was started with")
    monkeypatch.setenv(key_env, TOKEN)
    assert "gpt-4o" in list_models(url, os.environ[key_env], key_env=key_env)


# --- `ecgvlm serve` as a user runs it ---------------------------------------------------------

#: Ports Ray binds by default (GCS, dashboard, Ray client, dashboard agent, metrics agent,
#: runtime-env agent as a user's `ray start --head` takes them): `ecgvlm serve` must take none.
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365}


def _listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state held by any of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


#: Ray Serve's fixed default for HAProxy's stats page, on all interfaces.
HAPROXY_DEFAULT_STATS_PORT = 8404


def _hold_port(port: int) -> socket.socket | None:
    """A socket listening on every interface's ``port``, or None where it is taken already."""
    sock = socket.socket()
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_ecgvlm_serve_takes_free_ports_and_sigterm_stops_all_it_started(tiny_pulse_dir,
                                                                        tmp_path, ingress):
    from ecgvlm.local_ray import pids_under, process_cmdline

    port = _free_port()
    # With HAProxy, Serve's own default stats port is taken: a second endpoint on the
    # machine would find it so, and must start all the same.
    held = _hold_port(HAPROXY_DEFAULT_STATS_PORT) if ingress == "haproxy" else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    # A home as on a fresh machine: no ~/.ray/auth_token, which any earlier local
    # ``ray.init`` leaves and which once hid a Ray import made before the private head's
    # token was set (CI, with no such file, failed to connect).
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecgvlm.cli", "serve", "--model-dir", str(tiny_pulse_dir),
         "--port", str(port), "--num-cpus", "4", "--ingress", ingress],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "endpoint ready" in line:
                break
        ready = [ln for ln in lines if "endpoint ready" in ln]
        assert ready, "".join(lines)[-3000:]
        temp_dir = re.search(r"private head in (\S+?)\)", ready[0]).group(1)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        pids = pids_under(temp_dir)
        assert len(pids) >= 3, pids  # GCS, raylet, agents, workers...
        taken = _listening_ports(pids) & RAY_DEFAULT_PORTS
        assert not taken, f"ecgvlm serve's Ray listens on Ray's default port(s) {taken}"

        token = re.search(r"RAY_AUTH_TOKEN=(\w+)", Path(f"/proc/{pids[0]}/environ")
                          .read_bytes().replace(b"\0", b" ").decode()).group(1)
        marker = f"RAY_AUTH_TOKEN={token}"
        # Every process of the head, the raylet's agents among them (they have neither the
        # temp dir nor the token: they once outlived `ecgvlm serve` by a minute).
        running = {p: process_cmdline(p) for p in pids_under(temp_dir, env_marker=marker)}
        names = {re.split(rb"[\0 ]", c)[0] for c in running.values()}
        assert {b"ray::DashboardAgent", b"ray::RuntimeEnvAgent"} <= names, names
        if ingress == "haproxy":
            assert any(name.endswith(b"/haproxy") for name in names), names
            # The request went through HAProxy straight to the gateway replica: HAProxy
            # counts it against that replica's own server.
            stats_url = re.search(r"its stats at (\S+?);", ready[0]).group(1)
            requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).raise_for_status()
            rows = requests.get(f"{stats_url};csv", timeout=30).text.splitlines()
            header = rows[0].lstrip("# ").split(",")
            gateway = [dict(zip(header, r.split(","))) for r in rows if "Gateway" in r]
            assert gateway and int(gateway[0]["stot"]) >= 1, rows
            # Its request log socket is the head's too (Serve's default left a folder in
            # /tmp/haproxy-serve per start).
            assert list(Path(temp_dir).glob("*/metrics.sock")), list(Path(temp_dir).iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines) + proc.stdout.read()[-3000:]
        # Once `ecgvlm serve` has exited, nothing of it answers any more (Serve's HTTP proxy
        # once outlived it by seconds: the next server's health check reached the old one).
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        left = set(pids_under(temp_dir, env_marker=marker))
        left |= {p for p, cmd in running.items() if process_cmdline(p) == cmd}
        assert not left, f"left running after SIGTERM: {[process_cmdline(p)[:60] for p in left]}"
        assert not Path(temp_dir).exists()
    finally:
        if held is not None:
            held.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
