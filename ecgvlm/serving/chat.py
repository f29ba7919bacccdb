"""The OpenAI chat-completions schema, model routing, data-URL images, responses, usage."""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ecgvlm.serving.errors import ApiError, bad_request, parse_json_body, validation_error
from ecgvlm.serving.limits import (
    GPT4O_MODEL,
    IMAGE_MIME_TYPES,
    LORA_MODEL,
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    PULSE_MODEL,
    ServeLimits,
)


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


class StreamOptions(_Lenient):
    """OpenAI's ``stream_options``: with ``include_usage`` a last chunk carries ``usage``."""

    include_usage: StrictBool = False


class ChatCompletionRequest(_Lenient):
    """The subset of OpenAI's chat-completions request that the endpoint honours."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's constrained choice (clients send it in extra_body): the answer is one of these.
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None = (
        Field(None, min_length=1, max_length=MAX_CHOICES)
    )
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per generated token: None without ``logprobs``, else 0-20."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "ecgvlm"
    available: bool = True
    reason: str | None = None  # why it is unavailable
    adapter: str | None = None  # the LoRA adapter a pulse-lora model answers with
    # How PULSE runs on its replica (RUNTIME_KEYS of PulseRunner.stats), for pulse models.
    runtime: dict[str, Any] | None = None
    # The weights it answers with (ecgvlm.serving.model_fingerprints), for pulse models.
    fingerprint: str | None = None


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
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        # Before validation: a 2 MB array of a million numbers would otherwise cost the
        # ingress a million validation errors (~170 MB) to refuse.
        raise bad_request(
            f"{len(messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e
    if req.n != 1:
        with_stream = " (and stream: true streams one answer)" if req.stream else ""
        raise bad_request(f"n must be 1{with_stream}, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          param="stream_options")
    if req.guided_choice is not None and len(set(req.guided_choice)) != len(req.guided_choice):
        dup = next(c for c in req.guided_choice if req.guided_choice.count(c) > 1)
        raise bad_request(f"guided_choice: {dup!r} is given twice; choices must be distinct",
                          param="guided_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    tokens = req.max_completion_tokens or req.max_tokens
    if tokens is not None and tokens > limits.max_tokens:
        which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise bad_request(f"{which} is {tokens}; the limit is {limits.max_tokens}", param=which)
    n_chars = 0
    n_images = 0
    for i, msg in enumerate(req.messages):
        parts = msg.content
        if isinstance(parts, str):
            parts = [TextPart(type="text", text=parts)]
        for part in parts:
            if isinstance(part, TextPart):
                n_chars += len(part.text)
            else:
                n_images += 1
                if msg.role != "user":
                    raise bad_request(
                        f"messages[{i}].content: images are only accepted in user messages, "
                        f"not in a {msg.role!r} message",
                        param=f"messages[{i}].content",
                    )
    if n_chars > limits.max_text_chars:
        raise bad_request(
            f"messages: {n_chars} characters of text; the limit is {limits.max_text_chars}",
            param="messages",
        )
    if n_images > limits.max_images_per_request:
        raise bad_request(
            f"messages: {n_images} images; the limit is {limits.max_images_per_request}", param="messages"
        )
    return req


def requested_max_tokens(req: ChatCompletionRequest, limits: ServeLimits) -> int:
    return req.max_completion_tokens or req.max_tokens or limits.default_max_tokens


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


@dataclass(frozen=True)
class LogprobEntry:
    """One token of an answer in OpenAI's ``logprobs.content`` shape.

    Attributes:
        token: its text (``bytes`` decoded; a byte that is part of a character is shown as
            ``\\xNN``).
        bytes: its UTF-8 bytes, which add up to the answer's text across entries.
        logprob: its log-probability.
        top: the most probable alternatives at its position, most probable first.
    """

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[LogprobEntry, ...] = ()

    @classmethod
    def of(cls, raw: bytes, logprob: float, top: tuple[LogprobEntry, ...] = ()) -> LogprobEntry:
        return cls(raw.decode("utf-8", errors="backslashreplace"), tuple(raw), logprob, top)

    def to_json(self, with_top: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"token": self.token, "logprob": self.logprob,
                               "bytes": list(self.bytes)}
        if with_top:
            out["top_logprobs"] = [t.to_json(with_top=False) for t in self.top]
        return out


def logprobs_json(entries: Sequence[LogprobEntry]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a completion (or of a streamed chunk)."""
    return {"content": [e.to_json() for e in entries]}


def choice_logprobs(ranked: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """A constrained answer in OpenAI's ``logprobs`` shape: one content entry, the chosen
    string, with every choice (most probable first) as its ``top_logprobs``."""
    top = tuple(LogprobEntry.of(c.encode("utf-8"), lp) for c, lp in ranked)
    return logprobs_json([LogprobEntry(top[0].token, top[0].bytes, top[0].logprob, top)])


class RequestTiming:
    """Where a request's time went in the gateway, sent back as a ``Server-Timing`` header
    (W3C; browsers' developer tools show it): each ``lap`` is the time since the one before,
    ``inner`` parts of that lap measured elsewhere (the replica's ``queue`` and ``model``
    within ``call``), and ``total`` all of it, in milliseconds. What a client measures above
    ``total`` is Serve's HTTP proxy and the network."""

    def __init__(self) -> None:
        self._start_s = self._last_s = time.perf_counter()
        self._phases: list[tuple[str, float]] = []

    def lap(self, name: str, inner: dict[str, float] | None = None) -> None:
        now_s = time.perf_counter()
        self._phases.append((name, (now_s - self._last_s) * 1000))
        self._phases += list((inner or {}).items())
        self._last_s = now_s

    def header(self) -> str:
        total_ms = (time.perf_counter() - self._start_s) * 1000
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in (*self._phases, ("total", total_ms)))


def parse_server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: a;dur=1.5, b;dur=2`` as ``{"a": 1.5, "b": 2.0}`` (ms)."""
    out = {}
    for metric in filter(None, (m.strip() for m in header.split(","))):
        name, *params = (p.strip() for p in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                out[name] = float(value)
    return out


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


def completion_response(
    model: str, text: str, prompt_tokens: int, completion_tokens: int,
    finish_reason: str = "stop", logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object with ``usage`` counts (and ``logprobs``)."""
    out = {
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
        "usage": usage_json(prompt_tokens, completion_tokens),
    }
    if logprobs is not None:
        out["choices"][0]["logprobs"] = logprobs
    return out


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
