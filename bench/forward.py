"""The query forward on one CPU thread, this code against the formulation it replaced, in one run.

    python bench/forward.py                        # 5 rounds, batches 1, 16 and 32, torch and onnx
    python bench/forward.py --rounds 1 --repeats 2 --batches 4 --backends torch --out /tmp/f.json

Session 14 changed two pieces of the query path (`model/layers.py`), without changing what it
computes:
- pooling: `layers.pool` without autograd takes the max of the four strided quarters of each 2x2
  window, where `F.max_pool2d` also wrote an int64 argmax per output;
- `b`'s per-query kernels: `conv_trunk_per_sample` runs the shared slow kernel as one convolution
  and only the fast kernels as a batched matmul, where it stacked [S; F_i] for every query into one
  matmul (copying the kernels, S n times over, at every call).
`previous()` puts the old pieces back (`F.max_pool2d`, `stacked_trunk` below; the third change, W*
written in place, stays in both), so both versions of
the whole `MetaNet.classify` run in this process on the same task and queries: a 20-way one-shot
Omniglot task, registered by the shipped weights. Each round times every version and batch size in
turn (best of `--repeats` calls), so a slow minute of this shared machine hits both (glibc's heap
kept as the service keeps it, `service.inference.heap.retain`); the table
gives each one's best round, the ratio of old to new time, and the largest difference between
their probabilities. With onnx, the query path is exported by each version (`metanet
export-onnx`'s graph) and run by onnxruntime on one thread the same way. The pooling alone is
timed too, at the sizes the trunk pools (16 images of 64 channels, 28x28 down to 2x2), on the
output of a relu. Writes bench/results/forward-<date>-cpu.json and prints two markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from bench.serving import WAY, omniglot_ink  # noqa: E402
from model import layers, metanet  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.data import frame_drawings  # noqa: E402
from service.inference import heap  # noqa: E402
from service.settings import Settings  # noqa: E402

VERSIONS = ("this code", "before")


def reference_pool(h: Tensor) -> Tensor:
    """Pooling as before session 14: F.max_pool2d, which also computes the argmax indices."""
    return F.max_pool2d(h, 2, ceil_mode=True)


def stacked_trunk(x: Tensor, slow: Sequence[Tensor], fast: Sequence[Tensor]) -> Tensor:
    """`conv_trunk_per_sample` as before session 14: per layer one batched matmul of each image's
    columns with its stacked kernel [S; F_i] (n, 2 C_out, C_in * 9), then relu(slow) + relu(fast)."""
    n = x.shape[0]
    h = x
    for w_slow, w_fast in zip(slow, fast, strict=True):
        c_out, height, width = w_slow.shape[0], h.shape[2], h.shape[3]
        stacked = [w_slow.reshape(1, c_out, -1).expand(n, -1, -1), w_fast.reshape(n, c_out, -1)]
        kernels = torch.cat(stacked, dim=1)
        both = F.relu(torch.bmm(kernels, layers.conv3x3_columns(h)))
        h = reference_pool((both[:, :c_out] + both[:, c_out:]).reshape(n, c_out, height, width))
    return h.flatten(1)


@contextlib.contextmanager
def previous() -> Iterator[None]:
    """The model code computes with the pieces it had before session 14, while inside."""
    saved = layers.pool, metanet.conv_trunk_per_sample
    layers.pool, metanet.conv_trunk_per_sample = reference_pool, stacked_trunk
    try:
        yield
    finally:
        layers.pool, metanet.conv_trunk_per_sample = saved


def pooling(rounds: int, repeats: int) -> list[dict[str, Any]]:
    """µs per call of `layers.pool` (no autograd) and of `F.max_pool2d`, best round, at each size
    the trunk pools, with a check that their values agree exactly."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for side in (28, 14, 7, 4, 2):
            h = torch.relu(torch.randn(16, 64, side, side, generator=generator))
            if not torch.equal(layers.pool(h), reference_pool(h)):
                raise AssertionError(f"layers.pool and F.max_pool2d differ at {side}x{side}")
            times: dict[str, list[float]] = {"this code": [], "before": []}
            for _ in range(rounds):
                for version, fn in (("this code", layers.pool), ("before", reference_pool)):
                    fn(h)
                    times[version].append(1e3 * best_ms(lambda f=fn, h=h: f(h), repeats))
            new, old = min(times["this code"]), min(times["before"])
            rows.append({"input": [16, 64, side, side],
                         "us": {"this code": round(new, 1), "before": round(old, 1)},
                         "before_over_this": round(old / new, 2)})
    return rows


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
    parser.add_argument("--repeats", type=int, default=10, help="calls per version, batch and round")
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
    # The heap as the service keeps it: without it glibc maps and unmaps a large forward's buffers
    # at every call, and the old formulation's 32-image forward took 47 to 78 ms from run to run.
    heap.retain(Settings.model_fields["heap_retain_mb"].default)
    model = load_model(None, "cpu")
    ink, source = omniglot_ink(args.data_dir, WAY, 2017)
    x = torch.from_numpy(frame_drawings(ink))
    memory = model.register(x[:WAY, 0].unsqueeze(1), [f"char-{c}" for c in range(WAY)])
    queries = x[:WAY, 1:].reshape(-1, 1, *x.shape[-2:])

    runners: dict[tuple[str, str], Callable[[Tensor], Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            if backend == "torch":
                runners[backend, "this code"] = lambda q: model.classify(memory, q).probs

                def old(q: Tensor) -> Tensor:
                    with previous():
                        return model.classify(memory, q).probs
                runners[backend, "before"] = old
            else:
                from model.onnx import OnnxQueryPath, export_onnx

                for version in VERSIONS:
                    context = previous() if version == "before" else contextlib.nullcontext()
                    with context:
                        path = export_onnx(model, Path(tmp) / f"{version.replace(' ', '-')}.onnx")
                    runner = OnnxQueryPath(path, model, threads=1, device="cpu")
                    runners[backend, version] = lambda q, r=runner: r.classify(memory, q).probs
        times: dict[tuple[str, str, int], list[float]] = {
            (b, v, n): [] for b, v in runners for n in batches}
        for _ in range(args.rounds):
            for n in batches:
                for (backend, version), run in runners.items():
                    run(queries[:n])  # warm: the first call of a shape allocates
                    ms = best_ms(lambda r=run, n=n: r(queries[:n]), args.repeats)
                    times[backend, version, n].append(ms)
        rows: list[dict[str, Any]] = []
        for backend in backends:
            for n in batches:
                with torch.inference_mode():
                    this, before = (runners[backend, v](queries[:n]) for v in VERSIONS)
                    diff = this - before
                new, old = min(times[backend, "this code", n]), min(times[backend, "before", n])
                rows.append({
                    "backend": backend, "batch": n,
                    "ms": {"this code": round(new, 3), "before": round(old, 3)},
                    "images_per_s": {"this code": round(1e3 * n / new, 1), "before": round(1e3 * n / old, 1)},
                    "before_over_this": round(old / new, 3),
                    "max_abs_prob_diff": float(diff.abs().max()),
                    "rounds_ms": {v: [round(t, 3) for t in times[backend, v, n]] for v in VERSIONS}})
    pools = pooling(args.rounds, args.repeats)
    words = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python", "bench/forward.py", *words]),
              "date": str(dt.date.today()), "git_commit": git_commit(), "torch": torch.__version__,
              "threads": 1, "data": source, "task": f"{WAY}-way one-shot, shipped weights",
              "rounds": args.rounds, "repeats": args.repeats, "rows": rows, "pooling": pools}
    lines = ["| backend | batch | this code: ms (images/s) | before: ms (images/s) | before / this "
             "| max prob diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms, per_s = r["ms"], r["images_per_s"]
        lines.append(f"| {r['backend']} | {r['batch']} | {ms['this code']} ({per_s['this code']}) | "
                     f"{ms['before']} ({per_s['before']}) | {r['before_over_this']} | "
                     f"{r['max_abs_prob_diff']:.1e} |")
    lines += ["", "| pooling input | layers.pool µs | F.max_pool2d µs | before / this |", "|---|---|---|---|"]
    lines += [f"| {'x'.join(map(str, r['input']))} | {r['us']['this code']} | {r['us']['before']} | "
              f"{r['before_over_this']} |" for r in pools]
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
