"""A scriptable fake of an OpenAI-compatible server: real HTTP on 127.0.0.1, a free port.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` the way the OpenAI API and
our Ray Serve endpoint do, so the clients under test (the evaluation job's HTTP client, the
LLM judge, anything built on the ``openai`` package) run their real request, parsing, retry
and time-out code. Tests decide what comes back:

* a ``responder(request_json) -> Reply | str`` called for every request (a ``str`` is the
  assistant message's content), and
* a FIFO of scripted replies (``server.script(Reply(status=429), "ok")``) served before the
  responder, for "fail twice then succeed" scenarios.

A request with ``"stream": true`` is answered with server-sent ``chat.completion.chunk``
events (the content split after each space, a usage chunk when ``stream_options.include_usage``,
then ``[DONE]``); a reply's ``logprobs`` is sent as ``choices[0].logprobs``.

Every request is recorded in ``server.requests`` (path, parsed JSON body, headers).

Example:
    >>> with FakeOpenAIServer(lambda req: "The answer is B. Sinus rhythm.") as server:
    ...     client = openai.OpenAI(base_url=server.base_url, api_key="x")
    ...     client.chat.completions.create(model="pulse", messages=[...])
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted HTTP reply.

    Attributes:
        content: The assistant message content of a 200 chat completion.
        status: HTTP status; anything but 200 returns an OpenAI-style error body.
        body: Raw response bytes sent as-is (e.g. ``b"{not json"``), overriding ``content``.
        delay_s: Sleep before answering (to exercise client time-outs).
        headers: Extra response headers (e.g. ``{"Retry-After": "0"}``).
        choice_logprobs: Choice -> log-probability: the reply carries them as our endpoint
            answers ``guided_choice`` (``choices[0].logprobs.content[0].top_logprobs``
            lists every choice, most probable first; the content is the most probable).
        logprobs: ``choices[0].logprobs`` of the answer (OpenAI's shape, ``{"content":
            [{"token", "logprob", "bytes", "top_logprobs"}, ...]}``), if any; overrides
            ``choice_logprobs``.
    """

    content: str | None = None
    status: int = 200
    body: bytes | None = None
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    choice_logprobs: dict[str, float] | None = None
    logprobs: dict[str, Any] | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    json: Any
    headers: dict[str, str]


Responder = Callable[[dict[str, Any]], "Reply | str"]


def _default_responder(request: dict[str, Any]) -> Reply:
    return Reply(content="The answer is A.")


