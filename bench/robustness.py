"""How the model's answers hold up on what users send, on the evaluation alphabets.

    python bench/robustness.py                          # the full run (about an hour on 2 cores)
    python bench/robustness.py --quick                  # a smoke run of every part (a minute)
    python bench/robustness.py --weights DIR --episodes 300 --out FILE.json
    python bench/robustness.py --parts conditions,digits --stroke normalised   # another framing
    python bench/robustness.py --weights DIR --alphabets validation   # to choose between weights

Every image goes through `model.transform.canonical`, the transform the service applies to what
it receives, as 8-bit grey images a client would send (dark ink on light paper unless a condition
says otherwise). Parts, each on the same seeded episodes for every setting it compares:

- conditions (20-way 1-shot): the drawings plain, in inverted polarity, drawn at 40% of the frame,
  at half size in a corner, with a thick pen (a disk of radius 3 pixels dilating the 105x105
  strokes), with a thin pen (eroded by a pixel), with a fine pen (the strokes' 1-pixel skeleton,
  at 105x105 and drawn at 420x420, where a stroke is a 290th of the glyph's size), turned by up
  to 15 degrees either way, sent as 28x28 images, photographed (light falling off by 40% across
  the page, sensor noise and JPEG), scanned with dust (three specks of 2x2 pixels at random on
  the page), and mixed (each image of an episode under a condition of its
  own, as a user's support and queries are). Accuracy with a 95% interval, ECE,
  and the share of support images classified as their own label.
- uneven support sets (5- and 20-way 1-shot with one class at 2, 3 or 5 shots): the one-shot
  classes' accuracy beside the same episodes balanced, and the heavy class's.
- calibration: ECE on 20-way 1-shot tasks and on 5-way 1-shot tasks within one alphabet.
- warnings: the share of plain 20-way tasks for which registration would warn
  (`MetaNet.check_support`): false alarms, since Omniglot's support sets are sound.
- digits: 10-way 1-shot on scikit-learn's 8x8 handwritten digits, upscaled to 32x32 as a user
  would send them (light ink on dark), one support image a digit and 10 queries.

`--box`, `--centre`, `--fine`, `--pen` and `--stroke` measure framings other than canonical's on the
same tasks (`--fine 0`: every pen as drawn, no widening of fine strokes) in the conditions and
digits parts; the uneven and calibration parts frame the drawings as `model.data` loads them.
docs/model.md's "Input framing" chose canonical's with them. `--alphabets validation` runs the
Omniglot parts on the background alphabets training holds out for validation instead, so weights
can be chosen without looking at the evaluation alphabets their figures are reported on.

Writes bench/results/robustness-<date>-<model version>.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from model.calibrate import TaskKind, expected_calibration_error, sample_task  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.data import load_split, training_splits  # noqa: E402
from model.metanet import MetaNet  # noqa: E402
from model.transform import FINE, PEN, canonical, frame, ink_maps  # noqa: E402

QUERIES = 5  # queries per class of an Omniglot task
PARTS = ("conditions", "uneven", "calibration", "digits")

# ------------------------------------------------------------------------------ conditions
# Each takes drawings as drawn (n, 105, 105) uint8, ink = 1, and a generator, and returns the 8-bit
# grey images (n, H, W) a client would send.


def plain(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 * (1 - ink)).astype(np.uint8)


def inverted(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 * ink).astype(np.uint8)


def _shrunk(ink: np.ndarray, side: int) -> np.ndarray:
    """Each drawing's whole frame area-averaged to side x side, as float ink."""
    return np.stack([np.asarray(Image.fromarray(255 * d).resize((side, side), Image.BOX), np.float32) / 255
                     for d in ink])


def _on_paper(ink: np.ndarray, frame: int, top: int, left: int) -> np.ndarray:
    page = np.zeros((len(ink), frame, frame), np.float32)
    page[:, top : top + ink.shape[1], left : left + ink.shape[2]] = ink
    return np.round(255 * (1 - page)).astype(np.uint8)


