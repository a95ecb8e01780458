"""The query forward on one CPU thread (a model worker's share on 2 cores), torch and onnxruntime.

    python bench/forward.py                        # 5 rounds, batches 1, 16 and 32, torch and onnx
    python bench/forward.py --rounds 1 --repeats 2 --batches 4 --backends torch --out /tmp/f.json

`MetaNet.classify` of a 20-way one-shot Omniglot task registered by the shipped weights, and with
onnx the exported query path (`metanet export-onnx`'s graph) run by onnxruntime on one thread.
Each round times every backend and batch size in turn (best of `--repeats` calls), so a slow minute
of a shared machine hits them all; glibc's heap is kept as the service keeps it
(`service.inference.heap.retain`). The table gives each one's best round in ms and images/s.
Writes bench/results/forward-<date>-cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from bench.serving import WAY, omniglot_ink  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.data import frame_drawings  # noqa: E402
from service.inference import heap  # noqa: E402
from service.settings import Settings  # noqa: E402


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16,32", help="query batch sizes, comma-separated")
    parser.add_argument("--backends", default="torch,onnx", help="torch, onnx or both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="calls per backend, batch and round")
    omniglot = os.environ.get("METANET_OMNIGLOT_DIR") or REPO.parent / "shared" / "data" / "omniglot"
    parser.add_argument("--data-dir", type=Path, default=Path(omniglot))
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"forward-{dt.date.today()}-cpu.json")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes whole numbers separated by commas, not {args.batches!r}")
    backends = args.backends.split(",")
    if any(b < 1 or b > WAY * 19 for b in batches):
        parser.error(f"--batches must be between 1 and {WAY * 19} (the task's queries), got {args.batches}")
    if not set(backends) <= {"torch", "onnx"} or not backends:
        parser.error(f"--backends takes torch, onnx or both, not {args.backends!r}")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1 (got {args.rounds} and {args.repeats})")

    torch.set_num_threads(1)
    # Without it glibc maps and unmaps a large forward's buffers at every call.
    heap.retain(Settings.model_fields["heap_retain_mb"].default)
    model = load_model(None, "cpu")
    ink, source = omniglot_ink(args.data_dir, WAY, 2017)
    x = torch.from_numpy(frame_drawings(ink))
    memory = model.register(x[:WAY, 0].unsqueeze(1), [f"char-{c}" for c in range(WAY)])
    queries = x[:WAY, 1:].reshape(-1, 1, *x.shape[-2:])

    runners: dict[str, Callable[[Tensor], Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            if backend == "torch":
                runners[backend] = lambda q: model.classify(memory, q).probs
            else:
                from model.onnx import OnnxQueryPath, export_onnx

                runner = OnnxQueryPath(export_onnx(model, Path(tmp) / "query.onnx"), model, threads=1,
                                       device="cpu")
                runners[backend] = lambda q, r=runner: r.classify(memory, q).probs
        times: dict[tuple[str, int], list[float]] = {(b, n): [] for b in runners for n in batches}
        for _ in range(args.rounds):
            for n in batches:
                for backend, run in runners.items():
                    run(queries[:n])  # warm: the first call of a shape allocates
                    times[backend, n].append(best_ms(lambda r=run, n=n: r(queries[:n]), args.repeats))
    rows: list[dict[str, Any]] = []
    for backend in backends:
        for n in batches:
            ms = min(times[backend, n])
            rows.append({"backend": backend, "batch": n, "ms": round(ms, 3),
                         "images_per_s": round(1e3 * n / ms, 1),
                         "rounds_ms": [round(t, 3) for t in times[backend, n]]})
    words = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python", "bench/forward.py", *words]),
              "date": str(dt.date.today()), "git_commit": git_commit(), "torch": torch.__version__,
              "threads": 1, "data": source, "task": f"{WAY}-way one-shot, shipped weights",
              "rounds": args.rounds, "repeats": args.repeats, "rows": rows}
    lines = ["| backend | batch | ms | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['batch']} | {r['ms']} | {r['images_per_s']} |" for r in rows]
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
