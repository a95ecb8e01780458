"""The batcher in front of the model thread: gathering, limits, admission, dropping, order.

A stand-in `run_batch` records every batch it is handed and can be held on an event, so a test
decides exactly what is queued while the worker is busy.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from service.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from service.inference.batcher import BatchCost, Batcher, Call


class Worker:
    """Doubles every payload; records batches; blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on: int | None = None
        self.thread: int | None = None  # the thread it last ran on
        self.running = False

    def __call__(self, payloads: Sequence[int]) -> list[int | Exception]:
        self.thread, self.running = threading.get_ident(), True
        try:
            return self._run(payloads)
        finally:
            self.running = False

    def _run(self, payloads: Sequence[int]) -> list[int | Exception]:
        self.started.set()
        self.gate.wait(10)
        self.batches.append(list(payloads))
        if self.fail_on in payloads:
            raise RuntimeError("boom")
        return [2 * p for p in payloads]


def make(worker: Worker, **limits: Any) -> Batcher[int, int]:
    settings: dict[str, Any] = {"max_batch_images": 8, "max_wait_s": 0.0, "max_pending": 100,
                                "max_queue_images": 100}
    settings.update(limits)
    return Batcher(ThreadPoolExecutor(1), worker, **settings)  # type: ignore[arg-type]


async def occupy(batcher: Batcher[int, int], worker: Worker, payload: int | None = None) -> asyncio.Task[int]:
    """Start a job that holds the worker until the gate opens: a solo job (answering -1), or
    with `payload` a one-image classify batch of it."""
    worker.gate.clear()
    worker.started.clear()

    def hold() -> int:
        worker.started.set()
        worker.gate.wait(10)
        return -1

    job = batcher.submit_solo(hold, Call()) if payload is None else batcher.submit(payload, 1, Call())
    task = asyncio.create_task(job)
    while not worker.started.is_set():
        await asyncio.sleep(0.001)
    return task


def test_requests_queued_while_the_worker_is_busy_run_as_one_batch() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker)
        busy = await occupy(batcher, worker)
        jobs = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(5)]
        await asyncio.sleep(0.01)
        worker.gate.set()
        assert await asyncio.gather(*jobs) == [0, 2, 4, 6, 8]
        assert await busy == -1
        assert worker.batches == [[0, 1, 2, 3, 4]]
        assert (batcher.stats.batches, batcher.stats.batched_images) == (1, 5)
        await batcher.close()

    asyncio.run(scenario())


def test_a_batch_holds_at_most_max_batch_images_and_keeps_arrival_order() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=4)
        busy = await occupy(batcher, worker)
        sizes = [3, 1, 2, 2, 5]  # 5 > max: it still runs, alone
        jobs = [asyncio.create_task(batcher.submit(i, n, Call())) for i, n in enumerate(sizes)]
        await asyncio.sleep(0.01)
        worker.gate.set()
        await asyncio.gather(*jobs, busy)
        assert worker.batches == [[0, 1], [2, 3], [4]]
        await batcher.close()

    asyncio.run(scenario())


def test_the_oldest_request_waits_at_most_max_wait_for_company() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_wait_s=0.2)
        first = asyncio.create_task(batcher.submit(1, 1, Call()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(2, 1, Call()))
        start = time.monotonic()
        assert await asyncio.gather(first, second) == [2, 4]
        assert worker.batches == [[1, 2]]  # gathered within the wait
        assert time.monotonic() - start < 1.0
        await batcher.close()

    asyncio.run(scenario())


def test_a_full_batch_does_not_wait() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_wait_s=5.0, max_batch_images=2)
        start = time.monotonic()
        await asyncio.gather(batcher.submit(1, 1, Call()), batcher.submit(2, 1, Call()))
        assert time.monotonic() - start < 2.0
        await batcher.close()

    asyncio.run(scenario())


async def answered_one_while_two_queued(
    batcher: Batcher[int, int], worker: Worker
) -> list[asyncio.Task[int]]:
    """A one-image forward of 100 answered while requests 1 and 2 queued behind it; their tasks."""
    running = await occupy(batcher, worker, payload=100)
    queued = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in (1, 2)]
    await asyncio.sleep(0.01)
    worker.gate.set()
    assert await running == 200
    return queued


