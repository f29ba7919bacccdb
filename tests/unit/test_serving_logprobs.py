"""Log-probabilities of generated tokens, streaming and cancellation on the tiny PULSE: what
``ecgvlm.infer.generate`` reports against a plain forward pass, and what the replica
(``PulseRunner``) hands the endpoint."""

from __future__ import annotations

import io

import pytest
import torch

from ecgvlm import serving as sv
from ecgvlm.infer import generate, generate_batched
from ecgvlm.model import load_pulse
from ecgvlm.prompt import build_prompt
from tests.unit.pulse_support import noise_image, one_torch_thread  # noqa: F401

OPTIONS = ["Atrial fibrillation", "Normal sinus rhythm", "Sinus bradycardia"]


@pytest.fixture(scope="module")
def tiny(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)


@pytest.fixture(scope="module")
def runner(tiny_pulse_dir):
    return sv.PulseRunner(str(tiny_pulse_dir), device="cpu")


def _direct_logprobs(model, processor, prompt, image, token_ids, temperature=0.0):
    """log_softmax of a plain forward pass over prompt + ``token_ids``: row j is the
    distribution token j was drawn from."""
    batch = processor([prompt], [image])
    ids = torch.tensor([token_ids])
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
    with torch.no_grad():
        logits = model(**batch).logits[0, -len(token_ids) - 1:-1].float()
    return torch.log_softmax(logits / (temperature or 1.0), -1)


def _check_against_direct(model, processor, prompt, image, gen, k, temperature=0.0):
    ids = [e.token_id for e in gen.logprobs]
    assert len(ids) >= 5
    direct = _direct_logprobs(model, processor, prompt, image, ids, temperature)
    for j, entry in enumerate(gen.logprobs):
        assert entry.logprob == pytest.approx(float(direct[j, entry.token_id]), abs=1e-4)
        values, indices = direct[j].topk(k)
        assert [t for t, _ in entry.top] == indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        if temperature == 0:  # greedy: the chosen token is the most probable one
            assert entry.token_id == entry.top[0][0]


def test_generated_logprobs_equal_a_direct_forward_pass_batched_and_alone(tiny):
    model, processor = tiny
    prompts = [build_prompt("Which rhythm?", OPTIONS), build_prompt("Rate?", OPTIONS[:2])]
    images = [noise_image(200, 90, 0), noise_image(96, 48, 1)]  # different lengths: padding
    batched = generate_batched(model, processor, prompts, images, max_new_tokens=12,
                               top_logprobs=5)
    for i in range(2):
        _check_against_direct(model, processor, prompts[i], images[i], batched[i], 5)
        (alone,) = generate(model, processor, prompts[i:i + 1], images[i:i + 1],
                            max_new_tokens=12, top_logprobs=5)
        assert alone.text == batched[i].text
        assert [e.token_id for e in alone.logprobs] == [e.token_id for e in batched[i].logprobs]
    # Asking for logprobs changes nothing else.
    plain = generate(model, processor, prompts, images, max_new_tokens=12)
    assert [g.text for g in plain] == [g.text for g in batched]
    assert all(g.logprobs is None for g in plain)


def test_sampled_logprobs_are_of_the_tempered_distribution(tiny):
    model, processor = tiny
    prompt, image = build_prompt("Which rhythm?", OPTIONS), noise_image(200, 90, 0)
    (gen,) = generate(model, processor, [prompt], [image], max_new_tokens=10,
                      temperature=0.7, seed=3, top_logprobs=3)
    _check_against_direct(model, processor, prompt, image, gen, 3, temperature=0.7)
    (again,) = generate(model, processor, [prompt], [image], max_new_tokens=10,
                        temperature=0.7, seed=3, top_logprobs=3)
    assert again == gen


def test_on_token_and_cancellation(tiny):
    model, processor = tiny
    prompts = [build_prompt("Which rhythm?", OPTIONS)] * 2
    images = [noise_image(96, 48, 0), noise_image(96, 48, 1)]
    seen: list[tuple[int, int, int]] = []

    def on_token(row, step, token, logprob):
        seen.append((row, step, token))

    stop_after = 3
    out = generate(model, processor, prompts, images, max_new_tokens=40, on_token=on_token,
                   is_cancelled=lambda row: row == 0 and sum(r == 0 for r, _, _ in seen)
                   >= stop_after)
    assert out[0].cancelled and out[0].completion_tokens == stop_after
    assert not out[1].cancelled and out[1].completion_tokens == 40
    assert [s for r, s, _ in seen if r == 1] == list(range(40))
    (alone,) = generate(model, processor, prompts[1:], images[1:], max_new_tokens=40)
    assert out[1].text == alone.text  # the other row goes on unchanged


