"""The serving stage's logic: request schemas, validation, errors, images, the GPT-4o proxy.

``serve/app.py`` is thin Ray Serve wiring over this module. Everything here can be tested
without Ray: pydantic request and response schemas for the OpenAI-compatible API and the ECG
route, validation against named limit constants (every 4xx names the field at fault), OpenAI's
error JSON shape, image decoding from data URLs, a retrying client for an OpenAI-compatible
upstream (``gpt-4o``), usage counters, and ``PulseRunner``, which holds one base model with
its LoRA adapters and answers batches grouped by adapter.

Nothing here starts Ray or opens a socket on import; torch, peft and the model code are
imported inside the functions that need them, so the ingress replica stays light.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import os
import random
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

# --- Limits -------------------------------------------------------------------------------
# Defaults for ServeLimits; each request check names the limit it enforces.

#: Largest request body accepted, in bytes (a 12-lead 10 s WFDB upload is ~50 kB and a
#: 2200x1700 PNG printout ~1 MB; 16 MiB leaves room for JPEG photos of paper ECGs).
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Largest decoded image, in pixels (width * height); 4096 x 4096.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Most images in one chat request (PULSE sees one; the proxy forwards up to this many).
MAX_IMAGES_PER_REQUEST = 4
#: Largest ``max_tokens`` a client may ask for.
MAX_TOKENS = 1024
#: Tokens generated when the client does not say.
DEFAULT_MAX_TOKENS = 256
#: Most messages in one chat request, and most characters of text across them.
MAX_MESSAGES = 64
MAX_TEXT_CHARS = 32_000
#: Signal bounds for /v1/ecg/interpret.
MIN_FS_HZ = 50.0
MAX_FS_HZ = 10_000.0
MAX_LEADS = 16
MIN_DURATION_S = 1.0
MAX_DURATION_S = 120.0
#: Multiple-choice options on /v1/ecg/interpret.
MIN_OPTIONS = 2
MAX_OPTIONS = 10

#: Names clients use for the served models.
PULSE_MODEL = "pulse"
LORA_MODEL = "pulse-lora"
GPT4O_MODEL = "gpt-4o"

IMAGE_MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}


class ServeLimits(BaseModel):
    """Request limits, enforced by the ingress before any model sees a request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=64 * 64)
    max_images_per_request: int = Field(MAX_IMAGES_PER_REQUEST, ge=1)
    max_tokens: int = Field(MAX_TOKENS, ge=1)
    default_max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    max_messages: int = Field(MAX_MESSAGES, ge=1)
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1)
    max_duration_s: float = Field(MAX_DURATION_S, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> ServeLimits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens "
                f"({self.max_tokens})"
            )
        return self


# --- Errors -------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status code.
        message: What went wrong and, where possible, how to fix it.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``,
            ``rate_limit_error``, ``server_error``, ``service_unavailable``...).
        param: The request field at fault (``messages[0].content[1].image_url.url``), if any.
        code: A short machine-readable code.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray's process boundary intact (default pickling loses keyword args).
        return (ApiError, (self.status, self.message, self.type, self.param, self.code))


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def _format_loc(loc: Sequence[int | str]) -> str:
    """Pydantic's error location as a field path, without its union-branch markers."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        # Union branches appear as type names ("str", "list[tagged-union[...]]") and a
        # tagged union repeats its tag before the field of the same name: skip both.
        if "[" in item or item in {"str", "int", "float", "bool", "list", "dict"}:
            continue
        if parts and parts[-1].lstrip(".") == item:
            continue
        parts.append(("." if parts else "") + item)
    return "".join(parts)


def validation_error(e: ValidationError) -> ApiError:
    """A 400 naming the most specific field pydantic rejected."""
    errors = e.errors(include_url=False)
    # The longest location is the most specific: a content list with a bad part also fails
    # the "content is a string" branch, and the list branch is the one the client meant.
    err = max(errors, key=lambda x: len(x["loc"]))
    param = _format_loc(err["loc"]) or None
    msg = err["msg"]
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return bad_request(message, param=param, code=err["type"])


def parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from e


def check_body_size(n_bytes: int, limits: ServeLimits) -> None:
    if n_bytes > limits.max_body_bytes:
        raise ApiError(
            413,
            f"request body is {n_bytes} bytes; the limit is {limits.max_body_bytes} bytes",
            code="body_too_large",
        )


# --- Chat completions schema ----------------------------------------------------------------


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionRequest(_Lenient):
    """The subset of OpenAI's chat-completions request that the endpoint honours."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int = 1
    stream: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "ecgvlm"
    available: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class ModelRoute:
    """Where a request's ``model`` goes: ``kind`` "pulse" (adapter None = base) or "proxy"."""

    name: str
    kind: Literal["pulse", "proxy"]
    adapter: str | None = None