@pytest.mark.parametrize(("linger_s", "batches"), [(0.5, [[100], [1, 2, 3]]), (0.0, [[100], [1, 2], [3]])])
def test_a_free_worker_lingers_for_the_client_its_last_forward_answered(linger_s, batches) -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, linger_s=linger_s)
        queued = await answered_one_while_two_queued(batcher, worker)
        await asyncio.sleep(0.05)  # the answered client thinks, then sends its next request
        start = time.monotonic()
        again = asyncio.create_task(batcher.submit(3, 1, Call()))
        assert await asyncio.gather(*queued, again) == [2, 4, 6]
        assert worker.batches == batches
        assert time.monotonic() - start < 0.3  # its return ended the lingering: no wait for the rest
        assert batcher.stats.lingers == (1 if linger_s else 0)
        await batcher.close()

    asyncio.run(scenario())


def test_lingering_ends_linger_s_after_the_forward_when_its_client_does_not_come_back() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, linger_s=0.2)
        start = time.monotonic()
        queued = await answered_one_while_two_queued(batcher, worker)
        assert await asyncio.gather(*queued) == [2, 4]
        assert 0.15 < time.monotonic() - start < 1.0
        assert worker.batches == [[100], [1, 2]]
        assert batcher.stats.lingers == 1 and 0.1 < batcher.stats.linger_seconds < 1.0
        await batcher.close()

    asyncio.run(scenario())


def test_a_lone_client_never_waits_for_lingering() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, linger_s=5.0)
        start = time.monotonic()
        for i in range(5):  # each request is the answered client coming back: nothing else to wait for
            assert await batcher.submit(i, 1, Call()) == 2 * i
        assert time.monotonic() - start < 2.0
        assert worker.batches == [[i] for i in range(5)]
        assert batcher.stats.lingers == 0
        await batcher.close()

    asyncio.run(scenario())


def test_a_full_forward_does_not_linger() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, linger_s=5.0, max_batch_images=2)
        start = time.monotonic()
        queued = await answered_one_while_two_queued(batcher, worker)
        assert await asyncio.gather(*queued) == [2, 4]
        assert time.monotonic() - start < 2.0
        await batcher.close()

    asyncio.run(scenario())


def test_past_max_pending_or_max_queue_images_requests_get_overloaded_with_retry_after() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_pending=3, max_queue_images=10)
        busy = await occupy(batcher, worker)
        queued = [asyncio.create_task(batcher.submit(i, 4, Call())) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as too_many_jobs:
            await batcher.submit(9, 1, Call())
        assert int(too_many_jobs.value.headers["Retry-After"]) >= 1
        assert "3 model jobs" in too_many_jobs.value.message
        worker.gate.set()
        await asyncio.gather(*queued, busy)

        busy = await occupy(batcher, worker)
        queued = [asyncio.create_task(batcher.submit(1, 8, Call()))]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="8 images are already queued"):
            await batcher.submit(2, 4, Call())
        worker.gate.set()
        assert await asyncio.gather(*queued, busy) == [2, -1]
        assert batcher.stats.rejected == 2
        await batcher.close()

    asyncio.run(scenario())


def test_work_whose_deadline_passed_in_the_queue_is_dropped_before_compute() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker)
        busy = await occupy(batcher, worker)
        late = asyncio.create_task(batcher.submit(7, 1, Call(deadline=time.monotonic() + 0.05)))
        on_time = asyncio.create_task(batcher.submit(8, 1, Call()))
        with pytest.raises(DeadlineExceeded):
            await late  # the caller hears at its deadline, not when the worker frees up
        worker.gate.set()
        assert await on_time == 16
        await busy
        assert worker.batches == [[8]]  # 7 never reached the model
        assert sum(batcher.stats.dropped.values()) == 1
        await batcher.close()

    asyncio.run(scenario())


def test_work_of_a_client_that_disconnected_is_dropped_before_compute() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker)
        busy = await occupy(batcher, worker)

        async def gone() -> bool:
            return True

        left = asyncio.create_task(batcher.submit(5, 1, Call(disconnected=gone)))
        stayed = asyncio.create_task(batcher.submit(6, 1, Call()))
        await asyncio.sleep(0.01)
        worker.gate.set()
        with pytest.raises(ClientDisconnected):
            await left
        assert await stayed == 12
        await busy
        assert worker.batches == [[6]]
        assert batcher.stats.dropped["disconnected"] == 1
        await batcher.close()

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        worker = Worker()
        worker.fail_on = 3
        batcher = make(worker)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(3, 1, Call())
        assert await batcher.submit(4, 1, Call()) == 8
        assert batcher.pending == 0
        await batcher.close()

    asyncio.run(scenario())


