"""Cross-request batching in front of the model's worker threads.

Every model call of the service goes through one `Batcher`: a bounded FIFO served by a dispatcher
task on the event loop, which hands jobs and batches to `workers` worker threads (the engine's
model workers: Settings.model_workers). Classify jobs are batchable: when
a worker is free, the dispatcher gathers the queued classify jobs, up to `max_batch_images` images
(waiting at most `max_wait_s` after the oldest arrived for more to come), and runs them as one
forward. Registrations run alone, in their turn: with no other job beside them.

Lingering. Clients that call in a loop come back in a burst right after their forward answers
them, while the requests that queued during it would start the next forward at once without them:
on its own the service then alternates between two half-size forwards. With `linger_s`, a free
worker whose next forward is not full waits up to `linger_s` after the last forward ended for the
clients it answered to send their next requests (each arrival counts one back), so they share one
forward (forwards of about 14 images instead of 8 at 32 one-image clients on 2 CPU cores). It
waits only for clients answered and not yet back, so a lone client never waits, nor does anything
in overload mode.

Admission is bounded: past `max_pending` requests (queued or running; a request in parts counts
once), or `max_queue_images` queued images, a request gets
`Overloaded` (429 with Retry-After) at once instead of a latency that grows without bound. With
`max_wait_ahead` = (s, k), a classify job is also refused when the model work already ahead of it
(the rest of the running batches, then the queue) would take longer than s seconds plus k times
the job's own compute, both estimated from the batches run so far (`BatchCost`), unless it would
run in the next forward anyway. The bound is on time, which is what a caller waits, and in
proportion to the job: a large request may still queue behind others to keep the model busy, a
small one does not wait behind a crowd. Work whose
client disconnected, or whose deadline passed while it waited, is dropped before compute.

Overload. Batching trades latency for throughput: a request waits for a forward many times the
size of its own. That is the right trade while every client gets in, but once more clients want in
than the queue holds, it would keep the admitted ones at that long wait for nothing the refused
ones gain. So with `overload` = (demand, factor) the batcher counts its demand: the requests queued
or running, plus the clients waiting out a 429 right now (each refusal counts until its
Retry-After has passed). Past `demand` it is overloaded (and stays so until the demand falls under
3/4 of it): then a forward holds only as many images as keep its compute within `factor` times
that of the oldest request queued (by `BatchCost`), and a request is admitted only if it runs in
the next such forward (or nothing is queued), and not behind a registration. An admitted request
then waits for at most the rest of one small forward before its own, so it keeps close to its
unloaded latency, at the cost of the throughput that larger forwards would have given. Where its
forward would hold only its own images (the cost line leaves no room for more: one-image requests
on a CPU, or requests of a whole forward), it is admitted only if it starts at once: queued behind
a running forward it would wait that out for nothing, as no one else's images share its own. A
refused client is told to wait out the work ahead and,
in overload mode, the crowd refused before it (`_retry_after`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import ClientDisconnected, DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger("service.inference.batcher")
# The longest Retry-After of a refusal: under Settings.keep_alive_s, so a client that waits one out
# finds its keep-alive connection still open.
RETRY_AFTER_MAX_S = 10
P = TypeVar("P")  # what one batchable job carries
R = TypeVar("R")


@dataclass(frozen=True)
class Call:
    """What the caller of a model job allows: a deadline (time.monotonic() seconds) and a way to
    ask whether its client is still there."""

    deadline: float = math.inf
    disconnected: Callable[[], Awaitable[bool]] | None = None


@dataclass(eq=False)
class _Job(Generic[P]):
    call: Call
    future: asyncio.Future[Any]
    n_images: int = 0
    payload: P | None = None  # batchable job
    solo: Callable[[], Any] | None = None  # job that runs alone
    enqueued: float = field(default_factory=time.monotonic)
    # Whether it counts as a pending request: only a request's last part does (parts start in
    # order, so the request counts until its last part is done).
    counted: bool = True


class BatchCost:
    """Seconds a classify batch of n images takes, `a + b * n`, fitted by least squares over the
    recent batches (each weight decays by `decay` per batch), so it follows the machine's load.

    One number per image (`b` alone) would overcharge small requests, which pay mostly the fixed
    part of a forward, and undercharge large ones; batch sizes that never vary give no slope, and
    then the fit falls back to that per-image mean."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, n_images: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._x = d * self._x + n_images
        self._y = d * self._y + seconds
        self._xx = d * self._xx + n_images * n_images
        self._xy = d * self._xy + n_images * seconds

    @property
    def known(self) -> bool:
        return self._x > 0

    def line(self) -> tuple[float, float]:
        """(a, b): seconds per batch and per image, both >= 0."""
        if not self.known:
            return 0.0, 0.0
        spread = self._w * self._xx - self._x * self._x
        if spread > 1e-9 * self._w * self._xx:
            b = (self._w * self._xy - self._x * self._y) / spread
            a = (self._y - b * self._x) / self._w
            if a >= 0 and b > 0:
                return a, b
        return 0.0, self._y / self._x

    def seconds(self, n_images: int, batches: int = 1) -> float:
        a, b = self.line()
        return a * batches + b * n_images


