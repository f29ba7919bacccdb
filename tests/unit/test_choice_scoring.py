"""Constrained choice (vLLM's ``guided_choice``): one forward pass scores every choice after
the trained answer prefix; through the replica and the request schema."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from ecgvlm import serving as sv
from ecgvlm.infer import score_choices
from ecgvlm.model import load_pulse
from ecgvlm.prompt import ANSWER_PREFIX, build_prompt, build_training_text, format_target
from tests.unit.pulse_support import noise_image, one_torch_thread  # noqa: F401

OPTIONS = ["Atrial fibrillation", "Normal sinus rhythm", "Right bundle branch block",
           "Left bundle branch block"]
LETTERS = ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def tiny(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)


def _direct(model, processor, prompt, image, choice, all_choices):
    """log p(choice | prompt + prefix) from a plain forward pass over the whole text."""
    texts = [prompt + ANSWER_PREFIX + c for c in all_choices]
    encoded = processor.encode_prompts(texts)
    shared = next(i for i in range(min(map(len, encoded)))
                  if len({tuple(e[: i + 1]) for e in encoded}) > 1)
    full = encoded[list(all_choices).index(choice)]
    ids = full[shared:]
    batch = processor([prompt + ANSWER_PREFIX + choice], [image])
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[0].float(), -1)
    # The choice's token j sits at position -len(ids) + j and is predicted one position before.
    return sum(float(logp[-len(ids) + j - 1, t]) for j, t in enumerate(ids))


def test_the_answer_prefix_is_what_training_puts_before_the_letter():
    _, completion = build_training_text("Which?", OPTIONS, format_target("C", "Because."))
    assert completion.startswith(ANSWER_PREFIX + "C.") and ANSWER_PREFIX == " The answer is "


def test_choice_logprobs_equal_a_direct_forward_pass_and_sum_to_one(tiny):
    model, processor = tiny
    prompt = build_prompt("Which finding does this ECG show?", OPTIONS)
    image = noise_image(200, 90, 0)
    (letters,) = score_choices(model, processor, [prompt], [image], [LETTERS])
    for letter in LETTERS:
        assert letters.sequence_logprobs[letter] == pytest.approx(
            _direct(model, processor, prompt, image, letter, LETTERS), abs=1e-5)
    probs = torch.tensor(list(letters.logprobs.values()), dtype=torch.float64).exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    assert letters.best == max(letters.logprobs, key=letters.logprobs.get)
    # Multi-token choices: each is a row of its own, its tokens' log-probabilities summed.
    (words,) = score_choices(model, processor, [prompt], [image], [OPTIONS[:2]])
    for option in OPTIONS[:2]:
        assert words.sequence_logprobs[option] == pytest.approx(
            _direct(model, processor, prompt, image, option, OPTIONS[:2]), abs=1e-4)


def test_choices_score_the_same_batched_and_alone(tiny):
    model, processor = tiny
    prompts = [build_prompt("Which?", OPTIONS), build_prompt("Rhythm?", OPTIONS[:2])]
    images = [noise_image(200, 90, 0), noise_image(96, 48, 1)]
    choices = [LETTERS, OPTIONS[:2]]
    batched = score_choices(model, processor, prompts, images, choices)
    for i in range(2):
        (alone,) = score_choices(model, processor, [prompts[i]], [images[i]], [choices[i]])
        for c in choices[i]:  # probabilities, to 1e-5 (padding changes float32 sums)
            assert math.exp(batched[i].logprobs[c]) == pytest.approx(
                math.exp(alone.logprobs[c]), abs=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        score_choices(model, processor, prompts[:1], images[:1], [["A", "A"]])


def _text_only(question, options):
    """The prompt the endpoint builds for a question sent with no image part."""
    from ecgvlm.prompt import chat_messages, prompt_from_messages

    prompt, images = prompt_from_messages(chat_messages(question, options, None))
    assert images == [] and "<image>" not in prompt
    return prompt


def test_text_only_prompts_score_and_generate_the_same_batched_and_alone(tiny):
    from ecgvlm.infer import generate
    from ecgvlm.model.processor import PromptError

    model, processor = tiny
    prompts = [_text_only("Which?", OPTIONS), _text_only("Rhythm now, in one word?", OPTIONS[:2])]
    choices = [LETTERS, OPTIONS[:2]]
    batched = score_choices(model, processor, prompts, None, choices)
    for i in range(2):
        (alone,) = score_choices(model, processor, [prompts[i]], None, [choices[i]])
        for c in choices[i]:  # left padding and position ids: the same probabilities
            assert math.exp(batched[i].logprobs[c]) == pytest.approx(
                math.exp(alone.logprobs[c]), abs=1e-5)
    # The tiny model barely feels positions (random rotary weights: 1e-6), so that equality
    # cannot show the left-padded rows are numbered as unpadded ones; what reaches the model
    # can: each row's first real token is position 0, as the image merge numbers them.
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        score_choices(model, processor, prompts, None, choices)
    finally:
        hook.remove()
    mask, positions = seen[0]["attention_mask"], seen[0]["position_ids"]
    for row in range(len(mask)):
        real = mask[row].bool()
        assert positions[row][real].tolist() == list(range(int(real.sum())))
    # Against a plain forward pass over the unpadded text.
    ids = processor.encode_prompts([prompts[0] + ANSWER_PREFIX + "C"], with_image=False)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -2].float(), -1)
    assert batched[0].sequence_logprobs["C"] == pytest.approx(float(logp[ids[-1]]), abs=1e-5)
    together = generate(model, processor, prompts, None, max_new_tokens=5)
    for i in range(2):
        assert generate(model, processor, [prompts[i]], None, max_new_tokens=5)[0].text == together[i].text
    with pytest.raises(PromptError, match="without an image but contains 1"):
        score_choices(model, processor, [build_prompt("Which?", OPTIONS)], None, [LETTERS])


def test_one_letter_choice_is_one_row_per_prompt(tiny):
    model, processor = tiny
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(tuple(out.shape)))
    try:
        score_choices(model, processor, [build_prompt("Which?", OPTIONS)] * 3,
                      [noise_image(96, 48, i) for i in range(3)], [LETTERS] * 3)
    finally:
        hook.remove()
    assert len(rows) == 1 and rows[0][:2] == (3, 1)  # one pass, 3 rows, the last position


def _png(seed=0) -> bytes:
    buf = io.BytesIO()
    noise_image(96, 48, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_the_replica_answers_choices_and_generation_in_one_batch(tiny_pulse_dir):
    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    prompt = build_prompt("Which?", OPTIONS)
    choose = sv.GenerateRequest(prompt, _png(0), guided_choice=tuple(LETTERS))
    write = sv.GenerateRequest(prompt, _png(1), max_new_tokens=3)
    chosen, written = runner.generate([choose, write])
    assert chosen.choice_logprobs is not None and written.choice_logprobs is None
    assert chosen.choice_logprobs[0][0] == chosen.text
    assert sorted(c for c, _ in chosen.choice_logprobs) == LETTERS
    assert chosen.completion_tokens == 1 and written.completion_tokens >= 1
    assert runner.generate([choose])[0] == chosen
    body = sv.completion_response("pulse", chosen.text, chosen.prompt_tokens, 1,
                                  logprobs=sv.choice_logprobs(chosen.choice_logprobs))
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == chosen.text == body["choices"][0]["message"]["content"]
    assert [t["token"] for t in entry["top_logprobs"]] == [c for c, _ in chosen.choice_logprobs]
    assert entry["bytes"] == list(chosen.text.encode())


def test_the_replica_answers_questions_without_an_image_beside_those_with_one(tiny_pulse_dir):
    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    with_image = sv.GenerateRequest(build_prompt("Which?", OPTIONS), _png(0), guided_choice=tuple(LETTERS))
    text = sv.GenerateRequest(_text_only("Which?", OPTIONS), None, guided_choice=tuple(LETTERS))
    written = sv.GenerateRequest(_text_only("Rate?", OPTIONS), None, max_new_tokens=3)
    both = runner.generate([with_image, text, written])
    assert runner.generate([text])[0] == both[1] and runner.generate([with_image])[0] == both[0]
    assert both[1].choice_logprobs is not None and both[1].prompt_tokens < both[0].prompt_tokens
    assert both[2].completion_tokens >= 1


def _chat(**extra) -> bytes:
    return json.dumps({"model": "pulse", "messages": [{"role": "user", "content": "x"}],
                       **extra}).encode()


@pytest.mark.parametrize("extra, param", [
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["A", "B", "A"]}, "guided_choice"),
    ({"guided_choice": [chr(65 + i % 26) * (1 + i // 26) for i in range(27)]}, "guided_choice"),
    ({"guided_choice": ["x" * 65]}, "guided_choice[0]"),
    ({"guided_choice": [""]}, "guided_choice[0]"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_choice_requests_are_400s_naming_the_field(extra, param):
    with pytest.raises(sv.ApiError) as e:
        sv.parse_chat_request(_chat(**extra), sv.ServeLimits())
    assert e.value.status == 400 and e.value.param == param, e.value.message
    ok = sv.parse_chat_request(_chat(guided_choice=LETTERS, logprobs=True, top_logprobs=4),
                               sv.ServeLimits())
    assert ok.guided_choice == LETTERS
