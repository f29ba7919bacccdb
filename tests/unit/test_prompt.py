"""Prompt templates (LLaVA ``llava_v1``) and answer parsing."""

from __future__ import annotations

import base64
import json

import pytest

from ecgvlm import prompt
from ecgvlm.prompt import (
    PROMPT_VERSION,
    PromptError,
    build_prompt,
    build_training_text,
    chat_messages,
    conversation_json,
    conversation_turns,
    format_question,
    format_target,
    llava_record,
    parse_answer,
    prompt_from_messages,
    render_llava_v1,
)

OPTIONS = [
    "Sinus rhythm",
    "Atrial fibrillation",
    "Right bundle branch block",
    "Left bundle branch block",
]
LONG_OPTIONS = [
    "Normal sinus rhythm: rate 60-100 bpm, upright P waves in I and II, PR 120-200 ms.",
    "Atrial fibrillation: irregularly irregular RR intervals with no distinct P waves.",
    "Right bundle branch block: QRS at least 120 ms, rsR' in V1-V2, wide slurred S in I and V6.",
    "Left bundle branch block: QRS at least 120 ms, broad notched R in I, aVL, V5-V6.",
    "Sinus bradycardia: sinus P waves at a rate below 60 bpm.",
]
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_question_letters_options_and_instruction():
    text = format_question("Which finding does this ECG show?", OPTIONS)
    lines = text.split("\n")
    assert lines[0] == "Which finding does this ECG show?"
    assert lines[1:5] == [
        "A. Sinus rhythm",
        "B. Atrial fibrillation",
        "C. Right bundle branch block",
        "D. Left bundle branch block",
    ]
    assert "letter" in lines[5] and "explain" in lines[5]


def test_build_prompt_is_llava_v1_with_image_first():
    text = build_prompt("Q?", ["x", "y"])
    expected = (
        SYSTEM + " USER: <image>\nQ?\nA. x\nB. y\n" + prompt.ANSWER_INSTRUCTION + " ASSISTANT:"
    )
    assert text == expected
    assert text.count("<image>") == 1


def test_finished_conversation_matches_llava_two_style():
    # LLaVA's SeparatorStyle.TWO: system + sep, then "ROLE: msg" + (sep | sep2) alternately.
    full = render_llava_v1([("USER", "hi"), ("ASSISTANT", "hello"), ("USER", "more")])
    assert full == SYSTEM + " USER: hi ASSISTANT: hello</s>USER: more "
    prompt_text, completion = build_training_text("Q?", ["x", "y"], "The answer is B. Because.")
    assert prompt_text == build_prompt("Q?", ["x", "y"])
    assert completion == " The answer is B. Because.</s>"


@pytest.mark.parametrize(
    "turns",
    [
        [("ASSISTANT", "x")],
        [("USER", "a"), ("USER", "b")],
        [("USER", "a"), ("ASSISTANT", None), ("USER", "c")],
    ],
)
def test_render_rejects_bad_turns(turns):
    with pytest.raises(PromptError):
        render_llava_v1(turns)


def test_target_and_conversation_json():
    target = format_target("c", "Wide QRS with rsR' in V1.")
    assert target == "The answer is C. Wide QRS with rsR' in V1."
    turns = json.loads(conversation_json("Q?", OPTIONS, target))
    assert turns == conversation_turns("Q?", OPTIONS, target)
    assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\nQ?\nA. ")
    assert turns[1] == {"from": "gpt", "value": target}
    rec = llava_record("s1", "images/s1.png", "Q?", OPTIONS, target)
    assert rec["id"] == "s1" and rec["image"] == "images/s1.png"
    assert rec["conversations"] == turns


@pytest.mark.parametrize("letter", ["", "AB", "1", "?"])
def test_target_rejects_bad_letters(letter):
    with pytest.raises(PromptError):
        format_target(letter, "x")


@pytest.mark.parametrize("question,options", [("", ["a"]), ("Q", []), ("Q", ["a", " "])])
def test_question_rejects_empty_parts(question, options):
    with pytest.raises(PromptError):
        format_question(question, options)


