"""Paired comparison of holding each task's M in float32, float16 or bfloat16: the same seeded
episodes, each registered once, its queries classified with M in each dtype.

    python bench/m_dtype.py                          # 20-way 1-shot, 1000 episodes, seed 0: the full run
    python bench/m_dtype.py --episodes 5 --out /tmp  # a smoke run

The episodes are those of `metanet evaluate --seed SEED` (evaluation alphabets, shipped weights unless
--weights), so the float32 row equals its accuracy. For each dtype: accuracy with its 95% CI, the
paired difference to float32 in points with its 95% CI (per episode, so episode difficulty cancels),
the fraction of queries whose predicted class changed, the largest absolute change of a probability,
and the task's memory in bytes (its Q*, R and M: the service's memory_bytes). Writes
bench/results/m-dtype-<date>-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_model
from model.data import EpisodeSampler, load_split
from model.evaluate import M_DTYPES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import write_result  # noqa: E402  (run as a script: the repository first on the path)

BAR_POINTS = 0.2  # issue 4: 20-way one-shot accuracy within 0.2 points of float32


def compare(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.weights, args.device)
    split = load_split(args.data_dir, "evaluation", model.config.image_size)
    # As model.evaluate.evaluate draws them: same sampler, same generator, same order.
    sampler = EpisodeSampler(split, rotate=False, device=args.device)
    rng = np.random.default_rng(args.seed)
    names = [f"class-{k}" for k in range(args.way)]
    accuracy = {d: np.empty(args.episodes) for d in M_DTYPES}
    changed = dict.fromkeys(M_DTYPES, 0)
    max_prob_diff = dict.fromkeys(M_DTYPES, 0.0)
    nbytes: dict[str, int] = {}
    n_queries, start = 0, time.perf_counter()
    for e in range(args.episodes):
        ep = sampler.sample(rng, args.way, args.shot, args.queries)
        memory = model.register(ep.support_x, [names[int(k)] for k in ep.support_y])
        truth = ep.query_y.cpu()
        reference: torch.Tensor | None = None  # float32's probabilities, (n_query, n_way)
        for name, dtype in M_DTYPES.items():  # float32 first
            held = memory if dtype == torch.float32 else memory.with_m_dtype(dtype)
            probs = model.classify(held, ep.query_x).probs.float().cpu()
            # memory.labels is class-0, class-1, ... in first-appearance order: column k is class k
            predicted = torch.tensor([int(held.labels[k].split("-")[1]) for k in probs.argmax(1)])
            accuracy[name][e] = (predicted == truth).float().mean().item()
            if reference is None:
                reference, reference_predicted = probs, predicted
            changed[name] += int((predicted != reference_predicted).sum())
            max_prob_diff[name] = max(max_prob_diff[name], float((probs - reference).abs().max()))
            nbytes.setdefault(name, held.nbytes)  # the same for every task of this way and shot
        n_queries += len(truth)
        if args.progress and (e + 1) % args.progress == 0:
            print(f"{e + 1}/{args.episodes} episodes, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start

    rows = {}
    for name in M_DTYPES:
        diff = 100 * (accuracy[name] - accuracy["float32"])  # paired, in points
        rows[name] = {
            "accuracy": float(accuracy[name].mean()),
            "ci95": ci95(accuracy[name]),
            "diff_points": float(diff.mean()),
            "diff_ci95_points": ci95(diff),
            "predictions_changed": changed[name] / n_queries,
            "max_abs_prob_diff": max_prob_diff[name],
            "memory_bytes": nbytes[name],
            "memory_vs_float32": nbytes[name] / nbytes["float32"],
            "within_bar": abs(float(diff.mean())) <= BAR_POINTS,
        }
    return {
        "way": args.way, "shot": args.shot, "episodes": args.episodes, "queries_per_class": args.queries,
        "n_queries": n_queries, "seed": args.seed, "device": args.device, "model_version": model.version,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "bar_points": BAR_POINTS, "results": rows,
    }


def ci95(values: np.ndarray) -> float | None:
    """Half-width of the normal 95% interval of the mean; None for one value (no spread)."""
    return 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else None


def markdown(r: dict[str, Any]) -> str:
    def pm(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    lines = [
        f"{r['way']}-way {r['shot']}-shot, {r['episodes']} episodes ({r['n_queries']} queries), "
        f"seed {r['seed']}, {r['model_version']} on {r['device']}:",
        "",
        "| M dtype | accuracy % (95% CI) | vs float32, points (95% CI) | predictions changed "
        "| max abs prob diff | memory bytes per task |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["results"].items():
        ci = None if v["ci95"] is None else 100 * v["ci95"]
        lines.append(
            f"| {name} | {100 * v['accuracy']:.2f} ± {pm(ci)} "
            f"| {v['diff_points']:+.2f} ± {pm(v['diff_ci95_points'])} "
            f"| {100 * v['predictions_changed']:.2f}% | {v['max_abs_prob_diff']:.2g} "
            f"| {v['memory_bytes']:,} ({100 * v['memory_vs_float32']:.0f}%) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--way", type=int, default=20)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=5, help="queries per class per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", help="weights directory (default: the shipped weights)")
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the JSON")
    parser.add_argument("--progress", type=int, default=100,
                        help="report to stderr every this many episodes (0: never)")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(args)
    result["command"] = "python bench/m_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = f"m-dtype-{dt.date.today().isoformat()}-{args.device.replace(':', '')}.json"
    write_result(result, Path(args.out) / name, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