def resolve_model(name: str, adapters: Sequence[str], param: str = "model") -> ModelRoute:
    """Map a client's model name to a route.

    ``pulse`` is the base model, ``pulse-lora`` the default (first) adapter,
    ``pulse-lora:<name>`` a named adapter, ``gpt-4o`` the proxy.

    Raises:
        ApiError: 404 naming the served models when ``name`` is none of them.
    """
    if name == PULSE_MODEL:
        return ModelRoute(name, "pulse", None)
    if name == GPT4O_MODEL:
        return ModelRoute(name, "proxy")
    if name == LORA_MODEL and adapters:
        return ModelRoute(name, "pulse", adapters[0])
    if name.startswith(LORA_MODEL + ":") and name.split(":", 1)[1] in adapters:
        return ModelRoute(name, "pulse", name.split(":", 1)[1])
    served = [PULSE_MODEL, GPT4O_MODEL]
    if adapters:
        served += [LORA_MODEL] + [f"{LORA_MODEL}:{a}" for a in adapters]
    raise ApiError(
        404,
        f"model {name!r} does not exist; served models: {', '.join(served)}",
        param=param,
        code="model_not_found",
    )


def parse_chat_request(body: bytes, limits: ServeLimits) -> ChatCompletionRequest:
    """Parse and check a chat-completions body (everything but the images' contents)."""
    data = parse_json_body(body)
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e
    if req.stream:
        raise bad_request("stream=true is not supported; omit stream", param="stream")
    if req.n != 1:
        raise bad_request(f"n must be 1, got {req.n}", param="n")
    if len(req.messages) > limits.max_messages:
        raise bad_request(
            f"{len(req.messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    tokens = req.max_completion_tokens or req.max_tokens
    if tokens is not None and tokens > limits.max_tokens:
        which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise bad_request(f"{which} is {tokens}; the limit is {limits.max_tokens}", param=which)
    n_chars = 0
    n_images = 0
    for i, msg in enumerate(req.messages):
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        for part in parts:
            if isinstance(part, TextPart):
                n_chars += len(part.text)
            else:
                n_images += 1
                if msg.role != "user":
                    raise bad_request(
                        "images are only accepted in user messages",
                        param=f"messages[{i}].content",
                    )
    if n_chars > limits.max_text_chars:
        raise bad_request(
            f"{n_chars} characters of text; the limit is {limits.max_text_chars}",
            param="messages",
        )
    if n_images > limits.max_images_per_request:
        raise bad_request(
            f"{n_images} images; the limit is {limits.max_images_per_request}", param="messages"
        )
    return req


def requested_max_tokens(req: ChatCompletionRequest, limits: ServeLimits) -> int:
    return req.max_completion_tokens or req.max_tokens or limits.default_max_tokens


# --- Images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImage:
    """An image that passed the checks: its bytes as sent, format and size."""

    data: bytes
    format: str  # "PNG" or "JPEG"
    size_px: tuple[int, int]


def check_image_bytes(data: bytes, max_pixels: int, param: str) -> DecodedImage:
    """Check that ``data`` is a whole PNG or JPEG within ``max_pixels``.

    The header is read before the pixels, so an oversized image is refused without being
    decoded (and PIL's decompression-bomb guard turned into a 400, not a crash).

    Raises:
        ApiError: 400 naming ``param`` for a non-image, another format, a truncated image or
            one over the pixel limit.
    """
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            if isinstance(e, UnidentifiedImageError):
                raise bad_request(
                    f"{param} is not a PNG or JPEG image", param=param, code="invalid_image"
                ) from e
            raise bad_request(
                f"{param} is too large to decode; the limit is {max_pixels} pixels",
                param=param, code="image_too_large",
            ) from e
        with img:
            if img.format not in ("PNG", "JPEG"):
                raise bad_request(
                    f"{param} is a {img.format} image; send PNG or JPEG",
                    param=param, code="invalid_image",
                )
            w, h = img.size
            if w * h > max_pixels:
                raise bad_request(
                    f"{param} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                    param=param, code="image_too_large",
                )
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
                raise bad_request(
                    f"{param} is a damaged or truncated image: {e}",
                    param=param, code="invalid_image",
                ) from e
            return DecodedImage(data, img.format, (w, h))


def decode_data_url(url: str, max_pixels: int, param: str) -> DecodedImage:
    """Decode ``data:image/png;base64,...`` (or image/jpeg) into a checked image.

    Raises:
        ApiError: 400 naming ``param`` for remote URLs (never fetched), other media types,
            broken base64 and anything ``check_image_bytes`` refuses.
    """
    if not url.startswith("data:"):
        raise bad_request(
            f"{param} must be a data URL (data:image/png;base64,...); remote URLs are not "
            "fetched",
            param=param, code="invalid_image_url",
        )
    header, sep, payload = url.partition(",")
    media = header[len("data:"):].split(";")
    if not sep or "base64" not in media[1:]:
        raise bad_request(
            f"{param} must be a base64 data URL (data:image/png;base64,...)",
            param=param, code="invalid_image_url",
        )
    if media[0].lower() not in IMAGE_MIME_TYPES:
        raise bad_request(
            f"{param} has media type {media[0]!r}; send image/png or image/jpeg",
            param=param, code="invalid_image_url",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(
            f"{param} is not valid base64: {e}", param=param, code="invalid_base64"
        ) from e
    return check_image_bytes(data, max_pixels, param)


def image_data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def collect_images(req: ChatCompletionRequest, limits: ServeLimits) -> list[DecodedImage]:
    """Decode and check every image part of a chat request, in order."""
    images = []
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, str):
            continue
        for j, part in enumerate(msg.content):
            if isinstance(part, ImagePart):
                param = f"messages[{i}].content[{j}].image_url.url"
                images.append(decode_data_url(part.image_url.url, limits.max_image_pixels, param))
    return images


# --- Responses ------------------------------------------------------------------------------


def completion_response(
    model: str, text: str, prompt_tokens: int, completion_tokens: int,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object with ``usage`` counts."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens),
        },
    }


