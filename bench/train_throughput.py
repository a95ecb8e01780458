"""Meta-training throughput against episodes per optimizer step: episodes a second for each B of
--episodes-per-step at a few episode shapes, and each one's ratio to B = 1 measured in the same run.

    python bench/train_throughput.py                                # on cuda if there is one, else cpu
    python bench/train_throughput.py --modes fp32,bf16,compile,bf16+compile --seconds 300
    python bench/train_throughput.py --channels 8 --steps 1 --warmup 0 --out /tmp/t.json   # smoke run

A row times --steps optimizer steps after --warmup more (`model.train.train_step`, what `metanet
train` runs: the episodes drawn and augmented, the loss, backward, clipping and Adam; B = 1 in fp32
takes `episode_loss`, as training does), each row with a fresh model of the same seed, and
torch.cuda.synchronize around the timer on a GPU; --row-seconds ends a row's timing early (after one
step at least). Shapes are WAYxSHOTxQUERIES (queries a class) or `mix`: the training mix of the
paper preset (model.config.PRESETS), its sizes drawn in the same seeded order for every B. Modes:
fp32; bf16 (TrainConfig.bf16); compile (TrainConfig.compile: compiling happens in the warm-up, and
in the timed steps for each new shape of the mix); bf16+compile. A row that runs out of GPU memory
is recorded as such and the run goes on. Rows left when --seconds have passed are recorded as
skipped. Writes bench/results/train-throughput-<date>-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from model.config import PRESETS, TrainConfig  # noqa: E402
from model.data import EpisodeSampler, OmniglotSplit, load_split, train_val_split  # noqa: E402
from model.metanet import MetaNet  # noqa: E402
from model.train import augment_of, batched_loss_fn, is_batched, sample_episode_size, train_step  # noqa: E402

MODES = {"fp32": {}, "bf16": {"bf16": True}, "compile": {"compile": True},
         "bf16+compile": {"bf16": True, "compile": True}}
SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)|mix")
DEFAULT_SHAPES = "5x1x10,20x1x5,mix"


def device_slug(device: str) -> str:
    """'cpu', or the GPU's name as a file name part: 'nvidia-h200'."""
    if device.startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes-per-step", default="1,2,4,8,16", help="B values, comma-separated")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="WAYxSHOTxQUERIES (queries a class) or mix, comma-separated")
    parser.add_argument("--modes", default="fp32", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps a row (at most)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--row-seconds", type=float, default=0.0,
                        help="end a row's timing after this long (0: no limit)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="skip the rows left after this long (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                        help="the recipe: model, episode mix, augmentation")
    parser.add_argument("--channels", type=int, help="conv width (64; smaller for smoke runs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    parser.add_argument("--out", type=Path, help="the JSON record (default: bench/results/train-throughput-"
                        "<date>-<device>.json)")
    args = parser.parse_args(argv)
    try:
        args.bs = [int(v) for v in args.episodes_per_step.split(",")]
    except ValueError:
        parser.error(f"--episodes-per-step takes comma-separated integers, not {args.episodes_per_step!r}")
    if not args.bs or min(args.bs) < 1:
        parser.error(f"--episodes-per-step values must be at least 1, got {args.episodes_per_step!r}")
    args.shape_list = args.shapes.split(",")
    if not all(SHAPE.fullmatch(s) for s in args.shape_list):
        parser.error(f"--shapes takes WAYxSHOTxQUERIES or mix, comma-separated, not {args.shapes!r}")
    args.mode_list = args.modes.split(",")
    if not all(m in MODES for m in args.mode_list):
        parser.error(f"--modes takes {', '.join(MODES)}, comma-separated, not {args.modes!r}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def base_config(preset: str, channels: int | None) -> TrainConfig:
    cfg = PRESETS[preset]
    if channels:
        model = dataclasses.replace(cfg.model, channels=channels, rep_dim=channels, hidden_dim=channels)
        cfg = dataclasses.replace(cfg, model=model)
    return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_row(cfg: TrainConfig, shape: str, split: OmniglotSplit, device: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    """One (shape, mode, B): seconds of the timed steps and the episodes they trained."""
    torch.manual_seed(0)
    model = MetaNet(cfg.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    sampler = EpisodeSampler(split, rotate=cfg.rotate, device=device, augment=augment_of(cfg))
    loss_fn = batched_loss_fn(model, cfg) if is_batched(cfg) else None
    rng, sizes = np.random.default_rng(0), np.random.default_rng(1)
    fixed = SHAPE.fullmatch(shape)
    assert fixed is not None

    def size() -> tuple[int, int | list[int], int]:
        if shape == "mix":
            return sample_episode_size(cfg, sizes, sampler.n_drawings)
        way, shot, queries = (int(v) for v in fixed.groups())
        return way, shot, queries

    def step() -> None:
        train_step(model, optimizer, sampler, rng, cfg, cfg.lr, loss_fn, size())

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    steps, start = 0, time.perf_counter()
    while steps < args.steps:
        step()
        steps += 1
        if args.row_seconds and time.perf_counter() - start > args.row_seconds:
            _sync(device)
            if time.perf_counter() - start > args.row_seconds:
                break
    _sync(device)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"steps": steps, "seconds": round(seconds, 4),
                           "ms_per_step": round(1000 * seconds / steps, 2),
                           "episodes_per_s": round(steps * cfg.episodes_per_step / seconds, 3)}
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def run(args: argparse.Namespace, split: OmniglotSplit | None = None) -> dict[str, Any]:
    """Every row of `args` (from `parse_args`) on `split` (default: the training alphabets)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    base = base_config(args.preset, args.channels)
    if split is None:
        split, _ = train_val_split(load_split(args.data_dir, "background", base.model.image_size))
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for shape in args.shape_list:
        for mode in args.mode_list:
            for b in args.bs:
                row: dict[str, Any] = {"shape": shape, "mode": mode, "episodes_per_step": b}
                if args.seconds and time.monotonic() - started > args.seconds:
                    rows.append({**row, "skipped": "out of time (--seconds)"})
                    continue
                cfg = dataclasses.replace(base, episodes_per_step=b, **MODES[mode])
                try:
                    row.update(time_row(cfg, shape, split, device, args))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of GPU memory"
                    torch.cuda.empty_cache()
                except RuntimeError as exc:
                    if "cudnn" not in str(exc).lower() or not torch.backends.cudnn.enabled:
                        raise
                    # As cuDNN's LSTM once refused the meta learner's batch of ~150k coordinates
                    # per episode: PyTorch's own kernels from here on, and the record says so.
                    torch.backends.cudnn.enabled = False
                    row["note"] = f"cuDNN refused ({str(exc)[:160]}); off from this row on"
                    row.update(time_row(cfg, shape, split, device, args))
                if "compile" in mode:
                    torch._dynamo.reset()  # each row compiles its own model's read
                rows.append(row)
                print(row, flush=True)
    for row in rows:  # ratios to B = 1 of the same shape: in its mode, and in fp32
        for key, mode in (("vs_b1", row["mode"]), ("vs_fp32_b1", "fp32")):
            ref = next((r for r in rows if "episodes_per_s" in r
                        and (r["shape"], r["mode"], r["episodes_per_step"]) == (row["shape"], mode, 1)), None)
            if ref is not None and "episodes_per_s" in row:
                row[key] = round(row["episodes_per_s"] / ref["episodes_per_s"], 3)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"command": " ".join(["python", "bench/train_throughput.py", *args.argv]),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
            "torch": torch.__version__, "device": name, "threads": torch.get_num_threads(),
            "preset": args.preset, "model": base.model.to_dict(), "steps": args.steps, "warmup": args.warmup,
            "row_seconds": args.row_seconds, "seconds": round(time.monotonic() - started, 1), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    nan = float("nan")
    lines = [f"Training throughput on {result['device']} "
             f"(torch {result['torch']}, {result['threads']} threads)",
             "", "| shape | mode | B | steps | ms/step | episodes/s | x B=1 | x fp32 B=1 | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "episodes_per_s" not in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['episodes_per_step']} | "
                         f"{r.get('error') or r.get('skipped')} | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['mode']} | {r['episodes_per_step']} | {r['steps']} | "
                     f"{r['ms_per_step']:.1f} | {r['episodes_per_s']:.2f} | {r.get('vs_b1', nan):.2f} | "
                     f"{r.get('vs_fp32_b1', nan):.2f} | {r.get('peak_gib', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    out = args.out or (REPO / "bench" / "results"
                       / f"train-throughput-{dt.date.today()}-{device_slug(args.device)}.json")
    result = run(args)
    write_result(result, out, markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
