"""Every knob of the service, read once from the environment (`METANET_*`) or from the CLI.

No other module reads the environment: the factory takes a `Settings`, so tests pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Service configuration; each field `foo` is set by the environment variable `METANET_FOO`."""

    # Inputs stay out of validation errors: they may hold API keys.
    model_config = SettingsConfigDict(
        env_prefix="METANET_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # Where to listen.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # The model: "auto" picks CUDA when present; a weights directory, or None for the shipped weights.
    device: str = "auto"
    checkpoint: Path | None = None
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default")
    # Where queries run: "torch", or "onnx" (onnxruntime; registration stays in torch). The ONNX
    # graph is exported from the loaded weights to `onnx_path` when that file is missing
    # (default: <data_dir>/onnx/<model version>.onnx).
    backend: Literal["torch", "onnx"] = "torch"
    onnx_path: Path | None = None
    # dtype of each task's M (per-example fast weights, ~155k floats per support example) in the
    # cache: float16 and bfloat16 halve a task's memory.
    m_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    # The task store: a SQLite file under data_dir, or, with `store_url` (redis://[:password@]host:
    # port/db or rediss://...), a Redis that many replicas share. The cache of task memories is
    # each process's own.
    data_dir: Path = Path("var")
    store_url: str | None = Field(None, description="redis:// or rediss:// URL; None = SQLite in data_dir")
    cache_bytes: int = Field(1024 * MiB, ge=0, description="budget of the task-memory LRU cache")

    # Limits on what one request may hold. Bodies are capped before they are parsed, images before
    # they are decoded.
    max_body_bytes: int = Field(16 * MiB, ge=1024)
    max_image_bytes: int = Field(4 * MiB, ge=64, description="encoded bytes of one image")
    max_image_pixels: int = Field(16_000_000, ge=1, description="width x height of one image")
    max_images_per_request: int = Field(128, ge=1)
    max_examples: int = Field(100, ge=2, description="support examples per task (capped by the model's)")
    # Cross-request batching: classify requests that queue while the model is busy run as one
    # forward of up to `batch_max_images` images. With `batch_max_wait_ms` > 0, an idle model also
    # waits that long after a request arrives for others to join it (0: run at once; on a GPU a
    # few ms can pay off).
    # The queue is bounded: past `max_pending` model requests (queued or running) or `max_queue_images`
    # queued images, requests get 429 with Retry-After rather than an ever longer wait.
    # Every forward holds at most `batch_max_images`: a larger request runs in near-equal parts
    # (side by side on several model workers). 0 = by device: on a CPU, per thread of a worker, 32
    # images on torch and 16 on onnx (the one-thread forwards that carry the most side by side),
    # on a GPU 256 (a forward there is launch-bound: many requests should share one).
    batch_max_images: int = Field(0, ge=0)
    batch_max_wait_ms: float = Field(0.0, ge=0)
    # Clients that call in a loop come back in a burst just after their forward answers them: a
    # free model whose next forward is not full waits up to `batch_linger_ms` after the last
    # forward ended for the clients it answered (and only those, so a lone client never waits;
    # never in overload mode), so they share a forward rather than split into two half-size ones.
    # 0 = never.
    batch_linger_ms: float = Field(4.0, ge=0, le=1000)
    max_pending: int = Field(
        64, ge=1, description="model requests (registrations, classify) queued or running before more get 429"
    )
    max_queue_images: int = Field(1024, ge=1, description="query images queued before requests get 429")
    # And on time, a latency objective: a classify request is refused (429) when the model work
    # already ahead of it is estimated (from the batches run so far) to take more than
    # `max_queue_wait_ms` plus `max_queue_wait_factor` times the request's own compute, unless it
    # would run in the next forward anyway (so a burst that fits a batch is never refused). An
    # admitted request then waits in proportion to what it asks, under any load. Both 0: no bound
    # on time, only the counts above.
    max_queue_wait_ms: float = Field(5.0, ge=0)
    max_queue_wait_factor: float = Field(2.0, ge=0)
    # Overload (service/inference/batcher.py): when a server process's demand — requests queued or
    # running, plus the clients it refused that are still waiting out their Retry-After — passes
    # `overload_demand`, its forwards shrink to at most `overload_forward_factor` times the
    # compute of their oldest request, and only what runs in the next forward (and not behind a
    # registration) is admitted (where that forward would hold only the request's own images, as
    # one-image requests' do on a CPU, only if it starts at once), until the demand falls under 3/4
    # of the bound. Admitted requests then keep near their unloaded latency, and the service
    # carries fewer images than with full forwards. overload_demand 0 = by device: one and a half
    # times as many one-image requests as one round of forwards holds (1.5 x batch_max_images x
    # model workers, with batch_max_images at 0 counted as 16 a thread on a CPU and 256 on a GPU:
    # 24 a process on 2 CPU cores, 384 on a GPU), so that the kernel's hash, which splits clients
    # between processes, seldom puts one of two processes past it at 32 clients and seldom under it
    # at 80. overload_forward_factor 0 = no overload mode.
    overload_demand: int = Field(0, ge=0)
    overload_forward_factor: float = Field(1.25, ge=0, allow_inf_nan=False)
    # A request's deadline: this, or less with the header X-Request-Timeout-Ms; work still queued
    # when it passes is dropped (504), as is work whose client has disconnected.
    request_timeout_s: float = Field(30.0, gt=0)
    # After this many seconds with no model work, freed heap memory goes back to the OS (glibc's
    # malloc_trim on the model thread), so resident memory follows what the service holds rather
    # than its largest burst so far; 0 = never.
    heap_trim_idle_s: float = Field(1.0, ge=0)
    # Freed heap glibc keeps for the next forward instead of returning it to the OS at once (MB;
    # allocations up to 32 MB come from the heap); the idle trim above still returns it. 0 =
    # glibc's defaults, under which every large forward faulted in fresh pages
    # (service/inference/heap.py).
    heap_retain_mb: int = Field(256, ge=0, le=65536)
    # A torch forward on the CPU of fewer query images than this runs on one intra-op thread:
    # waking torch's sleeping thread team (OMP_WAIT_POLICY=PASSIVE, service/inference/__init__.py)
    # at each of a forward's parallel regions costs more than a small batch gains from a second
    # core (docs/performance.md, "OpenMP wait policy"). 0 = always the whole team.
    one_thread_below_images: int = Field(8, ge=0)
    # Model worker threads. With more than one, classify batches run side by side, each on its
    # share of the CPU threads (one each when workers = cores: no thread team to wake), and a
    # registration runs alone with all of them. 0 = by device: 2 on a CPU with 2 or more threads
    # (two one-thread forwards side by side carry more than one two-thread forward), else 1.
    model_workers: int = Field(0, ge=0, le=64)
    # Server processes on one port (service/process/supervisor.py), each with its own event
    # loop, model workers and cache of task memories, all sharing the task store, the rate limits
    # and /metrics; the CPU threads are split between them. 0 = by device: 2 on a CPU with 2 or
    # more cores (a process's event loop and model threads take turns at one GIL, which processes
    # do not share), 1 on a GPU (one process batches all requests on the one device).
    processes: int = Field(0, ge=0, le=64)
    # Where query images are decoded: "model-thread" (just before their forward, one request after
    # another), "workers" (a thread pool, requests in parallel, all under the process's one GIL) or
    # "processes" (decode_processes worker processes, which also take support sets); "auto" picks
    # the model thread on a CPU device and processes on a GPU (see TaskService._queries).
    query_decode: Literal["auto", "model-thread", "workers", "processes"] = "auto"
    # Worker processes of query_decode=processes; 0 = half the cores, at least 1 and at most 8.
    decode_processes: int = Field(0, ge=0, le=64)
    # Python's thread switch interval for the server process (sys.setswitchinterval), in ms.
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=100)

    # Bearer keys for /v1, one tenant each; empty = no auth. METANET_API_KEYS takes a comma-separated
    # list; METANET_API_KEYS_FILE names a file of one key per line (# starts a comment). Both add up.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    api_keys_file: Path | None = None
    # Bearer keys for GET /metrics (operators, not tenants); empty = /metrics is open.
    metrics_keys: Annotated[tuple[str, ...], NoDecode] = ()

    # Per-key token bucket on /v1 (per client address without keys): `rate_limit_per_s` requests a
    # second on average, bursts of up to `rate_limit_burst`; 0 = no rate limit.
    rate_limit_per_s: float = Field(0.0, ge=0)
    rate_limit_burst: int = Field(20, ge=1)

    # Seconds an idle keep-alive connection stays open. Longer than the longest Retry-After of a
    # full model queue (10 s, service/inference/batcher.py; a rate limit's may be longer), so a client that
    # waits one out comes back on its connection rather than racing the server's close (uvicorn's
    # default is 5 s). A proxy in front must drop its idle upstream connections sooner
    # (docker/nginx.conf: 10 s; lower it there if you set this to 10 or less).
    keep_alive_s: float = Field(15.0, gt=0, le=3600)
    # On SIGTERM: stop accepting, give in-flight requests this long to finish, then close the store.
    shutdown_timeout_s: float = Field(30.0, ge=0)
    # "json": one JSON object per log line (one line per request); "text": for a person at a terminal.
    log_format: Literal["json", "text"] = "json"

    @field_validator("api_keys", "metrics_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("api_keys", "metrics_keys")
    @classmethod
    def _check_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:  # never echo a key back: the message may end up in a log
            if not key.isprintable() or " " in key or "," in key:
                raise ValueError("an API key may not hold spaces, commas or control characters")
        return keys

    @model_validator(mode="after")
    def _add_keys_from_file(self) -> Settings:
        if self.api_keys_file is None:
            return self
        try:
            lines = self.api_keys_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {self.api_keys_file}: {exc.strerror}") from None
        keys = tuple(k for line in lines if (k := line.partition("#")[0].strip()))
        # Frozen model: the merged tuple is set once, here, during validation.
        object.__setattr__(self, "api_keys", tuple(dict.fromkeys((*self.api_keys, *self._check_keys(keys)))))
        return self

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if not value:
            return None  # METANET_STORE_URL= (empty) keeps the SQLite default
        if not value.startswith(("redis://", "rediss://")):
            # The value is not echoed: it may hold a password.
            raise ValueError("store_url must be a redis:// or rediss:// URL")
        return value

    @field_validator("overload_forward_factor")
    @classmethod
    def _check_overload_factor(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(f"overload_forward_factor must be 0 (off) or at least 1, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"
