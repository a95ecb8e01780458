"""The engine: the one adapter between the service and `model`. It loads MetaNet, turns request
images into model inputs, admits or refuses work (429), batches classify requests into forwards on
its model worker threads, and turns the model's errors into the service's.

Its public surface: `load`, `warm_up`, `close`, `info`; `prepare` (support images -> inputs),
`register`, `admit` and `classify`; `check_admission` (before a request's body is read) and
`queue_state` (for the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import torch

from model.checkpoint import load_model
from model.errors import InvalidTaskError
from model.metanet import MetaNet, SupportCheck, TaskMemory
from service.errors import InvalidImage, InvalidInput
from service.inference import heap
from service.inference.batcher import Batcher, Call
from service.inference.decoding import Decoding, Deferred, FieldOf
from service.inference.devices import pick_device
from service.inference.intake import ImageInput
from service.settings import Settings

__all__ = ["Admission", "Call", "Engine", "Memory", "ModelInfo", "QueueState", "Scores", "SupportReport"]
log = logging.getLogger("service.inference.engine")
T = TypeVar("T")
_NO_LIMIT = Call()
# The largest forward a thread runs on a CPU by default, per backend (serving_shape), and the
# one-image requests a thread's forward counts for in the overload bound (overload_demand).
CPU_FORWARD_PER_THREAD = {"torch": 32, "onnx": 16}
ONE_IMAGE_ROUND_PER_THREAD = 16
_M_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    max_way: int
    max_examples: int
    image_size: int
    backend: str
    device: str


@dataclass(frozen=True)
class SupportReport:
    """What the model makes of a task's own support set (`MetaNet.check_support`), by example in
    support order: the label each is classified as and its probability, and the pairs of examples
    of different labels it cannot tell apart (i, j, cosine of their representations), i < j."""

    predicted: tuple[str, ...]
    confidence: tuple[float, ...]
    confusable: tuple[tuple[int, int, float], ...]


@dataclass(frozen=True)
class Memory:
    """A registered task as the model holds it, with the label names post-processing needs."""

    state: TaskMemory
    labels: tuple[str, ...]  # class names; class id k is labels[k]
    example_labels: tuple[str, ...]  # label of each support example, in support order
    nbytes: int
    report: SupportReport | None = None  # only when registered with check=True


@dataclass(frozen=True)
class Scores:
    probs: np.ndarray  # (n_query, n_way), calibrated
    attention: np.ndarray | None  # (n_query, n_support)
    similarity: np.ndarray  # (n_query,): each query's best cosine to the support set's representations


@dataclass(frozen=True)
class QueueState:
    """The model queue at one moment, for the metrics."""

    pending: int  # requests queued or running
    queued_images: int
    overloaded: bool
    batches: int  # counters from here on
    batched_images: int
    rejected: int
    lingers: int
    linger_seconds: float
    dropped: dict[str, int] = field(default_factory=dict)  # by reason


class Admission:
    """A classify request's place in the model's queue, taken before its images are decoded (so a
    crowd of requests cannot all decode only to be refused). `Engine.classify` uses it up; leaving
    the `with` block unused gives the place back."""

    def __init__(self, batcher: Batcher[Any, Any], n_images: int) -> None:
        self._batcher = batcher
        self.images = batcher.reserve(n_images)  # Overloaded (429) when the queue is full

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.images:
            self._batcher.release(self.images)
            self.images = 0

    def take(self) -> int:
        images, self.images = self.images, 0
        return images


class Engine:
    """MetaNet behind a `Batcher`: model worker threads (`serving_shape`), concurrent classify
    requests batched into forwards of at most `batch_max_images`, a bounded queue."""

    def __init__(
        self, model: MetaNet, device: torch.device, settings: Settings,
        observe: Callable[[str, float], None] | None = None,
        onnx: Any | None = None,
    ) -> None:
        self._model = model
        self._onnx = onnx  # a model.onnx.OnnxQueryPath when queries run on onnxruntime
        self._m_dtype = _M_DTYPES[settings.m_dtype]
        # Threads per call: a registration runs alone on the whole team; a classify batch on its
        # worker's share of it (Settings.model_workers), and on one thread when small
        # (Settings.one_thread_below_images, CPU only).
        self._team = torch.get_num_threads()
        self._workers, self._batch_threads, batch_max_images = serving_shape(settings, device, self._team)
        self._one_thread_below = settings.one_thread_below_images if device.type == "cpu" else 0
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="metanet-model")
        self._observe = observe  # (operation, seconds) of every model call, queueing included
        self._batcher: Batcher[_Query, Scores] = Batcher(
            self._executor, self._classify_batch,
            max_batch_images=batch_max_images, max_wait_s=settings.batch_max_wait_ms / 1000,
            linger_s=settings.batch_linger_ms / 1000,
            max_pending=settings.max_pending, max_queue_images=settings.max_queue_images,
            max_wait_ahead=(settings.max_queue_wait_ms / 1000, settings.max_queue_wait_factor),
            overload=(overload_demand(settings, device, self._workers, self._batch_threads),
                      settings.overload_forward_factor),
            on_batch=None if observe is None else lambda n, seconds: observe("batch", seconds),
            on_idle=heap.trim if settings.heap_trim_idle_s > 0 and heap.available() else None,
            idle_s=settings.heap_trim_idle_s, workers=self._workers,
        )
        log.info("classify: %d model worker(s), forwards of at most %d images",
                 self._workers, batch_max_images)
        cfg = model.config
        backend = "torch" if onnx is None else "onnx"
        self.info = ModelInfo("metanet", model.version, model.max_way, cfg.max_examples,
                              cfg.image_size, backend, str(device))
        self._decoding = Decoding(settings, cfg.image_size, on_cpu=device.type == "cpu")

    @classmethod
    def load(cls, settings: Settings, observe: Callable[[str, float], None] | None = None) -> Engine:
        """Build the engine: blocking (weights from disk, maybe an ONNX export), so call it from a
        worker thread."""
        heap.retain(settings.heap_retain_mb)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = pick_device(settings.device)
        model = load_model(settings.checkpoint, device)
        log.info("loaded %s on %s", model.version, device)
        onnx = None
        if settings.backend == "onnx":
            from model.onnx import OnnxQueryPath, export_onnx

            path = settings.onnx_path or settings.data_dir / "onnx" / f"{model.version}.onnx"
            if not path.is_file():
                with _file_lock(path.with_name(path.name + ".lock")):  # server processes start together
                    if not path.is_file():
                        log.info("exporting the query path to %s", path)
                        export_onnx(model, path)
            # Several workers or processes: each runs on its share of the cores, as torch does.
            workers, threads, _ = serving_shape(settings, device, torch.get_num_threads())
            if workers == 1 and threads == torch.get_num_threads():
                threads = settings.torch_threads  # None: onnxruntime's own default
            onnx = OnnxQueryPath(path, model, threads=threads, device=str(device),
                                 one_thread_below=settings.one_thread_below_images)
            log.info("queries run on onnxruntime (%s) from %s", ", ".join(onnx.providers), path)
        return cls(model, device, settings, observe, onnx)

    async def warm_up(self) -> None:
        """Start the decoding processes (if any), then a tiny registration and classifications, so
        the first client does not pay for them."""
        await self._decoding.open()
        rng = np.random.default_rng(0)
        support = (rng.random((2, self.info.image_size, self.info.image_size)) > 0.8).astype(np.float32)
        memory = await self.register(support, ["a", "b"], check=True)
        await self._classify_inputs(memory, support, explain=True)
        await self._classify_inputs(memory, support[:1], explain=False)

    # ------------------------------------------------------------------ admission and metrics

    def admit(self, n_images: int) -> Admission:
        """A place in the queue for a classify request of n_images, or Overloaded (429) now."""
        return Admission(self._batcher, n_images)

    def check_admission(self, most_images: int) -> None:
        """Raise Overloaded (429) now if a classify request would be refused whatever its size, up
        to most_images: the check made before a request's body is read or decoded."""
        self._batcher.check_any_admission(most_images)

    def queue_state(self) -> QueueState:
        b = self._batcher
        stats = b.stats
        return QueueState(b.pending, b.queued_images, b.overloaded, stats.batches, stats.batched_images,
                          stats.rejected, stats.lingers, stats.linger_seconds, dict(stats.dropped))

    # ---------------------------------------------------------------------------- model calls

    async def prepare(self, images: Sequence[ImageInput], field_of: FieldOf) -> np.ndarray:
        """A support set's images -> (n, S, S) float32 model inputs; a bad image raises
        InvalidImage or ImageTooLarge naming `field_of(index)`, and so does a blank one (a single
        shade throughout: no ink), which would register as an example with no glyph and pull the
        task's other examples off their labels. Stored examples are not checked again."""
        inputs = await self._decoding.inputs(images, field_of)
        blank = np.flatnonzero(~inputs.reshape(len(inputs), -1).any(axis=1))
        if len(blank):
            i = int(blank[0])
            raise InvalidImage("the image is blank (a single shade throughout): a support example needs "
                               "a drawing", field=field_of(i), index=i)
        return inputs

    async def register(
        self, support: np.ndarray, labels: Sequence[str], field: str = "examples", offset: int = 0,
        call: Call = _NO_LIMIT, check: bool = False,
    ) -> Memory:
        """Support (n, S, S) float32 model inputs and their labels -> the task's memory; with
        `check`, also its `SupportReport` (one more classify, of the support set, in the same job).

        The model's own input errors come back as InvalidInput naming `field[i - offset].image` (or
        `.label`): `offset` is how many stored examples precede the request's.
        """
        def run() -> Memory:
            x = torch.from_numpy(support)
            try:
                with _threads_for(self._team):
                    state = self._model.register(x, list(labels))
                    if self._m_dtype != torch.float32:
                        state = state.with_m_dtype(self._m_dtype)
                    report = _report(state, self._model.check_support(state, x)) if check else None
            except InvalidTaskError as exc:
                raise _located(exc, field, offset) from None
            example_labels = tuple(state.labels[i] for i in state.support_labels.tolist())
            return Memory(state, state.labels, example_labels, state.nbytes, report)
        return await self._timed("register", self._batcher.submit_solo(run, call))

    async def classify(
        self, memory: Memory, images: Sequence[ImageInput], explain: bool, call: Call = _NO_LIMIT,
        admission: Admission | None = None,
    ) -> Scores:
        """Class probabilities of a request's query images, batched with other requests' queries
        (`admission`: the place `admit` took for them; without one, they are admitted now). A bad
        image raises InvalidImage or ImageTooLarge naming `images[i]`."""
        queries = await self._decoding.queries(images)
        return await self._classify_inputs(memory, queries, explain, call,
                                           admission.take() if admission is not None else 0)

    async def _classify_inputs(
        self, memory: Memory, queries: np.ndarray | Deferred, explain: bool, call: Call = _NO_LIMIT,
        reserved: int = 0,
    ) -> Scores:
        """Class probabilities of queries (n, S, S), or of what a Deferred prepares on the model
        thread (`reserved`: the images the request was admitted for).

        More queries than a batch holds are split into near-equal parts of at most
        `batch_max_images`, queued together: each part's forward is of a size the model runs
        well (a 128-image forward runs slower per image than four of 32 on a CPU), and with
        several model workers the parts of one large request run side by side."""
        parts = _parts(len(queries), self._batcher.max_batch_images)
        jobs = [(_Query(memory, _part(queries, start, stop), explain), stop - start) for start, stop in parts]
        scores = await self._timed("classify", self._batcher.submit_parts(jobs, call, reserved))
        if len(scores) == 1:
            return scores[0]
        attention = [s.attention for s in scores if s.attention is not None]
        return Scores(np.concatenate([s.probs for s in scores]),
                      np.concatenate(attention) if attention else None,
                      np.concatenate([s.similarity for s in scores]))

    async def close(self) -> None:
        await self._batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        await self._decoding.close()

    async def _timed(self, operation: str, work: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await work
        finally:
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - start)

    # ------------------------------------------------------------------ in the worker thread

    def _classify_batch(self, jobs: Sequence[_Query]) -> list[Scores | Exception]:
        """Prepare the deferred inputs, then one forward for the queries of every job that has
        them; a job whose inputs are bad fails alone."""
        prepared: list[_Query | Exception] = []
        for job in jobs:
            try:
                prepared.append(job.prepared())
            except Exception as exc:
                prepared.append(exc)
        results = iter(self._run_forward([p for p in prepared if isinstance(p, _Query)]))
        return [p if isinstance(p, Exception) else next(results) for p in prepared]

    def _run_forward(self, jobs: Sequence[_Query]) -> list[Scores | Exception]:
        """One forward for the queries of every job; should it fail, each job alone, so one bad
        job fails only its own request."""
        if not jobs:
            return []
        try:
            return list(self._forward(jobs))
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            log.warning("a batch of %d requests failed; running them one by one", len(jobs), exc_info=True)
        out: list[Scores | Exception] = []
        for job in jobs:
            try:
                out.extend(self._forward([job]))
            except Exception as exc:
                out.append(exc)
        return out

    def _forward(self, jobs: Sequence[_Query]) -> list[Scores]:
        requests = [(job.memory.state, torch.from_numpy(job.queries)) for job in jobs]
        explain = any(job.explain for job in jobs)
        try:
            if self._onnx is None:
                n = sum(len(x) for _, x in requests)
                with _threads_for(1 if n < self._one_thread_below else self._batch_threads):
                    outputs = self._model.classify_many(requests, return_attention=explain)
            else:
                outputs = self._onnx_forward(requests, explain)
        except InvalidTaskError as exc:
            raise _located(exc, "images", 0) from None
        scores = []
        for job, out in zip(jobs, outputs, strict=True):
            attention = None
            if job.explain and out.attention is not None:
                attention = out.attention.float().cpu().numpy()
            scores.append(Scores(out.probs.float().cpu().numpy(), attention,
                                 out.similarity.float().cpu().numpy()))
        return scores

    def _onnx_forward(self, requests: list[tuple[TaskMemory, torch.Tensor]], explain: bool) -> list[Any]:
        """One onnxruntime run per task in the batch, over the queries of all its requests."""
        assert self._onnx is not None
        by_task: dict[int, list[int]] = {}
        for i, (memory, _) in enumerate(requests):
            by_task.setdefault(id(memory), []).append(i)
        outputs: list[Any] = [None] * len(requests)
        for indices in by_task.values():
            memory = requests[indices[0]][0]
            x = torch.cat([requests[i][1] for i in indices])
            out = self._onnx.classify(memory, x, return_attention=explain)
            start = 0
            for i in indices:
                n = len(requests[i][1])
                attention = None if out.attention is None else out.attention[start : start + n]
                outputs[i] = type(out)(out.probs[start : start + n], attention,
                                       out.similarity[start : start + n])
                start += n
        return outputs