@dataclass
class UsageCounter:
    """Requests, errors and tokens per model since the replica started."""

    requests: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: Counter = field(default_factory=Counter)
    completion_tokens: Counter = field(default_factory=Counter)

    def add(self, model: str, usage: dict[str, Any] | None = None, error: bool = False) -> None:
        self.requests[model] += 1
        if error:
            self.errors[model] += 1
        if usage:
            self.prompt_tokens[model] += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens[model] += int(usage.get("completion_tokens") or 0)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {
            m: {
                "requests": self.requests[m],
                "errors": self.errors[m],
                "prompt_tokens": self.prompt_tokens[m],
                "completion_tokens": self.completion_tokens[m],
            }
            for m in sorted(self.requests)
        }


# --- The GPT-4o proxy -----------------------------------------------------------------------


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
        return f"OpenAIProxy(base_url={self.settings.base_url!r}, model={self.settings.model!r}, key={key})"

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


# --- /v1/ecg/interpret ----------------------------------------------------------------------

#: Question asked when a client gives options but no question.
DEFAULT_QUESTION = "Which of the following best describes the main finding on this ECG?"
#: Largest |sample| accepted, in millivolts; bigger values are almost surely microvolts or
#: ADC counts sent by mistake.
MAX_ABS_MV = 50.0
#: Extensions accepted in a WFDB upload.
WFDB_UPLOAD_SUFFIXES = (".hea", ".dat", ".mat", ".atr")


