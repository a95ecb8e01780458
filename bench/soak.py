"""Soak test: mixed register / classify / delete traffic at a fixed concurrency against a server
this command starts itself (`python -m service` on a free port, a fresh data directory).

    python bench/soak.py                         # 5 minutes at concurrency 32 (the recorded run)
    python bench/soak.py --seconds 30            # the CI version (api_tests/test_soak.py)
    python bench/soak.py --json out.json --markdown out.md

Each worker loops: register a small task (2-3 way, mostly 1-shot, 28x28 PNGs), classify it five
times, read it, now and then list its tasks or classify a one-off episode, delete it. The warm-up
lasts at least --warmup seconds and until every worker has done --warmup-rounds rounds; then the
traffic pauses, connections are closed, and once the idle server has settled (its idle heap trim
has run) its resident memory and open file descriptors are read from /proc. Then --seconds of
traffic, and the same readings. It passes (exit 0) with zero errors, resident memory at most
--max-rss-growth above the warm-up reading, no more open file descriptors than after warm-up, and a clean
exit on SIGTERM. METANET_* variables in the environment reach the server (METANET_TORCH_THREADS,
METANET_DEVICE, ...); data directory and port are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from api_tests.harness import ServiceProcess  # noqa: E402  (run as a script: the repository first on the path)

CLASSIFY_PER_TASK = 5  # as in use: a task is registered once and classified against many times


# ---------------------------------------------------------------------------------- traffic

def glyphs(n: int, seed: int = 0) -> list[str]:
    """n small random stroke drawings, black on white, as base64 PNGs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("L", (28, 28), 255)
        draw = ImageDraw.Draw(img)
        points = [(rng.randint(3, 24), rng.randint(3, 24)) for _ in range(rng.randint(2, 5))]
        draw.line(points, fill=0, width=2)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def record(self, op: str, seconds: float, ok: bool, detail: str) -> None:
        self.latencies[op].append(seconds)
        if not ok:
            self.errors[op] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{op}: {detail}")

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())


async def call(client: httpx.AsyncClient, tally: Tally, op: str, expect: int, method: str, path: str,
               **kwargs: Any) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        tally.record(op, time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}")
        return None
    ok = response.status_code == expect
    tally.record(op, time.perf_counter() - start, ok, f"{response.status_code} {response.text[:200]}")
    return response if ok else None


async def worker(wid: int, client: httpx.AsyncClient, stop: asyncio.Event, tally: Tally, pool: list[str],
                 rounds: list[int]) -> None:
    """Loops until `stop`; `rounds[wid]` counts its finished rounds (task registered ... deleted)."""
    rng = random.Random(wid * 1_000_003 + rounds[wid])
    labels = ["alpha", "beta", "gamma", "delta", "epsilon"]
    while not stop.is_set():
        iteration = rounds[wid] + 1
        n_way, n_shot = rng.randint(2, 3), 1 + (rng.random() < 0.25)
        support = [{"label": labels[c], "image": rng.choice(pool)}
                   for c in range(n_way) for _ in range(n_shot)]
        created = await call(client, tally, "register", 201, "POST", "/v1/tasks",
                             json={"name": f"soak-{wid}-{iteration}", "examples": support})
        if created is None:
            rounds[wid] += 1
            continue
        task_id = created.json()["task_id"]
        for _ in range(CLASSIFY_PER_TASK):
            if stop.is_set():
                break  # wind down quickly, but always delete what was made
            queries = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
            await call(client, tally, "classify", 200, "POST", f"/v1/tasks/{task_id}/classify",
                       json={"images": queries, "top_k": 2})
        await call(client, tally, "get", 200, "GET", f"/v1/tasks/{task_id}")
        if iteration % 8 == 0 and not stop.is_set():
            await call(client, tally, "list", 200, "GET", "/v1/tasks", params={"limit": 20})
            await call(client, tally, "classify_once", 200, "POST", "/v1/classify",
                       json={"support": support, "images": [rng.choice(pool)]})
        await call(client, tally, "delete", 204, "DELETE", f"/v1/tasks/{task_id}")
        rounds[wid] += 1


class Traffic:
    """`concurrency` workers sharing one connection pool, started and stopped by phase."""

    def __init__(self, url: str, concurrency: int, pool: list[str]) -> None:
        self.url, self.concurrency, self.pool = url, concurrency, pool
        self.tally = Tally()
        self.rounds = [0] * concurrency

    async def run(self, seconds: float, rounds: int = 0, max_seconds: float = float("inf")) -> float:
        """Traffic for at least `seconds` and until every worker has done `rounds` more rounds (but
        no longer than `max_seconds`); then each worker finishes its round and every connection is
        closed, so the server's file descriptors can settle. Returns the seconds it ran."""
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        client = httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits)
        stop, start, target = asyncio.Event(), time.monotonic(), [r + rounds for r in self.rounds]
        tasks = [asyncio.create_task(worker(i, client, stop, self.tally, self.pool, self.rounds))
                 for i in range(self.concurrency)]
        while True:
            await asyncio.sleep(0.2)
            elapsed = time.monotonic() - start
            done = all(r >= t for r, t in zip(self.rounds, target, strict=True))
            if (elapsed >= seconds and done) or elapsed >= max_seconds:
                break
        stop.set()
        await asyncio.gather(*tasks)
        await client.aclose()
        return time.monotonic() - start


