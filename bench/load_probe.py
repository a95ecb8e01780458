"""A quick probe of one load shape: what the server process spends per request.

    python bench/load_probe.py --concurrency 32 --images 32 --seconds 8
    python bench/load_probe.py --concurrency 32 --images 1 --set model_workers=2 --set heap_retain_mb=0

Starts `python -m service` (CPU unless --set device=...) with the given METANET_* settings,
registers a 20-way one-shot Omniglot task, and drives it with `--concurrency` LeanClients in this
process (a client refused with 429 waits out its Retry-After) for `--seconds`. Prints the
answered requests/s, their p50 / p99, the server's CPU time (user, system) and minor page faults
per answered request from /proc, and the average batch from /metrics; then the server processes in
overload mode (`metanet_overloaded`) every 0.5 s of the load; then the CPU per request of each
thread. Nothing is recorded: it is
for finding out where a setting matters, before `bench/serving.py` measures it properly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from api_tests.harness import LeanClient, ServiceProcess, descendants, parse_metrics  # noqa: E402
from bench.serving import WAY, as_png, omniglot_ink, percentile  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each thread of a process and its descendants, by
    "name/tid"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    tasks = [task for p in [pid, *descendants(pid)] for task in Path(f"/proc/{p}/task").iterdir()]
    for task in tasks:
        try:
            head, _, rest = (task / "stat").read_text().rpartition(")")
        except OSError:  # the thread ended
            continue
        fields = rest.split()
        out[f"{head.partition('(')[2]}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def proc_stat(pid: int) -> tuple[float, float, int]:
    """(user seconds, system seconds, minor faults) so far of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = faults = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        user, system, faults = user + int(fields[11]), system + int(fields[12]), faults + int(fields[7])
    return user / tick, system / tick, faults


# A batch's seconds from its dispatch to its results back on the event loop: decoding on the
# model thread and the forward, with the hand-offs between threads.
BATCH_SECONDS = 'metanet_model_seconds_sum{operation="batch"}'


async def drive(url: str, path: str, bodies: list[bytes], concurrency: int, seconds: float,
                warmup: float = 0.0) -> tuple[list[float], int]:
    """Latencies of the 200s that end in the `seconds` after `warmup`, and how many 200s in all."""
    latencies: list[float] = []
    answered = 0
    counted = time.perf_counter() + warmup
    end = counted + seconds

    async def client(i: int) -> None:
        nonlocal answered
        async with LeanClient(url, timeout=120) as lean:
            k = i
            while (start := time.perf_counter()) < end:
                status, headers, _ = await lean.post(path, bodies[k % len(bodies)])
                k += 1
                if status == 200:
                    answered += 1
                    if (done := time.perf_counter()) >= counted:
                        latencies.append(done - start)
                elif status == 429:
                    pause = float(headers.get("retry-after", 1)) * random.uniform(1.0, 1.1)
                    await asyncio.sleep(min(pause, max(0.0, end - time.perf_counter())))
                else:
                    raise RuntimeError(f"unexpected status {status}")

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return latencies, answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds of load before the counted ones (the bench's phases take 2)")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="also record the server with py-spy (raw folded stacks, per thread) into FILE")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a service setting, e.g. model_workers=2 (METANET_MODEL_WORKERS)")
    omniglot = (os.environ.get("METANET_OMNIGLOT_DIR")
                or Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
    parser.add_argument("--data-dir", type=Path, default=Path(omniglot))
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.images < 1 or not args.seconds > 0 or not args.warmup >= 0:
        parser.error("--concurrency and --images must be at least 1, --seconds more than 0 "
                     "and --warmup at least 0")
    settings: dict[str, str] = {"device": "cpu"}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set takes NAME=VALUE, not {item!r}")
        settings[name] = value

    ink, _ = omniglot_ink(args.data_dir, max(WAY, 40), 2017)
    queries = [as_png(ink[c, d]) for d in range(1, ink.shape[1]) for c in range(WAY)]
    bodies = [json.dumps({"images": [queries[(i * args.images + j) % len(queries)]
                                     for j in range(args.images)], "top_k": 1}).encode() for i in range(16)]
    with tempfile.TemporaryDirectory(prefix="metanet-probe-") as tmp:
        try:
            server = ServiceProcess(Path(tmp) / "data", Path(tmp) / "server.log", settings).start()
        except RuntimeError as exc:  # e.g. a --set value the service refuses: its own message
            print(f"load_probe.py: the service did not start: {exc}", file=sys.stderr)
            return 2
        try:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                support = [{"label": f"c{c}", "image": as_png(ink[c, 0])} for c in range(WAY)]
                created = client.post("/v1/tasks", json={"examples": support})
                created.raise_for_status()
                path = f"/v1/tasks/{created.json()['task_id']}/classify"
                before_metrics = parse_metrics(client.get("/metrics").text)
                user0, sys0, faults0 = proc_stat(server.pid)
                threads0 = thread_cpu(server.pid)
                spy = None if args.profile is None else subprocess.Popen(
                    ["py-spy", "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
                     "--rate", "250", "--threads", "--subprocesses", "--format", "raw",
                     "--output", str(args.profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                overloaded: list[float] = []  # metanet_overloaded every 0.5 s: processes in overload mode
                sampling = threading.Event()

                def sample() -> None:
                    with httpx.Client(base_url=server.url, timeout=30) as sampler:
                        while not sampling.wait(0.5):
                            overloaded.append(parse_metrics(sampler.get("/metrics").text)
                                              .get("metanet_overloaded", float("nan")))
                sampler = threading.Thread(target=sample)
                sampler.start()
                try:
                    latencies, answered = asyncio.run(
                        drive(server.url, path, bodies, args.concurrency, args.seconds, args.warmup))
                finally:
                    sampling.set()
                    sampler.join()
                user1, sys1, faults1 = proc_stat(server.pid)
                threads1 = thread_cpu(server.pid)
                if spy is not None:
                    spy.wait()
                after_metrics = parse_metrics(client.get("/metrics").text)
        finally:
            server.stop()
    n = max(answered, 1)  # the server's CPU and metrics span the warmup too
    batches = after_metrics.get("metanet_batches_total", 0) - before_metrics.get("metanet_batches_total", 0)
    images = (after_metrics.get("metanet_batched_images_total", 0)
              - before_metrics.get("metanet_batched_images_total", 0))
    batch_seconds = (after_metrics.get(BATCH_SECONDS, 0) - before_metrics.get(BATCH_SECONDS, 0))
    print(f"{len(latencies) / args.seconds:.1f} requests/s, p50 {1000 * percentile(latencies, 0.5):.1f} ms, "
          f"p99 {1000 * percentile(latencies, 0.99):.1f} ms; server per request: "
          f"{1000 * (user1 - user0) / n:.2f} ms user + {1000 * (sys1 - sys0) / n:.2f} ms system CPU, "
          f"{(faults1 - faults0) / n:.0f} minor faults; batches of {images / max(batches, 1):.1f} images, "
          f"{1000 * batch_seconds / max(images, 1):.2f} ms of a model worker's time an image ({settings})")
    per_thread = {name: threads1[name] - threads0.get(name, 0.0) for name in threads1}
    print("processes in overload mode (metanet_overloaded every 0.5 s): "
          + " ".join(f"{v:g}" for v in overloaded))
    print("per request, by thread: " + ", ".join(
        f"{name} {1000 * cpu / n:.2f} ms" for name, cpu in sorted(per_thread.items(), key=lambda kv: -kv[1])
        if cpu * 1000 / n >= 0.01))
    return 0


if __name__ == "__main__":
    sys.exit(main())
