"""Prompts and answer parsing: the one place where text goes to and comes from a model.

Training (the LLaVA conversation and its target), serving (OpenAI chat messages turned into a
``llava_v1`` prompt) and evaluation (chat messages for the endpoint and GPT-4o, then
``parse_answer``) all call this module, so a model is asked the same question in the same
words everywhere.

The conversation format is LLaVA's ``llava_v1`` template, which PULSE-7B was trained with:
the system line, then ``USER: <image>\\n<question> ASSISTANT: <answer></s>``. In LLaVA's
``SeparatorStyle.TWO`` a user turn is followed by ``sep`` (a space) and an assistant turn by
``sep2`` (``</s>``); a turn still to be generated is written as ``ASSISTANT:`` with nothing
after the colon, so generation starts right there.

This module imports only the standard library: data workers and the server use it.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
SEP = " "
SEP2 = "</s>"
TEMPLATE_NAME = "llava_v1"

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The instruction closes every question: a letter first (what parse_answer looks for), then
# the explanation that the judge scores.
ANSWER_INSTRUCTION = (
    "Answer with the letter of the correct option, then explain which features of the ECG "
    "support it."
)
OPTION_TEMPLATE = "{letter}. {text}"
TARGET_TEMPLATE = "The answer is {letter}. {explanation}"
#: What a trained model writes after the prompt and before the letter: the llava_v1 separator
#: after ``ASSISTANT:``, then the target's words up to the letter (constrained choices are
#: scored right after it).
ANSWER_PREFIX = SEP + TARGET_TEMPLATE.split("{letter}", 1)[0]


def _prompt_version() -> str:
    """Hash of every template above, so a report can name the exact wording it used."""
    parts = [
        TEMPLATE_NAME, SYSTEM_PROMPT, USER_ROLE, ASSISTANT_ROLE, SEP, SEP2, IMAGE_TOKEN,
        ANSWER_INSTRUCTION, OPTION_TEMPLATE, TARGET_TEMPLATE,
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{TEMPLATE_NAME}-{digest[:10]}"


PROMPT_VERSION = _prompt_version()


class PromptError(ValueError):
    """A question, option list or chat message that cannot be turned into a prompt."""


def option_letters(n_options: int) -> str:
    """The letters of ``n_options`` options: ``option_letters(4) == "ABCD"``."""
    if not 1 <= n_options <= len(LETTERS):
        raise PromptError(f"number of options must be in [1, {len(LETTERS)}], got {n_options}")
    return LETTERS[:n_options]


def letter_index(letter: str, n_options: int) -> int:
    """Index of an option letter (case-insensitive) among ``n_options`` options."""
    letters = option_letters(n_options)
    idx = letters.find(letter.strip().upper()) if len(letter.strip()) == 1 else -1
    if idx < 0:
        raise PromptError(f"letter must be one of {', '.join(letters)}, got {letter!r}")
    return idx


def format_question(question: str, options: Sequence[str]) -> str:
    """The question text a model sees: question, lettered options, answer instruction.

    Args:
        question: The question stem, e.g. "Which finding does this ECG show?".
        options: Option texts in display order; they are lettered A, B, C...

    Returns:
        Lines ``question``, ``A. ...``, ``B. ...``, ..., and the instruction.

    Raises:
        PromptError: on an empty question, no options, or an empty option.
    """
    if not question.strip():
        raise PromptError("question must not be empty")
    letters = option_letters(len(options))
    for i, text in enumerate(options):
        if not str(text).strip():
            raise PromptError(f"option {letters[i]} must not be empty")
    lines = [question.strip()]
    lines += [OPTION_TEMPLATE.format(letter=l, text=str(t).strip()) for l, t in zip(letters, options)]
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def format_target(letter: str, explanation: str) -> str:
    """The training target: ``"The answer is X. <explanation>"``."""
    letter = letter.strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise PromptError(f"answer letter must be a single letter A-Z, got {letter!r}")
    return TARGET_TEMPLATE.format(letter=letter, explanation=explanation.strip()).rstrip()


def user_text(question: str, options: Sequence[str]) -> str:
    """The first user turn as LLaVA stores it: image token, newline, question."""
    return f"{IMAGE_TOKEN}\n{format_question(question, options)}"


def render_llava_v1(
    turns: Sequence[tuple[str, str | None]], system: str = SYSTEM_PROMPT
) -> str:
    """Write (role, text) turns in the ``llava_v1`` (SeparatorStyle.TWO) format.

    A turn whose text is None (or empty) is the one to be generated: written ``ROLE:`` with
    nothing after it, and it must come last.

    Args:
        turns: Alternating (``"USER"``, text) and (``"ASSISTANT"``, text or None) pairs,
            starting with the user.
        system: The system line; LLaVA's by default.

    Raises:
        PromptError: when roles do not alternate from USER, or an open turn is not last.
    """
    seps = (SEP, SEP2)
    out = system + SEP
    for i, (role, text) in enumerate(turns):
        expected = USER_ROLE if i % 2 == 0 else ASSISTANT_ROLE
        if role != expected:
            raise PromptError(f"turn {i} must be {expected}, got {role!r}")
        if text:
            out += f"{role}: {text}{seps[i % 2]}"
        else:
            if i != len(turns) - 1:
                raise PromptError(f"only the last turn may be open; turn {i} is empty")
            out += f"{role}:"
    return out


def build_prompt(question: str, options: Sequence[str]) -> str:
    """The full ``llava_v1`` prompt up to and including ``"ASSISTANT:"``, image token first."""
    return render_llava_v1([(USER_ROLE, user_text(question, options)), (ASSISTANT_ROLE, None)])


def build_training_text(question: str, options: Sequence[str], target: str) -> tuple[str, str]:
    """The prompt and the supervised completion of one training example.

    ``prompt + completion`` is exactly what LLaVA's ``get_prompt`` writes for a finished
    two-turn conversation; only ``completion`` (``" <target></s>"``) is trained on.
    """
    prompt = build_prompt(question, options)
    full = render_llava_v1(
        [(USER_ROLE, user_text(question, options)), (ASSISTANT_ROLE, target.strip())]
    )
    assert full.startswith(prompt)
    return prompt, full[len(prompt):]


def conversation_turns(
    question: str, options: Sequence[str], target: str
) -> list[dict[str, str]]:
    """LLaVA training JSON turns: ``[{"from": "human", ...}, {"from": "gpt", ...}]``."""
    return [
        {"from": "human", "value": user_text(question, options)},
        {"from": "gpt", "value": target.strip()},
    ]


def conversation_json(question: str, options: Sequence[str], target: str) -> str:
    """``conversation_turns`` as a JSON string (the Parquet ``conversation`` column)."""
    return json.dumps(conversation_turns(question, options, target), ensure_ascii=False)


def llava_record(
    sample_id: str, image: str, question: str, options: Sequence[str], target: str
) -> dict[str, Any]:
    """One entry of a LLaVA/PULSE/LLaMA-Factory training JSON list.

    Args:
        sample_id: The sample's id.
        image: Image path relative to the image folder.
        question, options, target: As for ``conversation_turns``.
    """
    return {
        "id": sample_id,
        "image": image,
        "conversations": conversation_turns(question, options, target),
    }


def png_data_url(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URL for chat-completions image parts."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def chat_messages(
    question: str,
    options: Sequence[str],
    png: bytes | None,
    system: str | None = SYSTEM_PROMPT,
) -> list[dict[str, Any]]:
    """OpenAI chat-completions messages asking one MCQ about one PNG image.

    The image part comes before the text, as LLaVA puts the image token first;
    ``prompt_from_messages`` turns these messages back into exactly ``build_prompt``'s text.

    Args:
        question: The question stem.
        options: Option texts in display order.
        png: The ECG printout as PNG bytes; None (or empty) asks the question with no image
            (the evaluation's ``text_only`` baseline).
        system: System message; None leaves it out (the server then uses LLaVA's).
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = []
    if png:
        content.append({"type": "image_url", "image_url": {"url": png_data_url(png)}})
    content.append({"type": "text", "text": format_question(question, options)})
    messages.append({"role": "user", "content": content})
    return messages


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:<mime>;base64,<payload>`` URL.

    Raises:
        PromptError: when the URL is not a base64 data URL (remote URLs are refused: the
            server never fetches from the network).
    """
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise PromptError(
            f"image_url must be a base64 data URL (data:image/png;base64,...), got {url[:40]!r}"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise PromptError("image_url data URL holds invalid base64") from e


def prompt_from_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[bytes]]:
    """Turn OpenAI chat messages into a ``llava_v1`` prompt plus the images it refers to.

    Image parts of a user message become ``<image>\\n`` ahead of its text (LLaVA's order);
    a system message replaces LLaVA's system line; the prompt ends with ``ASSISTANT:``.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str | list[part]}]``,
            where a part is ``{"type": "text", "text": ...}`` or
            ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.

    Returns:
        (prompt, images as bytes in order of appearance).

    Raises:
        PromptError: on unknown roles or part types, non-alternating turns, remote image URLs,
            or a conversation that does not end with a user turn.
    """
    system = SYSTEM_PROMPT
    turns: list[tuple[str, str | None]] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            if i != 0:
                raise PromptError("a system message may only come first")
            system = _content_text(content, images, allow_images=False, where=f"messages[{i}]")
            continue
        if role not in ("user", "assistant"):
            raise PromptError(
                f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}"
            )
        text = _content_text(content, images, allow_images=role == "user", where=f"messages[{i}]")
        turns.append((USER_ROLE if role == "user" else ASSISTANT_ROLE, text))
    if not turns or turns[-1][0] != USER_ROLE:
        raise PromptError("the last message must come from the user")
    turns.append((ASSISTANT_ROLE, None))
    return render_llava_v1(turns, system=system), images


def _content_text(content: Any, images: list[bytes], allow_images: bool, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise PromptError(f"{where}.content must be a string or a list of parts")
    texts: list[str] = []
    n_images = 0
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            if not allow_images:
                raise PromptError(f"{where}.content[{j}]: images are only allowed in user turns")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str):
                raise PromptError(f"{where}.content[{j}].image_url.url must be a string")
            images.append(decode_data_url(url))
            n_images += 1
        else:
            raise PromptError(
                f"{where}.content[{j}].type must be 'text' or 'image_url', got {kind!r}"
            )
    text = "\n".join(t for t in texts if t)
    return (f"{IMAGE_TOKEN}\n" * n_images) + text


# ---------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------

# Words that, after an uppercase "A", show it is the option letter rather than the article.
_AFTER_LETTER_A = r"(?:because|since|as|given|due)\b"
_CONNECTIVE = r"\s*(?i:or|and|/|&|vs\.?|versus)\s*"
# Fuzzy option matching: a near copy of an option's text must reach this similarity, and beat
# the runner-up by the margin, or the answer is left unparsed.
_FUZZY_MIN_RATIO = 0.88
_FUZZY_MARGIN = 0.08


def _letter_token(letters: str) -> str:
    """Regex for one option letter written as an answer (groups ``L1``-``L4``).

    Accepted: ``(C)``, ``[C]``, a letter followed by punctuation or the end (``c.``, ``C)``,
    ``C:``), an uppercase letter standing alone (``C because``), but not the article
    ``A``/``a`` followed by a word ("a left bundle branch block").
    """
    both = letters + letters.lower()
    upper_not_a = letters.replace("A", "") or "(?!)"
    return (
        rf"(?:[(\[](?P<L1>[{both}])[)\]]"
        rf"|\b(?P<L2>[{both}])\b(?=\s*[.):;,*]|\s*$)"
        rf"|\b(?P<L3>[{upper_not_a}])\b(?!['’-])"
        rf"|\b(?P<L4>A)\b(?=\s+{_AFTER_LETTER_A}))"
    )


def _token_letter(match: re.Match[str]) -> str:
    for name in ("L1", "L2", "L3", "L4"):
        value = match.group(name)
        if value:
            return value.upper()
    raise AssertionError("letter token matched without a letter group")


def _followed_by_other_letter(text: str, end: int, letters: str) -> bool:
    """True when a letter at ``end`` is followed by "or B", "/B", "and (b)", "B, C": a hedge.

    A comma counts only before a bare list ("C, D or E"), not before a clause ("C, D is
    wrong").
    """
    other = rf"(?:option\s+|choice\s+)?(?:[(\[][{letters}{letters.lower()}][)\]]|[{letters}]\b)"
    rest = text[end:]
    if re.match(_CONNECTIVE + other, rest):
        return True
    listed = r"\s*,\s*" + other + r"(?=\s*(?:,|/|&|(?i:or|and)\b|[.;)]|$))"
    return re.match(listed, rest) is not None


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z%]+", " ", text.lower()).split())


def parse_answer(text: str | None, options: Sequence[str]) -> str | None:
    """The option letter a model's reply commits to, or None when it commits to none.

    In order: an explicit statement ("The answer is C", "Answer: (C)"), a mention such as
    "option c", a reply that starts with a letter ("C.", "(c)", "C) ..."), a single
    parenthesised letter anywhere, and finally the text of exactly one option (verbatim or a
    near copy, without its letter) in the reply's first sentence.
    A reply naming two letters ("A or B"), conflicting letters, a letter outside the options
    or several options' texts gives None: an unparsed answer is never guessed.

    Args:
        text: The model's reply.
        options: The option texts the question showed, in order (their count fixes the
            valid letters).

    Returns:
        An uppercase letter, or None.
    """
    if not text or not options:
        return None
    letters = option_letters(len(options))
    # Letters a reply might name: at least A-H, so "E" against four options is seen and
    # refused instead of skipped (but "I" in "I think" is no letter unless there are 9+).
    seen = LETTERS[: max(len(letters), 8)]
    body = text.strip()

    def decide(found: list[str]) -> str | None | bool:
        """A letter, None (refuse), or False (nothing found: try the next rule)."""
        if not found:
            return False
        if len(set(found)) != 1 or found[0] not in letters:
            return None
        return found[0]

    # 1. Explicit statements, "answer is C" / "Answer: (c)" first; then "option **C**"
    # mentions, which explanations may also use for the options they rule out.
    for word in ("answer", "(?:option|choice)"):
        explicit = re.compile(
            rf"\b{word}\b"
            r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)\b|\s*[:=\-–]|\s+)"
            r"\s*(?:\*\*)?\s*(?:(?:the\s+)?(?:option|choice|letter)\s*)?[:\-]?\s*(?:\*\*)?\s*"
            + _letter_token(seen),
            flags=re.IGNORECASE,
        )
        found: list[str] = []
        for m in explicit.finditer(body):
            if _followed_by_other_letter(body, m.end(), seen):
                return None
            found.append(_token_letter(m))
        result = decide(found)
        if result is not False:
            return result  # type: ignore[return-value]

    # 2. A reply that opens with its letter: "C.", "(c)", "C) Sinus rhythm", "B - ...".
    lead = re.match(
        r"^[\s*_#>\"'`]*(?:[(\[]\s*(?P<P>[A-Za-z])\s*[)\]]|(?P<Q>[A-Za-z])\s*(?:[.):\]]|-\s|$))",
        body,
    )
    if lead:
        if _followed_by_other_letter(body, lead.end(), seen):
            return None
        return decide([(lead.group("P") or lead.group("Q")).upper()]) or None

    # 3. Exactly one parenthesised letter anywhere ("I would pick (B) here").
    paren = [m.group(1).upper() for m in re.finditer(r"[(\[]([A-Za-z])[)\]]", body)]
    result = decide(paren)
    if result is not False:
        return result  # type: ignore[return-value]

    # 4. The text of one option, without its letter, in the reply's first sentence (later
    # sentences may describe the options ruled out).
    return _match_option_text(_first_sentence(body), options, letters)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0]


def _option_parts(option: str) -> list[str]:
    """Normalised texts that name an option: all of it, and for "Name: description" each half."""
    parts = [option]
    name, sep, description = option.partition(":")
    if sep and name.strip() and description.strip():
        parts += [name, description]
    normalised = [_normalise(p) for p in parts]
    return [p for p in dict.fromkeys(normalised) if p]


def _match_option_text(body: str, options: Sequence[str], letters: str) -> str | None:
    norm_body = _normalise(body)
    if not norm_body:
        return None
    parts = [_option_parts(str(o)) for o in options]

    # Verbatim: the longest part of each option found in the reply.
    found: dict[int, str] = {}
    for i, option_parts in enumerate(parts):
        for part in option_parts:
            if re.search(rf"\b{re.escape(part)}\b", norm_body) and len(part) > len(found.get(i, "")):
                found[i] = part
    if found:
        # A match lying inside another option's match is not evidence ("sinus rhythm" inside
        # "sinus rhythm with ...").
        maximal = [
            i for i, text in found.items()
            if not any(j != i and text in other for j, other in found.items())
        ]
        return letters[maximal[0]] if len(maximal) == 1 else None

    # Near copies: slide a window the length of each part over the reply.
    scores = sorted(
        (
            (max(_best_window_ratio(norm_body, p) for p in option_parts), i)
            for i, option_parts in enumerate(parts)
            if option_parts
        ),
        reverse=True,
    )
    if not scores:
        return None
    best, idx = scores[0]
    runner_up = scores[1][0] if len(scores) > 1 else 0.0
    if best >= _FUZZY_MIN_RATIO and best - runner_up >= _FUZZY_MARGIN:
        return letters[idx]
    return None


def _best_window_ratio(body: str, option: str) -> float:
    n = len(option)
    if len(body) <= n:
        starts = [0]
    else:
        step = max(1, n // 10)
        starts = list(range(0, len(body) - n + 1, step)) + [len(body) - n]
    best = 0.0
    for s in starts:
        window = body[s : s + n]
        matcher = difflib.SequenceMatcher(None, option, window, autojunk=False)
        if matcher.real_quick_ratio() < best or matcher.quick_ratio() < best:
            continue
        best = max(best, matcher.ratio())
    return best