def test_chat_messages_round_trip_to_the_same_prompt():
    png = b"\x89PNG\r\n\x1a\nfake"
    messages = chat_messages("Q?", OPTIONS, png)
    assert messages[0] == {"role": "system", "content": SYSTEM}
    parts = messages[1]["content"]
    assert parts[0]["type"] == "image_url"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png
    text, images = prompt_from_messages(messages)
    assert text == build_prompt("Q?", OPTIONS)
    assert images == [png]
    # Without a system message the server falls back to LLaVA's line: same prompt.
    text2, _ = prompt_from_messages(chat_messages("Q?", OPTIONS, png, system=None))
    assert text2 == text


def test_prompt_from_messages_multi_turn_and_plain_strings():
    text, images = prompt_from_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ]
    )
    assert text == "Be brief. USER: hi ASSISTANT: hello</s>USER: again ASSISTANT:"
    assert images == []


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}],
    ],
)
def test_prompt_from_messages_rejects(messages):
    with pytest.raises(PromptError):
        prompt_from_messages(messages)


def test_prompt_version_names_template_and_is_stable():
    assert PROMPT_VERSION.startswith("llava_v1-")
    assert PROMPT_VERSION == prompt._prompt_version()


@pytest.mark.parametrize(
    "reply,expected",
    [
        # explicit statements
        ("Answer: (C)", "C"),
        ("the answer is C", "C"),
        ("The answer is C. Wide QRS with rsR' in V1; not A.", "C"),
        ("The answer is **C**.", "C"),
        ("The correct option is (d).", "D"),
        ("Option D", "D"),
        ("My answer would be option b, given the irregular rhythm", "B"),
        ("The answer is A because the rhythm is regular.", "A"),
        ("The answer is a", "A"),
        ("The answer is C, D is wrong", "C"),
        ("The answer is C. It is not option D, which would show a broad R in V6.", "C"),
        ("Option B fits better than option C.", None),
        ("The answer is B, as the RR intervals vary", "B"),
        # a reply opening with its letter
        ("c.", "C"),
        ("C", "C"),
        ("C) Right bundle branch block", "C"),
        ("(b)", "B"),
        ("[D] Left bundle branch block", "D"),
        ("**B. Atrial fibrillation**", "B"),
        ("B - atrial fibrillation", "B"),
        # one parenthesised letter anywhere
        ("I would pick (B) here.", "B"),
        # option text without its letter
        ("Right bundle branch block", "C"),
        ("right bundle-branch block.", "C"),
        ("The ECG shows left bundle branch block with a wide QRS.", "D"),
        ("A left bundle branch block is seen", "D"),
        ("Rigt bundle branch blok", "C"),
        # hedges, conflicts, out-of-range letters and nothing at all
        ("A or B", None),
        ("The answer is A or B.", None),
        ("Answer: C or D", None),
        ("B/C", None),
        ("A, B or C", None),
        ("C and D are both possible", None),
        ("The answer is C. Actually the answer is D.", None),
        ("E.", None),
        ("The answer is E", None),
        ("answer is not A", None),
        ("bundle branch block", None),
        ("The ECG shows atrial fibrillation and left bundle branch block", None),
        ("I cannot tell from this image.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_answer(reply, expected):
    assert parse_answer(reply, OPTIONS) == expected


@pytest.mark.parametrize(
    "reply,expected",
    [
        (LONG_OPTIONS[2], "C"),
        (LONG_OPTIONS[2].replace("Right bundle branch block: ", ""), "C"),
        # A near copy (two words changed) of one option's text.
        ("QRS at least 120 ms, rsR' in V1 and V2, wide slurred S in I and V6.", "C"),
        ("Sinus P waves at a rate below 60 bpm, so this is bradycardia.", "E"),
        ("The answer is E. " + LONG_OPTIONS[4], "E"),
        # A reply that quotes two options' texts commits to neither.
        (LONG_OPTIONS[2][:-1] + "; " + LONG_OPTIONS[3], None),
        # Only the first sentence commits: later ones may describe rejected options.
        (LONG_OPTIONS[2] + " Unlike " + LONG_OPTIONS[3], "C"),
        ("QRS at least 120 ms.", None),
    ],
)
def test_parse_answer_long_descriptions(reply, expected):
    assert parse_answer(reply, LONG_OPTIONS) == expected


def test_parse_answer_round_trips_every_target():
    for i, letter in enumerate("ABCDE"):
        target = format_target(letter, LONG_OPTIONS[i])
        assert parse_answer(target, LONG_OPTIONS) == letter
