"""What the model pays for batching many small requests instead of one large one: `classify_many`
over N one-image requests of one task against one N-image request, alternated in one process.

    python bench/request_overhead.py                   # the run the README quotes
    python bench/request_overhead.py --images 8 --rounds 40

On the shipped weights, a 20-way 1-shot task of random strokes, one torch thread (a model
worker's share on 2 cores). Prints the min and median seconds of each shape and their ratio (1.00:
a request costs nothing beyond its images) and writes bench/results/request-overhead-<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import write_result  # noqa: E402  (run as a script: the repository first on the path)
from model.checkpoint import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16,
                        help="images in the batch (the service's largest CPU forward)")
    parser.add_argument("--rounds", type=int, default=80, help="calls of each shape, alternated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for name in ("images", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")

    torch.set_num_threads(args.threads)
    model = load_model(None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    size = model.config.image_size
    support = torch.from_numpy((rng.random((20, size, size)) > 0.8).astype(np.float32))
    memory = model.register(support, [f"c{i}" for i in range(20)])
    queries = torch.from_numpy((rng.random((args.images, size, size)) > 0.8).astype(np.float32))
    shapes = {
        "one request": [(memory, queries)],
        "one-image requests": [(memory, queries[i : i + 1]) for i in range(args.images)],
    }
    seconds: dict[str, list[float]] = {name: [] for name in shapes}
    for requests in shapes.values():
        model.classify_many(requests)  # warm-up
    for _ in range(args.rounds):
        for name, requests in shapes.items():
            start = time.perf_counter()
            model.classify_many(requests)
            seconds[name].append(time.perf_counter() - start)

    stats = {name: {"min_ms": round(1000 * min(s), 3), "median_ms": round(1000 * float(np.median(s)), 3)}
             for name, s in seconds.items()}
    one, many = stats["one request"], stats["one-image requests"]
    ratio = {"min": round(many["min_ms"] / one["min_ms"], 3),
             "median": round(many["median_ms"] / one["median_ms"], 3)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"command": " ".join(["python", "bench/request_overhead.py", *(argv or sys.argv[1:])]),
              "date": dt.date.today().isoformat(), "git_commit": commit, "torch": torch.__version__,
              "images": args.images, "rounds": args.rounds, "threads": args.threads,
              "shapes": stats, "ratio": ratio}
    markdown = "\n".join([
        f"classify_many, {args.images} images, {args.threads} thread(s), {args.rounds} rounds alternated",
        "", "| shape | min ms | median ms |", "|---|---|---|",
        *(f"| {name} | {s['min_ms']} | {s['median_ms']} |" for name, s in stats.items()),
        "", f"{args.images} one-image requests / one {args.images}-image request: "
            f"{ratio['min']} (min), {ratio['median']} (median)",
    ])
    out = args.out or REPO / "bench" / "results" / f"request-overhead-{result['date']}-cpu.json"
    write_result(result, out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
