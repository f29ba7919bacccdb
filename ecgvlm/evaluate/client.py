"""The HTTP client of the evaluation: chat requests with retries, the model list, one
prediction row per request.

Nothing here opens a connection on import.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ecgvlm.evaluate.errors import EvaluationError
from ecgvlm.serving.limits import MAX_TOP_LOGPROBS  # OpenAI's and our endpoint's bound

#: How a model may answer a question: a constrained choice among the option letters (with
#: every option's probability) or free text with an explanation.
ANSWER_MODES: tuple[str, ...] = ("choice", "generate")

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 30.0


@dataclass
class ChatResult:
    """One chat request's outcome: the reply text, or the error after all retries.

    ``choice_logprobs`` holds, for a constrained-choice request, each choice's
    log-probability as the server reported it.
    """

    text: str | None
    error: str | None
    latency_s: float
    attempts: int
    choice_logprobs: dict[str, float] | None = None


class NoChoiceScoresError(Exception):
    """A constrained-choice reply without the choices' log-probabilities (a server that does
    not take ``guided_choice``): asking again will not help."""


def choice_logprobs_of(response: Any, choices: list[str]) -> dict[str, float]:
    """The log-probability of each choice in a constrained-choice reply.

    Read from ``choices[0].logprobs.content[0].top_logprobs``: our endpoint lists every
    choice there; vLLM lists the first token's most probable tokens, which are the choices
    for single-letter options. Tokens are compared without surrounding spaces; a choice the
    reply does not list is left out (probability 0 once normalised).

    Raises:
        NoChoiceScoresError: when the reply lists none of the choices.
    """
    logprobs = getattr(response.choices[0], "logprobs", None)
    content = getattr(logprobs, "content", None) or []
    found: dict[str, float] = {}
    for entry in (content[0].top_logprobs or []) if content else []:
        token = str(entry.token).strip()
        if token in choices and token not in found:
            found[token] = float(entry.logprob)
    if not found:
        raise NoChoiceScoresError(
            "the reply carries no log-probabilities of the choices (does the server take "
            "guided_choice with logprobs? answer_mode: [generate] asks for free text only)"
        )
    return found


def _retry_after_s(error: Any) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ChatClient:
    """Calls ``POST {endpoint}/chat/completions`` with retries and backoff.

    Built on the ``openai`` client with its own retries off, so the retry policy (which
    errors, how many times, how long to wait) is this class's and is counted per request.

    Args:
        endpoint: Base URL ending in ``/v1``.
        api_key: Sent as a bearer token; local endpoints ignore it.
        timeout_s, max_retries, backoff_s, max_tokens, temperature: As in EvalConfig.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str = "EMPTY",
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        import openai

        self._openai = openai
        self.client = openai.OpenAI(
            base_url=endpoint, api_key=api_key, timeout=timeout_s, max_retries=0
        )
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._rng = random.Random()

    def _retryable(self, error: Exception) -> bool:
        openai = self._openai
        if isinstance(error, NoChoiceScoresError):
            return False
        if isinstance(error, openai.APIStatusError):
            return error.status_code in _RETRYABLE_STATUS
        # Connection refused/reset, time-outs, and a body that is not a completion.
        return isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError,
                                  ValueError))

    def chat(
        self, model: str, messages: list[dict[str, Any]], guided_choice: list[str] | None = None
    ) -> ChatResult:
        """The assistant's reply text, or the last error once retries are spent.

        With ``guided_choice`` the request is vLLM's constrained choice (sent in the body as
        ``guided_choice``, with ``logprobs``), and the result carries every choice's
        log-probability (see ``choice_logprobs_of``).
        """
        start = time.perf_counter()
        attempt = 0
        extra: dict[str, Any] = {}
        if guided_choice is not None:
            extra = {"extra_body": {"guided_choice": guided_choice}, "logprobs": True,
                     "top_logprobs": min(len(guided_choice), MAX_TOP_LOGPROBS)}
        while True:
            attempt += 1
            try:
                response = self.client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    **extra,
                )
                if not response.choices:
                    raise ValueError("reply has no choices")
                text = response.choices[0].message.content or ""
                scores = choice_logprobs_of(response, guided_choice) if guided_choice else None
                return ChatResult(text, None, time.perf_counter() - start, attempt, scores)
            except Exception as e:  # noqa: BLE001 - classified below; never dropped
                if attempt > self.max_retries or not self._retryable(e):
                    message = f"{type(e).__name__}: {e}"
                    return ChatResult(None, message[:500], time.perf_counter() - start, attempt)
                delay = _retry_after_s(e)
                if delay is None:
                    delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + self._rng.random())
                time.sleep(min(delay, _MAX_BACKOFF_S))

    def close(self) -> None:
        self.client.close()


def list_models(endpoint: str, api_key: str = "EMPTY", timeout_s: float = 10.0,
                key_env: str | None = None) -> dict[str, str | None]:
    """The models ``GET {endpoint}/models`` lists: id -> None when it can answer, else why not.

    ``key_env`` names the variable ``api_key`` came from, for the message of a refused token.

    Raises:
        EvaluationError: when the endpoint cannot be reached or answers with an error.
    """
    cards = list_model_cards(endpoint, api_key, timeout_s, key_env)
    return {model: card["reason"] for model, card in cards.items()}


