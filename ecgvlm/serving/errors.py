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


#: Deepest nesting of arrays and objects a request body may have. Ours need 6 (a chat
#: message's content part's image URL); a deeper body is refused before it can exhaust the
#: parser's or the validator's recursion.
MAX_JSON_DEPTH = 32


def _json_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            if level > MAX_JSON_DEPTH:
                break
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return depth


def parse_json_body(body: bytes) -> Any:
    too_deep = bad_request(f"request body nests arrays or objects deeper than "
                           f"{MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise too_deep from e
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def check_body_size(n_bytes: int, limits: ServeLimits) -> None:
    if n_bytes > limits.max_body_bytes:
        raise ApiError(
            413,
            f"request body is {n_bytes} bytes; the limit is {limits.max_body_bytes} bytes",
            code="body_too_large",
        )


#: Retry-After of a 503 for a model replica that died mid-request: Serve starts a new one,
#: which takes a few seconds on the tiny model and a minute or more for PULSE-7B on a GPU.
REPLICA_LOST_RETRY_AFTER_S = 5.0


def unavailable_error(e: BaseException) -> ApiError | None:
    """The 503 (or 429) for Ray's errors that mean "not now" rather than a bug, else None.

    A deployment over its ``max_queued_requests`` (Serve's ``BackPressureError``, with the
    status and ``Retry-After`` its ``backpressure_config`` asks for), a replica that died or
    is unreachable mid-request (Serve restarts it; the request is not retried because it may
    have run), and a deployment that failed to start are answered so that a client retries,
    not with a 500 and a traceback in the log.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, BackPressureError):
        return ApiError(
            e.status_code, f"the model is at capacity ({e.message}): retry later",
            "rate_limit_error" if e.status_code == 429 else "service_unavailable",
            code="overloaded", retry_after_s=e.retry_after_s or 1.0)
    if isinstance(e, RayActorError):  # ActorDiedError, ActorUnavailableError
        return ApiError(
            503, f"the model replica was lost while answering ({type(e).__name__}); it is "
            "being restarted: retry", "service_unavailable", code="replica_unavailable",
            retry_after_s=REPLICA_LOST_RETRY_AFTER_S)
    if isinstance(e, DeploymentUnavailableError):
        return ApiError(503, f"the model is not available: {e}", "service_unavailable",
                        code="model_unavailable", retry_after_s=REPLICA_LOST_RETRY_AFTER_S)
    return None