class InterpretQuery(BaseModel):
    """What to ask about an ECG and with which model (the non-signal part of the request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = PULSE_MODEL
    question: str | None = Field(None, min_length=1, max_length=2000)
    options: list[Annotated[str, Field(min_length=1, max_length=500)]] | None = Field(
        None, min_length=MIN_OPTIONS, max_length=MAX_OPTIONS
    )
    return_image: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None
    dataset: str | None = Field(None, min_length=1, max_length=40)


class InterpretJsonRequest(InterpretQuery):
    """An ECG as JSON: ``samples`` of shape (n_samples, n_leads) in millivolts."""

    samples: list[list[float]]
    fs_hz: float
    leads: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        min_length=1, max_length=MAX_LEADS
    )
    record_id: str = Field("upload", min_length=1, max_length=200)


def parse_model(cls: type[BaseModel], data: Any) -> Any:
    """``cls.model_validate(data)``, with a 400 naming the field on failure."""
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def check_query(query: InterpretQuery, limits: ServeLimits) -> tuple[str, list[str]]:
    """The question and options to ask; options are required (there is no default list)."""
    if query.options is None:
        raise bad_request(
            f"options is required: give {MIN_OPTIONS}-{MAX_OPTIONS} candidate findings "
            "(the answer is one of their letters)",
            param="options",
        )
    if query.max_tokens is not None and query.max_tokens > limits.max_tokens:
        raise bad_request(
            f"max_tokens is {query.max_tokens}; the limit is {limits.max_tokens}",
            param="max_tokens",
        )
    return query.question or DEFAULT_QUESTION, list(query.options)


def check_signal(
    signal: np.ndarray, fs_hz: float, leads: Sequence[str], limits: ServeLimits,
    param: str = "samples",
) -> None:
    """Check a signal's shape, rate, duration and values against the limits.

    Raises:
        ApiError: 400 naming the field: wrong shape, lead count mismatch, duplicate leads,
            fs_hz or duration out of range, NaN/inf, or values too large for millivolts.
    """
    if not MIN_FS_HZ <= fs_hz <= MAX_FS_HZ:
        raise bad_request(f"fs_hz must be in [{MIN_FS_HZ:g}, {MAX_FS_HZ:g}], got {fs_hz}",
                          param="fs_hz")
    if len(set(leads)) != len(leads):
        raise bad_request(f"leads has duplicate names: {list(leads)}", param="leads")
    if signal.ndim != 2 or signal.shape[1] != len(leads):
        raise bad_request(
            f"{param} must have shape (n_samples, n_leads) = (n, {len(leads)}) to match "
            f"leads {list(leads)}; got shape {tuple(signal.shape)}",
            param=param, code="invalid_shape",
        )
    duration_s = signal.shape[0] / fs_hz
    if not MIN_DURATION_S <= duration_s <= limits.max_duration_s:
        raise bad_request(
            f"{param} spans {duration_s:.2f} s at {fs_hz:g} Hz; it must span "
            f"{MIN_DURATION_S:g}-{limits.max_duration_s:g} s",
            param=param, code="invalid_duration",
        )
    bad = ~np.isfinite(signal)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise bad_request(
            f"{param} holds {int(bad.sum())} NaN or infinite value(s), the first at sample "
            f"{row} of lead {leads[col]!r}",
            param=param, code="non_finite",
        )
    peak = float(np.abs(signal).max())
    if peak > MAX_ABS_MV:
        raise bad_request(
            f"{param} must be in millivolts; its largest |value| is {peak:g}, over "
            f"{MAX_ABS_MV:g} mV (microvolts or ADC counts?)",
            param=param, code="invalid_units",
        )


def record_from_json(req: InterpretJsonRequest, limits: ServeLimits) -> Any:
    """An ``EcgRecord`` from a checked JSON signal."""
    from ecgvlm.records import EcgRecord

    n_values = sum(len(row) for row in req.samples)
    n_rows = len(req.samples)
    if n_rows == 0 or n_values != n_rows * len(req.samples[0]):
        raise bad_request(
            "samples must be a non-empty rectangular list of rows (n_samples, n_leads); "
            "its rows have different lengths" if n_rows else "samples must not be empty",
            param="samples", code="invalid_shape",
        )
    signal = np.asarray(req.samples, dtype=np.float64)
    check_signal(signal, req.fs_hz, req.leads, limits)
    return EcgRecord(
        record_id=req.record_id, dataset="upload", signal_mv=signal.astype(np.float32),
        fs_hz=float(req.fs_hz), leads=tuple(req.leads),
    )


def safe_upload_name(name: str | None, param: str) -> str:
    """An uploaded file's base name, if it is a plain WFDB file name."""
    base = os.path.basename(name or "")
    if not base or base.startswith(".") or not all(c.isalnum() or c in "._-" for c in base):
        raise bad_request(f"{param}: file name {name!r} is not a plain file name",
                          param=param, code="invalid_upload")
    if not base.lower().endswith(WFDB_UPLOAD_SUFFIXES):
        raise bad_request(
            f"{param}: {base!r} is not a WFDB file; upload a .hea header and its "
            f"{'/'.join(WFDB_UPLOAD_SUFFIXES[1:])} signal file(s)",
            param=param, code="invalid_upload",
        )
    return base


