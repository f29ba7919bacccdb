"""OpenAI's error shape and the helpers that turn bad input into 4xx answers naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from ecgvlm.serving.limits import ServeLimits


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status code.
        message: What went wrong and, where possible, how to fix it.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``,
            ``rate_limit_error``, ``server_error``, ``service_unavailable``...).
        param: The request field at fault (``messages[0].content[1].image_url.url``), if any.
        code: A short machine-readable code.
        retry_after_s: Sent as ``Retry-After`` (whole seconds) when the client should retry.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray's process boundary intact (default pickling loses keyword args).
        return (ApiError, (self.status, self.message, self.type, self.param, self.code,
                           self.retry_after_s))


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
