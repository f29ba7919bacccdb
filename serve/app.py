"""The ecgvlm endpoint on Ray Serve: PULSE, PULSE+LoRA and a GPT-4o proxy behind one ingress.

Three deployments, wired by ``build_app(ServeArgs)``:

* ``Gateway`` (FastAPI ingress): auth, body limits, validation, rendering, routing.
* ``PulseModel``: base weights loaded once per replica, LoRA adapters multiplexed onto them
  (``@serve.multiplexed``), requests batched when the model is free (``sv.BatchQueue``) and
  grouped by adapter.
* ``Gpt4oProxy``: the retrying OpenAI client with a concurrency limit.

The logic lives in ``ecgvlm.serving``; this file is wiring. Run it with
``serve run serve/config.yaml`` or ``ecgvlm serve --model-dir DIR`` (see docs/serve.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecgvlm import serving as sv
from ecgvlm.serving import room

if TYPE_CHECKING:
    from ecgvlm.model import PreparedImage

logger = logging.getLogger("ray.serve")

#: How long /readyz waits for a model deployment to answer.
READY_TIMEOUT_S = 5.0

# No /docs or /openapi.json: every route but the health checks and the reading room's page
# (which holds no data: it asks the API, with the user's token) sits behind auth.
app = FastAPI(title="ecgvlm", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(sv.ApiError)
async def _api_error(request: Request, e: sv.ApiError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=e.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(sv.error_body(str(e.detail), kind), status_code=e.status_code)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    # A bug, not a bad request: logged with its traceback, answered without internals.
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse(
        sv.error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500
    )


async def _answer(call: Awaitable[Any]) -> Any:
    """``call``'s result, with Ray's "not now" errors (a deployment over its queue, a replica
    lost mid-request) raised as the 503 ApiError the client gets, in our error shape."""
    try:
        return await call
    except Exception as e:
        error = sv.unavailable_error(e)
        if error is None:
            raise
        logger.warning("%s: %s", error.code, e)
        raise error from e


@serve.deployment
class PulseModel:
    """PULSE on one replica: shared base weights, multiplexed adapters, batched requests."""

    def __init__(self, args: sv.ServeArgs) -> None:
        assert args.model_dir is not None
        self.runner = sv.PulseRunner(
            args.model_dir, args.adapters, dtype=args.dtype, device=args.device,
            attn_implementation=args.attn_implementation,
            max_batch_tokens=args.batching.max_batch_tokens,
        )
        self.default_adapter = next(iter(args.adapters), None)
        if self.default_adapter is not None:
            self.runner.load_adapter(self.default_adapter)  # pulse-lora answers at once
        self.batches = sv.BatchQueue(self._generate_batch, args.batching.max_batch_size,
                                     args.batching.batch_wait_timeout_s)
        # Each request's image is decoded, tiled and normalised here as it arrives, while
        # the batch before it generates: on the batch's thread it was 44% of the tiny model's
        # samples at concurrency 32 (docs/serve.md, "Where the CPU goes").
        self._image_thread = ThreadPoolExecutor(1, thread_name_prefix="prepare-image")

    @serve.multiplexed(max_num_models_per_replica=sv.MAX_ADAPTERS_PER_REPLICA)
    async def get_adapter(self, adapter: str) -> _AdapterLease:
        await asyncio.to_thread(self.runner.load_adapter, adapter)
        return _AdapterLease(self.runner, adapter, pinned=adapter == self.default_adapter)

    async def generate(self, req: sv.GenerateRequest) -> sv.GenerateResult | sv.ApiError:
        # An ApiError (prompt over the context, out of memory) is returned, not raised, as
        # Gpt4oProxy does: it is the request's answer, not a replica failure to log.
        arrived_s = time.perf_counter()
        await self._use_adapter()  # loads the adapter on its first use here
        adapter_s = time.perf_counter()
        prepared = await self._prepare_image(req)
        queued_s = time.perf_counter()
        hooks = sv.RequestHooks()
        try:
            out = await self.batches.submit((req, hooks, prepared))
        finally:
            # Cancelled when the caller leaves: its row stops at the next token. Harmless
            # once answered.
            hooks.cancel.set()
        if isinstance(out, sv.GenerateResult) and hooks.batch_started_s is not None:
            out = replace(out, timing_ms={
                "adapter": (adapter_s - arrived_s) * 1000,
                "image": (queued_s - adapter_s) * 1000,
                "queue": (hooks.batch_started_s - queued_s) * 1000,
                "model": (hooks.batch_s or 0.0) * 1000})
        return out

    async def stream(
        self, req: sv.GenerateRequest
    ) -> AsyncIterator[sv.StreamDelta | sv.GenerateResult | sv.ApiError]:
        """``req`` answered token by token: deltas as the batch it joined generates them
        (those that pile up while the caller reads are merged), then the result."""
        await self._use_adapter()
        prepared = await self._prepare_image(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        hooks = sv.RequestHooks(
            on_delta=lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta))
        answer = asyncio.ensure_future(self.batches.submit((req, hooks, prepared)))
        # After every delta: the thread queues them before its batch can return.
        answer.add_done_callback(queue.put_nowait)
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                deltas = [i for i in items if isinstance(i, sv.StreamDelta)]
                if deltas:
                    yield sv.StreamDelta.merge(deltas)
                if answer in items:
                    yield answer.result()
                    return
        finally:
            hooks.cancel.set()  # the caller left (or the answer is in): stop generating
            answer.cancel()

    async def _use_adapter(self) -> None:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.get_adapter(adapter)

    async def _prepare_image(self, req: sv.GenerateRequest) -> PreparedImage | None:
        if req.image is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            self._image_thread, self.runner.prepare_image, req.image)

    def _generate_batch(
        self, jobs: list[tuple[sv.GenerateRequest, sv.RequestHooks, PreparedImage | None]]
    ) -> list[sv.GenerateResult | sv.ApiError]:
        # On the batch queue's thread, one batch at a time: the replica's event loop stays
        # free for health checks and queueing while the model runs. Streamed and plain
        # requests share batches; the hooks are this replica's own.
        started_s = time.perf_counter()
        try:
            return self.runner.generate([r for r, _, _ in jobs], [h for _, h, _ in jobs],
                                        [p for _, _, p in jobs])
        finally:
            for _, hooks, _ in jobs:
                hooks.batch_started_s, hooks.batch_s = started_s, time.perf_counter() - started_s

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()


class _AdapterLease:
    """What Serve's multiplexing cache holds per adapter; eviction frees its LoRA weights.

    Serve calls the instance's ``__del__`` attribute on eviction. It is set on the instance
    (not the class) so that garbage collection never unloads an adapter a newer lease holds.
    """

    def __init__(self, runner: sv.PulseRunner, name: str, pinned: bool) -> None:
        self.name = name
        self.__del__ = (lambda: None) if pinned else (lambda: runner.unload_adapter(name))


@serve.deployment
class Gpt4oProxy:
    """The ``gpt-4o`` route: an OpenAI-compatible upstream behind retries and a limit."""

    def __init__(self, settings: sv.OpenAISettings, api_key: SecretStr | None) -> None:
        self.proxy = sv.OpenAIProxy(settings, api_key)

    def status(self) -> dict[str, Any]:
        return {"available": self.proxy.available, "reason": self.proxy.unavailable_reason,
                "attempts": self.proxy.attempts}

    async def complete(self, req: sv.ChatCompletionRequest) -> dict[str, Any]:
        # Upstream failures are answers, not crashes: returned (not raised) so the replica
        # log is not filled with tracebacks of every 429.
        try:
            return {"completion": await self.proxy.complete(req)}
        except sv.ApiError as e:
            return {"error": e}

    async def stream(self, req: sv.ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """The upstream's chunks as ``{"chunk": ...}``; a failure as a last ``{"error": ...}``.
        Closing this stream closes the upstream's."""
        try:
            async for chunk in self.proxy.stream(req):
                yield {"chunk": chunk}
        except sv.ApiError as e:
            yield {"error": e}