async def settled(read: Callable[[], int], tolerance: int = 0, timeout: float = 10) -> int:
    """A reading of the idle server once it has settled: two in a row, 0.5 s apart, within
    `tolerance` (closed connections gone; freed heap returned to the OS on the idle trim)."""
    deadline, last = time.monotonic() + timeout, -(2**62)
    while time.monotonic() < deadline:
        now = read()
        if abs(now - last) <= tolerance:
            return now
        last = now
        await asyncio.sleep(0.5)
    return last


async def settled_readings(server: ServiceProcess) -> tuple[int, int]:
    """(resident bytes, open fds) of the idle server, after its idle heap trim has had time to run."""
    await asyncio.sleep(1.5)  # METANET_HEAP_TRIM_IDLE_S is 1 s by default
    return await settled(server.rss_bytes, tolerance=2**20), await settled(server.open_fds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50": round(1000 * percentile(seconds, 0.5), 1),
            "p99": round(1000 * percentile(seconds, 0.99), 1)}


# ------------------------------------------------------------------------------------- main

async def soak(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="metanet-soak-") as tmp:
        # The caller's METANET_* variables reach it (METANET_TORCH_THREADS, METANET_DEVICE, ...).
        # The queue's time bound and overload mode are off: the soak asks for zero errors from a
        # queue that admits all of its traffic. With the bound, requests beyond one batch that
        # come while one of its registrations runs (up to seconds here) would get 429s; overload
        # mode refuses classify requests while a registration runs once a process's demand passes
        # its bound, and the soak's clients, which send again at once instead of waiting out the
        # Retry-After, stay counted as demand for that long (and a crowd's Retry-After grows with it).
        server = ServiceProcess(Path(tmp) / "data", Path(args.server_log or Path(tmp) / "server.log"),
                                {"max_queue_wait_ms": 0, "max_queue_wait_factor": 0,
                                 "overload_forward_factor": 0},
                                hermetic=False).start(wait=False)
        try:
            await asyncio.to_thread(server.wait_ready)
            traffic = Traffic(server.url, args.concurrency, glyphs(64))
            # Warm-up: until every worker has been through a few rounds, so caches, pools and the
            # allocator have seen the whole mix at full concurrency before the first reading.
            warmup = await traffic.run(args.warmup, rounds=args.warmup_rounds, max_seconds=args.warmup_max)
            warm_rss, warm_fds = await settled_readings(server)
            warm_requests = traffic.tally.requests

            rss_samples: list[int] = []

            async def sample_rss() -> None:
                while True:
                    rss_samples.append(server.rss_bytes())
                    await asyncio.sleep(1)

            sampler = asyncio.create_task(sample_rss())
            elapsed = await traffic.run(args.seconds)
            sampler.cancel()
            end_rss, end_fds = await settled_readings(server)
        finally:
            exit_status = server.stop()

    tally = traffic.tally
    every = [s for values in tally.latencies.values() for s in values]
    growth = end_rss / warm_rss - 1
    result = {
        "seconds": round(elapsed, 1), "warmup_seconds": round(warmup, 1), "concurrency": args.concurrency,
        "requests": tally.requests, "requests_after_warmup": tally.requests - warm_requests,
        "throughput_rps": round((tally.requests - warm_requests) / elapsed, 1),
        "errors": sum(tally.errors.values()), "errors_by_operation": dict(tally.errors),
        "error_samples": tally.error_samples,
        "latency_ms": {op: summary(v) for op, v in sorted(tally.latencies.items())} | {"all": summary(every)},
        "rss_mib": {"warmup": round(warm_rss / 2**20, 1), "end": round(end_rss / 2**20, 1),
                    "max": round(max(rss_samples, default=end_rss) / 2**20, 1)},
        "rss_growth": round(growth, 4), "max_rss_growth": args.max_rss_growth,
        "open_fds": {"warmup": warm_fds, "end": end_fds},
        "server_exit_status": exit_status, "malloc_arena_max": server.env["MALLOC_ARENA_MAX"],
    }
    result["failures"] = [
        *([f"{result['errors']} errors"] if result["errors"] else []),
        *([f"RSS grew {100 * growth:.1f}% after warm-up (limit {100 * args.max_rss_growth:.0f}%)"]
          if growth > args.max_rss_growth else []),
        *([f"open fds grew from {warm_fds} to {end_fds}"] if end_fds > warm_fds else []),
        *([f"the server exited with {exit_status} on SIGTERM"]
          if exit_status not in (0, -signal.SIGTERM) else []),
    ]
    result["passed"] = not result["failures"]
    return result


def markdown(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    rows = "\n".join(f"| {op} | {v['n']} | {v['p50']} | {v['p99']} |" for op, v in lat.items())
    return (
        f"Soak: {r['seconds']} s after a {r['warmup_seconds']} s warm-up at concurrency {r['concurrency']}: "
        f"{r['requests']} requests ({r['requests_after_warmup']} after warm-up, {r['throughput_rps']}/s), "
        f"{r['errors']} errors; "
        f"RSS {r['rss_mib']['warmup']} MiB after warm-up -> {r['rss_mib']['end']} MiB at the end "
        f"({100 * r['rss_growth']:+.1f}%, max {r['rss_mib']['max']} MiB); "
        f"open fds {r['open_fds']['warmup']} -> {r['open_fds']['end']}; "
        f"{'PASSED' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}\n\n"
        f"| operation | requests | p50 ms | p99 ms |\n|---|---|---|---|\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="traffic after the warm-up")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=10, help="least warm-up seconds")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="least rounds of every worker in it")
    parser.add_argument("--warmup-max", type=float, default=180, help="most warm-up seconds")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--markdown", help="write the summary as Markdown here")
    parser.add_argument("--server-log", help="keep the server's log here")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    text = markdown(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(json.dumps(result))
    print(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
