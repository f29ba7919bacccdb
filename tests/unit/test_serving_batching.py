"""``BatchQueue``: the PULSE replica's batches are formed when its model thread is free."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ecgvlm.serving import BatchQueue


class Model:
    """Records each batch it is given; the first one blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.running = threading.Event()
        self.release = threading.Event()

    def run(self, jobs: list[str]) -> list[str]:
        self.batches.append(list(jobs))
        if len(self.batches) == 1:
            self.running.set()
            assert self.release.wait(10)
        if "bad" in jobs:
            raise ValueError("the model failed")
        return [job.upper() for job in jobs]


async def _while_the_first_batch_runs(model: Model, queue: BatchQueue, later: list[str]):
    """Submits "first", then ``later`` while its batch runs; returns every caller's task.
    The batches use a wait of 5 ms."""
    first = asyncio.create_task(queue.submit("first"))
    assert await asyncio.to_thread(model.running.wait, 10)
    tasks = []
    for job in later:  # one at a time, as clients send them, twice the batch wait apart
        tasks.append(asyncio.create_task(queue.submit(job)))
        await asyncio.sleep(0.01)
    return first, tasks


LATER = [f"r{i}" for i in range(10)]


@pytest.mark.parametrize(("max_batch_size", "batches_after_the_first"), [
    (32, [LATER]),  # every request that waited, in one batch
    (4, [LATER[:4], LATER[4:8], LATER[8:]]),  # at most max_batch_size, in arrival order
])
def test_requests_that_wait_during_a_batch_go_into_the_next(max_batch_size,
                                                            batches_after_the_first):
    # Serve's own @serve.batch (Ray 2.60) forms a batch of what arrived in each
    # batch_wait_timeout_s while the first runs and queues it behind it (read in its source;
    # seen in the replica as batches of 1-6 with 14-29 requests waiting, docs/serve.md).
    model = Model()

    async def main():
        queue = BatchQueue(model.run, max_batch_size, batch_wait_timeout_s=0.005)
        first, tasks = await _while_the_first_batch_runs(model, queue, LATER)
        model.release.set()
        return await first, await asyncio.gather(*tasks)

    first, answers = asyncio.run(main())
    assert model.batches == [["first"], *batches_after_the_first]
    assert first == "FIRST" and answers == [job.upper() for job in LATER]


def test_jobs_that_arrive_within_the_wait_share_a_batch():
    model = Model()
    model.release.set()

    async def main():
        # A long wait, so that a slow machine still sends "b" and "c" within it; the batch
        # starts once it is full, not at the end of the wait.
        queue = BatchQueue(model.run, max_batch_size=3, batch_wait_timeout_s=30.0)
        one = asyncio.create_task(queue.submit("a"))
        await asyncio.sleep(0.05)  # "a" is waiting for company
        return await asyncio.gather(one, queue.submit("b"), queue.submit("c"))

    assert asyncio.run(main()) == ["A", "B", "C"]
    assert model.batches == [["a", "b", "c"]]


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs():
    model = Model()

    async def main():
        queue = BatchQueue(model.run, max_batch_size=8, batch_wait_timeout_s=0.005)
        first, tasks = await _while_the_first_batch_runs(model, queue, ["bad", "ok"])
        model.release.set()
        await first
        failed = await asyncio.gather(*tasks, return_exceptions=True)
        return failed, await queue.submit("after")

    failed, after = asyncio.run(main())
    assert [type(e) for e in failed] == [ValueError, ValueError]
    assert "the model failed" in str(failed[0])
    assert after == "AFTER" and model.batches[-1] == ["after"]


def test_a_caller_that_leaves_before_its_batch_is_left_out():
    model = Model()

    async def main():
        queue = BatchQueue(model.run, max_batch_size=8, batch_wait_timeout_s=0.005)
        first, (gone, kept) = await _while_the_first_batch_runs(model, queue, ["gone", "kept"])
        gone.cancel()
        await asyncio.sleep(0)
        model.release.set()
        await first
        return await kept

    assert asyncio.run(main()) == "KEPT"
    assert model.batches == [["first"], ["kept"]]


def test_a_run_that_answers_the_wrong_number_of_jobs_fails_its_callers():
    async def main():
        queue = BatchQueue(lambda jobs: ["one answer"], max_batch_size=8,
                           batch_wait_timeout_s=0.05)
        return await asyncio.gather(queue.submit("a"), queue.submit("b"),
                                    return_exceptions=True)

    errors = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert "a batch of 2 jobs got 1 results" in str(errors[0])


@pytest.mark.parametrize(("size", "wait_s", "message"), [
    (0, 0.01, "max_batch_size must be at least 1, got 0"),
    (8, -1.0, "batch_wait_timeout_s must be >= 0, got -1.0"),
])
def test_bad_settings_are_named(size, wait_s, message):
    with pytest.raises(ValueError, match=message):
        BatchQueue(lambda jobs: jobs, max_batch_size=size, batch_wait_timeout_s=wait_s)
