"""Requests gathered into batches for a replica's one model thread.

Ray Serve's ``@serve.batch`` (Ray 2.60) forms the next batch as soon as its wait runs out,
whether or not the model is free: while one batch generates, it keeps forming batches of the
few requests that arrived in each wait and queues them behind the running one. With 32
clients in flight, the tiny model's replica ran batches of 1-6 requests while 14-29 more
waited in those queued batches (docs/serve.md, "Where a batch's requests wait").

Here a batch is formed only when the model is free: it takes every request that waited
during the last batch (up to ``max_batch_size``), and waits up to ``batch_wait_timeout_s``
after the first one for more only when fewer than that are waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


class BatchQueue(Generic[Job, Result]):
    """Runs ``run(jobs)`` on a worker thread, one batch at a time, for callers of :meth:`submit`.

    Args:
        run: Answers a batch of jobs, one result per job, in order; it runs on a thread so
            that the event loop (health checks, new requests) stays free while it does.
        max_batch_size: The most jobs in one call of ``run``.
        batch_wait_timeout_s: How long a batch waits after its first job for more to arrive.

    ``run`` raising fails every job of its batch with that exception. A caller that is
    cancelled before its batch starts is left out of it.
    """

    def __init__(
        self,
        run: Callable[[list[Job]], Sequence[Result]],
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._waiting: deque[tuple[Job, asyncio.Future[Result]]] = deque()
        # Made on the event loop that serves the requests, at the first one.
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, job: Job) -> Result:
        """``job``'s result, once a batch holding it has run."""
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._serve_batches())
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        self._arrived.set()
        return await future

    async def _arrival(self, timeout_s: float | None = None) -> None:
        """Returns when a job arrives (or ``timeout_s`` passes). Jobs are only ever taken
        from ``_waiting`` by the caller, so a timeout cannot lose one."""
        assert self._arrived is not None
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            pass

    async def _next_batch(self) -> list[tuple[Job, asyncio.Future[Result]]]:
        while not self._waiting:
            await self._arrival()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_timeout_s
        batch = [self._waiting.popleft()]
        while len(batch) < self.max_batch_size:
            if self._waiting:
                batch.append(self._waiting.popleft())
                continue
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            await self._arrival(remaining_s)
        return [(job, future) for job, future in batch if not future.done()]

    async def _serve_batches(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            try:
                results = await asyncio.to_thread(self.run, jobs)
                if len(results) != len(jobs):
                    raise RuntimeError(
                        f"a batch of {len(jobs)} jobs got {len(results)} results")
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