def test_bad_top_logprobs_is_refused(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="top_logprobs"):
        generate(model, processor, [build_prompt("x", OPTIONS)], [noise_image(96, 48, 0)],
                 max_new_tokens=2, top_logprobs=21)


# -- the replica ---------------------------------------------------------------------------------


def _png(seed=0, size=(96, 48)) -> bytes:
    buf = io.BytesIO()
    noise_image(*size, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_the_replica_returns_each_tokens_logprob_with_its_bytes(runner):
    prompt = build_prompt("Which rhythm?", OPTIONS)
    want = sv.GenerateRequest(prompt, _png(0), max_new_tokens=8, top_logprobs=3)
    plain = sv.GenerateRequest(prompt, _png(1), max_new_tokens=8)
    got, other = runner.generate([want, plain])
    assert other.token_logprobs is None  # batched together, only one asked
    (alone,) = runner.generate([sv.GenerateRequest(prompt, _png(0), max_new_tokens=8)])
    assert got.text == alone.text
    assert len(got.token_logprobs) == got.completion_tokens  # no end-of-sequence in 8 tokens
    for entry in got.token_logprobs:
        assert len(entry.top) == 3 and entry.top[0].logprob == entry.logprob  # greedy
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top),
                                                        reverse=True)
        assert entry.token == bytes(entry.bytes).decode("utf-8", "backslashreplace")
    # The tokens' bytes are the answer's (the tokenizer's word-boundary marker is a space).
    raw = b"".join(bytes(e.bytes) for e in got.token_logprobs)
    assert raw.decode("utf-8", "replace").strip() == got.text
    body = sv.completion_response("pulse", got.text, got.prompt_tokens, got.completion_tokens,
                                  logprobs=sv.logprobs_json(got.token_logprobs))
    content = body["choices"][0]["logprobs"]["content"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_a_streamed_answer_adds_up_to_the_answer_token_by_token(runner):
    prompt = build_prompt("Which rhythm?", OPTIONS)
    # The tiny model writes many byte tokens: partial UTF-8 characters are held back.
    req = sv.GenerateRequest(prompt, _png(0), max_new_tokens=120, top_logprobs=1)
    deltas: list[sv.StreamDelta] = []
    hooks = sv.RequestHooks(on_delta=deltas.append)
    (streamed, plain) = runner.generate([req, req], [hooks, None])
    assert streamed == plain
    assert "".join(d.text for d in deltas) == streamed.text
    assert len(deltas) > 20  # token by token, not at the end
    assert tuple(e for d in deltas for e in d.logprobs) == streamed.token_logprobs
    assert sv.StreamDelta.merge(deltas).text == streamed.text


def test_a_request_whose_client_left_stops_and_leaves_nothing_in_flight(runner):
    prompt = build_prompt("Which rhythm?", OPTIONS)
    req = sv.GenerateRequest(prompt, _png(0), max_new_tokens=200)
    before = runner.stats()
    seen: list[sv.StreamDelta] = []
    hooks = sv.RequestHooks()
    in_flight_during: list[int] = []

    def on_delta(delta):
        seen.append(delta)
        in_flight_during.append(runner.stats()["in_flight"])
        if len(seen) == 3:
            hooks.cancel.set()  # what the replica does when the caller goes away

    hooks.on_delta = on_delta
    left_early = sv.RequestHooks()
    left_early.cancel.set()
    short = sv.GenerateRequest(prompt, _png(1), max_new_tokens=5)
    stopped, never, other = runner.generate([req, req, short], [hooks, left_early, None])
    assert in_flight_during[0] == 3
    assert stopped.completion_tokens < 10  # stopped at its next token, not at 200
    assert isinstance(never, sv.ApiError) and never.status == sv.CLIENT_CLOSED
    assert other.completion_tokens == 5
    stats = runner.stats()
    assert stats["in_flight"] == 0 and stats["cancelled"] == before["cancelled"] + 2
    # One call, one batch of three (cancelled ones count: they were in the batch).
    assert stats["batches"] == before["batches"] + 1
    assert stats["batched_requests"] == before["batched_requests"] + 3