def test_solo_jobs_run_alone_in_their_turn() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker)
        busy = await occupy(batcher, worker)
        order: list[str] = []

        def solo() -> str:
            order.append("solo")
            return "done"

        first = asyncio.create_task(batcher.submit(1, 1, Call()))
        lone = asyncio.create_task(batcher.submit_solo(solo, Call()))
        await asyncio.sleep(0.01)
        worker.gate.set()
        assert await lone == "done"
        assert await first == 2
        await busy
        assert worker.batches == [[1]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_reservation_counts_as_queued_until_its_job_is_submitted_or_released() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_queue_images=10)
        busy = await occupy(batcher, worker)
        first = batcher.reserve(8)  # admitted while its images are still being decoded
        with pytest.raises(Overloaded, match="8 images are already queued"):
            batcher.reserve(4)
        batcher.release(batcher.reserve(2))  # fits; abandoned, given back
        job = asyncio.create_task(batcher.submit(5, 8, Call(), reserved=first))
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 8
        worker.gate.set()
        assert await job == 10
        await busy
        assert batcher.queued_images == 0 and batcher.reserve(10) == 10
        await batcher.close()

    asyncio.run(scenario())


def test_the_idle_callback_runs_on_the_worker_once_per_idle_spell_and_never_beside_a_job() -> None:
    async def scenario() -> None:
        worker = Worker()
        idle_threads: list[int] = []

        def on_idle() -> None:
            assert not worker.running, "the idle callback ran beside a model job"
            idle_threads.append(threading.get_ident())

        batcher = make(worker, on_idle=on_idle, idle_s=0.05)
        assert await batcher.submit(1, 1, Call()) == 2
        await asyncio.sleep(0.02)
        assert idle_threads == []  # not idle long enough yet
        await asyncio.sleep(0.2)
        assert idle_threads == [worker.thread]  # on the model thread
        await asyncio.sleep(0.2)
        assert len(idle_threads) == 1  # once per idle spell, not every idle_s
        assert await asyncio.gather(*(batcher.submit(i, 1, Call()) for i in range(3))) == [0, 2, 4]
        await asyncio.sleep(0.2)
        assert len(idle_threads) == 2
        await batcher.close()

    asyncio.run(scenario())


def test_a_failing_idle_callback_does_not_stop_the_batcher() -> None:
    async def scenario() -> None:
        def on_idle() -> None:
            raise OSError("no")

        batcher = make(Worker(), on_idle=on_idle, idle_s=0.01)
        assert await batcher.submit(1, 1, Call()) == 2
        await asyncio.sleep(0.1)
        assert await batcher.submit(2, 1, Call()) == 4
        await batcher.close()

    asyncio.run(scenario())


