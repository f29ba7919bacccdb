"""The gpt-4o route: an OpenAI-compatible upstream behind retries with back-off and jitter."""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ecgvlm.serving.chat import ChatCompletionRequest, choice_logprobs, completion_response
from ecgvlm.serving.errors import ApiError

#: Alternatives the upstream is asked for when it answers a constrained choice (OpenAI's most).
UPSTREAM_TOP_LOGPROBS = 20
#: Fields of a chat request passed to the upstream as they are, when set.
PASSED_FIELDS = ("temperature", "max_tokens", "max_completion_tokens", "seed", "logprobs",
                 "top_logprobs")


class OpenAISettings(BaseModel):
    """Where ``gpt-4o`` requests go and how patiently.

    Attributes:
        base_url: An OpenAI-compatible API root; None means OpenAI's own.
        model: The upstream model name requests are sent with.
        api_key_env: Environment variable holding the key (read, never logged or echoed).
        timeout_s: Per-attempt time-out.
        max_retries: Retries after the first attempt on 429, 5xx, time-outs and lost
            connections.
        backoff_base_s: First back-off; doubled each retry, with jitter.
        backoff_max_s: Cap on one back-off (also on a server's Retry-After).
        max_concurrency: Upstream calls in flight per proxy replica; more wait their turn.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = None
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(8.0, ge=0)
    max_concurrency: int = Field(8, ge=1)


def backoff_delay_s(
    attempt: int, base_s: float, max_s: float, rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): capped exponential, equal jitter.

    Half the exponential step is kept and half drawn at random, so clients that failed
    together do not retry together. A server's Retry-After, when given, is honoured up to the
    cap.
    """
    step = min(max_s, base_s * (2**attempt))
    delay = step / 2 + rng.uniform(0, step / 2)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, max_s))
    return delay


def choice_instruction(choices: Sequence[str]) -> str:
    """What is added to the last user message when the upstream answers a constrained choice."""
    return "Answer with only one of these, and nothing else: " + ", ".join(choices)


def choice_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """``req.messages`` with :func:`choice_instruction` appended to the last user message."""
    assert req.guided_choice is not None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    instruction = choice_instruction(req.guided_choice)
    last = next((m for m in reversed(messages) if m["role"] == "user"), None)
    if last is None:
        messages.append({"role": "user", "content": instruction})
    elif isinstance(last["content"], str):
        last["content"] = f"{last['content']}\n\n{instruction}"
    else:
        last["content"] = [*last["content"], {"type": "text", "text": instruction}]
    return messages


def rank_choices(
    top: Sequence[tuple[str, float]], choices: Sequence[str]
) -> list[tuple[str, float]]:
    """Each choice's log-probability, normalised over the choices, from the upstream's first
    answer token and its top alternatives (``top``: (token, log-probability) pairs).

    1. A listed token counts for the choice whose text it equals once spaces are stripped
       (" A" and "A" both count for "A"), or else for the one choice that starts with it;
       a token that fits no choice, or several, counts for none.
    2. A choice's probability is the sum of its tokens' probabilities.
    3. A choice no listed token counts for gets the smallest listed probability divided by
       ``UPSTREAM_TOP_LOGPROBS``: any token outside the list is at most as probable as the
       least probable one in it, and the list's twentieth of that bound ranks it below every
       choice that was seen. With no choice seen, every choice gets that value (uniform).
    4. The log-probabilities are normalised over the choices (they sum to 1 as
       probabilities) and returned most probable first, ties in the order given.

    Raises:
        ValueError: ``top`` is empty.
    """
    if not top:
        raise ValueError("no log-probabilities to read the choices from")
    stripped = [c.strip() for c in choices]
    mass: dict[str, float] = {}
    for token, logprob in top:
        text = token.strip()
        if not text:
            continue
        hits = [c for c, s in zip(choices, stripped) if s == text]
        if not hits:
            hits = [c for c, s in zip(choices, stripped) if s.startswith(text)]
        if len(hits) == 1:
            mass[hits[0]] = mass.get(hits[0], 0.0) + math.exp(logprob)
    floor = min(lp for _, lp in top) - math.log(UPSTREAM_TOP_LOGPROBS)
    logprobs = [math.log(mass[c]) if c in mass else floor for c in choices]
    top_lp = max(logprobs)
    total = top_lp + math.log(sum(math.exp(lp - top_lp) for lp in logprobs))
    return sorted(zip(choices, (lp - total for lp in logprobs)), key=lambda kv: -kv[1])


