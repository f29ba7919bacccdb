"""``stream: true``: OpenAI's ``chat.completion.chunk`` objects as server-sent events.

A stream is a first chunk with the assistant's role, chunks with content deltas (and their
tokens' ``logprobs`` when asked for), a chunk with ``finish_reason``, with
``stream_options.include_usage`` a last chunk with empty ``choices`` and the ``usage``, and
``data: [DONE]``. An error after the stream has begun is one ``data: {"error": ...}`` event
(what OpenAI sends, and what its client raises), after which the stream ends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ecgvlm.serving.chat import LogprobEntry, logprobs_json
from ecgvlm.serving.errors import ApiError

#: The event that ends every stream.
DONE_EVENT = "data: [DONE]\n\n"
#: The response's media type.
EVENT_STREAM = "text/event-stream"


def sse_event(data: dict[str, Any]) -> str:
    """One server-sent event carrying ``data`` as JSON (one line: JSON escapes newlines)."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(e: ApiError) -> str:
    return sse_event(e.to_json())


class ChunkWriter:
    """The events of one streamed completion; every chunk shares its ``id`` and ``created``.

    Args:
        model: The model name the chunks carry.
        include_usage: ``stream_options.include_usage``: every chunk carries ``usage: null``
            and :meth:`usage` writes the last one.
    """

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def _choice(self, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
                finish_reason: str | None = None) -> str:
        return sse_event(self._chunk([{"index": 0, "delta": delta, "logprobs": logprobs,
                                       "finish_reason": finish_reason}]))

    def role(self) -> str:
        """The first chunk: the assistant's role, empty content."""
        return self._choice({"role": "assistant", "content": ""})

    def content(self, text: str, logprobs: Sequence[LogprobEntry] | None = None) -> str:
        """A content delta; ``logprobs`` (its tokens', when asked for) may come without text."""
        return self._choice({"content": text},
                            logprobs_json(logprobs) if logprobs is not None else None)

    def finish(self, reason: str) -> str:
        return self._choice({}, finish_reason=reason)

    def usage(self, usage: dict[str, Any]) -> str:
        """The last chunk with ``include_usage``: no choices, the whole answer's ``usage``."""
        out = self._chunk([])
        out["usage"] = usage
        return sse_event(out)


def completion_events(completion: dict[str, Any], include_usage: bool = False) -> list[str]:
    """A finished ``chat.completion`` as the events of its stream: role, the whole content
    (with its ``logprobs``) in one delta, finish reason, usage, ``[DONE]``.

    For answers that are complete at once (a constrained choice is one forward pass).
    """
    choice = completion["choices"][0]
    writer = ChunkWriter(completion["model"], include_usage)
    writer.id, writer.created = completion["id"], completion["created"]
    content = writer._choice({"content": choice["message"].get("content") or ""},
                             choice.get("logprobs"))
    events = [writer.role(), content, writer.finish(choice.get("finish_reason") or "stop")]
    if include_usage:
        events.append(writer.usage(completion.get("usage") or {}))
    return events + [DONE_EVENT]
