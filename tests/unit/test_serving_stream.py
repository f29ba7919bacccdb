"""Streaming events, the gpt-4o route's logprobs, streams and constrained choices against a
fake upstream on loopback, and /v1/ecg/interpret's probabilities (no Ray)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ecgvlm import serving as sv
from ecgvlm.serving.proxy import UPSTREAM_TOP_LOGPROBS, choice_instruction, rank_choices
from tests.fakes.openai_server import FakeOpenAIServer, Reply

LN = math.log


def _parse_events(events: list[str]) -> list[dict | str]:
    out = []
    for event in events:
        assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
        data = event[len("data: "):-2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- chunks ---------------------------------------------------------------------------------------


def test_chunk_writer_writes_openai_chunks_with_usage_last():
    writer = sv.ChunkWriter("pulse", include_usage=True)
    entry = sv.LogprobEntry.of(b" sinus", -0.25, (sv.LogprobEntry.of(b" sinus", -0.25),))
    events = _parse_events([writer.role(), writer.content("Sin", [entry]), writer.content("us"),
                            writer.finish("stop"),
                            writer.usage(sv.usage_json(10, 2)), sv.DONE_EVENT])
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert {c.id for c in chunks} == {writer.id} and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Sinus"
    assert chunks[1].choices[0].logprobs.content[0].token == " sinus"
    assert chunks[1].choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.25
    assert chunks[2].choices[0].logprobs is None
    assert chunks[3].choices[0].finish_reason == "stop"
    assert all(e["usage"] is None for e in events[:-2])  # usage: null until the last chunk
    assert chunks[4].choices == [] and chunks[4].usage.total_tokens == 12


def test_a_complete_answer_streams_as_one_delta_with_its_logprobs():
    ranked = [("B", LN(0.7)), ("A", LN(0.3))]
    completion = sv.completion_response("pulse", "B", 20, 1, logprobs=sv.choice_logprobs(ranked))
    events = _parse_events(sv.completion_events(completion, include_usage=False))
    assert events[-1] == "[DONE]" and len(events) == 4
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert chunks[1].choices[0].delta.content == "B"
    top = chunks[1].choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.logprob) for t in top] == ranked
    assert all("usage" not in e for e in events[:-1])


# -- constrained choice from an upstream's top log-probabilities ---------------------------------


def test_rank_choices_by_hand():
    top = [("A", LN(0.5)), (" A", LN(0.1)), ("B", LN(0.2)), ("The", LN(0.15)), ("b", LN(0.05))]
    ranked = dict(rank_choices(top, ["A", "B", "C"]))
    # A: 0.5 + 0.1; B: 0.2; C is not listed: the smallest listed (0.05) / 20.
    c = 0.05 / UPSTREAM_TOP_LOGPROBS
    total = 0.6 + 0.2 + c
    assert list(ranked) == ["A", "B", "C"]
    assert ranked["A"] == pytest.approx(LN(0.6 / total))
    assert ranked["B"] == pytest.approx(LN(0.2 / total))
    assert ranked["C"] == pytest.approx(LN(c / total))
    assert sum(math.exp(v) for v in ranked.values()) == pytest.approx(1.0)
    # Multi-token choices: a token that starts only one choice counts for it; one that starts
    # two counts for neither.
    words = ["Atrial fibrillation", "Atrial flutter", "Sinus rhythm"]
    ranked = dict(rank_choices([("Atrial", LN(0.6)), (" Sin", LN(0.3))], words))
    assert ranked["Sinus rhythm"] == pytest.approx(LN(0.3 / (0.3 + 2 * 0.3 / 20)))
    assert ranked["Atrial fibrillation"] == ranked["Atrial flutter"]
    # No choice listed: uniform, in the order given.
    ranked = rank_choices([("The", LN(0.9))], ["A", "B"])
    assert [c for c, _ in ranked] == ["A", "B"] and ranked[0][1] == pytest.approx(LN(0.5))
    with pytest.raises(ValueError):
        rank_choices([], ["A"])


# -- the gpt-4o proxy against a fake upstream -----------------------------------------------------


def _top(pairs):
    return {"content": [{"token": pairs[0][0], "logprob": pairs[0][1], "bytes": [65],
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                          for t, lp in pairs]}]}


@pytest.fixture()
def upstream():
    with FakeOpenAIServer() as server:
        yield server


def _proxy(server):
    return sv.OpenAIProxy(sv.OpenAISettings(base_url=server.base_url, max_retries=0), "sk-test")


def _request(**fields):
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Which rhythm?"}],
            **fields}
    return sv.parse_chat_request(json.dumps(body).encode(), sv.ServeLimits())


def test_gpt4o_passes_logprobs_through(upstream):
    logprobs = _top([("B", LN(0.8)), ("A", LN(0.15))])
    upstream.script(Reply(content="B", logprobs=logprobs))
    out = asyncio.run(_proxy(upstream).complete(_request(logprobs=True, top_logprobs=2)))
    sent = upstream.chat_requests[-1].json
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    parsed = ChatCompletion.model_validate(out)
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "A"


@pytest.mark.parametrize("content", ["Which rhythm?", [{"type": "text", "text": "Which?"}]])
def test_gpt4o_answers_a_constrained_choice_in_pulses_shape(upstream, content):
    upstream.script(Reply(content="B", logprobs=_top(
        [("B", LN(0.6)), (" B", LN(0.1)), ("A", LN(0.2)), ("The", LN(0.05))])))
    req = _request(guided_choice=["A", "B", "C"], temperature=0.0,
                   messages=[{"role": "user", "content": content}])
    out = asyncio.run(_proxy(upstream).complete(req))
    sent = upstream.chat_requests[-1].json
    assert (sent["max_tokens"], sent["logprobs"], sent["top_logprobs"]) == (1, True, 20)
    assert "guided_choice" not in sent and sent["temperature"] == 0.0
    last = sent["messages"][-1]["content"]
    text = last if isinstance(last, str) else last[-1]["text"]
    assert text.endswith(choice_instruction(["A", "B", "C"])) and "A, B, C" in text
    # What the PULSE models answer: content[0] the chosen string, every choice ranked.
    reply = ChatCompletion.model_validate(out)
    entry = reply.choices[0].logprobs.content[0]
    assert reply.choices[0].message.content == entry.token == "B"
    assert [t.token for t in entry.top_logprobs] == ["B", "A", "C"]
    c = 0.05 / 20
    assert entry.top_logprobs[0].logprob == pytest.approx(LN(0.7 / (0.9 + c)))
    assert sum(math.exp(t.logprob) for t in entry.top_logprobs) == pytest.approx(1.0)
    assert reply.usage.completion_tokens == 1


def test_gpt4o_choice_without_upstream_logprobs_is_a_502(upstream):
    upstream.script(Reply(content="B"))
    with pytest.raises(sv.ApiError) as e:
        asyncio.run(_proxy(upstream).complete(_request(guided_choice=["A", "B"])))
    assert e.value.status == 502 and e.value.code == "upstream_no_logprobs"


def test_gpt4o_stream_passes_the_upstreams_chunks_through(upstream):
    upstream.script("The answer is B. Irregular rhythm.")

    async def collect():
        return [c async for c in _proxy(upstream).stream(
            _request(stream=True, stream_options={"include_usage": True}))]

    chunks = [ChatCompletionChunk.model_validate(c) for c in asyncio.run(collect())]
    sent = upstream.chat_requests[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The answer is B. Irregular rhythm."
    assert chunks[-1].usage.total_tokens == 2 and chunks[-2].choices[0].finish_reason == "stop"


# -- /v1/ecg/interpret's probabilities ------------------------------------------------------------


def test_interpret_reports_probabilities_and_uncertainty():
    ranked = [("B", LN(0.55)), ("A", LN(0.3)), ("C", LN(0.15))]
    usage = sv.usage_json(1, 1)
    out = sv.interpret_response("pulse", "The answer is B.", "Q?", ["x", "y", "z"], usage,
                                choice_logprobs=ranked, abstain_below=0.6)
    assert list(out["probabilities"]) == ["A", "B", "C"]
    assert out["probabilities"]["B"] == pytest.approx(0.55)
    assert out["uncertain"] is True and out["abstain_below"] == 0.6
    sure = sv.interpret_response("pulse", "B", "Q?", ["x", "y", "z"], usage,
                                 choice_logprobs=ranked, abstain_below=0.5)
    assert sure["uncertain"] is False and sure["answer_letter"] == "B"
    never = sv.interpret_response("pulse", "B", "Q?", ["x", "y", "z"], usage,
                                  choice_logprobs=ranked)
    assert never["uncertain"] is False  # abstain_below 0: never uncertain


@pytest.mark.parametrize("value", [1.0, -0.1, "high"])
def test_abstain_below_must_be_a_probability_below_one(value):
    with pytest.raises(ValueError, match="abstain_below"):
        sv.ServeArgs(abstain_below=value)
    assert sv.ServeArgs(abstain_below=0.7).abstain_below == 0.7


def test_cli_serve_refuses_a_bad_abstain_below_before_starting_ray(tmp_path, capsys):
    from ecgvlm.cli import main

    assert main(["serve", "--model-dir", str(tmp_path), "--abstain-below", "1.5"]) == 2
    assert "abstain_below" in capsys.readouterr().err