def _retry_after_s(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class OpenAIProxy:
    """Chat completions against an OpenAI-compatible upstream, with retries and a limit.

    Args:
        settings: Upstream, time-out, retry and concurrency settings.
        api_key: The key; None reads ``settings.api_key_env`` from the environment. Without
            one the proxy reports itself unavailable and answers 503.
        sleep: Awaitable sleep (tests pass a recorder).
        rng: Jitter source.
    """

    def __init__(
        self,
        settings: OpenAISettings,
        api_key: SecretStr | str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        self._api_key = api_key or os.environ.get(settings.api_key_env) or None
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._client: Any = None
        self.attempts = 0  # upstream calls made, retries included

    def __repr__(self) -> str:
        # Never show the key, even by accident in a log line.
        key = "set" if self._api_key else "missing"
        return (
            f"OpenAIProxy(base_url={self.settings.base_url!r}, "
            f"model={self.settings.model!r}, key={key})"
        )

    @property
    def available(self) -> bool:
        return self._api_key is not None

    @property
    def unavailable_reason(self) -> str | None:
        if self.available:
            return None
        return (
            f"gpt-4o is not configured: set the {self.settings.api_key_env} environment "
            "variable where the endpoint runs (e.g. runtime_env env_vars in serve/config.yaml) "
            "and redeploy"
        )

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self.settings.base_url,
                timeout=self.settings.timeout_s,
                max_retries=0,  # retries are ours: counted, jittered, capped
            )
        return self._client

    async def complete(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """Send ``req`` upstream and return its ``chat.completion`` as a dict (``logprobs``
        and ``top_logprobs`` passed through); a ``guided_choice`` is answered by
        :meth:`choose`.

        Raises:
            ApiError: 503 without a key; after retries are spent, 429 (still rate-limited),
                502 (upstream 5xx or rejected credentials), 504 (time-out or no connection);
                upstream 4xx other than 429 pass through with the upstream's message.
        """
        if req.guided_choice is not None:
            return await self.choose(req)
        async with self._semaphore:
            resp = await self._create(self._kwargs(req))
        return resp.model_dump(exclude_none=True)

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """``req`` with ``stream: true``: the upstream's ``chat.completion.chunk`` objects as
        it sends them. Retries happen before the first chunk only; the concurrency slot is
        held until the stream ends or its consumer closes it.

        Raises:
            ApiError: as :meth:`complete` before the first chunk; 502 when the upstream's
                stream breaks off.
        """
        import openai

        kwargs = {**self._kwargs(req), "stream": True}
        if req.stream_options is not None:
            kwargs["stream_options"] = req.stream_options.model_dump()
        async with self._semaphore:
            stream = await self._create(kwargs)
            try:
                async for chunk in stream:
                    yield chunk.model_dump(exclude_unset=True)
            except openai.APIError as e:
                raise ApiError(502, f"the gpt-4o upstream's stream broke off: "
                               f"{type(e).__name__}", "upstream_error",
                               code="upstream_error") from e
            finally:
                await stream.close()

    async def choose(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """A constrained choice answered by the upstream, in the PULSE models' shape.

        The upstream is asked for one token (``max_tokens`` 1) with its top
        ``UPSTREAM_TOP_LOGPROBS`` log-probabilities, the choices listed in an instruction
        after the last user message (:func:`choice_instruction`); the choices' probabilities
        are read off that token's alternatives by :func:`rank_choices`.

        Raises:
            ApiError: as :meth:`complete`; 502 when the upstream returns no log-probabilities.
        """
        assert req.guided_choice is not None
        kwargs: dict[str, Any] = {
            "model": self.settings.model, "messages": choice_messages(req), "max_tokens": 1,
            "logprobs": True, "top_logprobs": UPSTREAM_TOP_LOGPROBS,
        }
        for name in ("temperature", "seed"):
            if getattr(req, name) is not None:
                kwargs[name] = getattr(req, name)
        async with self._semaphore:
            resp = await self._create(kwargs)
        data = resp.model_dump(exclude_none=True)
        content = ((data.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
        top = [(t["token"], t["logprob"]) for t in (content[0].get("top_logprobs") or [])
               ] if content else []
        if not top:
            raise ApiError(502, "the gpt-4o upstream returned no top_logprobs for the answer "
                           "token, so the choices cannot be scored", "upstream_error",
                           code="upstream_no_logprobs")
        ranked = rank_choices(top, req.guided_choice)
        usage = data.get("usage") or {}
        return completion_response(data.get("model") or self.settings.model, ranked[0][0],
                                   usage.get("prompt_tokens", 0), 1,
                                   logprobs=choice_logprobs(ranked))

    def _kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [m.model_dump(exclude_none=True) for m in req.messages],
        }
        for name in PASSED_FIELDS:
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    async def _create(self, kwargs: dict[str, Any]) -> Any:
        """``chat.completions.create(**kwargs)`` with our retries (the caller holds the
        concurrency slot)."""
        if not self.available:
            raise ApiError(503, self.unavailable_reason or "", "service_unavailable",
                           param="model", code="model_unavailable")
        import openai

        attempts = self.settings.max_retries + 1
        last: Exception | None = None
        client = self._get_client()
        for attempt in range(attempts):
            self.attempts += 1
            retry_after = None
            try:
                return await client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                last = e
                if e.status_code != 429 and e.status_code < 500:
                    raise self._client_error(e) from e
                retry_after = _retry_after_s(getattr(e.response, "headers", None))
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = e
            if attempt + 1 < attempts:
                await self._sleep(backoff_delay_s(
                    attempt, self.settings.backoff_base_s, self.settings.backoff_max_s,
                    self._rng, retry_after,
                ))
        raise self._final_error(last, attempts) from last

    def _client_error(self, e: Any) -> ApiError:
        status = e.status_code
        if status in (401, 403):
            return ApiError(
                502,
                f"the gpt-4o upstream rejected our credentials (HTTP {status}); check "
                f"{self.settings.api_key_env} where the endpoint runs",
                "upstream_error", code="upstream_auth",
            )
        if status == 404:
            return ApiError(
                502,
                f"the gpt-4o upstream does not know model {self.settings.model!r} (HTTP 404)",
                "upstream_error", code="upstream_model_not_found",
            )
        body = e.body if isinstance(e.body, dict) else {}
        inner = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        message = inner.get("message") or str(e.message)
        return ApiError(
            status if 400 <= status < 500 else 502,
            f"gpt-4o upstream: {message}", inner.get("type") or "invalid_request_error",
            inner.get("param"), inner.get("code"),
        )

    def _final_error(self, e: Exception | None, attempts: int) -> ApiError:
        import openai

        if isinstance(e, openai.APIStatusError) and e.status_code == 429:
            return ApiError(
                429,
                f"the gpt-4o upstream is rate-limiting (HTTP 429 on all {attempts} attempts); "
                "retry later",
                "rate_limit_error", code="upstream_rate_limited",
            )
        if isinstance(e, openai.APIStatusError):
            return ApiError(
                502,
                f"the gpt-4o upstream failed (HTTP {e.status_code} on all {attempts} attempts)",
                "upstream_error", code="upstream_error",
            )
        if isinstance(e, openai.APITimeoutError):
            return ApiError(
                504,
                f"the gpt-4o upstream timed out ({self.settings.timeout_s:g} s per attempt, "
                f"{attempts} attempts)",
                "upstream_error", code="upstream_timeout",
            )
        return ApiError(
            504,
            f"could not reach the gpt-4o upstream at {self.settings.base_url or 'OpenAI'} "
            f"({attempts} attempts)",
            "upstream_error", code="upstream_unreachable",
        )
