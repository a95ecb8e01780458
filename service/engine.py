"""The one adapter between the service and `model`: loads MetaNet, runs it off the event loop,
and turns its errors into the service's. No other service module imports `model` or torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from model.checkpoint import load_model
from model.data import to_model_input
from model.errors import InvalidTaskError
from model.metanet import MetaNet, TaskMemory
from service.errors import InvalidInput, Overloaded
from service.settings import Settings

log = logging.getLogger("service.engine")
T = TypeVar("T")


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
class Memory:
    """A registered task as the model holds it, with the label names post-processing needs."""

    state: TaskMemory
    labels: tuple[str, ...]  # class names; class id k is labels[k]
    example_labels: tuple[str, ...]  # label of each support example, in support order
    nbytes: int


@dataclass(frozen=True)
class Scores:
    probs: np.ndarray  # (n_query, n_way)
    attention: np.ndarray | None  # (n_query, n_support)


class Engine:
    """MetaNet behind one worker thread: torch already spreads one call over every core, so
    calls run one at a time; at most `max_pending` are running or queued, the rest get 429."""

    def __init__(
        self, model: MetaNet, device: torch.device, max_pending: int,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self._model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metanet-model")
        self._max_pending = max_pending
        self._pending = 0
        self._observe = observe  # (operation, seconds) of every model call, queueing included
        cfg = model.config
        self.info = ModelInfo("metanet", model.version, model.max_way, cfg.max_examples,
                              cfg.image_size, "torch", str(device))

    @classmethod
    def load(cls, settings: Settings, observe: Callable[[str, float], None] | None = None) -> Engine:
        """Build the engine: blocking (weights from disk), so call it from a worker thread."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = pick_device(settings.device)
        model = load_model(settings.checkpoint, device)
        log.info("loaded %s on %s", model.version, device)
        return cls(model, device, settings.max_pending, observe)

    @property
    def pending(self) -> int:
        return self._pending

    def to_input(self, ink: np.ndarray) -> np.ndarray:
        """An ink map (H, W) -> the model's input (S, S), the exact preprocessing of training."""
        return to_model_input(ink, self.info.image_size).numpy()

    async def warm_up(self) -> None:
        """One tiny registration and classification, so the first client does not pay for it."""
        rng = np.random.default_rng(0)
        support = (rng.random((2, self.info.image_size, self.info.image_size)) > 0.8).astype(np.float32)
        memory = await self.register(support, ["a", "b"])
        await self.classify(memory, support, explain=True)

    async def register(
        self, support: np.ndarray, labels: Sequence[str], field: str = "examples", offset: int = 0
    ) -> Memory:
        """Support (n, S, S) float32 model inputs and their labels -> the task's memory.

        The model's own input errors come back as InvalidInput naming `field[i - offset].image` (or
        `.label`): `offset` is how many stored examples precede the request's.
        """
        def run() -> Memory:
            try:
                state = self._model.register(torch.from_numpy(support), list(labels))
            except InvalidTaskError as exc:
                raise _located(exc, field, offset) from None
            example_labels = tuple(state.labels[i] for i in state.support_labels.tolist())
            return Memory(state, state.labels, example_labels, state.nbytes)
        return await self._submit("register", run)

    async def classify(self, memory: Memory, queries: np.ndarray, explain: bool) -> Scores:
        def run() -> Scores:
            try:
                out = self._model.classify(memory.state, torch.from_numpy(queries), return_attention=explain)
            except InvalidTaskError as exc:
                raise _located(exc, "images", 0) from None
            attention = out.attention.float().cpu().numpy() if out.attention is not None else None
            return Scores(out.probs.float().cpu().numpy(), attention)
        return await self._submit("classify", run)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _submit(self, operation: str, fn: Callable[[], T]) -> T:
        if self._pending >= self._max_pending:
            raise Overloaded(
                f"{self._pending} model jobs are already waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._pending += 1  # only the event loop touches the counter
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._pending -= 1
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - start)


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"METANET_DEVICE={name} but CUDA is not available on this machine")
    return device


def _located(exc: InvalidTaskError, field: str, offset: int) -> InvalidInput:
    """The model names its arguments ("images", "labels"); the client knows `examples[i].image`."""
    if exc.index is None or exc.index < offset:
        return InvalidInput(exc.message, field=field)
    index = exc.index - offset
    if field == "images":
        return InvalidInput(exc.message, field=f"images[{index}]", index=index)
    part = {"images": "image", "labels": "label"}.get(exc.field, exc.field)
    return InvalidInput(exc.message, field=f"{field}[{index}].{part}", index=index)