def serving_shape(settings: Settings, device: torch.device, team: int) -> tuple[int, int, int]:
    """(model workers, threads of a classify forward, largest forward in images) of this process:
    the settings, or what 0 ("by device") means.

    Classify forwards run on this process's share of the `team` CPU threads (Settings.processes
    share them; a registration still runs on the whole team). On a CPU, one-thread forwards side by
    side on two workers carry more than one two-thread forward, and a one-thread torch forward of 32
    images costs less an image than one of 16 (onnxruntime's best are 8 to 16); on a GPU, one
    worker and forwards of up to 256."""
    cpu = device.type == "cpu"
    share = max(1, team // max(1, settings.processes)) if cpu else team
    workers = settings.model_workers or (min(2, share) if cpu else 1)
    threads = max(1, share // workers)
    per_thread = CPU_FORWARD_PER_THREAD["onnx" if settings.backend == "onnx" else "torch"]
    most = settings.batch_max_images or (per_thread * threads if cpu else 256)
    return workers, threads, most


def overload_demand(settings: Settings, device: torch.device, workers: int, threads: int) -> int:
    """Settings.overload_demand, or by device: one and a half times as many one-image requests as
    a round of forwards holds: Settings.batch_max_images a worker where set, else 16 images a
    thread on a CPU whatever the largest forward (one-image clients fill forwards by arriving, not
    up to the bound: 24 a process on 2 cores), 256 on a GPU."""
    if settings.overload_demand:
        return settings.overload_demand
    per_worker = settings.batch_max_images or (
        ONE_IMAGE_ROUND_PER_THREAD * threads if device.type == "cpu" else 256)
    one_round = per_worker * workers
    return 3 * one_round // 2


def _parts(n: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting n items into the fewest near-equal parts of at most `most`."""
    count = max(1, -(-n // most))
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def _part(queries: np.ndarray | Deferred, start: int, stop: int) -> np.ndarray | Deferred:
    if start == 0 and stop == len(queries):
        return queries
    if isinstance(queries, Deferred):
        return queries.part(start, stop)
    return queries[start:stop]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock) on `path`, created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _threads_for(n: int) -> Iterator[None]:
    """torch's intra-op threads on this thread for one model call: n, then back as they were.
    (OpenMP keeps the count per thread, so model workers side by side each keep their own.)"""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Query:
    memory: Memory
    queries: np.ndarray | Deferred  # (n, S, S) float32
    explain: bool

    def prepared(self) -> _Query:
        if not isinstance(self.queries, Deferred):
            return self
        x = self.queries.inputs()
        if len(x) != self.queries.n:
            raise RuntimeError(f"prepared {len(x)} inputs for a job of {self.queries.n} images")
        return _Query(self.memory, x, self.explain)


def _report(state: TaskMemory, check: SupportCheck) -> SupportReport:
    return SupportReport(
        predicted=tuple(state.labels[k] for k in check.predicted.tolist()),
        confidence=tuple(check.confidence.float().tolist()),
        confusable=tuple(check.confusable),
    )


def _located(exc: InvalidTaskError, field: str, offset: int) -> InvalidInput:
    """The model names its arguments ("images", "labels"); the client knows `examples[i].image`."""
    if exc.index is None or exc.index < offset:
        return InvalidInput(exc.message, field=field)
    index = exc.index - offset
    if field == "images":
        return InvalidInput(exc.message, field=f"images[{index}]", index=index)
    part = {"images": "image", "labels": "label"}.get(exc.field, exc.field)
    return InvalidInput(exc.message, field=f"{field}[{index}].{part}", index=index)