@serve.deployment
@serve.ingress(app)
class Gateway:
    """The HTTP ingress: every route checks auth and limits before any model sees a request."""

    def __init__(
        self,
        pulse: DeploymentHandle | None,
        proxy: DeploymentHandle,
        args: sv.ServeArgs,
        auth_token: SecretStr | None,
        fingerprints: dict[str, str] | None = None,
    ) -> None:
        self.pulse = pulse
        self.fingerprints = dict(fingerprints or {})  # sv.model_fingerprints, per model id
        self.proxy = proxy
        self._proxy_stream = proxy.options(stream=True)
        self.args = args
        self.limits = args.limits
        self.adapters = args.served_adapters()
        self._token = auth_token.get_secret_value().encode() if auth_token else None
        self._samples_dir = args.samples_dir or room.default_samples_dir()
        self.usage = sv.UsageCounter()
        self._pulse_handles: dict[tuple[str, bool], DeploymentHandle] = {}

    # -- helpers -------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self._token):
            raise sv.ApiError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with "
                f"the token set in {self.args.auth_token_env} where the endpoint runs",
                "authentication_error", code="invalid_api_key",
            )

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit():
            sv.check_body_size(int(length), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            sv.check_body_size(size, self.limits)  # chunked bodies stop at the limit
            chunks.append(chunk)
        return b"".join(chunks)

    def _pulse_handle(self, route: sv.ModelRoute, stream: bool = False) -> DeploymentHandle:
        if self.pulse is None:
            raise sv.ApiError(503, "pulse is not served here: start the endpoint with "
                              "model_dir (ecgvlm serve --model-dir DIR)",
                              "service_unavailable", "model", "model_unavailable")
        key = (route.adapter or "", stream)
        handle = self._pulse_handles.get(key)
        if handle is None:  # one handle per adapter and mode, reused: options() builds one
            handle = self._pulse_handles[key] = self.pulse.options(
                multiplexed_model_id=key[0], stream=stream)
        return handle

    async def _run_pulse(self, route: sv.ModelRoute, req: sv.GenerateRequest) -> sv.GenerateResult:
        out = await _answer(self._pulse_handle(route).generate.remote(req))
        if isinstance(out, sv.ApiError):
            raise out
        return out

    async def _run_proxy(self, req: sv.ChatCompletionRequest) -> dict[str, Any]:
        out = await _answer(self.proxy.complete.remote(req))
        if "error" in out:
            raise out["error"]
        return out["completion"]

    # -- routes --------------------------------------------------------------------------
    @app.get("/")
    async def reading_room(self) -> HTMLResponse:
        # The page itself is public; everything it shows comes from the API behind auth,
        # with the token the user types into it.
        return HTMLResponse(room.page_html(auth=self._token is not None))

    @app.get("/v1/ecg/samples")
    async def samples(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        listed = await asyncio.to_thread(room.list_samples, self._samples_dir)  # walks a folder
        return {"object": "list", "data": listed}

    @app.get("/v1/ecg/samples/{name:path}")
    async def sample_file(self, name: str, request: Request) -> FileResponse:
        self._authorize(request)
        return FileResponse(room.sample_file(self._samples_dir, name),
                            media_type="application/octet-stream")

    @app.get("/v1/report")
    async def report(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await asyncio.to_thread(room.report_summary, self.args.report_dir)

    @app.get("/v1/report/plots/{name}")
    async def report_plot(self, name: str, request: Request) -> FileResponse:
        self._authorize(request)
        return FileResponse(room.report_plot(self.args.report_dir, name), media_type="image/png")

    @app.get("/v1/report/predictions")
    async def report_predictions(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        q = request.query_params
        flag = q.get("correct", "").lower()
        if flag not in ("true", "false", ""):
            raise sv.bad_request(f"correct must be true or false, got {q['correct']!r}",
                                 param="correct")
        correct = flag == "true" if flag else None
        offset, limit = room.query_int(q, "offset", 0), room.query_int(q, "limit", 50)
        return await asyncio.to_thread(
            room.report_predictions, self.args.report_dir, q.get("dataset"), q.get("model"),
            q.get("condition"), correct, q.get("contradicted", "").lower() == "true", offset,
            limit)

    @app.get("/v1/report/printouts/{sample_id:path}")
    async def report_printout(self, sample_id: str, request: Request) -> Response:
        self._authorize(request)
        png = await asyncio.to_thread(room.report_printout, self.args.report_dir, sample_id)
        return Response(png, media_type="image/png")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        if self.pulse is not None:
            try:
                checks["pulse"] = await asyncio.wait_for(
                    self.pulse.stats.remote(), READY_TIMEOUT_S
                )
            except Exception as e:  # noqa: BLE001 - reported, not raised: readiness is the answer
                checks["pulse"] = {"error": type(e).__name__}
                ok = False
        try:
            checks["gpt-4o"] = await asyncio.wait_for(self.proxy.status.remote(), READY_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - as above
            checks["gpt-4o"] = {"error": type(e).__name__}
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        proxy = await self.proxy.status.remote()
        no_pulse = None if self.pulse is not None else "started without model_dir"
        runtime = None
        if self.pulse is not None:
            try:  # how PULSE runs: device, dtype, attention kernel, batch token budget
                stats = await asyncio.wait_for(self.pulse.stats.remote(), READY_TIMEOUT_S)
                runtime = {k: stats[k] for k in sv.RUNTIME_KEYS}
            except Exception as e:  # noqa: BLE001 - the list answers without it
                runtime = {"error": type(e).__name__}
        cards = [sv.ModelCard(id=sv.PULSE_MODEL, available=no_pulse is None, reason=no_pulse,
                              runtime=runtime)]
        if self.adapters:
            cards.append(sv.ModelCard(id=sv.LORA_MODEL, adapter=self.adapters[0],
                                      runtime=runtime))
            cards += [sv.ModelCard(id=f"{sv.LORA_MODEL}:{a}", adapter=a, runtime=runtime)
                      for a in self.adapters]
        for card in cards:
            card.fingerprint = self.fingerprints.get(card.id)
        cards.append(sv.ModelCard(id=sv.GPT4O_MODEL, owned_by="openai",
                                  available=proxy["available"], reason=proxy["reason"]))
        return {"object": "list", "data": [c.model_dump() for c in cards]}

    @app.get("/v1/usage")
    async def usage_counts(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "usage", "replica_models": self.usage.to_json()}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        timing = sv.RequestTiming()
        self._authorize(request)
        req = sv.parse_chat_request(await self._read_body(request), self.limits)
        route = sv.resolve_model(req.model, self.adapters)
        timing.lap("parse")
        images = sv.collect_images(req, self.limits)
        timing.lap("decode")
        try:
            if req.stream and req.guided_choice is None:
                return await self._stream(req, route, images)  # usage counted at its end
            if route.kind == "proxy":
                out = await self._run_proxy(req)
                timing.lap("call")
            else:
                out = await self._chat_pulse(req, route, images, timing)
        except sv.ApiError:
            self.usage.add(route.name, error=True)
            raise
        self.usage.add(route.name, out.get("usage"))
        headers = {"Server-Timing": timing.header()}
        if req.stream:  # a constrained choice is answered at once: its stream in one go
            return Response("".join(sv.completion_events(out, req.include_usage())),
                            media_type=sv.EVENT_STREAM, headers=headers)
        return JSONResponse(out, headers=headers)

    def _pulse_request(
        self, req: sv.ChatCompletionRequest, route: sv.ModelRoute, images: list[sv.DecodedImage]
    ) -> sv.GenerateRequest:
        from ecgvlm.prompt import PromptError, prompt_from_messages

        if len(images) > 1:
            # None is a question to the language model alone (the evaluation's text-only
            # baseline); PULSE was trained on one printout per question.
            raise sv.bad_request(
                f"messages: {route.name} reads at most one image per request (an image_url part with a "
                f"PNG or JPEG data URL), got {len(images)}",
                param="messages", code="too_many_images",
            )
        try:
            prompt, _ = prompt_from_messages([m.model_dump(exclude_none=True)
                                              for m in req.messages])
        except PromptError as e:
            raise sv.bad_request(f"messages: {e}", param="messages") from e
        return sv.GenerateRequest(
            prompt=prompt, image=images[0].data if images else None, adapter=route.adapter,
            max_new_tokens=sv.requested_max_tokens(req, self.limits),
            temperature=req.temperature or 0.0, seed=req.seed or 0,
            guided_choice=tuple(req.guided_choice) if req.guided_choice is not None else None,
            top_logprobs=req.top_logprobs_wanted(),
        )

    async def _chat_pulse(
        self, req: sv.ChatCompletionRequest, route: sv.ModelRoute, images: list[sv.DecodedImage],
        timing: sv.RequestTiming,
    ) -> dict[str, Any]:
        gen = self._pulse_request(req, route, images)
        timing.lap("prompt")
        result = await self._run_pulse(route, gen)
        timing.lap("call", inner=result.timing_ms)
        if result.choice_logprobs is not None:
            return sv.completion_response(route.name, result.text, result.prompt_tokens, 1,
                                          logprobs=sv.choice_logprobs(result.choice_logprobs))
        finish = "length" if result.completion_tokens >= gen.max_new_tokens else "stop"
        logprobs = (sv.logprobs_json(result.token_logprobs)
                    if result.token_logprobs is not None else None)
        return sv.completion_response(route.name, result.text, result.prompt_tokens,
                                      result.completion_tokens, finish, logprobs)

    async def _stream(
        self, req: sv.ChatCompletionRequest, route: sv.ModelRoute, images: list[sv.DecodedImage]
    ) -> StreamingResponse:
        """A streamed answer. The first item is awaited before the response starts, so that
        errors known by then (a prompt over the context, an upstream refusing) are plain HTTP
        errors; later ones are an error event."""
        if route.kind == "proxy":
            gen = self._proxy_stream.stream.remote(req)
        else:
            gen_req = self._pulse_request(req, route, images)
            gen = self._pulse_handle(route, stream=True).stream.remote(gen_req)
        try:
            first = await _answer(anext(gen, None))
        except BaseException:
            gen.cancel()
            raise
        error = first.get("error") if isinstance(first, dict) else first
        if isinstance(error, sv.ApiError):
            raise error
        events = (self._proxy_events(route, first, gen) if route.kind == "proxy"
                  else self._pulse_events(route, req, first, gen, gen_req.max_new_tokens))
        return StreamingResponse(self._guarded(route, events, gen), media_type=sv.EVENT_STREAM,
                                 headers={"Cache-Control": "no-cache"})

    async def _guarded(self, route: sv.ModelRoute, events: AsyncIterator[str],
                       gen: Any) -> AsyncIterator[str]:
        """``events`` to the client. A failure mid-stream (a replica lost) is an error event,
        and logged; a client that leaves cancels the model's stream, so nothing runs on."""
        ended = False
        try:
            async for event in events:
                yield event
            ended = True
        except Exception as e:
            ended = True
            self.usage.add(route.name, error=True)
            error = sv.unavailable_error(e)
            if error is None:
                logger.exception("stream of %s failed", route.name)
                error = sv.ApiError(500, f"internal error ({type(e).__name__})", "server_error")
            yield sv.error_event(error)
        finally:
            if not ended:
                gen.cancel()

    async def _pulse_events(
        self, route: sv.ModelRoute, req: sv.ChatCompletionRequest, item: Any, gen: Any,
        max_new_tokens: int,
    ) -> AsyncIterator[str]:
        writer = sv.ChunkWriter(route.name, req.include_usage())
        yield writer.role()
        while True:
            if isinstance(item, sv.StreamDelta):
                logprobs = item.logprobs if req.logprobs else None
                if item.text or logprobs:
                    yield writer.content(item.text, logprobs)
            elif isinstance(item, sv.ApiError):
                self.usage.add(route.name, error=True)
                yield sv.error_event(item)
                return
            else:  # the result: every delta has been sent
                usage = sv.usage_json(item.prompt_tokens, item.completion_tokens)
                yield writer.finish("length" if item.completion_tokens >= max_new_tokens
                                    else "stop")
                if writer.include_usage:
                    yield writer.usage(usage)
                yield sv.DONE_EVENT
                self.usage.add(route.name, usage)
                return
            item = await gen.__anext__()

    async def _proxy_events(self, route: sv.ModelRoute, item: Any, gen: Any) -> AsyncIterator[str]:
        usage = None
        while item is not None:
            if "error" in item:
                self.usage.add(route.name, error=True)
                yield sv.error_event(item["error"])
                return
            usage = item["chunk"].get("usage") or usage
            yield sv.sse_event(item["chunk"])
            item = await anext(gen, None)
        yield sv.DONE_EVENT
        self.usage.add(route.name, usage)

    @app.post("/v1/ecg/interpret")
    async def interpret(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = await self._read_body(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            req = sv.parse_model(sv.InterpretJsonRequest, sv.parse_json_body(body))
            query: sv.InterpretQuery = req
            record = sv.record_from_json(req, self.limits)
        elif ctype == "multipart/form-data":
            query, record = await self._parse_upload(request, body)
        else:
            raise sv.ApiError(
                415, f"content-type must be application/json (samples, fs_hz, leads) or "
                f"multipart/form-data (a WFDB .hea with its .dat/.mat), got {ctype!r}",
                param="content-type", code="unsupported_media_type")
        route = sv.resolve_model(query.model, self.adapters)
        question, options = sv.check_query(query, self.limits)
        # Drawn and measured side by side, in threads: the ingress's event loop stays free.
        measuring = (asyncio.create_task(asyncio.to_thread(sv.measure_json, record,
                                                           query.measure_waves))
                     if query.return_measurements else None)
        png = await asyncio.to_thread(sv.render_png, record, query.layout)
        max_new = query.max_tokens or self.limits.default_max_tokens
        from ecgvlm.prompt import option_letters

        letters = tuple(option_letters(len(options)))
        # The answer with its explanation, and the option letters scored as a constrained
        # choice, asked together (two rows of one batch on a PULSE replica).
        try:
            if route.kind == "proxy":
                from ecgvlm.prompt import chat_messages

                chat = sv.ChatCompletionRequest.model_validate({
                    "model": route.name, "messages": chat_messages(question, options, png),
                    "max_tokens": max_new, "temperature": query.temperature, "seed": query.seed,
                })
                out, chosen = await asyncio.gather(
                    self._run_proxy(chat),
                    self._run_proxy(chat.model_copy(update={"guided_choice": list(letters)})))
                text = out["choices"][0]["message"].get("content") or ""
                usages = [out.get("usage") or {}, chosen.get("usage") or {}]
                top = chosen["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                ranked = [(t["token"], t["logprob"]) for t in top]
            else:
                from ecgvlm.prompt import build_prompt

                gen = sv.GenerateRequest(
                    prompt=build_prompt(question, options), image=png, adapter=route.adapter,
                    max_new_tokens=max_new, temperature=query.temperature or 0.0,
                    seed=query.seed or 0,
                )
                result, chosen = await asyncio.gather(
                    self._run_pulse(route, gen),
                    self._run_pulse(route, replace(gen, guided_choice=letters)))
                text = result.text
                usages = [sv.usage_json(r.prompt_tokens, r.completion_tokens)
                          for r in (result, chosen)]
                ranked = list(chosen.choice_logprobs or ())
        except sv.ApiError:
            self.usage.add(route.name, error=True)
            if measuring is not None:
                measuring.cancel()
            raise
        usage = sv.usage_json(*(sum(int(u.get(k) or 0) for u in usages)
                                for k in ("prompt_tokens", "completion_tokens")))
        self.usage.add(route.name, usage)
        window_s = (record.start_s, record.n_samples / record.fs_hz)
        return JSONResponse(sv.interpret_response(
            route.name, text, question, options, usage, png if query.return_image else None,
            window_s, await measuring if measuring is not None else None,
            choice_logprobs=ranked, abstain_below=self.args.abstain_below,
        ))

    async def _parse_upload(self, request: Request, body: bytes) -> tuple[sv.InterpretQuery, Any]:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=8, max_fields=16)
        except Exception as e:  # python-multipart's errors: malformed bodies, too many parts
            raise sv.bad_request(f"malformed multipart body: {e}", code="invalid_multipart") from e
        files: dict[str, bytes] = {}
        fields: dict[str, Any] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    name = sv.safe_upload_name(value.filename, param=key)
                    files[name] = await value.read()
                elif key == "options":
                    fields.setdefault("options", []).append(value)
                else:
                    fields[key] = value
        finally:
            await form.close()
        opts = fields.get("options")
        if opts is not None and len(opts) == 1:
            if not opts[0].lstrip().startswith("["):  # 'AF,NSR' was one option named so
                raise sv.bad_request(
                    f"options: one field holds {opts[0]!r}; give the findings as one JSON list "
                    """(-F 'options=["Atrial fibrillation","Normal sinus rhythm"]') or one """
                    "options field each", param="options", code="too_short")
            fields["options"] = sv.parse_json_body(opts[0].encode())
        query = sv.parse_model(sv.InterpretQuery, fields)
        record = await asyncio.to_thread(
            sv.record_from_wfdb_upload, files, self.limits, query.dataset, query.start_s,
            query.duration_s,
        )
        return query, record


def build_app(args: sv.ServeArgs | dict[str, Any]) -> serve.Application:
    """The Serve application: ``Gateway`` over ``PulseModel`` and ``Gpt4oProxy``.

    Secrets are read here from the environment named by ``args`` (``OPENAI_API_KEY``,
    ``ECGVLM_API_TOKEN`` by default) and handed to the replicas as ``SecretStr``, so they
    never appear in reprs or logs; a replica whose builder saw no key still reads its own
    environment.

    Relative ``model_dir`` and adapter paths are taken from the builder's working directory
    (the repository root for ``serve run serve/config.yaml``).

    Raises:
        ValueError: when ``model_dir`` or an adapter directory does not exist.
    """
    if not isinstance(args, sv.ServeArgs):
        args = sv.ServeArgs.model_validate(args)
    args = sv.absolute_paths(args)  # replicas do not run in this directory
    sv.check_paths(args)
    api_key = os.environ.get(args.openai.api_key_env) or None
    token = os.environ.get(args.auth_token_env) or None
    pulse = None
    if args.model_dir is not None:
        options = args.pulse.deployment_options(num_gpus=sv.pulse_gpus(args))
        pulse = PulseModel.options(**options).bind(args)
    proxy = Gpt4oProxy.options(**args.proxy.deployment_options()).bind(
        args.openai, SecretStr(api_key) if api_key else None
    )
    return Gateway.options(**args.gateway.deployment_options()).bind(
        pulse, proxy, args, SecretStr(token) if token else None, sv.model_fingerprints(args)
    )
