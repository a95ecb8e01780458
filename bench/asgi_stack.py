"""What the HTTP framework costs per classify request: the app's ASGI stack (middlewares, routing,
the route's handler, the body's validation, the answer's serialisation) with the task service
stubbed to answer at once, called in process without sockets.

    python bench/asgi_stack.py
    python bench/asgi_stack.py --repo /tmp/other-checkout --out /tmp/before.json   # another revision

Sends a one-image 105x105 PNG classify body to POST /v1/tasks/{id}/classify, as the service's
event loop sees it under load, `--requests` times per round, and prints the CPU microseconds
(process time) per request of each round, their min and median; writes
bench/results/asgi-stack-<date>-cpu.json. The model, the store and the socket are not in it: this
is the share of the event loop's time that the framework and the service's HTTP layer take.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose service is measured")
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    if not (args.repo / "service" / "app.py").is_file():
        parser.error(f"--repo must be a checkout of this project (no service/app.py in {args.repo})")
    sys.path.insert(0, str(args.repo.resolve()))
    sys.path.insert(1, str(REPO))
    import numpy as np  # noqa: PLC0415

    from bench.serving import as_png  # noqa: PLC0415  (the repository first on the path)
    from service.app import create_app  # noqa: PLC0415
    from service.settings import Settings  # noqa: PLC0415

    measured = Path(sys.modules["service.app"].__file__).resolve()
    if not measured.is_relative_to(args.repo.resolve()):  # an installed copy came first
        parser.error(f"imported the service from {measured}, not from --repo {args.repo}")

    with tempfile.TemporaryDirectory(prefix="metanet-asgi-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp), log_level="warning"))
        app.state.runtime.tasks = _StubTasks()
        ink = np.zeros((105, 105), dtype=np.float32)
        ink[30:70, 50:56] = 1
        body = json.dumps({"images": [as_png(ink)], "top_k": 1}).encode()
        rounds = asyncio.run(_measure(app, body, args.requests, args.rounds))

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip()
    result = {"command": " ".join(["python", "bench/asgi_stack.py", *(argv or sys.argv[1:])]),
              "date": dt.date.today().isoformat(), "git_commit": commit, "requests": args.requests,
              "us_per_request": {"rounds": rounds, "min": min(rounds), "median": statistics.median(rounds)}}
    markdown = (f"ASGI stack of POST /v1/tasks/{{id}}/classify, task service stubbed "
                f"({args.repo}, {commit[:7]}): {min(rounds)} us per request "
                f"(min of {args.rounds} rounds of {args.requests}), "
                f"median {statistics.median(rounds)}")
    from bench.harness import write_result  # noqa: PLC0415

    write_result(result, args.out or REPO / "bench" / "results" / f"asgi-stack-{result['date']}-cpu.json",
                 markdown)
    return 0


class _StubTasks:
    """Stands in for TaskService: admits everything and answers a classify at once, with nothing.
    (Both admission checks: a --repo checkout before session 16 calls the one for a size.)"""

    max_images = 128
    engine = types.SimpleNamespace(info=types.SimpleNamespace(version="stub"), batcher=types.SimpleNamespace(
        check_admission=lambda n: None, check_any_admission=lambda most: None))

    async def classify(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []


async def _measure(app: Any, body: bytes, requests: int, rounds: int) -> list[float]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/tasks/0123456789abcdef/classify",
             "raw_path": b"/v1/tasks/0123456789abcdef/classify", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one() -> None:
        await app(dict(scope, state={}), receive, send)

    await one()
    if statuses != [200]:
        raise RuntimeError(f"the stubbed classify answered {statuses}, not 200")
    out = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            await one()
        out.append(round((time.process_time() - start) / requests * 1e6, 1))
    if set(statuses) != {200}:
        raise RuntimeError(f"the stubbed classify answered {sorted(set(statuses))}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("METANET_LOG_LEVEL", "warning")
    sys.exit(main())
