"""Soak test: mixed register / classify / delete traffic at a fixed concurrency against a server
this command starts itself (`python -m service` on a free port, a fresh data directory).

    python bench/soak.py                         # 5 minutes at concurrency 32 (the recorded run)
    python bench/soak.py --seconds 30            # the CI version
    python bench/soak.py --json out.json --markdown out.md

Each worker loops: register a small task (2-3 way, mostly 1-shot, 28x28 PNGs), classify it five
times, read it, now and then list its tasks or classify a one-off episode, delete it. After a
warm-up the traffic pauses, connections are closed and the server's resident memory and open file
descriptors are read from /proc; the same is done at the end. It passes (exit 0) with zero errors,
resident memory at the end at most `--max-rss-growth` above the warm-up reading, no more open file
descriptors than after warm-up, and a clean exit on SIGTERM. METANET_* variables in the environment
reach the server (METANET_TORCH_THREADS, METANET_DEVICE, ...); data directory and port are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CLASSIFY_PER_TASK = 5  # as in use: a task is registered once and classified against many times


# ----------------------------------------------------------------------------------- server

class Server:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "METANET_DATA_DIR": str(data_dir), "METANET_LOG_LEVEL": "warning"}
        env.setdefault("METANET_DEVICE", "cpu")
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout} s")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


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


async def worker(wid: int, client_of: Any, stop: asyncio.Event, tally: Tally, pool: list[str]) -> None:
    rng = random.Random(wid)
    labels = ["alpha", "beta", "gamma", "delta", "epsilon"]
    iteration = 0
    while not stop.is_set():
        client: httpx.AsyncClient = client_of()
        iteration += 1
        n_way, n_shot = rng.randint(2, 3), 1 + (rng.random() < 0.25)
        support = [{"label": labels[c], "image": rng.choice(pool)}
                   for c in range(n_way) for _ in range(n_shot)]
        created = await call(client, tally, "register", 201, "POST", "/v1/tasks",
                             json={"name": f"soak-{wid}-{iteration}", "examples": support})
        if created is None:
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


class Traffic:
    """`concurrency` workers sharing one connection pool, started and stopped by phase."""

    def __init__(self, url: str, concurrency: int, pool: list[str]) -> None:
        self.url, self.concurrency, self.pool = url, concurrency, pool
        self.tally = Tally()
        self.client: httpx.AsyncClient | None = None

    async def run_for(self, seconds: float) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker(i, lambda: self.client, stop, self.tally, self.pool))
                 for i in range(self.concurrency)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)  # each worker finishes its iteration: its task is deleted
        await self.client.aclose()  # closes every connection, so the server's fds can settle


async def settled_fds(server: Server, timeout: float = 10) -> int:
    """The server's open fds once closed connections are gone (two equal readings in a row)."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        now = server.open_fds()
        if now == last:
            return now
        last = now
        await asyncio.sleep(0.5)
    return last


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50": round(1000 * percentile(seconds, 0.5), 1),
            "p99": round(1000 * percentile(seconds, 0.99), 1)}


# ------------------------------------------------------------------------------------- main

async def soak(args: argparse.Namespace) -> dict[str, Any]:
    warmup = args.warmup if args.warmup is not None else min(60.0, args.seconds / 3)
    with tempfile.TemporaryDirectory(prefix="metanet-soak-") as tmp:
        server = Server(Path(tmp) / "data", Path(args.server_log or Path(tmp) / "server.log"))
        try:
            await server.wait_ready()
            traffic = Traffic(server.url, args.concurrency, glyphs(64))
            started = time.monotonic()
            await traffic.run_for(warmup)
            warm_rss, warm_fds = server.rss_bytes(), await settled_fds(server)
            warm_requests = traffic.tally.requests

            rss_samples: list[int] = []

            async def sample_rss() -> None:
                while True:
                    rss_samples.append(server.rss_bytes())
                    await asyncio.sleep(1)

            sampler = asyncio.create_task(sample_rss())
            await traffic.run_for(args.seconds - warmup)
            sampler.cancel()
            elapsed = time.monotonic() - started
            end_rss, end_fds = server.rss_bytes(), await settled_fds(server)
        finally:
            exit_status = server.stop()

    tally = traffic.tally
    every = [s for values in tally.latencies.values() for s in values]
    growth = end_rss / warm_rss - 1
    result = {
        "seconds": round(elapsed, 1), "warmup_seconds": warmup, "concurrency": args.concurrency,
        "requests": tally.requests, "requests_after_warmup": tally.requests - warm_requests,
        "throughput_rps": round(tally.requests / elapsed, 1),
        "errors": sum(tally.errors.values()), "errors_by_operation": dict(tally.errors),
        "error_samples": tally.error_samples,
        "latency_ms": {op: summary(v) for op, v in sorted(tally.latencies.items())} | {"all": summary(every)},
        "rss_mib": {"warmup": round(warm_rss / 2**20, 1), "end": round(end_rss / 2**20, 1),
                    "max": round(max(rss_samples, default=end_rss) / 2**20, 1)},
        "rss_growth": round(growth, 4), "max_rss_growth": args.max_rss_growth,
        "open_fds": {"warmup": warm_fds, "end": end_fds},
        "server_exit_status": exit_status,
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
        f"Soak: {r['seconds']} s ({r['warmup_seconds']} s warm-up) at concurrency {r['concurrency']}: "
        f"{r['requests']} requests ({r['throughput_rps']}/s), {r['errors']} errors; "
        f"RSS {r['rss_mib']['warmup']} MiB after warm-up -> {r['rss_mib']['end']} MiB at the end "
        f"({100 * r['rss_growth']:+.1f}%, max {r['rss_mib']['max']} MiB); "
        f"open fds {r['open_fds']['warmup']} -> {r['open_fds']['end']}; "
        f"{'PASSED' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}\n\n"
        f"| operation | requests | p50 ms | p99 ms |\n|---|---|---|---|\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="total run time, warm-up included")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default: a third, at most 60)")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--markdown", help="write the summary as Markdown here")
    parser.add_argument("--server-log", help="keep the server's log here")
    args = parser.parse_args(argv)
    if args.warmup is not None and not 0 < args.warmup < args.seconds:
        parser.error("--warmup must lie between 0 and --seconds")
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
