"""How wide strokes are for their glyph's size: Omniglot's drawings, the pens training draws them
with, the robustness benchmark's pens, and scikit-learn's digits. The widest training pen
(`TrainConfig.augment_pen_max`) has to reach the pens users draw with.

    python bench/stroke_widths.py                 # 400 drawings of the evaluation alphabets
    python bench/stroke_widths.py --pens 0,3,6 --drawings 1000

A glyph's width is 4 x the mean distance of its ink pixels to the paper (a flat stroke of width w
gives w / 4), divided by the longer side of its ink: a ratio the framing (`model.transform`, which
scales the longer side to 20 pixels) keeps. Training pens dilate Omniglot's 105x105 strokes by r
pixels exactly as `model.augment` does; the robustness benchmark's thick pen is a disk of radius 3.

Writes bench/results/stroke-widths-<date>.json (or --out) and prints the medians and quartiles.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from bench.robustness import digit_images, thick_pen, thin_pen, width_ratios  # noqa: E402
from model.augment import dilate  # noqa: E402
from model.data import load_split  # noqa: E402


def summary(ratios: np.ndarray) -> dict[str, float]:
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"q1": round(float(q1), 4), "median": round(float(median), 4), "q3": round(float(q3), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    parser.add_argument("--drawings", type=int, default=400, help="evaluation drawings sampled (400)")
    parser.add_argument("--pens", default="1,2,3,4,5,6", help="training pens (dilation radii) to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result file (default bench/results/stroke-widths-<date>.json)")
    args = parser.parse_args(argv)

    raw = load_split(args.data_dir, "evaluation").raw
    rng = np.random.default_rng(args.seed)
    picks = zip(rng.integers(0, raw.shape[0], args.drawings), rng.integers(0, raw.shape[1], args.drawings),
                strict=True)
    ink = np.stack([raw[c, d] for c, d in picks]).astype(np.uint8)

    rows: dict[str, dict[str, float]] = {"Omniglot as drawn": summary(width_ratios(ink))}
    pens = {"robustness: thin pen": thin_pen, "robustness: thick pen (disk of radius 3)": thick_pen}
    for name, pen in pens.items():
        rows[name] = summary(width_ratios(pen(ink, rng) < 128))
    for radius in (int(r) for r in args.pens.split(",")):
        dilated = dilate(torch.from_numpy(ink).float()[:, None], radius)[:, 0].numpy()
        rows[f"training pen {radius}"] = summary(width_ratios(dilated > 0.5))
    digits, _ = digit_images()
    rows["scikit-learn digits (32x32)"] = summary(width_ratios(digits >= 128))

    result = {"command": "python bench/stroke_widths.py " + " ".join(argv or sys.argv[1:]),
              "commit": git_commit(), "drawings": args.drawings, "seed": args.seed,
              "width_over_longer_side": rows}
    lines = ["| strokes | width / longer side: median | quartiles |", "|---|---|---|"]
    lines += [f"| {name} | {r['median']:.3f} | {r['q1']:.3f} - {r['q3']:.3f} |" for name, r in rows.items()]
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"stroke-widths-{dt.date.today()}.json"
    write_result(result, out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