class Overlap:
    """A run_batch for several workers: holds each batch on `gate`, records how many ran at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.batches: list[list[int]] = []
        self.log: list[str] = []

    def __call__(self, payloads: Sequence[int]) -> list[int | Exception]:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.batches.append(list(payloads))
            self.log.append("batch")
        try:
            self.gate.wait(10)
            return [2 * p for p in payloads]
        finally:
            with self.lock:
                self.now -= 1


def several(run: Overlap, workers: int = 2, **limits: Any) -> Batcher[int, int]:
    settings: dict[str, Any] = {"max_batch_images": 2, "max_wait_s": 0.0, "max_pending": 100,
                                "max_queue_images": 100, "workers": workers}
    settings.update(limits)
    return Batcher(ThreadPoolExecutor(workers), run, **settings)  # type: ignore[arg-type]


async def until(condition: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_with_two_workers_two_batches_run_side_by_side_and_no_more() -> None:
    async def scenario() -> None:
        run = Overlap()
        batcher = several(run)
        jobs = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(6)]
        await until(lambda: run.now == 2)
        await asyncio.sleep(0.05)
        assert run.now == 2 and batcher.pending == 6  # two batches running, the third waits
        run.gate.set()
        assert await asyncio.gather(*jobs) == [0, 2, 4, 6, 8, 10]
        assert run.most == 2
        assert sorted(p for b in run.batches for p in b) == list(range(6))
        await batcher.close()

    asyncio.run(scenario())


def test_with_two_workers_a_registration_waits_for_both_and_runs_alone() -> None:
    async def scenario() -> None:
        run = Overlap()
        batcher = several(run)
        first = [asyncio.create_task(batcher.submit(i, 2, Call())) for i in range(2)]
        await until(lambda: run.now == 2)

        def register() -> str:
            with run.lock:
                run.log.append(f"register beside {run.now}")
            return "registered"

        lone = asyncio.create_task(batcher.submit_solo(register, Call()))
        await asyncio.sleep(0.01)
        after = asyncio.create_task(batcher.submit(9, 1, Call()))
        await asyncio.sleep(0.05)
        assert run.log == ["batch", "batch"]  # the registration waits for both workers
        run.gate.set()
        assert await lone == "registered"
        assert await asyncio.gather(*first, after) == [0, 2, 18]
        assert run.log == ["batch", "batch", "register beside 0", "batch"]  # and runs alone
        await batcher.close()

    asyncio.run(scenario())


def test_closing_answers_running_and_queued_jobs_not_ready() -> None:
    async def scenario() -> None:
        from service.errors import NotReady

        run = Overlap()
        batcher = several(run, workers=1, max_batch_images=1)
        jobs = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(2)]
        await until(lambda: run.now == 1)
        await batcher.close()
        run.gate.set()
        for outcome in await asyncio.gather(*jobs, return_exceptions=True):
            assert isinstance(outcome, NotReady)

    asyncio.run(scenario())


# ------------------------------------------------------------------------ admission on time


def test_batch_cost_fits_a_fixed_part_and_a_part_per_image() -> None:
    cost = BatchCost()
    assert not cost.known and cost.seconds(8) == 0.0
    for n in (1, 4, 16, 1, 8, 32):
        cost.observe(n, 0.002 + 0.001 * n)
    a, b = cost.line()
    assert a == pytest.approx(0.002) and b == pytest.approx(0.001)
    assert cost.seconds(10, batches=2) == pytest.approx(2 * 0.002 + 10 * 0.001)


def test_batch_cost_without_a_spread_of_sizes_falls_back_to_the_mean_per_image() -> None:
    cost = BatchCost()
    for seconds in (0.030, 0.034):
        cost.observe(16, seconds)
    a, b = cost.line()
    assert a == 0.0 and b == pytest.approx((0.9 * 0.030 + 0.034) / (1.9 * 16))


def test_batch_cost_follows_the_recent_batches() -> None:
    cost = BatchCost(decay=0.5)
    for _ in range(3):
        cost.observe(4, 0.004)
    for _ in range(20):  # the machine got ten times slower
        cost.observe(4, 0.040)
    assert cost.seconds(4) == pytest.approx(0.040, rel=1e-3)


async def three_queued_behind_one(
    worker: Worker,
) -> tuple[Batcher[int, int], asyncio.Task[int], list[asyncio.Task[int]]]:
    """A batcher whose images cost 100 ms each and whose jobs may wait 250 ms + 1 x their own
    compute (or be in the next forward of 2), its worker held on a one-image batch of 100, three
    one-image jobs queued behind it: about 0.3 to 0.4 s of work ahead."""
    batcher = make(worker, max_batch_images=2, max_wait_ahead=(0.250, 1.0))
    for n in (1, 2, 4):
        batcher.cost.observe(n, 0.100 * n)
    running = await occupy(batcher, worker, payload=100)
    queued = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(3)]
    await asyncio.sleep(0.01)
    return batcher, running, queued


def test_a_classify_job_is_refused_when_the_work_ahead_of_it_passes_its_allowance() -> None:
    async def scenario() -> None:
        worker = Worker()
        # the first two queued images are in the next forward, whatever the wait
        batcher, running, queued = await three_queued_behind_one(worker)
        # the running image's 100 ms (less what has run) and the three queued
        assert 0.3 < batcher.work_ahead() <= 0.4
        with pytest.raises(Overloaded, match="ms of work queued ahead") as refused:
            await batcher.submit(7, 1, Call())  # may wait 350 ms
        assert int(refused.value.headers["Retry-After"]) in (1, 2)
        large = asyncio.create_task(batcher.submit(8, 32, Call()))  # may wait 250 + 3200 ms
        await asyncio.sleep(0.01)
        assert not large.done()
        worker.gate.set()
        assert await asyncio.gather(running, *queued, large) == [200, 0, 2, 4, 16]
        assert batcher.stats.rejected == 1
        await batcher.close()

    asyncio.run(scenario())


def test_without_a_time_bound_or_before_any_batch_ran_only_the_counts_limit_admission() -> None:
    async def scenario() -> None:
        for bound, observed in (((0.0, 0.0), True), ((0.001, 0.0), False)):
            worker = Worker()
            batcher = make(worker, max_batch_images=2, max_wait_ahead=bound)
            if observed:
                batcher.cost.observe(1, 1.0)  # a second per image: any queue is "too long"
            busy = await occupy(batcher, worker)
            queued = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(5)]
            await asyncio.sleep(0.01)
            worker.gate.set()
            assert await asyncio.gather(*queued, busy) == [0, 2, 4, 6, 8, -1]
            assert batcher.stats.rejected == 0
            await batcher.close()

    asyncio.run(scenario())


def test_a_registration_counts_in_the_work_ahead_as_long_as_recent_ones_took() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=1, max_wait_ahead=(0.010, 0.0))
        batcher.cost.observe(1, 0.001)
        assert await batcher.submit_solo(lambda: time.sleep(0.2), Call()) is None
        busy = await occupy(batcher, worker)
        # the last registration took 200 ms (and a little more: its measured time is the estimate)
        assert 0.1 < batcher.work_ahead() <= batcher._solo_seconds < 0.5
        next_batch = asyncio.create_task(batcher.submit(1, 1, Call()))  # runs right after it
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):  # would wait for the registration and that batch
            await batcher.submit(2, 1, Call())
        worker.gate.set()
        assert await asyncio.gather(busy, next_batch) == [-1, 2]
        await batcher.close()

    asyncio.run(scenario())


def test_a_burst_that_fits_the_next_forward_is_never_refused_on_time() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=8, max_wait_ahead=(0.001, 0.0))
        batcher.cost.observe(1, 1.0)  # a second per image: any wait is "too long"
        running = await occupy(batcher, worker, payload=100)
        burst = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(8)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):  # the ninth image would wait for a second forward
            await batcher.submit(9, 1, Call())
        worker.gate.set()
        assert await asyncio.gather(running, *burst) == [200, *range(0, 16, 2)]
        assert worker.batches[1] == list(range(8))
        await batcher.close()

    asyncio.run(scenario())


def test_a_forward_a_free_worker_is_about_to_start_counts_as_running_for_the_time_bound() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=2, max_wait_ahead=(0.001, 0.0))
        batcher.cost.observe(1, 1.0)  # a second per image: any wait is "too long"
        # One turn of the event loop: the first two fill the forward the free worker starts next,
        # the next two fit the forward after it, the fifth would wait for a third.
        jobs = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(5)]
        done = await asyncio.gather(*jobs, return_exceptions=True)
        assert done[:4] == [0, 2, 4, 6]
        assert isinstance(done[4], Overloaded)
        assert worker.batches == [[0, 1], [2, 3]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_request_that_comes_while_a_free_worker_lingers_for_a_full_forward_is_admitted() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=2, max_wait_ahead=(0.001, 0.0), linger_s=0.5)
        batcher.cost.observe(1, 0.001)
        running = await occupy(batcher, worker, payload=100)
        queued = asyncio.create_task(batcher.submit(1, 1, Call()))
        await asyncio.sleep(0.01)
        batcher.cost.observe(1, 1.0)  # from here on any wait is "too long"
        worker.gate.set()
        assert await running == 200
        await asyncio.sleep(0.01)  # lingering for the client of [100]
        late = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in (2, 3)]  # one turn
        assert await asyncio.gather(queued, *late) == [2, 4, 6]
        assert worker.batches == [[100], [1, 2], [3]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_requests_parts_queue_together_count_as_one_pending_request_and_fail_together() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_batch_images=4, max_pending=3)
        busy = await occupy(batcher, worker)  # one pending request
        split = asyncio.create_task(batcher.submit_parts([(10, 4), (11, 4), (12, 4)], Call()))
        await asyncio.sleep(0.01)
        assert batcher.pending == 2 and batcher.queued_images == 12
        other = asyncio.create_task(batcher.submit(20, 1, Call()))  # the third request: room for it
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.submit(21, 1, Call())
        worker.gate.set()
        assert await split == [20, 22, 24]
        assert await other == 40
        await busy
        assert worker.batches == [[10], [11], [12], [20]]  # one part per forward, in order
        assert batcher.pending == 0 and batcher.queued_images == 0

        busy = await occupy(batcher, worker)
        worker.fail_on = 11
        failing = asyncio.create_task(batcher.submit_parts([(10, 4), (11, 4), (12, 4)], Call()))
        await asyncio.sleep(0.01)
        worker.gate.set()
        with pytest.raises(RuntimeError, match="boom"):
            await failing
        await busy
        await asyncio.sleep(0.05)
        assert worker.batches[4:6] == [[10], [11]]  # a part after the failed one may run or be dropped
        assert batcher.pending == 0 and batcher.queued_images == 0
        await batcher.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------ overload

def overloaded_batcher(worker: Worker, demand: int = 4, factor: float = 1.0,
                       **limits: Any) -> Batcher[int, int]:
    """Forwards that cost 10 ms per image and nothing fixed; with a factor of 1 a forward under
    overload holds no more than its oldest request, whatever the cost line."""
    batcher = make(worker, overload=(demand, factor), **limits)
    for n in (1, 8):
        batcher.cost.observe(n, 0.010 * n)
    return batcher


def waiting(batcher: Batcher[int, int], seconds: float) -> None:
    """As if a client had just been refused with Retry-After: `seconds`."""
    heapq.heappush(batcher._waiting, time.monotonic() + seconds)


async def refuse(batcher: Batcher[int, int], times: int) -> list[int]:
    """Have the batcher refuse `times` one-image requests (its pending bound is full); their
    Retry-After values."""
    waits = []
    for _ in range(times):
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(0, 1, Call())
        waits.append(int(refused.value.headers["Retry-After"]))
    return waits


def test_refused_clients_count_as_demand_until_their_retry_after_and_past_the_bound_forwards_shrink() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, demand=6, max_pending=4)
        running = await occupy(batcher, worker, payload=100)
        queued = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.demand() == 4 and not batcher.overloaded
        await refuse(batcher, 2)
        assert batcher.demand() == 6 and not batcher.overloaded  # at the bound, not past it
        await refuse(batcher, 1)
        assert batcher.demand() == 7 and batcher.overloaded
        worker.gate.set()
        assert await asyncio.gather(running, *queued) == [200, 0, 2, 4]
        assert worker.batches == [[100], [0], [1], [2]]  # one image a forward, not [0, 1, 2]
        await batcher.close()

    asyncio.run(scenario())


async def overloaded_and_busy(worker: Worker) -> tuple[Batcher[int, int], asyncio.Task[int]]:
    """A batcher in overload mode (five clients waiting out a 429, past a bound of 1) whose worker
    is held on a one-image batch of 100 until the gate opens."""
    batcher = overloaded_batcher(worker, demand=1)
    running = await occupy(batcher, worker, payload=100)
    waiting(batcher, 5)
    return batcher, running


def test_under_overload_only_what_runs_in_the_next_forward_is_admitted() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher, running = await overloaded_and_busy(worker)
        batcher.overload = (1, 2.0)  # forwards of up to twice their oldest request: room to share
        assert batcher.overloaded
        nxt = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in (1, 2)]  # the next forward
        await asyncio.sleep(0.01)
        for n in (1, 4):  # would wait for a second forward
            with pytest.raises(Overloaded, match="overloaded") as refused:
                await batcher.submit(3, n, Call())
            assert 1 <= int(refused.value.headers["Retry-After"]) <= 10
        worker.gate.set()
        assert await asyncio.gather(running, *nxt) == [200, 2, 4]
        assert worker.batches == [[100], [1, 2]]
        # A request larger than one forward runs when nothing is queued ahead of it.
        assert await batcher.submit(3, 20, Call()) == 6
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_a_request_whose_forward_holds_only_its_own_images_must_start_at_once() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher, running = await overloaded_and_busy(worker)  # a factor of 1: forwards of one request
        for n in (1, 4, 20):  # nothing is queued, but the one worker is busy
            with pytest.raises(Overloaded, match="model is busy") as refused:
                await batcher.submit(1, n, Call())
            assert 1 <= int(refused.value.headers["Retry-After"]) <= 10
        worker.gate.set()
        assert await running == 200
        await until(lambda: batcher.pending == 0)
        assert batcher.overloaded
        assert await batcher.submit(1, 1, Call()) == 2  # the worker is free: it starts at once
        assert await batcher.submit(3, 20, Call()) == 6  # so does one larger than a forward
        await batcher.close()

        # Two workers: a request is admitted while one of them is free and nothing queued (or
        # reserved) would take it first.
        run = Overlap()
        batcher = several(run, max_batch_images=8, overload=(1, 1.0))
        for n in (1, 8):
            batcher.cost.observe(n, 0.010 * n)
        waiting(batcher, 5)
        first = asyncio.create_task(batcher.submit(1, 1, Call()))
        await until(lambda: run.now == 1)
        reserved = batcher.reserve(1)  # the other worker's, while its request is decoded
        with pytest.raises(Overloaded, match="model is busy"):
            batcher.check_admission(1)
        second = asyncio.create_task(batcher.submit(2, 1, Call(), reserved=reserved))
        await until(lambda: run.now == 2)
        with pytest.raises(Overloaded, match="model is busy"):
            await batcher.submit(3, 1, Call())
        run.gate.set()
        assert await asyncio.gather(first, second) == [2, 4]
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_the_next_forward_is_sized_by_the_oldest_queued_request() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher, running = await overloaded_and_busy(worker)
        batcher.overload = (1, 1.5)  # forwards of up to 1.5 x 4 images: a head of 4 may queue
        head = asyncio.create_task(batcher.submit(1, 4, Call()))  # the next forward
        await asyncio.sleep(0.01)
        batcher.overload = (1, 1.0)  # the next forward: the head's 4 images
        with pytest.raises(Overloaded, match="already queued"):
            await batcher.submit(2, 1, Call())  # 4 + 1 would not fit it
        batcher.overload = (1, 1.5)  # 1.5 x 4: a one-image request fits
        rider = asyncio.create_task(batcher.submit(2, 1, Call()))
        await asyncio.sleep(0.01)
        worker.gate.set()
        assert await asyncio.gather(running, head, rider) == [200, 2, 4]
        assert worker.batches == [[100], [1, 2]]
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_a_free_worker_does_not_linger() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, demand=1, factor=3.0, linger_s=5.0)  # forwards of 3
        waiting(batcher, 5)
        start = time.monotonic()
        queued = await answered_one_while_two_queued(batcher, worker)
        assert batcher.overloaded
        assert await asyncio.gather(*queued) == [2, 4]
        assert time.monotonic() - start < 2.0
        assert worker.batches == [[100], [1, 2]]
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_a_classify_request_is_not_admitted_behind_a_registration() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, demand=1)
        registration = await occupy(batcher, worker)
        waiting(batcher, 5)
        with pytest.raises(Overloaded, match="registration"):
            await batcher.submit(1, 1, Call())
        worker.gate.set()
        assert await registration == -1
        assert await batcher.submit(1, 1, Call()) == 2
        await batcher.close()

    asyncio.run(scenario())


def test_overload_ends_once_the_demand_falls_under_three_quarters_of_the_bound() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, demand=8)
        for _ in range(9):
            waiting(batcher, 0.2)
        waiting(batcher, 5)
        assert batcher.overloaded  # 10 waiting
        await asyncio.sleep(0.25)  # 9 Retry-Afters passed: 1 left, under 6
        assert batcher.demand() == 1 and not batcher.overloaded
        running = await occupy(batcher, worker, payload=100)
        burst = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(4)]
        await asyncio.sleep(0.01)
        worker.gate.set()
        assert await asyncio.gather(running, *burst) == [200, 0, 2, 4, 6]
        assert worker.batches == [[100], [0, 1, 2, 3]]  # full forwards again
        await batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("overload", [(0, 1.25), (4, 0.0)])
def test_without_an_overload_bound_or_factor_refusals_never_change_the_forwards(overload) -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, *overload, max_pending=4)
        running = await occupy(batcher, worker, payload=100)
        queued = [asyncio.create_task(batcher.submit(i, 1, Call())) for i in range(3)]
        await asyncio.sleep(0.01)
        await refuse(batcher, 20)
        assert not batcher.overloaded
        worker.gate.set()
        await asyncio.gather(running, *queued)
        assert worker.batches == [[100], [0, 1, 2]]
        await batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("fixed", "per_image", "factor", "n", "images"), [
    (0.0012, 0.0022, 1.25, 1, 1),  # a CPU: a second image costs more than a quarter more
    (0.0012, 0.0022, 1.25, 8, 10),  # (1.25 x 18.8 ms - 1.2 ms) / 2.2 ms = 10.1
    (0.0030, 0.00002, 1.25, 1, 16),  # a GPU-like line: launch-bound, up to the largest forward
    (0.0012, 0.0022, 1.0, 3, 3),  # a factor of 1: the request alone
    (0.0012, 0.0022, 1.25, 20, 16),  # past the largest forward: that (its parts run alone)
])
def test_the_forward_under_overload_keeps_within_the_factor_of_its_oldest_requests_compute(
        fixed, per_image, factor, n, images) -> None:
    batcher = make(Worker(), max_batch_images=16, overload=(1, factor))
    for size in (1, 4, 16):
        for _ in range(3):
            batcher.cost.observe(size, fixed + per_image * size)
    assert batcher._overload_forward(n) == images


def test_retry_after_stays_under_the_keep_alive_however_much_work_is_ahead() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_pending=1)
        batcher.cost.observe(1, 100.0)  # a hundred seconds an image
        running = await occupy(batcher, worker, payload=100)
        assert batcher.work_ahead() > 50
        assert max(await refuse(batcher, 20)) <= 10
        worker.gate.set()
        await running
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_retry_after_counts_the_crowd_still_waiting_to_come_back() -> None:
    """In overload mode a refused client is told to wait for the work ahead and for the clients
    refused before it, who come back first: each of them a mean request's compute. Without
    overload mode only the work ahead counts."""
    async def scenario() -> None:
        worker = Worker()
        batcher, running = await overloaded_and_busy(worker)  # one client waiting, 10 ms an image
        for _ in range(249):
            waiting(batcher, 5)
        (wait,) = await refuse(batcher, 1)  # 250 one-image requests of 10 ms ahead: 2.5 s
        assert 3 <= wait <= 6
        worker.gate.set()
        await running
        await batcher.close()

        other = Worker()
        calm = overloaded_batcher(other, demand=10_000, max_pending=1)
        for _ in range(250):
            waiting(calm, 5)
        running = await occupy(calm, other, payload=100)
        assert not calm.overloaded
        assert set(await refuse(calm, 10)) <= {1, 2}  # the work ahead alone: 10 ms
        other.gate.set()
        await running
        await calm.close()

    asyncio.run(scenario())


def test_the_crowd_in_retry_after_is_counted_in_mean_requests() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = overloaded_batcher(worker, demand=1)
        for i in range(20):  # requests of 8 images: the mean request moves from 1 towards 8
            assert await batcher.submit(i, 8, Call()) == 2 * i
        for _ in range(100):  # the stand-in's batches took no time: 10 ms an image again
            for n in (1, 8):
                batcher.cost.observe(n, 0.010 * n)
        running = await occupy(batcher, worker, payload=100)
        for _ in range(50):
            waiting(batcher, 5)
        assert batcher.overloaded
        (wait,) = await refuse(batcher, 1)  # 50 x (over 7 images x 10 ms): 3.6 s and more
        assert 4 <= wait <= 8
        worker.gate.set()
        await running
        await batcher.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ admission before the body

def test_before_its_body_is_read_a_request_is_refused_only_if_it_would_be_at_every_size() -> None:
    """The check made before a body is read knows no size: it must not refuse what the size would
    let in. The time bound's allowance grows with a request's compute, so a large request may
    queue behind work a one-image request may not wait for."""
    async def scenario() -> None:
        worker = Worker()
        batcher, running, queued = await three_queued_behind_one(worker)
        assert 0.3 < batcher.work_ahead() <= 0.4
        with pytest.raises(Overloaded, match="a request of 1 image may wait"):
            batcher.check_admission(1)  # 350 ms allowed
        batcher.check_any_admission(32)  # a 32-image request may wait 3,450 ms: not refused
        batcher.check_any_admission(2)  # nor one of 2 images (450 ms)
        with pytest.raises(Overloaded, match="a request of 1 image may wait") as refused:
            batcher.check_any_admission(1)  # a caller whose requests hold one image at most
        assert int(refused.value.headers["Retry-After"]) in (1, 2)
        more = asyncio.create_task(batcher.submit(3, 2, Call()))  # may wait 450 ms: admitted
        await asyncio.sleep(0.01)
        assert 0.5 < batcher.work_ahead() <= 0.6
        with pytest.raises(Overloaded, match="a request of 2 images may wait"):
            batcher.check_any_admission(2)  # 450 ms, for the largest request there may be
        assert batcher.stats.rejected == 3
        worker.gate.set()
        assert await asyncio.gather(running, *queued, more) == [200, 0, 2, 4, 6]
        await batcher.close()

    asyncio.run(scenario())


def test_before_its_body_is_read_a_request_is_refused_when_the_counts_are_full() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker, max_pending=2)
        running = await occupy(batcher, worker, payload=1)
        queued = asyncio.create_task(batcher.submit(2, 1, Call()))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="2 model jobs are already queued or running"):
            batcher.check_any_admission(128)
        worker.gate.set()
        assert await asyncio.gather(running, queued) == [2, 4]
        batcher.check_any_admission(128)
        await batcher.close()

    asyncio.run(scenario())


def test_under_overload_before_its_body_is_read_a_request_under_a_forward_may_still_get_in() -> None:
    """Overload mode, nothing queued, the worker busy: a one-image request's forward would hold its
    own image alone, so it must start at once and is refused; a 7-image one's forward (1.25 x its
    compute) has room for 8, so it queues. The check before the body refuses neither."""
    async def scenario() -> None:
        worker = Worker()
        batcher, running = await overloaded_and_busy(worker)  # forwards of up to 8, 10 ms an image
        batcher.overload = (1, 1.25)
        with pytest.raises(Overloaded, match="model is busy"):
            batcher.check_admission(1)
        batcher.check_any_admission(128)
        batcher.check_any_admission(4)  # 1.25 x 4 images: room for a fifth
        with pytest.raises(Overloaded, match="model is busy"):
            batcher.check_any_admission(3)  # 1.25 x 3 images: no room for a fourth
        large = asyncio.create_task(batcher.submit(3, 7, Call()))
        await asyncio.sleep(0.01)
        assert not large.done()  # admitted, queued
        worker.gate.set()
        assert await asyncio.gather(running, large) == [200, 6]
        await batcher.close()

    asyncio.run(scenario())
