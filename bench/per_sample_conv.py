"""`b`'s per-image 3x3 convolutions both ways, layer by layer, on one CPU thread.

    python bench/per_sample_conv.py                       # batches 1, 8, 16 and 32, 5 rounds
    python bench/per_sample_conv.py --batches 16 --rounds 1 --out /tmp/p.json

`model.layers.per_sample_conv3x3` runs each layer of `b` either as one grouped convolution
(`grouped_conv3x3`) or as a batched matmul over im2col columns (`columns_conv3x3`), by the
layer's shape. This times both at each layer's shape of the shipped model (C channels: 1 -> C at
28x28, then C -> C at 14x14, 7x7, 4x4 and 2x2) and each batch size, with kernels laid out as
`MetaNet.classify_many` writes them, best of `--repeats` calls per round and the best round, the
two ways alternating so a slow minute of this shared machine hits both, and the largest
difference between their outputs. The table says which way
`per_sample_conv3x3` takes and whether that was the faster here. Writes
bench/results/per-sample-conv-<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from model.checkpoint import load_model  # noqa: E402
from model.layers import columns_conv3x3, grouped_conv3x3, takes_grouped  # noqa: E402

WAYS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grouped": grouped_conv3x3, "columns": columns_conv3x3}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,16,32", help="images per call, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="calls per way, shape and round")
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"per-sample-conv-{dt.date.today()}-cpu.json")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes whole numbers separated by commas, not {args.batches!r}")
    if not batches or any(b < 1 or b > 256 for b in batches):
        parser.error(f"--batches must be between 1 and 256, got {args.batches}")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1 (got {args.rounds} and {args.repeats})")

    torch.set_num_threads(1)
    model = load_model(None, "cpu")
    kernels = [w.shape for w in model.b_convs]  # (C_out, C_in, 3, 3) of each layer
    size, sizes = model.config.image_size, []
    for _ in kernels:
        sizes.append(size)
        size = -(-size // 2)  # ceil pooling
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for n in batches:
            for shape, side in zip(kernels, sizes, strict=True):
                h = torch.rand(n, shape[1], side, side, generator=gen)
                w = torch.randn(n, *shape, generator=gen) * 0.05  # contiguous, as classify_many writes W*
                times: dict[str, list[float]] = {way: [] for way in WAYS}
                for _ in range(args.rounds):
                    for way, fn in WAYS.items():
                        times[way].append(best_ms(lambda fn=fn, h=h, w=w: fn(h, w), args.repeats))
                best = {way: min(t) for way, t in times.items()}
                taken = "grouped" if takes_grouped(h, w) else "columns"
                diff = (grouped_conv3x3(h, w) - columns_conv3x3(h, w)).abs().max().item()
                rows.append({"batch": n, "c_in": shape[1], "c_out": shape[0], "map": f"{side}x{side}",
                             **{f"{way}_ms": round(ms, 4) for way, ms in best.items()},
                             "taken": taken, "taken_is_faster": best[taken] <= min(best.values()),
                             "max_abs_diff": diff})
    lines = ["| batch | layer | grouped ms | columns ms | taken | the faster? |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['c_in']} -> {r['c_out']}, {r['map']} | {r['grouped_ms']:.3f} | "
                     f"{r['columns_ms']:.3f} | {r['taken']} | {'yes' if r['taken_is_faster'] else 'no'} |")
    for n in batches:
        of = [r for r in rows if r["batch"] == n]
        total = {way: sum(r[f"{way}_ms"] for r in of) for way in WAYS}
        taken = sum(r[f"{r['taken']}_ms"] for r in of)
        lines.append(f"| {n} | all five | {total['grouped']:.3f} | {total['columns']:.3f} | "
                     f"as taken: {taken:.3f} | |")
    result = {"command": " ".join(["python", "bench/per_sample_conv.py", *(argv or sys.argv[1:])]),
              "date": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "threads": 1, "rounds": args.rounds, "repeats": args.repeats,
              "rows": rows}
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
