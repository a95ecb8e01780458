"""Evaluate the shipped (or given) weights on the model card's five settings and record the result.

    python bench/model_card.py [--weights DIR] [--episodes 1000] [--device cpu]

Runs `metanet evaluate` for 5-way 1-shot, 5-way 5-shot, 20-way 1-shot, 20-way 5-shot and 50-way
1-shot (evaluation alphabets, seed 0), writes
bench/results/model-card-<date>-<model version>-<device>-<episodes>ep.json and prints the model
card's markdown table (docs/model.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

PAPER = {(5, 1): "98.95*", (20, 1): "97.00* / 95.9"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", help="weights directory (default: shipped)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--settings", default="5x1,5x5,20x1,20x5,50x1",
                        help="comma-separated WAYxSHOT settings to evaluate")
    args = parser.parse_args()
    rows = []
    settings = [tuple(int(v) for v in item.split("x")) for item in args.settings.split(",")]
    for way, shot in settings:
        cmd = [sys.executable, "-m", "service.cli", "evaluate", "--way", str(way), "--shot", str(shot),
               "--episodes", str(args.episodes), "--seed", "0", "--device", args.device, "--json"]
        if args.weights:
            cmd += ["--weights", args.weights]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. more classes than the weights were trained for
            print(f"{way}-way {shot}-shot: not evaluated: {done.stderr.strip()}", flush=True)
            continue
        result = json.loads(done.stdout)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["command"] = "metanet " + " ".join(cmd[3:])
        rows.append(result)
        print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    version = rows[0]["model_version"] if rows else "none"
    path = out / f"model-card-{dt.date.today().isoformat()}-{version}-{args.device}-{args.episodes}ep.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {path}\n")
    print("| setting | accuracy (95% CI) | episodes | paper | command |")
    print("|---|---|---|---|---|")
    for r in rows:
        key = (r["way"], r["shot"])
        print(f"| {r['way']}-way {r['shot']}-shot | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} "
              f"| {r['episodes']} | {PAPER.get(key, '—')} | `{r['command']}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