def completion_body(
    content: str, model: str, choice_logprobs: dict[str, float] | None = None
) -> dict[str, Any]:
    """A chat.completion object as the OpenAI API returns it (with ``choice_logprobs``: as
    our endpoint answers a constrained choice)."""
    if choice_logprobs:
        ranked = sorted(choice_logprobs.items(), key=lambda kv: -kv[1])
        content = ranked[0][0]

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        logprobs = {"content": [{**entry(*ranked[0]), "top_logprobs": [entry(*kv) for kv in ranked]}]}
    body = {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    if choice_logprobs:
        body["choices"][0]["logprobs"] = logprobs
    return body


def stream_body(content: str, model: str, include_usage: bool = False) -> bytes:
    """The server-sent events of a streamed answer: role, the content split after each
    space, the finish reason, usage when asked for, ``[DONE]``."""
    import re

    base = {"id": f"chatcmpl-fake-{time.monotonic_ns()}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def event(delta: dict[str, Any] | None, finish: str | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]
        chunk = {**base, "choices": choices}
        if include_usage:
            chunk["usage"] = (None if delta is not None else
                              {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
        return f"data: {json.dumps(chunk)}\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": piece}) for piece in re.findall(r"\S*\s*", content) if piece]
    events.append(event({}, "stop"))
    if include_usage:
        events.append(event(None))
    return ("".join(events) + "data: [DONE]\n\n").encode()


class FakeOpenAIServer:
    """A threaded HTTP server on loopback; use as a context manager or start()/stop().

    Args:
        responder: Called with each chat request's JSON body; returns a Reply or a content
            string. Defaults to always answering "The answer is A.".
        models: Model ids listed by ``GET /v1/models``; a dict is listed as the model card
            itself (e.g. ``{"id": "gpt-4o", "available": False, "reason": "..."}``).
        host: Interface to bind (loopback by default: tests reach only servers they start).
    """

    def __init__(
        self,
        responder: Responder | None = None,
        models: Iterable[str | dict[str, Any]] = ("pulse", "pulse-lora", "gpt-4o"),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.responder: Responder = responder or _default_responder
        self.models = tuple(models)
        self.host = host
        # 0: a free port; a fixed one lets a rerun reach "the same" server at the same URL.
        self._bind_port = port
        self.requests: list[RecordedRequest] = []
        self._script: collections.deque[Reply | str] = collections.deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------------
    def script(self, *replies: Reply | str) -> None:
        """Queue replies served (first in, first out) before the responder is consulted."""
        with self._lock:
            self._script.extend(replies)

    def _next_reply(self, request: dict[str, Any]) -> Reply:
        with self._lock:
            reply = self._script.popleft() if self._script else None
        if reply is None:
            reply = self.responder(request)
        return Reply(content=reply) if isinstance(reply, str) else reply

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The ``/v1`` base URL, as ``openai.OpenAI(base_url=...)`` takes it."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers and clients use

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _record(self, payload: Any) -> None:
                with server._lock:
                    server.requests.append(
                        RecordedRequest(self.command, self.path, payload, dict(self.headers))
                    )

            def do_GET(self) -> None:
                self._record(None)
                if self.path.rstrip("/").endswith("/v1/models"):
                    data = [
                        m if isinstance(m, dict) else {"id": m, "object": "model", "owned_by": "fake"}
                        for m in server.models
                    ]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": "not found"}}).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw)
                except json.JSONDecodeError:
                    self._record(raw)
                    self._send(400, json.dumps({"error": {"message": "bad json"}}).encode())
                    return
                self._record(payload)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, json.dumps({"error": {"message": "not found"}}).encode())
                    return
                reply = server._next_reply(payload)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                content_type = "application/json"
                if reply.body is not None:
                    body = reply.body
                elif reply.status != 200:
                    body = json.dumps(
                        {"error": {"message": f"fake error {reply.status}", "type": "fake",
                                   "code": reply.status}}
                    ).encode()
                elif payload.get("stream"):
                    usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                    body = stream_body(reply.content or "", str(payload.get("model", "")), usage)
                    content_type = "text/event-stream"
                else:
                    model = str(payload.get("model", ""))
                    completion = completion_body(reply.content or "", model, reply.choice_logprobs)
                    if reply.logprobs is not None:
                        completion["choices"][0]["logprobs"] = reply.logprobs
                    body = json.dumps(completion).encode()
                try:
                    self._send(reply.status, body, reply.headers, content_type)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out test); nothing to answer

        self._httpd = ThreadingHTTPServer((self.host, self._bind_port), Handler)
        self._httpd.daemon_threads = True
        # serve_forever's default poll of 0.5 s is what stop() waits for; 22 places in the tests
        # start one.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-openai", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a fake endpoint in its own process (benchmarks): prints ``PORT <n>`` when ready."""
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible endpoint on loopback")
    parser.add_argument("--delay-s", type=float, default=0.0, help="service time per request")
    parser.add_argument("--answer", default="The answer is B. Regular rhythm seen in lead II.")
    args = parser.parse_args(argv)

    def respond(request: dict[str, Any]) -> Reply:
        choices = request.get("guided_choice")
        if choices:  # every option equally likely, as an untrained model nearly says
            uniform = {c: -math.log(len(choices)) for c in choices}
            return Reply(choice_logprobs=uniform, delay_s=args.delay_s)
        return Reply(content=args.answer, delay_s=args.delay_s)

    server = FakeOpenAIServer(respond).start()
    print(f"PORT {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
