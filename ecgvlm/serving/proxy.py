"""The gpt-4o route: an OpenAI-compatible upstream behind retries with back-off and jitter."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ecgvlm.serving.chat import ChatCompletionRequest
from ecgvlm.serving.errors import ApiError


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
        """Send ``req`` upstream and return its ``chat.completion`` as a dict.

        Raises:
            ApiError: 503 without a key; after retries are spent, 429 (still rate-limited),
                502 (upstream 5xx or rejected credentials), 504 (time-out or no connection);
                upstream 4xx other than 429 pass through with the upstream's message.
        """
        if not self.available:
            raise ApiError(503, self.unavailable_reason or "", "service_unavailable",
                           param="model", code="model_unavailable")
        import openai

        kwargs: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [m.model_dump(exclude_none=True) for m in req.messages],
        }
        for name in ("temperature", "max_tokens", "max_completion_tokens", "seed"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        attempts = self.settings.max_retries + 1
        last: Exception | None = None
        async with self._semaphore:
            client = self._get_client()
            for attempt in range(attempts):
                self.attempts += 1
                retry_after = None
                try:
                    resp = await client.chat.completions.create(**kwargs)
                    return resp.model_dump(exclude_none=True)
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