@dataclass
class BatchStats:
    """Counters the metrics read at scrape time."""

    batches: int = 0
    batched_images: int = 0
    dropped: dict[str, int] = field(
        default_factory=lambda: {"disconnected": 0, "deadline": 0, "cancelled": 0}
    )
    rejected: int = 0
    lingers: int = 0  # forwards whose start waited for the clients of the last forward
    linger_seconds: float = 0.0  # how long those waits took, together


class Batcher(Generic[P, R]):
    """See the module docstring. `run_batch(payloads)` runs in the worker thread and returns one
    result, or the exception for that payload alone, per payload."""

    def __init__(
        self, executor: Executor, run_batch: Callable[[Sequence[P]], list[R | Exception]], *,
        max_batch_images: int, max_wait_s: float, max_pending: int, max_queue_images: int,
        max_wait_ahead: tuple[float, float] = (0.0, 0.0), overload: tuple[int, float] = (0, 0.0),
        linger_s: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
        on_idle: Callable[[], object] | None = None, idle_s: float = 1.0, workers: int = 1,
    ) -> None:
        self._executor = executor  # with at least `workers` threads
        self.workers = workers
        self._run_batch = run_batch
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.linger_s = linger_s
        self.max_pending = max_pending
        self.max_queue_images = max_queue_images
        self.max_wait_ahead = max_wait_ahead  # (0, 0): no bound on time, only on counts
        self.overload = overload  # (demand, forward factor); either 0: no overload mode
        self._overloaded = False
        self._waiting: list[float] = []  # heap: when each refused client's Retry-After ends
        self.cost = BatchCost()
        self._solo_seconds = 0.0  # moving mean of a registration's seconds, for `work_ahead`
        self._request_images = 1.0  # moving mean of a classify request's images, for `_retry_after`
        self._on_batch = on_batch  # (images in the batch, seconds of compute)
        self._on_idle = on_idle  # run on the worker once the queue has been empty for idle_s
        self.idle_s = idle_s
        self._busy_since_idle = False
        self._queue: deque[_Job[P]] = deque()
        self._queued_images = 0  # images of the batchable jobs in the queue
        self._reserved_images = 0  # images of requests admitted by `reserve`, still being decoded
        self._queued = 0  # requests queued: counted jobs in the queue
        self._running = 0  # requests running: counted jobs handed to the workers
        self._batches: dict[asyncio.Task[None], list[_Job[P]]] = {}  # what each worker runs
        self._started: dict[asyncio.Task[None], float] = {}  # when (time.monotonic()) it began
        self._solo_running = False
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self.stats = BatchStats()
        # Lingering: requests answered by the forward that ended last, at `_freed_at`, whose
        # clients have not sent another since (each classify request that arrives counts one back).
        self._returning = 0
        self._freed_at = -math.inf

    # ------------------------------------------------------------------------------ public

    @property
    def pending(self) -> int:
        """Requests queued or running (a request split into parts counts once)."""
        return self._queued + self._running

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def overloaded(self) -> bool:
        """In overload mode now (see the module docstring)? Reading it updates the mode, so the
        metrics gauge falls back to 0 once the demand is gone even with no request to admit."""
        return self._overload_check()

    def check_admission(self, n_images: int) -> None:
        """Raise Overloaded now if a job of n_images would not be admitted."""
        self._admit(n_images)

    def check_any_admission(self, most_images: int) -> None:
        """Raise Overloaded now if a classify request would be refused whatever its size, from 1
        to most_images images: the check made before a request's body is read, which must not
        refuse a request its size would have let in (a 32-image request may queue behind work
        that a one-image request may not wait for)."""
        why = self._any_size_refusal(most_images)
        if why is not None:
            self._reject(why)

    def reserve(self, n_images: int) -> int:
        """Admit a job of n_images before its inputs are prepared (decoded): its images count as
        queued from now on, so concurrent requests cannot all decode and then be refused. Hand the
        result to `submit(reserved=...)`, or to `release` if the job is abandoned."""
        self._admit(n_images)
        self._reserved_images += n_images
        return n_images

    def release(self, reserved: int) -> None:
        self._reserved_images -= reserved

    async def submit(self, payload: P, n_images: int, call: Call, reserved: int = 0) -> R:
        """Queue a batchable job and wait for its result (`reserved`: what `reserve` returned)."""
        return (await self.submit_parts([(payload, n_images)], call, reserved))[0]

    async def submit_parts(self, parts: Sequence[tuple[P, int]], call: Call, reserved: int = 0) -> list[R]:
        """Queue the parts of one request (payload, images) as jobs of their own, admitted or
        refused together, and wait for all their results; the first failure raises, and the parts
        still queued are dropped."""
        images = sum(n for _, n in parts)
        if reserved:
            self.release(reserved)
        else:
            self._admit(images)
        self._request_images = 0.9 * self._request_images + 0.1 * images
        jobs = [_Job(call, self._future(), n_images=n, payload=payload, counted=i == len(parts) - 1)
                for i, (payload, n) in enumerate(parts)]
        return await self._wait(jobs)

    async def submit_solo(self, fn: Callable[[], R], call: Call) -> R:
        """Queue a job that runs alone (a registration) and wait for its result."""
        self._admit(0)
        return (await self._wait([_Job(call, self._future(), solo=fn)]))[0]

    async def close(self) -> None:
        """Stop dispatching; jobs still queued or running get NotReady."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        running = [job for batch in self._batches.values() for job in batch]
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        while self._queue:
            running.append(self._queue.popleft())
        self._queued = 0
        for job in running:
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))

    # ---------------------------------------------------------------------------- admission

    def _admit(self, n_images: int) -> None:
        why = self._refusal(n_images)
        if why is not None:
            self._reject(why)

    def _refusal(self, n_images: int) -> str | None:
        """Why a job of n_images (0: a registration) queued now would be refused, or None."""
        if self.pending >= self.max_pending:
            return f"{self.pending} model jobs are already queued or running"
        queued = self._queued_images + self._reserved_images
        if n_images and queued and queued + n_images > self.max_queue_images:
            return f"{queued} images are already queued for the model"
        if self._overload_check() and n_images:
            if self._solo_running or any(job.solo is not None for job in self._queue):
                return "the service is overloaded and a registration is running or queued"
            if self._next_forward(n_images) <= n_images:
                # Its forward would hold only its own images (one-image forwards on a CPU): queued
                # behind a running forward it would wait that forward out and share its own with no
                # one, so it is admitted only if it starts at once.
                if not self._starts_now(n_images):
                    return ("the service is overloaded and its model is busy: this request's "
                            "forward would wait for another")
            elif queued and not self._in_next_batch(n_images):
                return (f"the service is overloaded and {queued} images are already queued for "
                        f"its next forwards of {self._next_forward(n_images)} images")
            return None
        if n_images and any(self.max_wait_ahead) and self.cost.known \
                and not self._in_next_batch(n_images, starting=True):
            fixed, factor = self.max_wait_ahead
            ahead, allowed = self.work_ahead(), fixed + factor * self.cost.seconds(n_images)
            if ahead > allowed:
                images = f"{n_images} image{'s' * (n_images != 1)}"
                return (f"the model has about {1000 * ahead:.0f} ms of work queued ahead, over "
                        f"the {1000 * allowed:.0f} ms a request of {images} may wait")
        return None

    def _any_size_refusal(self, most_images: int) -> str | None:
        """Why a classify job of any size from 1 to most_images would be refused, or None if one
        of some size would be admitted. Three sizes decide it (the rules of `_refusal`, by size):
        one image is the likeliest admitted by the counts, by fitting the next forward and by
        starting at once; the most images by the time bound, whose allowance grows with the
        job's compute; and, under overload with nothing queued, the largest job under a forward,
        whose forward has the most room beside it."""
        why = None
        for n in sorted({1, most_images, min(most_images, self.max_batch_images - 1)} - {0}):
            why = self._refusal(n)
            if why is None:  # most requests: one image gets in, and nothing more is asked
                return None
        return why

    def demand(self) -> int:
        """Requests queued or running, plus the refused clients still waiting out their 429."""
        now = time.monotonic()
        while self._waiting and self._waiting[0] <= now:
            heapq.heappop(self._waiting)
        return self.pending + len(self._waiting)

    def _overload_check(self) -> bool:
        """Update and return the overload mode: on past the demand bound, off under 3/4 of it."""
        most, factor = self.overload
        if not most or not factor:
            return False
        demand = self.demand()
        if demand > most and not self._overloaded:
            log.warning("overloaded: a demand of %d requests, over %d; admitting only what "
                        "runs in the next small forward", demand, most)
            self._overloaded = True
        elif demand < 0.75 * most and self._overloaded:
            log.info("no longer overloaded: a demand of %d requests", demand)
            self._overloaded = False
        return self._overloaded

    def _overload_forward(self, n_images: int) -> int:
        """Images in a forward under overload, for an oldest request of n_images: the most whose
        compute stays within the overload factor times that request's own, and at least n_images,
        but never past max_batch_images (a larger request runs in parts of that size)."""
        most = self.max_batch_images
        if n_images >= most or not self.cost.known:
            return most
        a, b = self.cost.line()
        allowed = self.overload[1] * self.cost.seconds(n_images)
        fits = math.floor((allowed - a) / b + 1e-9) if b > 0 else most
        return max(n_images, min(most, fits))

    def _next_forward(self, n_images: int) -> int:
        """The most images in the next forward a job of n_images queued now could join: sized by
        the oldest classify job queued (the job itself when none is), see `_batch_images`."""
        if not self.overloaded:
            return self.max_batch_images
        head = next((job.n_images for job in self._queue if job.payload is not None), n_images)
        return self._overload_forward(head)

    def _in_next_batch(self, n_images: int, starting: bool = False) -> bool:
        """Would a job of n_images queued now run in the next classify forward of a worker? Then
        refusing it would spare no one a wait, so a burst that fits a batch is never refused on
        time, nor is a request that comes while a registration runs. Under overload this is
        what admission asks of every request (when something is queued).

        `starting`: a free worker's forward from the queue counts as running, not as the next
        one: it starts as soon as the dispatcher runs, or when its lingering ends. (Otherwise a
        request that came in the same turn of the event loop as the one that filled that forward,
        or while a free worker lingered for a full one, was refused for waiting out a forward
        that, a moment later, would have been running: at 32 one-image clients such refusals
        could tip a process into overload mode.)"""
        queued = self._queued_images + self._reserved_images
        forwards = self.workers
        if starting and not self._solo_running:
            forwards += self.workers - len(self._batches)
        return queued + n_images <= self._next_forward(n_images) * forwards

    def _starts_now(self, n_images: int) -> bool:
        """Would a classify job of n_images queued now start at once? A worker is free for it, and
        the images queued (or reserved) ahead of it, if any, leave it room in the forwards the
        free workers start next."""
        free = self.workers - len(self._batches)
        if free <= 0 or self._solo_running:
            return False
        queued = self._queued_images + self._reserved_images
        return not queued or queued + n_images <= free * self._next_forward(n_images)

    def work_ahead(self) -> float:
        """Estimated seconds until a job queued now would start: the rest of the running jobs, then
        the queued (and reserved) images in full batches and the queued registrations (each the
        recent mean), shared by the workers."""
        now = time.monotonic()
        running = sum(
            max(0.0, self._seconds(batch) - (now - self._started[task]))
            for task, batch in self._batches.items()
        )
        images = self._queued_images + self._reserved_images
        solos = sum(1 for job in self._queue if job.solo is not None)
        queued = self.cost.seconds(images, math.ceil(images / self.max_batch_images)) \
            + solos * self._solo_seconds
        return (running + queued) / self.workers

    def _retry_after(self) -> int:
        """Seconds a refused client is asked to wait: the time until the model could take it, in
        whole seconds (at least 1), plus up to as much again at random, so a crowd refused together
        does not come back together; RETRY_AFTER_MAX_S at most.

        That time is the work ahead, and in overload mode also the crowd's: the clients refused
        before this one and still waiting out their Retry-After come back first, and serving each
        of them once takes about one request's compute (`_request_images`, the mean request). Told
        to come back after the work ahead alone, a crowd many forwards deep comes back all at once
        to be refused again, and those refusals hold up the event loop that answers the admitted
        requests."""
        if not self.cost.known:
            ahead = 1.0
        else:
            ahead = self.work_ahead()
            if self._overloaded:
                crowd = self.demand() - self.pending
                ahead += crowd * self.cost.seconds(self._request_images) / self.workers
        wait = min(RETRY_AFTER_MAX_S // 2, max(1, math.ceil(ahead)))
        return wait + random.randint(0, wait)

    def _seconds(self, batch: list[_Job[P]]) -> float:
        if batch[0].solo is not None:
            return self._solo_seconds
        return self.cost.seconds(sum(job.n_images for job in batch))

    def _reject(self, why: str) -> None:
        self.stats.rejected += 1
        wait = self._retry_after()
        if all(self.overload):
            heapq.heappush(self._waiting, time.monotonic() + wait)
        raise Overloaded(f"{why}; retry shortly", headers={"Retry-After": str(wait)})

    def _future(self) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done():
            self._wake = asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch(), name="metanet-batcher")
        return loop.create_future()

    def _enqueue(self, job: _Job[P]) -> None:
        self._queue.append(job)
        if job.payload is not None and job.counted and self._returning:
            self._returning -= 1  # perhaps one of the clients the last forward answered
        self._queued += job.counted
        self._queued_images += job.n_images if job.payload is not None else 0
        assert self._wake is not None
        self._wake.set()

    async def _wait(self, jobs: list[_Job[P]]) -> list[Any]:
        """Queue the jobs and wait for their results in order; the first failure raises, and a
        job not finished by then is cancelled (the dispatcher drops it, or discards its result)."""
        for job in jobs:
            self._enqueue(job)
        try:
            return [await self._result(job) for job in jobs]
        finally:
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()

    async def _result(self, job: _Job[P]) -> Any:
        """The job's result by its deadline."""
        timeout = job.call.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout if timeout < math.inf else None)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before the model answered") from None

    # ---------------------------------------------------------------------------- dispatcher

    async def _dispatch(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._can_start():
                self._wake.clear()
                if not self._queue and not self._batches and self._on_idle is not None \
                        and self._busy_since_idle:
                    await self._idle(loop)
                else:
                    await self._wake.wait()
            head = self._queue[0]
            if head.payload is not None:
                await self._fill(head)
                batch = self._take_batch()
            else:
                batch = [self._queue.popleft()]
                self._queued -= batch[0].counted
            batch = await self._still_wanted(batch)
            if batch:
                self._start(loop, batch)

    def _can_start(self) -> bool:
        """Is there a job at the head of the queue, and a worker it may have? A registration
        waits for every worker to be free, and nothing starts beside it."""
        if not self._queue or self._solo_running:
            return False
        if self._queue[0].solo is not None:
            return not self._batches
        return len(self._batches) < self.workers

    def _start(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P]]) -> None:
        counted = sum(job.counted for job in batch)
        self._running += counted
        self._solo_running = batch[0].solo is not None
        self._busy_since_idle = True
        task = loop.create_task(self._run(loop, batch))
        self._batches[task] = batch
        self._started[task] = time.monotonic()

        def finished(task: asyncio.Task[None]) -> None:
            self._batches.pop(task, None)
            self._started.pop(task, None)
            self._running -= counted
            if batch[0].solo is not None:
                self._solo_running = False
            else:
                self._returning, self._freed_at = counted, time.monotonic()
            if self._wake is not None:
                self._wake.set()

        task.add_done_callback(finished)

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for work; after idle_s without any, run on_idle on the worker (once per idle
        spell). Jobs that arrive meanwhile wait for it: it is short next to a model call."""
        assert self._wake is not None and self._on_idle is not None
        try:
            await asyncio.wait_for(self._wake.wait(), self.idle_s)
            return
        except TimeoutError:
            pass
        self._busy_since_idle = False
        try:
            await loop.run_in_executor(self._executor, self._on_idle)
        except Exception:  # a housekeeping failure must not stop the dispatcher
            log.exception("the idle callback failed")

    def _batch_images(self, head: _Job[P]) -> int:
        """The most images in the forward `head` starts: max_batch_images, or fewer under overload."""
        return self._overload_forward(head.n_images) if self.overloaded else self.max_batch_images

    async def _fill(self, head: _Job[P]) -> None:
        """Wait until a full batch is queued, or else until the oldest job has waited max_wait_s
        and no client answered by the last forward is still to be lingered for."""
        assert self._wake is not None
        start, lingered = time.monotonic(), False
        try:
            while self._queued_images < self._batch_images(head):
                linger = self._linger_until()
                until = max(head.enqueued + self.max_wait_s, linger)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return
                lingered = lingered or linger == until
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            if lingered:
                self.stats.lingers += 1
                self.stats.linger_seconds += time.monotonic() - start

    def _linger_until(self) -> float:
        """When lingering for the clients of the last forward ends (-inf: not lingering)."""
        if not self.linger_s or self._returning <= 0 or self.overloaded:
            return -math.inf
        return self._freed_at + self.linger_s

    def _take_batch(self) -> list[_Job[P]]:
        """Batchable jobs in arrival order up to `_batch_images` (at least one); solo jobs keep
        their place in the queue."""
        batch: list[_Job[P]] = []
        kept: deque[_Job[P]] = deque()
        images = 0
        most = self._batch_images(self._queue[0])
        while self._queue:
            job = self._queue.popleft()
            if job.payload is not None and (not batch or images + job.n_images <= most):
                batch.append(job)
                images += job.n_images
                self._queued -= job.counted
                self._queued_images -= job.n_images
            else:
                kept.append(job)
                if job.payload is not None:
                    break  # the batch is full: everything after it waits for the next
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _still_wanted(self, batch: list[_Job[P]]) -> list[_Job[P]]:
        live = []
        now = time.monotonic()
        for job in batch:
            if job.future.done():  # its caller gave up (its deadline, or it was cancelled)
                self.stats.dropped["cancelled"] += 1
            elif now > job.call.deadline:
                self.stats.dropped["deadline"] += 1
                job.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
            elif job.call.disconnected is not None and await job.call.disconnected():
                self.stats.dropped["disconnected"] += 1
                job.future.set_exception(ClientDisconnected("the client disconnected while queued"))
            else:
                live.append(job)
        if len(live) < len(batch):
            log.info("dropped %d of %d queued model jobs before compute", len(batch) - len(live), len(batch))
        return live

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P]]) -> None:
        start = time.perf_counter()
        if batch[0].solo is not None:
            job = batch[0]
            try:
                outcome: list[Any] = [await loop.run_in_executor(self._executor, job.solo)]
            except Exception as exc:  # handed to the waiter, raised there
                outcome = [exc]
            seconds = time.perf_counter() - start
            mean = self._solo_seconds
            self._solo_seconds = seconds if not mean else 0.8 * mean + 0.2 * seconds
        else:
            payloads = [job.payload for job in batch]
            try:
                outcome = await loop.run_in_executor(self._executor, self._run_batch, payloads)
            except Exception as exc:
                outcome = [exc] * len(batch)
            images = sum(job.n_images for job in batch)
            seconds = time.perf_counter() - start
            self.stats.batches += 1
            self.stats.batched_images += images
            self.cost.observe(images, seconds)
            if self._on_batch is not None:
                self._on_batch(images, seconds)
        for job, result in zip(batch, outcome, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