def record_from_wfdb_upload(
    files: dict[str, bytes], limits: ServeLimits, dataset: str | None = None
) -> Any:
    """An ``EcgRecord`` from uploaded WFDB files: one ``.hea`` and its signal file(s).

    The files are written to a private temporary folder under their (checked) names and read
    with ``ecgvlm.signal.read_record``, so an upload is read exactly like a record on disk.

    Raises:
        ApiError: 400 naming ``files`` when the header is missing or doubled, a signal file
            it names was not uploaded, wfdb cannot read the files, or the signal breaks a
            limit.
    """
    import tempfile

    from ecgvlm.signal import detect_dataset, read_record

    headers = [n for n in files if n.lower().endswith(".hea")]
    if len(headers) != 1:
        raise bad_request(
            f"files: upload exactly one .hea header with its signal file(s); got {sorted(files)}",
            param="files", code="invalid_upload",
        )
    if len(files) < 2:
        raise bad_request(
            f"files: upload the signal file(s) ({'/'.join(WFDB_UPLOAD_SUFFIXES[1:])}) that "
            f"{headers[0]} names, not only the header",
            param="files", code="invalid_upload",
        )
    stem = headers[0][: -len(".hea")]
    if dataset is None and detect_dataset(stem) is None:
        from ecgvlm.labels import DATASETS

        raise bad_request(
            f"cannot tell which dataset {stem!r} comes from by its name (its labels are read "
            f"the dataset's way); send a dataset field, one of {', '.join(DATASETS)}",
            param="dataset",
        )
    with tempfile.TemporaryDirectory(prefix="ecgvlm-upload-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            record = read_record(os.path.join(tmp, stem), dataset=dataset)
        except FileNotFoundError as e:
            missing = os.path.basename(str(e.filename or e))
            raise bad_request(
                f"files: the header names a signal file that was not uploaded ({missing})",
                param="files", code="invalid_upload",
            ) from e
        except Exception as e:
            # wfdb raises many types on malformed input; all of them mean a bad upload.
            message = str(e).replace(tmp + os.sep, "").replace(tmp, "")
            raise bad_request(
                f"files: could not read the WFDB upload: {type(e).__name__}: {message}",
                param="files", code="invalid_upload",
            ) from e
    check_signal(record.signal_mv, record.fs_hz, record.leads, limits, param="files")
    return record


def render_png(record: Any) -> bytes:
    """The printout PULSE and GPT-4o are shown: 3x4+II for 12 standard leads, else strips.

    Records with more leads than a strip page holds but not all 12 are drawn 3x4+II with the
    missing panels blank.

    Raises:
        ApiError: 400 naming ``leads`` when the record cannot be drawn.
    """
    from ecgvlm.render import RenderConfig, RenderError, render_printout

    try:
        return render_printout(record, RenderConfig(layout="auto")).png
    except RenderError as first:
        try:
            return render_printout(
                record, RenderConfig(layout="3x4+II", missing_leads="skip")
            ).png
        except RenderError:
            raise bad_request(f"cannot draw this ECG: {first}", param="leads",
                              code="unrenderable") from first


def split_explanation(text: str, letter: str | None) -> str:
    """The reply without its leading answer statement ("The answer is B." / "B.")."""
    if letter is None:
        return text.strip()
    pattern = (
        r"^\s*(?:\**\s*(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?"
        rf"(?:option\s+)?[(\[]?{letter}[)\]]?\**\s*[.:)\-]?\s*"
    )
    return re.sub(pattern, "", text, count=1, flags=re.IGNORECASE).strip()


def interpret_response(
    model: str, text: str, question: str, options: Sequence[str], usage: dict[str, Any],
    png: bytes | None = None,
) -> dict[str, Any]:
    """The /v1/ecg/interpret answer: letter, finding, explanation (and the image if asked)."""
    from ecgvlm.prompt import letter_index, parse_answer

    letter = parse_answer(text, options)
    finding = options[letter_index(letter, len(options))] if letter else None
    out: dict[str, Any] = {
        "object": "ecg.interpretation",
        "model": model,
        "answer_letter": letter,
        "finding": finding,
        "explanation": split_explanation(text, letter),
        "text": text,
        "question": question,
        "options": list(options),
        "usage": usage,
    }
    if png is not None:
        out["image_png_base64"] = base64.b64encode(png).decode("ascii")
    return out


# --- PULSE: one base model, many adapters ---------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for the PULSE replica; ``adapter`` None means the base model."""

    prompt: str
    image: bytes
    adapter: str | None = None
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int = 0

    def group_key(self) -> tuple[str | None, int, float, int]:
        """Requests sharing this key run as one ``generate`` call."""
        return (self.adapter, self.max_new_tokens, self.temperature, self.seed)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int


def group_requests(
    requests: Sequence[GenerateRequest],
) -> dict[tuple[str | None, int, float, int], list[int]]:
    """Indices of ``requests`` grouped by adapter and sampling settings, in arrival order.

    A Serve batch may mix adapters (and temperatures): each group is one forward pass with
    one adapter active.
    """
    groups: dict[tuple[str | None, int, float, int], list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.group_key(), []).append(i)
    return groups


def read_adapter(path: str) -> tuple[Any, dict[str, Any]]:
    """A PEFT adapter directory's config and weights, ready to share base weights.

    The study trains with ``bias="lora_only"``, and PEFT refuses a second adapter on one model
    when any adapter's config names a bias mode. PULSE's language model (Llama) has no
    biases in the attention projections LoRA targets, so such an adapter holds no bias
    weights and is exactly a ``bias="none"`` adapter: it is loaded as one. An adapter that
    does carry bias weights would change the shared base, and is refused.

    Raises:
        ValueError: the directory is not a PEFT adapter, or the adapter trains biases.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable PEFT adapter directory: {e}") from e
    biases = [k for k in weights if k.endswith(".bias") and "lora_" not in k]
    if biases:
        raise ValueError(
            f"adapter {path} trains bias weights ({biases[0]}, ...): they would change the base "
            "weights every other model shares, so it cannot be multiplexed"
        )
    if getattr(config, "bias", "none") != "none":
        config.bias = "none"
    config.inference_mode = True
    return config, weights


class PulseRunner:
    """PULSE base weights loaded once, with LoRA adapters loaded onto the same weights.

    Adapters are PEFT directories. The first one wraps the base in a ``PeftModel``; later
    ones are added with ``load_adapter`` and chosen per group with ``set_adapter``; the base
    model answers inside ``disable_adapter()``. Switching never reloads the base weights.

    All model access holds one lock: Serve runs generation in a worker thread while the
    multiplexing cache may load or evict adapters.

    Args:
        model_dir: A PULSE checkpoint directory (``ecgvlm.model.load_pulse`` format).
        adapters: Adapter name -> PEFT directory; the names clients may ask for.
        dtype: Torch dtype name for the weights.
        device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (CUDA when available).
    """

    def __init__(
        self, model_dir: str, adapters: dict[str, str] | None = None, dtype: str = "float32",
        device: str = "auto",
    ) -> None:
        import torch

        from ecgvlm.model import load_pulse

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.adapter_paths = dict(adapters or {})
        self._lock = threading.RLock()
        self.model, self.processor = load_pulse(
            model_dir, dtype=getattr(torch, dtype), device=device
        )
        self.base_loads = 1
        self.adapter_loads: Counter = Counter()
        self._loaded: list[str] = []

    @property
    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def load_adapter(self, name: str) -> None:
        """Load adapter ``name`` onto the base weights (no-op when already loaded)."""
        if name not in self.adapter_paths:
            raise KeyError(f"unknown adapter {name!r}; known: {sorted(self.adapter_paths)}")
        with self._lock:
            if name in self._loaded:
                return
            config, weights = read_adapter(self.adapter_paths[name])
            from peft import PeftModel
            from peft.utils import set_peft_model_state_dict

            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = PeftModel(self.model, config, adapter_name=name)
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
            if result.unexpected_keys:
                self.model.delete_adapter(name) if len(self._loaded) else None
                raise ValueError(
                    f"adapter {name} ({self.adapter_paths[name]}) does not fit this base "
                    f"model: unexpected weights {result.unexpected_keys[:5]}"
                )
            self.model.eval()
            self._loaded.append(name)
            self.adapter_loads[name] += 1

    def unload_adapter(self, name: str) -> None:
        """Free adapter ``name``'s weights; the last loaded adapter stays (PEFT needs one)."""
        with self._lock:
            if name not in self._loaded or len(self._loaded) == 1:
                return
            self.model.delete_adapter(name)
            self._loaded.remove(name)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Answer a batch, one ``generate`` call per (adapter, settings) group."""
        import contextlib

        from PIL import Image

        from ecgvlm.infer import generate

        results: list[GenerateResult | None] = [None] * len(requests)
        for (adapter, max_new_tokens, temperature, seed), idxs in group_requests(requests).items():
            prompts = [requests[i].prompt for i in idxs]
            images = [Image.open(io.BytesIO(requests[i].image)).convert("RGB") for i in idxs]
            with self._lock:
                if adapter is None:
                    ctx = (self.model.disable_adapter() if self._loaded
                           else contextlib.nullcontext())
                else:
                    self.load_adapter(adapter)
                    self.model.set_adapter(adapter)
                    ctx = contextlib.nullcontext()
                with ctx:
                    gens = generate(
                        self.model, self.processor, prompts, images,
                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                    )
            for i, g in zip(idxs, gens):
                results[i] = GenerateResult(g.text, g.prompt_tokens, g.completion_tokens)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {
            "base_loads": self.base_loads,
            "adapters_loaded": self.loaded_adapters,
            "adapter_loads": dict(self.adapter_loads),
            "device": self.device,
        }


# --- Application arguments ------------------------------------------------------------------

#: Adapters kept loaded per PULSE replica by Serve's multiplexing cache (least recently used
#: are evicted beyond this); ``@serve.multiplexed`` fixes it when the class is defined.
MAX_ADAPTERS_PER_REPLICA = 4


class BatchingArgs(BaseModel):
    """``@serve.batch`` settings of the PULSE replica; max_batch_size 1 turns batching off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)