def list_model_cards(endpoint: str, api_key: str = "EMPTY", timeout_s: float = 10.0,
                     key_env: str | None = None) -> dict[str, dict[str, str | None]]:
    """What :func:`list_models` gives, with each model's weights: id -> ``{"reason": None
    or why it cannot answer, "fingerprint": None or the weights' fingerprint}`` (our endpoint
    gives one for its PULSE models, ``ecgvlm.serving.model_fingerprints``).

    Our endpoint's model cards carry ``available`` and ``reason`` (e.g. gpt-4o without an
    OpenAI key on the server); plain OpenAI-compatible servers list available models only.

    Raises:
        EvaluationError: when the endpoint cannot be reached or answers with an error.
    """
    import openai

    client = openai.OpenAI(base_url=endpoint, api_key=api_key, timeout=timeout_s, max_retries=2)
    try:
        cards = list(client.models.list())
    except openai.APIConnectionError as e:
        # The newcomer's usual case: the endpoint was never started (or on another port).
        raise EvaluationError(
            f"endpoint {endpoint} did not list its models: nothing answered there ({e}); start "
            "one with `ecgvlm serve` (README step 6) or set endpoint=URL") from e
    except openai.NotFoundError as e:
        # Something answers there, but not at {endpoint}/models: the /v1 left off, usually.
        base = endpoint.rstrip("/")
        hint = "" if base.endswith("/v1") else f"; did you mean endpoint={base}/v1?"
        raise EvaluationError(f"endpoint {endpoint} did not list its models: {e}{hint}") from e
    except openai.AuthenticationError as e:
        # `ecgvlm serve` with ECGVLM_API_TOKEN set: the token missing here, or another one.
        where = f"set {key_env} to the token the endpoint was started with" if key_env else (
            "give the endpoint's token as api_key")
        given = "no token was sent" if api_key == "EMPTY" else "it refused the token sent"
        raise EvaluationError(f"endpoint {endpoint} did not list its models: it asks for a "
                              f"token and {given} (401); {where}") from e
    except openai.OpenAIError as e:
        raise EvaluationError(f"endpoint {endpoint} did not list its models: {e}") from e
    finally:
        client.close()
    out: dict[str, dict[str, str | None]] = {}
    for card in cards:
        extra = card.model_extra or {}
        available = extra.get("available", True) is not False
        reason = None if available else str(extra.get("reason") or "listed as unavailable")
        fingerprint = extra.get("fingerprint")
        out[card.id] = {"reason": reason,
                        "fingerprint": str(fingerprint) if fingerprint else None}
    return out


_ANSWER_LEAD = re.compile(
    r"^\s*(?:\**\s*)?(?:the\s+)?(?:correct\s+)?answer\s*(?:is|:)\s*\**\s*[(\[]?[A-Za-z][)\]]?\**"
    r"\s*[.:,)\-–]?\s*",
    flags=re.IGNORECASE,
)


def explanation_of(text: str) -> str:
    """The reply without its leading answer statement ("The answer is B. ..." -> "...")."""
    return _ANSWER_LEAD.sub("", text, count=1).strip()


def option_probabilities(logprobs: Mapping[str, float], letters: list[str]) -> list[float]:
    """Each option's probability, in option order: the choices' log-probabilities
    exponentiated and normalised over the options (a letter not reported gets 0)."""
    import math

    top = max(logprobs.values())
    weights = [math.exp(logprobs[x] - top) if x in logprobs else 0.0 for x in letters]
    total = sum(weights)
    return [w / total for w in weights]


def predict_one(
    client: ChatClient, row: Mapping[str, Any], model: str, answer_mode: str = "generate"
) -> dict[str, Any]:
    """Ask ``model`` one MCQ and turn the reply into a predictions.parquet row.

    ``answer_mode`` ``generate`` parses the letter out of free text (the explanation is the
    rest of the reply); ``choice`` asks for a constrained choice among the option letters and
    keeps every option's probability in ``option_probs``; the answer is the most probable
    option (the first of equals).
    """
    from ecgvlm.prompt import (
        PROMPT_VERSION,
        chat_messages,
        letter_index,
        option_letters,
        parse_answer,
    )

    options = list(row["options"])
    option_labels = list(row["option_labels"])
    answer_letter = str(row["answer_letter"])
    true_label = option_labels[letter_index(answer_letter, len(options))]
    messages = chat_messages(row["question"], options, row["png"] or None)  # b"": text only
    probs = None
    if answer_mode == "choice":
        letters = list(option_letters(len(options)))
        result = client.chat(model, messages, guided_choice=letters)
        letter = None
        if result.choice_logprobs is not None:
            probs = option_probabilities(result.choice_logprobs, letters)
            letter = letters[max(range(len(letters)), key=lambda i: (probs[i], -i))]
        explanation = ""
    else:
        result = client.chat(model, messages)
        letter = parse_answer(result.text, options) if result.text is not None else None
        explanation = explanation_of(result.text) if result.text else ""
    return {
        "sample_id": row["sample_id"],
        "dataset": row["dataset"],
        "model": model,
        "answer_mode": answer_mode,
        "true_label": true_label,
        "answer_letter": answer_letter,
        "predicted_letter": letter,
        "predicted_label": option_labels[letter_index(letter, len(options))] if letter else None,
        "option_probs": probs,
        "explanation": explanation,
        "raw_text": result.text or "",
        "error": result.error,
        "latency_s": result.latency_s,
        "attempts": result.attempts,
        "prompt_version": PROMPT_VERSION,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
