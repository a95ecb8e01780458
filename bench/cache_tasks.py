"""Cache budget with many registered tasks: a server with a small task-memory cache takes N tasks;
the cache stays within its budget, every task stays listed, and evicted tasks are rebuilt on demand.

    python bench/cache_tasks.py                        # 10,000 tasks, a cache of 50 tasks: the full run
    python bench/cache_tasks.py --tasks 40 --cache-tasks 5 --out /tmp  # a smoke run

Starts `python -m service` on a free port with a fresh data directory and METANET_CACHE_BYTES set
to --cache-bytes, or to --cache-tasks times one task's memory_bytes (read from a probe task on a
first, short-lived server). Other METANET_* variables in the environment reach the server
(METANET_TORCH_THREADS, METANET_M_DTYPE, ...). Then registers --tasks 2-way 1-shot tasks over HTTP
at --concurrency, each two Omniglot drawings of the evaluation alphabets as PNGs (random strokes
when the data is missing), while /metrics (metanet_cache_bytes) and the server's VmRSS are polled.
The first --sample tasks are classified right after registering (two queries: another drawing of
each character). At the end: GET /v1/tasks is paged through and must count N; the sample tasks,
long evicted, are classified again (a rebuild: metanet_cache_misses must grow) and then once more
(cached), and must give the predictions they gave at registration. It passes (exit 0) with no
failed request, the cache never over budget, N tasks listed, the sample rebuilt with the same
predictions, and a clean exit on SIGTERM.
Writes bench/results/cache-tasks-<date>.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import ServiceProcess, parse_metrics, write_result  # noqa: E402  (run as a script)

PROB_TOLERANCE = 1e-5  # a rebuilt memory is the same computation; allow for float summation order


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


# ----------------------------------------------------------------------------------- tasks

class Drawings:
    """Task i: two characters, one drawing of each as support and another as query, seeded by i."""

    def __init__(self, data_dir: str | None, seed: int) -> None:
        self.seed = seed
        self.ink: np.ndarray | None = None  # (n_chars, n_drawings, 105, 105), ink = 1
        default = REPO.parent / "shared" / "data" / "omniglot"
        path = Path(data_dir or os.environ.get("METANET_OMNIGLOT_DIR") or default)
        if (path / "omniglot_evaluation.npz").is_file():
            with np.load(path / "omniglot_evaluation.npz") as d:
                self.ink = np.unpackbits(d["images"], axis=-1)[..., : int(d["width"])]
        self.source = "omniglot evaluation alphabets" if self.ink is not None else "random strokes"

    def task(self, i: int) -> tuple[list[dict[str, str]], list[str], list[str]]:
        """(support examples, query images, true labels of the queries)."""
        rng = np.random.default_rng([self.seed, i])
        if self.ink is not None:
            chars = rng.choice(len(self.ink), size=2, replace=False)
            drawings = [rng.choice(self.ink.shape[1], size=2, replace=False) for _ in chars]
            images = [[_png(self.ink[c, d]) for d in ds] for c, ds in zip(chars, drawings, strict=True)]
            labels = [f"char-{c}" for c in chars]
        else:
            images = [[_strokes(rng)] * 2 for _ in range(2)]
            labels = [f"glyph-{i}-{k}" for k in range(2)]
        support = [{"label": label, "image": pair[0]} for label, pair in zip(labels, images, strict=True)]
        return support, [pair[1] for pair in images], labels


def _png(ink: np.ndarray) -> str:
    """Black strokes on white, as Omniglot's own PNG files, base64."""
    buf = io.BytesIO()
    Image.fromarray((255 * (1 - ink)).astype(np.uint8), mode="L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _strokes(rng: np.random.Generator) -> str:
    img = Image.new("L", (28, 28), 255)
    points = [tuple(int(v) for v in rng.integers(3, 25, size=2)) for _ in range(int(rng.integers(3, 6)))]
    ImageDraw.Draw(img).line(points, fill=0, width=2)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Run:
    task_ids: dict[int, str] = field(default_factory=dict)  # task index -> id
    memory_bytes: set[int] = field(default_factory=set)  # as the API records them
    register_seconds: list[float] = field(default_factory=list)
    at_registration: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # sample: predictions
    errors: list[str] = field(default_factory=list)
    cache_bytes: list[float] = field(default_factory=list)
    over_budget: list[float] = field(default_factory=list)
    entries_max: float = 0
    rss: list[int] = field(default_factory=list)


async def classify(client: httpx.AsyncClient, task_id: str, queries: list[str]) -> list[dict[str, Any]]:
    response = await client.post(f"/v1/tasks/{task_id}/classify", json={"images": queries, "top_k": 2})
    response.raise_for_status()
    return response.json()["predictions"]


async def register_all(client: httpx.AsyncClient, drawings: Drawings, run: Run, n: int, concurrency: int,
                       sample: int) -> None:
    next_index = iter(range(n))

    async def worker() -> None:
        for i in next_index:  # one shared iterator: each index goes to exactly one worker
            support, queries, _ = drawings.task(i)
            start = time.perf_counter()
            try:
                response = await client.post("/v1/tasks", json={"name": f"cache-{i}", "examples": support})
                run.register_seconds.append(time.perf_counter() - start)
                if response.status_code != 201:
                    run.errors.append(f"register {i}: {response.status_code} {response.text[:200]}")
                    continue
                run.task_ids[i] = response.json()["task_id"]
                run.memory_bytes.add(response.json()["memory_bytes"])
                if i < sample:
                    run.at_registration[i] = await classify(client, run.task_ids[i], queries)
            except httpx.HTTPError as exc:
                run.errors.append(f"task {i}: {type(exc).__name__}: {exc}")
            if run.task_ids and len(run.task_ids) % 500 == 0:
                print(f"{len(run.task_ids)}/{n} tasks registered", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def read_state(server: ServiceProcess, client: httpx.AsyncClient, run: Run, budget: int) -> None:
    """One reading: the cache gauge against the budget, and the server's resident memory."""
    metrics = await scrape(client)
    run.cache_bytes.append(metrics["metanet_cache_bytes"])
    run.entries_max = max(run.entries_max, metrics["metanet_cache_entries"])
    if metrics["metanet_cache_bytes"] > budget:
        run.over_budget.append(metrics["metanet_cache_bytes"])
    run.rss.append(server.rss_bytes())


async def watch(server: ServiceProcess, client: httpx.AsyncClient, run: Run, budget: int,
                every: float) -> None:
    while True:  # until cancelled
        await read_state(server, client, run, budget)
        await asyncio.sleep(every)


async def listed(client: httpx.AsyncClient) -> list[str]:
    ids, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/tasks", params=params)
        response.raise_for_status()
        page = response.json()
        ids += [t["task_id"] for t in page["data"]]
        if (cursor := page["next_cursor"]) is None:
            return ids


def same_predictions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[bool, float]:
    """(same top-1 labels, largest probability difference)."""
    diff = 0.0
    for pa, pb in zip(a, b, strict=True):
        probs_a = {e["label"]: e["probability"] for e in pa["top_k"]}
        probs_b = {e["label"]: e["probability"] for e in pb["top_k"]}
        diff = max(diff, *(abs(probs_a[k] - probs_b[k]) for k in probs_a))
    return [p["label"] for p in a] == [p["label"] for p in b], diff


# ------------------------------------------------------------------------------------- main

async def probe_task_bytes(tmp: Path, drawings: Drawings) -> int:
    """memory_bytes of one 2-way 1-shot task, as the server (its weights, its M dtype) counts it."""
    server = ServiceProcess(tmp / "probe", tmp / "probe.log", hermetic=False).start(wait=False)
    try:
        await asyncio.to_thread(server.wait_ready)
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            response = await client.post("/v1/tasks", json={"examples": drawings.task(0)[0]})
            response.raise_for_status()
            return int(response.json()["memory_bytes"])
    finally:
        server.stop()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    drawings = Drawings(args.data_dir, args.seed)
    with tempfile.TemporaryDirectory(prefix="metanet-cache-") as tmp_name:
        tmp = Path(tmp_name)
        if args.cache_bytes is not None:
            budget = args.cache_bytes
        else:
            budget = args.cache_tasks * await probe_task_bytes(tmp, drawings)
        server = ServiceProcess(tmp / "data", Path(args.server_log or tmp / "server.log"),
                                {"cache_bytes": budget}, hermetic=False).start(wait=False)
        run = Run()
        try:
            await asyncio.to_thread(server.wait_ready)
            limits = httpx.Limits(max_connections=args.concurrency + 1)
            async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                rss_start = server.rss_bytes()
                watcher = asyncio.create_task(watch(server, client, run, budget, args.poll))
                start = time.perf_counter()
                await register_all(client, drawings, run, args.tasks, args.concurrency, args.sample)
                register_wall = time.perf_counter() - start
                watcher.cancel()
                await read_state(server, client, run, budget)

                ids = await listed(client)
                before = await scrape(client)
                rebuilt, cached, mismatches, max_diff, rebuilds = [], [], [], 0.0, 0
                for i in sorted(run.at_registration):
                    queries = drawings.task(i)[1]
                    misses = (await scrape(client))["metanet_cache_misses_total"]
                    t0 = time.perf_counter()
                    again = await classify(client, run.task_ids[i], queries)
                    rebuilt.append(time.perf_counter() - t0)
                    rebuilds += int((await scrape(client))["metanet_cache_misses_total"] > misses)
                    t0 = time.perf_counter()
                    third = await classify(client, run.task_ids[i], queries)
                    cached.append(time.perf_counter() - t0)
                    for later in (again, third):
                        same, diff = same_predictions(run.at_registration[i], later)
                        max_diff = max(max_diff, diff)
                        if not same or diff > PROB_TOLERANCE:
                            mismatches.append(i)
                after = await scrape(client)
                await read_state(server, client, run, budget)
                rss_end = server.rss_bytes()
        finally:
            exit_status = server.stop()

    n_ok = len(run.task_ids)
    result: dict[str, Any] = {
        "tasks": args.tasks, "registered": n_ok, "concurrency": args.concurrency, "images": drawings.source,
        "task_memory_bytes": sorted(run.memory_bytes), "cache_budget_bytes": budget,
        "cache_budget_tasks": round(budget / max(run.memory_bytes), 1) if run.memory_bytes else None,
        "register_seconds": round(register_wall, 1), "register_rate_per_s": round(n_ok / register_wall, 2),
        "register_latency_ms": summary(run.register_seconds),
        "cache_bytes_peak": max(run.cache_bytes), "cache_entries_peak": run.entries_max,
        "cache_scrapes": len(run.cache_bytes), "cache_over_budget_scrapes": len(run.over_budget),
        "cache_evictions": after.get("metanet_cache_evictions_total"),
        "listed": len(ids), "listed_all_registered": set(ids) == set(run.task_ids.values()),
        "sample": len(run.at_registration), "sample_rebuilt": rebuilds,
        "sample_misses": after["metanet_cache_misses_total"] - before["metanet_cache_misses_total"],
        "rebuild_latency_ms": summary(rebuilt), "cached_latency_ms": summary(cached),
        "prediction_mismatches": mismatches, "max_prob_diff": max_diff,
        "rss_mib": {"start": mib(rss_start), "peak": mib(max(run.rss)), "end": mib(rss_end)},
        "errors": len(run.errors), "error_samples": run.errors[:20], "server_exit_status": exit_status,
    }
    result["failures"] = [
        *([f"{len(run.errors)} failed requests"] if run.errors else []),
        *([f"cache over budget in {len(run.over_budget)} scrapes (max {max(run.over_budget):.0f})"]
          if run.over_budget else []),
        *([f"{len(ids)} tasks listed, {n_ok} registered"] if not result["listed_all_registered"] else []),
        *([f"only {rebuilds} of {len(rebuilt)} sample tasks were rebuilt (not evicted?)"]
          if rebuilds < len(rebuilt) else []),
        *([f"tasks {mismatches} gave other predictions than at registration"] if mismatches else []),
        *([f"the server exited with {exit_status} on SIGTERM"]
          if exit_status not in (0, -signal.SIGTERM) else []),
    ]
    result["passed"] = not result["failures"]
    return result


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def q(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1) if ordered else 0.0

    return {"n": len(ordered), "p50": q(0.5), "p99": q(0.99)}


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def markdown(r: dict[str, Any]) -> str:
    reg, rb, ca = r["register_latency_ms"], r["rebuild_latency_ms"], r["cached_latency_ms"]
    rss, task_bytes = r["rss_mib"], ", ".join(f"{n:,}" for n in r["task_memory_bytes"])
    return "\n".join([
        f"Cache budget with {r['tasks']:,} tasks (2-way 1-shot, {r['images']}), "
        f"concurrency {r['concurrency']}: "
        f"{'PASSED' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| registered | {r['registered']:,} in {r['register_seconds']} s, {r['register_rate_per_s']}/s "
        f"(p50 {reg['p50']} ms, p99 {reg['p99']} ms) |",
        f"| cache budget | {r['cache_budget_bytes']:,} bytes: {r['cache_budget_tasks']} tasks "
        f"of {task_bytes} bytes (memory_bytes) |",
        f"| cache bytes, peak of {r['cache_scrapes']} scrapes | {r['cache_bytes_peak']:,.0f} "
        f"({r['cache_entries_peak']:.0f} tasks); over budget in {r['cache_over_budget_scrapes']} |",
        f"| evictions | {r['cache_evictions']:,.0f} |",
        f"| listed by GET /v1/tasks | {r['listed']:,} |",
        f"| evicted tasks classified again | {r['sample']}, {r['sample_rebuilt']} rebuilt; "
        f"{len(r['prediction_mismatches'])} with other predictions "
        f"(max prob diff {r['max_prob_diff']:.1g}) |",
        f"| classify latency, rebuilt / cached | p50 {rb['p50']} / {ca['p50']} ms, "
        f"p99 {rb['p99']} / {ca['p99']} ms |",
        f"| server RSS start / peak / end | {rss['start']} / {rss['peak']} / {rss['end']} MiB |",
        f"| failed requests | {r['errors']} |",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks to register")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-tasks", type=int, default=50, help="cache budget in tasks (default 50)")
    budget.add_argument("--cache-bytes", type=int, help="cache budget in bytes")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample", type=int, default=20, help="earliest tasks checked after eviction")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between /metrics scrapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR, "
                        "then ../shared/data/omniglot; random strokes without it)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the JSON")
    parser.add_argument("--server-log", help="keep the server's log here")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.concurrency < 1:
        parser.error("--tasks and --concurrency must be at least 1")
    args.sample = min(args.sample, args.tasks)
    result = asyncio.run(bench(args))
    result["command"] = "python bench/cache_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_result(result, Path(args.out) / f"cache-tasks-{dt.date.today().isoformat()}.json", markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