class AutoscalingArgs(BaseModel):
    """Serve autoscaling: replicas follow the ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas "
                f"({self.max_replicas})"
            )
        return self


class ReplicaArgs(BaseModel):
    """Replica count (fixed or autoscaled), resources and concurrency of one deployment.

    ``num_cpus`` is fractional on purpose: local runs give Ray logical CPUs and a replica
    holding a whole core starves a trainer on a 2-core machine (DESIGN.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeArgs(BaseModel):
    """Everything the endpoint is built from (``serve/config.yaml``'s ``args``).

    Attributes:
        model_dir: PULSE checkpoint directory; None serves only ``gpt-4o``.
        adapters: Adapter name -> PEFT directory; the first is ``pulse-lora``.
        dtype: Weight dtype on the replica (``float32``, ``bfloat16``, ``float16``).
        device: ``auto`` (CUDA when the replica has a GPU), ``cpu`` or ``cuda``.
        openai: The ``gpt-4o`` upstream.
        limits: Request limits.
        auth_token_env: Environment variable holding the bearer token clients must send;
            unset or empty turns auth off. Read by the app builder, never logged.
        batching: PULSE request batching.
        pulse, gateway, proxy: Replicas and resources of each deployment.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str | None = None
    adapters: dict[str, str] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    limits: ServeLimits = Field(default_factory=ServeLimits)
    auth_token_env: str = "ECGVLM_API_TOKEN"
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    pulse: ReplicaArgs = Field(default_factory=lambda: ReplicaArgs(num_cpus=1.0))
    gateway: ReplicaArgs = Field(default_factory=lambda: ReplicaArgs(num_cpus=0.25,
                                                                     max_ongoing_requests=256))
    proxy: ReplicaArgs = Field(default_factory=lambda: ReplicaArgs(num_cpus=0.1))

    @model_validator(mode="after")
    def _check_adapters(self) -> ServeArgs:
        for name in self.adapters:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(
                    f"adapters: name {name!r} must be letters, digits, '.', '_' or '-'"
                )
        if self.adapters and self.model_dir is None:
            raise ValueError("adapters need model_dir (the base model they were trained on)")
        return self

    def served_adapters(self) -> list[str]:
        return list(self.adapters)


def parse_adapter_specs(specs: Iterable[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (the CLI's ``--adapter``) as an ordered name -> dir mapping."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter must look like NAME=DIR, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name} is given twice")
        adapters[name] = path
    return adapters
