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

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 30.0


@dataclass
class ChatResult:
    """One chat request's outcome: the reply text, or the error after all retries."""

    text: str | None
    error: str | None
    latency_s: float
    attempts: int


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
        if isinstance(error, openai.APIStatusError):
            return error.status_code in _RETRYABLE_STATUS
        # Connection refused/reset, time-outs, and a body that is not a completion.
        return isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError,
                                  ValueError))

    def chat(self, model: str, messages: list[dict[str, Any]]) -> ChatResult:
        """The assistant's reply text, or the last error once retries are spent."""
        start = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                )
                if not response.choices:
                    raise ValueError("reply has no choices")
                text = response.choices[0].message.content or ""
                return ChatResult(text, None, time.perf_counter() - start, attempt)
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


def list_models(endpoint: str, api_key: str = "EMPTY", timeout_s: float = 10.0) -> dict[str, str | None]:
    """The models ``GET {endpoint}/models`` lists: id -> None when it can answer, else why not.

    Our endpoint's model cards carry ``available`` and ``reason`` (e.g. gpt-4o without an
    OpenAI key on the server); plain OpenAI-compatible servers list available models only.

    Raises:
        EvaluationError: when the endpoint cannot be reached or answers with an error.
    """
    import openai

    client = openai.OpenAI(base_url=endpoint, api_key=api_key, timeout=timeout_s, max_retries=2)
    try:
        cards = list(client.models.list())
    except openai.OpenAIError as e:
        raise EvaluationError(f"endpoint {endpoint} did not list its models: {e}") from e
    finally:
        client.close()
    out: dict[str, str | None] = {}
    for card in cards:
        extra = card.model_extra or {}
        available = extra.get("available", True) is not False
        out[card.id] = None if available else str(extra.get("reason") or "listed as unavailable")
    return out


_ANSWER_LEAD = re.compile(
    r"^\s*(?:\**\s*)?(?:the\s+)?(?:correct\s+)?answer\s*(?:is|:)\s*\**\s*[(\[]?[A-Za-z][)\]]?\**"
    r"\s*[.:,)\-–]?\s*",
    flags=re.IGNORECASE,
)


def explanation_of(text: str) -> str:
    """The reply without its leading answer statement ("The answer is B. ..." -> "...")."""
    return _ANSWER_LEAD.sub("", text, count=1).strip()


def predict_one(client: ChatClient, row: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Ask ``model`` one MCQ and turn the reply into a predictions.parquet row."""
    from ecgvlm.prompt import PROMPT_VERSION, chat_messages, letter_index, parse_answer

    options = list(row["options"])
    option_labels = list(row["option_labels"])
    answer_letter = str(row["answer_letter"])
    true_label = option_labels[letter_index(answer_letter, len(options))]
    messages = chat_messages(row["question"], options, row["png"])
    result = client.chat(model, messages)
    letter = parse_answer(result.text, options) if result.text is not None else None
    return {
        "sample_id": row["sample_id"],
        "dataset": row["dataset"],
        "model": model,
        "true_label": true_label,
        "answer_letter": answer_letter,
        "predicted_letter": letter,
        "predicted_label": option_labels[letter_index(letter, len(options))] if letter else None,
        "explanation": explanation_of(result.text) if result.text else "",
        "raw_text": result.text or "",
        "error": result.error,
        "latency_s": result.latency_s,
        "attempts": result.attempts,
        "prompt_version": PROMPT_VERSION,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