def small(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The drawing at 40% of its frame, centred."""
    return _on_paper(_shrunk(ink, 42), 105, 31, 31)


def off_centre(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The drawing at half size in the top-left corner of its frame."""
    return _on_paper(_shrunk(ink, 52), 105, 2, 2)


def _offsets(radius: int, disk: bool) -> list[tuple[int, int]]:
    span = range(-radius, radius + 1)
    return [(dy, dx) for dy in span for dx in span if (dy * dy + dx * dx <= radius * radius) or not disk]


def _morph(ink: np.ndarray, offsets: list[tuple[int, int]], grow: bool) -> np.ndarray:
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.pad(ink.astype(bool), ((0, 0), (r, r), (r, r)))
    h, w = ink.shape[1:]
    out = np.zeros(ink.shape, bool) if grow else np.ones(ink.shape, bool)
    for dy, dx in offsets:
        window = padded[:, r + dy : r + dy + h, r + dx : r + dx + w]
        out = out | window if grow else out & window
    return out.astype(np.uint8)


def thick_pen(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return plain(_morph(ink, _offsets(3, disk=True), grow=True), rng)


def thin_pen(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return plain(_morph(ink, _offsets(1, disk=True), grow=False), rng)


def _fine_pen(ink: np.ndarray, scale: int) -> np.ndarray:
    """Each drawing redrawn at `scale` times its size with a 1-pixel pen (its strokes' skeleton)."""
    from skimage.morphology import skeletonize

    block = np.ones((scale, scale), bool)
    return plain(np.stack([skeletonize(np.kron(d.astype(bool), block)) for d in ink]).astype(np.uint8), None)


def fine_pen(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _fine_pen(ink, 1)


def fine_pen_large_canvas(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _fine_pen(ink, 4)


def turned(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angles = rng.uniform(-15, 15, len(ink))
    return np.stack([np.asarray(Image.fromarray(255 - 255 * d).rotate(a, Image.BILINEAR, fillcolor=255))
                     for d, a in zip(ink, angles, strict=True)])


def sent_at_28(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.round(255 * (1 - _shrunk(ink, 28))).astype(np.uint8)


def photographed(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each drawing as a phone photographs a page: paper at 235 and ink at 40, the light falling off
    by 40% from one edge of the frame to the opposite one (in a direction of its own), sensor
    noise (sigma 6 grey levels) and JPEG at quality 75."""
    rows, cols = np.mgrid[0 : ink.shape[1], 0 : ink.shape[2]] / max(ink.shape[1:])
    out = []
    for drawing, angle in zip(ink, rng.uniform(0, 2 * np.pi, len(ink)), strict=True):
        along = np.cos(angle) * cols + np.sin(angle) * rows
        light = 1 - 0.4 * (along - along.min()) / np.ptp(along)
        grey = light * np.where(drawing > 0, 40.0, 235.0) + rng.normal(0, 6, drawing.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=75)
        out.append(np.asarray(Image.open(buffer)))
    return np.stack(out)


def dusty(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each drawing scanned with dust on the glass: three specks of 2x2 pixels, as dark as the ink,
    at random on the page."""
    page = ink.astype(bool)
    for drawing in page:
        for top, left in rng.integers(0, np.array(drawing.shape) - 1, (3, 2)):
            drawing[top : top + 2, left : left + 2] = True
    return plain(page.astype(np.uint8), rng)


CONDITIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "plain": plain, "inverted polarity": inverted, "small in the frame (40%)": small,
    "off-centre (half size in a corner)": off_centre, "thick pen": thick_pen, "thin pen": thin_pen,
    "fine pen (1-pixel strokes)": fine_pen,
    "fine pen on a 4x canvas (1-pixel strokes at 420x420)": fine_pen_large_canvas,
    "turned up to 15 degrees": turned, "sent at 28x28": sent_at_28,
    "photographed on unevenly lit paper (JPEG)": photographed,
    "scanned with dust (three 2x2 specks)": dusty,
}


def mixed(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image under a condition of its own, all framed to model inputs (sizes differ)."""
    choice = rng.integers(0, len(CONDITIONS), len(ink))
    out = np.empty((len(ink), 28, 28), np.float32)
    for k, make in enumerate(CONDITIONS.values()):
        rows = np.flatnonzero(choice == k)
        if len(rows):
            out[rows] = framed(make(ink[rows], rng))
    return out


# canonical's framing; --box, --centre, --stroke, --fine and --pen compare others (conditions and
# digits: the uneven and calibration parts use the drawings as loaded, in canonical's framing)
FRAMING: dict[str, Any] = {"box": 20, "centre": "mass", "stroke": "as drawn", "fine": FINE, "pen": PEN}


def framed(greys: np.ndarray) -> np.ndarray:
    if FRAMING["stroke"] == "normalised":
        return np.stack([frame(thinned_to_omniglot(ink), box=FRAMING["box"], centre=FRAMING["centre"],
                               fine=FRAMING["fine"], pen=FRAMING["pen"])[0]
                         for ink in ink_maps(greys)])
    return canonical(greys, box=FRAMING["box"], centre=FRAMING["centre"], fine=FRAMING["fine"],
                     pen=FRAMING["pen"])


# --stroke normalised: the alternative to leaving the pen as drawn. Strokes wider, for the glyph's
# size, than Omniglot's median are eroded to it (a glyph under OMNIGLOT_EXTENT pixels is first
# enlarged to about that, so an erosion by whole pixels is fine enough). Width is 4 x the mean
# distance of an ink pixel to the paper (a flat stroke of width w: w / 4).
OMNIGLOT_EXTENT = 72  # a drawing's median longer side in Omniglot's 105x105 frame
STROKE_TO_EXTENT: list[float] = []  # Omniglot's median width / longer side, measured at start


def _extent(mask: np.ndarray) -> int:
    """The longer side of a glyph's ink mask, in pixels."""
    rows, cols = np.nonzero(mask)
    return int(max(np.ptp(rows), np.ptp(cols)) + 1)


def stroke(mask: np.ndarray) -> tuple[float, int, np.ndarray]:
    """(stroke width, longer side, distance to the paper) of a glyph's ink mask."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask)
    return 4 * float(distance[mask].mean()), _extent(mask), distance


def width_ratios(masks: np.ndarray) -> np.ndarray:
    """Each binary glyph's stroke width over its longer side."""
    return np.array([width / extent for width, extent, _ in map(stroke, masks.astype(bool))])


def measure_omniglot_stroke(raw: np.ndarray, seed: int, n: int = 1500) -> float:
    rng = np.random.default_rng(seed)
    chars, drawings = rng.integers(0, raw.shape[0], n), rng.integers(0, raw.shape[1], n)
    return float(np.median(width_ratios(raw[chars, drawings])))


def thinned_to_omniglot(ink: np.ndarray) -> np.ndarray:
    """One ink map (H, W) -> (1, H', W') binary ink, its strokes no wider than Omniglot's."""
    mask = ink >= 0.5 * ink.max()
    if not mask.any():
        return ink[None]
    scale = max(1, round(OMNIGLOT_EXTENT / _extent(mask)))
    if scale > 1:
        big = Image.fromarray(ink).resize((ink.shape[1] * scale, ink.shape[0] * scale), Image.BILINEAR)
        mask = np.asarray(big) >= 0.5 * ink.max()
    width, extent, distance = stroke(mask)
    excess = int((width - STROKE_TO_EXTENT[0] * extent) // 2)
    return (mask & (distance > excess) if excess >= 1 else mask)[None].astype(np.float32)


def model_inputs(condition: str, ink: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    x = mixed(ink, rng) if condition == "mixed" else framed(CONDITIONS[condition](ink, rng))
    return torch.from_numpy(x)[:, None]


# ------------------------------------------------------------------------------------ parts


def omniglot_tasks(raw: np.ndarray, way: int, episodes: int,
                   seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded tasks: per task the (character, drawing) of its support images (one a class) and of
    its queries (QUERIES a class), classes in order."""
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(episodes):
        chars = rng.choice(len(raw), way, replace=False)
        draws = np.stack([rng.choice(raw.shape[1], 1 + QUERIES, replace=False) for _ in chars])
        tasks.append((chars, draws))
    return tasks


class Tally:
    """Per-episode accuracies plus every answer's confidence and correctness."""

    def __init__(self) -> None:
        self.episode_acc: list[float] = []
        self.confidence: list[np.ndarray] = []
        self.correct: list[np.ndarray] = []

    def add(self, probs: torch.Tensor, labels: np.ndarray) -> None:
        confidence, predicted = probs.max(dim=1)
        correct = predicted.numpy() == labels
        self.episode_acc.append(float(correct.mean()))
        self.confidence.append(confidence.numpy())
        self.correct.append(correct)

    def summary(self) -> dict[str, float]:
        acc = np.array(self.episode_acc)
        ci = 1.96 * acc.std(ddof=1) / math.sqrt(len(acc)) if len(acc) > 1 else 0.0
        ece = expected_calibration_error(np.concatenate(self.confidence), np.concatenate(self.correct))
        return {"accuracy": float(acc.mean()), "ci95": float(ci), "episodes": len(acc), "ece": ece}


def run_conditions(model: MetaNet, raw: np.ndarray, way: int, episodes: int, seed: int,
                   conditions: list[str]) -> dict[str, Any]:
    tasks = omniglot_tasks(raw, way, episodes, seed)
    labels = [f"c{k}" for k in range(way)]
    truth_q = np.repeat(np.arange(way), QUERIES)
    out = {}
    for condition in conditions:
        rng = np.random.default_rng(seed + 1)
        tally, self_right, self_total, warned = Tally(), 0, 0, 0
        for chars, draws in tasks:
            queries = raw[chars[:, None], draws[:, 1:]].reshape(-1, *raw.shape[2:])
            ink = np.concatenate([raw[chars, draws[:, 0]], queries])
            x = model_inputs(condition, ink, rng)
            memory = model.register(x[:way], labels)
            tally.add(model.classify(memory, x[way:]).probs, truth_q)
            check = model.check_support(memory, x[:way])
            self_right += int((check.predicted == memory.support_labels).sum())
            self_total += way
            warned += bool(check.confusable) or bool((check.predicted != memory.support_labels).any())
        out[condition] = {**tally.summary(), "support_self": self_right / self_total,
                          "tasks_warned": warned / len(tasks)}
        print(f"  {condition}: {100 * out[condition]['accuracy']:.2f}%", flush=True)
    return out


def run_uneven(model: MetaNet, framed: np.ndarray, way: int, heavy: int, episodes: int,
               seed: int) -> dict[str, Any]:
    """The same tasks balanced (1 shot a class) and with class 0 at `heavy` shots, from the plain
    drawings framed (the split's images: `canonical` of the plain condition)."""
    rng = np.random.default_rng(seed)
    plain_x = torch.from_numpy(framed)
    balanced, uneven, heavy_right, heavy_total = Tally(), Tally(), 0, 0
    light = np.repeat(np.arange(1, way), QUERIES)
    for _ in range(episodes):
        chars = rng.choice(len(framed), way, replace=False)
        draws = [rng.choice(framed.shape[1], heavy + QUERIES, replace=False) for _ in chars]
        support = torch.stack([plain_x[c, d[0]] for c, d in zip(chars, draws, strict=True)])[:, None]
        extra = plain_x[chars[0], draws[0][1:heavy]][:, None]
        queries = torch.stack([plain_x[c, q] for c, d in zip(chars, draws, strict=True)
                               for q in d[heavy:]])[:, None]
        labels = [f"c{k}" for k in range(way)]
        for tally, memory in (
            (balanced, model.register(support, labels)),
            (uneven, model.register(torch.cat([support, extra]), labels + ["c0"] * (heavy - 1))),
        ):
            probs = model.classify(memory, queries).probs
            tally.add(probs[QUERIES:], light)  # the one-shot classes' queries
            if tally is uneven:
                heavy_right += int((probs[:QUERIES].argmax(1) == 0).sum())
                heavy_total += QUERIES
    return {"balanced_one_shot": balanced.summary(), "uneven_one_shot": uneven.summary(),
            "heavy_class_accuracy": heavy_right / heavy_total}


def run_within_alphabet(model: MetaNet, split: Any, episodes: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    tally = Tally()
    kind = TaskKind("5-way 1-shot within one alphabet", 5, within_alphabet=True)
    for _ in range(episodes):
        sx, sy, qx, qy = sample_task(split, kind, rng, QUERIES, torch.device("cpu"))
        memory = model.register(sx, [f"c{int(k)}" for k in sy])
        tally.add(model.classify(memory, qx).probs, qy.numpy())
    return tally.summary()


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16), upscaled bilinearly to 32x32 8-bit
    images, light ink on dark as the data set stores them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small_images = (digits.images * (255 / 16)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(d).resize((32, 32), Image.BILINEAR)) for d in small_images])
    return big, digits.target


def run_digits(model: MetaNet, episodes: int, seed: int, queries: int = 10) -> dict[str, float]:
    images, target = digit_images()
    x = torch.from_numpy(framed(images))[:, None]
    rng = np.random.default_rng(seed)
    tally = Tally()
    for _ in range(episodes):
        picks = [rng.choice(np.flatnonzero(target == d), 1 + queries, replace=False) for d in range(10)]
        support = x[[p[0] for p in picks]]
        query_rows = np.concatenate([p[1:] for p in picks])
        memory = model.register(support, [str(d) for d in range(10)])
        tally.add(model.classify(memory, x[query_rows]).probs, np.repeat(np.arange(10), queries))
    return tally.summary()


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="weights directory (default: the shipped weights)")
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    parser.add_argument("--episodes", type=int, default=300, help="tasks per setting (300)")
    parser.add_argument("--way", type=int, default=20, help="classes of the condition tasks (20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphabets", choices=("evaluation", "validation"), default="evaluation",
                        help="Omniglot alphabets the tasks draw from: the evaluation set, or the "
                             "background alphabets held out for validation, to choose weights by "
                             "(evaluation)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 tasks a setting, 5-way, one uneven setting a way")
    parser.add_argument("--out", help="result file (default bench/results/robustness-<date>-<version>.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run ({','.join(PARTS)})")
    parser.add_argument("--conditions", default=",".join([*CONDITIONS, "mixed"]),
                        help="which conditions to run, comma-separated (default: all)")
    parser.add_argument("--box", type=int, default=20,
                        help="framing: the glyph box's side in the 28-pixel input, to compare framings (20)")
    parser.add_argument("--centre", choices=("box", "mass"), default="mass",
                        help="framing: centre the glyph by its ink's mass or by its box (mass)")
    parser.add_argument("--stroke", choices=("as drawn", "normalised"), default="as drawn",
                        help="framing: leave strokes as drawn, or erode those wider than Omniglot's "
                             "to its width (as drawn)")
    parser.add_argument("--fine", type=float, default=FINE,
                        help=f"framing: widen strokes finer than this share of the glyph's longer side; "
                             f"0 leaves every pen as drawn ({FINE})")
    parser.add_argument("--pen", type=float, default=PEN,
                        help=f"framing: the width fine strokes are widened to, as a share of the glyph's "
                             f"longer side ({PEN})")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    conditions = [c for c in args.conditions.split(",") if c]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes some of {', '.join(PARTS)}")
    if not conditions or set(conditions) - {*CONDITIONS, "mixed"}:
        parser.error(f"--conditions takes some of {', '.join([*CONDITIONS, 'mixed'])}")
    if not 4 <= args.box <= 28:
        parser.error("--box must be 4 to 28")
    if not (0 <= args.fine <= args.pen <= 1):
        parser.error("--fine and --pen are shares of the glyph's side: 0 <= fine <= pen <= 1")
    FRAMING.update(box=args.box, centre=args.centre, stroke=args.stroke, fine=args.fine, pen=args.pen)
    heavies = (2, 3, 5)
    if args.quick:
        args.episodes, args.way, heavies = 2, 5, (3,)
    if args.episodes < 2:
        parser.error("--episodes must be at least 2 (a confidence interval needs two)")
    if not 2 <= args.way <= 50:
        parser.error("--way must be 2 to 50")
    started = time.perf_counter()
    model = load_model(args.weights)
    omniglot = (training_splits(args.data_dir)[1] if args.alphabets == "validation"
                else load_split(args.data_dir, "evaluation"))
    assert omniglot.raw is not None
    if args.stroke == "normalised":
        STROKE_TO_EXTENT[:] = [measure_omniglot_stroke(omniglot.raw, args.seed)]
        FRAMING["stroke_to_extent"] = round(STROKE_TO_EXTENT[0], 4)
    command = "python bench/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(), "commit": git_commit(), "model_version": model.version,
        "temperatures": {str(w): round(float(model.temperature[w]), 4) for w in sorted({args.way, 5, 10})},
        "date": dt.date.today().isoformat(),
        "alphabets": args.alphabets, "episodes": args.episodes, "way": args.way, "seed": args.seed,
        "framing": dict(FRAMING),
    }
    if "conditions" in parts:
        print(f"{model.version}: conditions, {args.way}-way 1-shot, {args.episodes} tasks each", flush=True)
        result["conditions"] = run_conditions(model, omniglot.raw, args.way, args.episodes, args.seed,
                                              conditions)
    if "uneven" in parts:
        result["uneven"] = {}
        for way in (5, 20):
            for heavy in heavies:
                result["uneven"][f"{way}-way, one class of {heavy}"] = run_uneven(
                    model, omniglot.images, way, heavy, args.episodes, args.seed)
                print(f"  uneven {way}-way, one class of {heavy}: done", flush=True)
    if "calibration" in parts:
        result["within_alphabet_5way"] = run_within_alphabet(model, omniglot, args.episodes, args.seed)
        result["calibration"] = {"5-way 1-shot within one alphabet": result["within_alphabet_5way"]["ece"]}
        if "plain" in result.get("conditions", {}):
            result["calibration"][f"{args.way}-way 1-shot"] = result["conditions"]["plain"]["ece"]
    if "digits" in parts:
        result["digits_10way_1shot"] = run_digits(model, args.episodes, args.seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    suffix = ("-validation" if args.alphabets == "validation" else "") + ("-quick" if args.quick else "")
    name = f"robustness-{result['date']}-{model.version}{suffix}.json"
    path = Path(args.out) if args.out else REPO / "bench" / "results" / name
    write_result(result, path, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    lines = [f"`{result['command']}` on {result['model_version']} ({result['episodes']} tasks a setting, "
             f"{result['alphabets']} alphabets)"]
    if "conditions" in result:
        lines += ["", f"| condition ({result['way']}-way 1-shot) | accuracy | 95% CI | ECE "
                  "| support images as their own label | tasks warned |", "|---|---|---|---|---|---|"]
    for name, row in result.get("conditions", {}).items():
        lines.append(f"| {name} | {pct(row['accuracy'])} | ± {pct(row['ci95'])} | {row['ece']:.3f} "
                     f"| {pct(row['support_self'])} | {pct(row['tasks_warned'])} |")
    if "uneven" in result:
        lines += ["", "| uneven support set | one-shot classes, balanced | one-shot classes, uneven "
                  "| heavy class |", "|---|---|---|---|"]
    for name, row in result.get("uneven", {}).items():
        lines.append(f"| {name} | {pct(row['balanced_one_shot']['accuracy'])} "
                     f"| {pct(row['uneven_one_shot']['accuracy'])} | {pct(row['heavy_class_accuracy'])} |")
    lines.append("")
    if "within_alphabet_5way" in result:
        within = result["within_alphabet_5way"]
        lines.append(f"5-way 1-shot within one alphabet: {pct(within['accuracy'])} ± {pct(within['ci95'])}, "
                     f"ECE {within['ece']:.3f}")
    if "digits_10way_1shot" in result:
        digits = result["digits_10way_1shot"]
        lines.append(f"scikit-learn digits, 10-way 1-shot: {pct(digits['accuracy'])} "
                     f"± {pct(digits['ci95'])}, ECE {digits['ece']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
