"""Where request images become model inputs (`intake.model_inputs`): on the event loop when tiny,
on the model thread just before their forward, in a thread, or in worker processes.

On a CPU, query images decode on the model thread (a `Deferred`): decoding beside a forward would
take a core from torch's thread team, which then waits on it at every parallel region. On a GPU the
forward is short and decoding on the model thread would serialise with it, while threads beside it
all wait for the one GIL, so images decode in worker processes there. Settings.query_decode
overrides the choice. Support sets, which a registration's model job follows, decode in a thread or
in those processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.errors import ImageTooLarge, InvalidImage, ServiceError
from service.inference.intake import ImageInput, ImageLimits, model_inputs
from service.settings import Settings

log = logging.getLogger("service.inference.decoding")
FieldOf = Callable[[int], str]  # an image's index in the request -> the field errors name
_INLINE_IMAGES = 2  # requests of at most this many images, each at most _INLINE_BYTES encoded
_INLINE_BYTES = 16 * 1024  # (or pixels of a pixel array) and _INLINE_PIXELS decoded, are decoded
_INLINE_PIXELS = 256 * 256  # on the event loop


@dataclass(frozen=True)
class Deferred:
    """Query inputs prepared on the model thread just before their forward: `prepare(start, stop)`
    returns the (stop - start, S, S) float32 model inputs of a request's images [start, stop), or
    raises the client's error (naming the image by its place in the request)."""

    n: int
    prepare: Callable[[int, int], np.ndarray]
    start: int = 0  # this part's place among the request's images

    def __len__(self) -> int:
        return self.n

    def part(self, start: int, stop: int) -> Deferred:
        return Deferred(stop - start, self.prepare, self.start + start)

    def inputs(self) -> np.ndarray:
        return self.prepare(self.start, self.start + self.n)


class Decoding:
    """Turns a request's images into (n, S, S) float32 model inputs, where the settings say."""

    def __init__(self, settings: Settings, image_size: int, on_cpu: bool) -> None:
        self.size = image_size
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        where = settings.query_decode
        if where == "auto":
            where = "model-thread" if on_cpu else "processes"
        self.on_model_thread = where == "model-thread"
        self._processes = DecodeProcesses(settings.decode_processes) if where == "processes" else None

    async def open(self) -> None:
        """Start the decoding processes, if any, so the first requests do not wait for them."""
        if self._processes is not None:
            await self._processes.open()

    async def close(self) -> None:
        if self._processes is not None:
            await run_in_threadpool(self._processes.close)

    async def queries(self, images: Sequence[ImageInput]) -> np.ndarray | Deferred:
        """Query images -> what a forward takes: decoded later on the model thread, or now."""
        if self.on_model_thread:
            def prepare(start: int, stop: int) -> np.ndarray:
                return self._decoder(images[start:stop], lambda i: f"images[{start + i}]")()
            return Deferred(len(images), prepare)
        return await self.inputs(images, lambda i: f"images[{i}]")

    async def inputs(self, images: Sequence[ImageInput], field_of: FieldOf) -> np.ndarray:
        """Images -> model inputs, in a worker process or thread (or on the loop when tiny). A bad
        image raises InvalidImage or ImageTooLarge naming its field."""
        if len(images) <= _INLINE_IMAGES and all(_small(image) for image in images):
            # A drawing or two of modest size decodes in a fraction of a millisecond: cheaper on
            # the event loop than the hop to a worker thread and back. The pixel cap keeps a
            # small file that inflates to a large image off the loop: it goes to a thread.
            inline = ImageLimits(self.limits.max_bytes, min(self.limits.max_pixels, _INLINE_PIXELS))
            try:
                return self._decoder(images, field_of, inline)()
            except ImageTooLarge:
                if self.limits.max_pixels <= _INLINE_PIXELS:
                    raise
        if self._processes is not None:
            return await self._processes.run(images, field_of, self.limits, self.size)
        return await run_in_threadpool(self._decoder(images, field_of))

    def _decoder(self, images: Sequence[ImageInput], field_of: FieldOf,
                 limits: ImageLimits | None = None) -> Callable[[], np.ndarray]:
        size, limits = self.size, limits or self.limits

        def run() -> np.ndarray:
            try:
                return model_inputs(images, limits, size)
            except (InvalidImage, ImageTooLarge) as exc:
                raise _located(exc, field_of) from None
        return run


class DecodeProcesses:
    """Worker processes that turn request images into model inputs.

    Threads of one process decode under its one GIL, beside the event loop and the model thread;
    processes decode in parallel and hand back only (n, S, S) floats. A worker that dies (killed,
    or crashed by an image) breaks the pool: it is replaced, and the requests it held are tried
    once more in the new one; images that break that one too are refused as undecodable.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes or min(8, max(1, (os.cpu_count() or 2) // 2))
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: the server process has threads (and perhaps CUDA), which fork does not survive.
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        size, limits = 2, ImageLimits(1 << 10, 1 << 10)
        blank = np.zeros((size, size), dtype=np.float32)
        await asyncio.gather(*(loop.run_in_executor(self._pool, model_inputs, [blank], limits, size)
                               for _ in range(self.processes)))

    async def run(self, images: Sequence[ImageInput], field_of: FieldOf, limits: ImageLimits,
                  size: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, model_inputs, images, limits, size)
            except (InvalidImage, ImageTooLarge) as exc:  # pickled back with its index
                raise _located(exc, field_of) from None
            except BrokenProcessPool:
                log.warning("a decoding process died; starting a new pool (attempt %d)", attempt)
                if self._pool is pool:  # the first request to see it replaces it
                    self._pool = self._new_pool()
                    pool.shutdown(wait=False, cancel_futures=True)
        raise InvalidImage("decoding these images killed the decoding process twice")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _located(exc: InvalidImage | ImageTooLarge, field_of: FieldOf) -> ServiceError:
    """An error of `intake.model_inputs` (which knows the image's index) pinned to its field."""
    return exc.located(field_of(exc.index or 0), exc.index)


def _small(image: ImageInput) -> bool:
    return (image.size if isinstance(image, np.ndarray) else len(image)) <= _INLINE_BYTES
