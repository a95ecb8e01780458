"""Meta-training on a GPU machine in one call: check the device, time training throughput briefly,
train with several episodes a step for a time budget, evaluate the best weights on the evaluation
alphabets, and archive it all in one folder, all within a wall-clock limit.

    python3 bench/gpu_train.py --out $OUT --minutes 10 --limit-minutes 9.5  # resume a copy of runs/metanet
    python3 bench/gpu_train.py --out $OUT --from-scratch --preset paper --minutes 10
    python3 bench/gpu_train.py --out /tmp/o --device cpu --channels 8 ...   # a smoke run (the test's)

Phases, in order, each inside the limit (--limit-minutes, from the start of this command):
1. the device: its name, memory and torch's versions; a probe step at the largest episode of the
   recipe's mix (halving episodes a step until one fits in memory, and turning cuDNN off if its
   kernels refuse the meta learners' batch, as an LSTM over millions of coordinates once did);
2. `bench/train_throughput.py` for --bench-seconds (its record, with the GPU's figures, is kept);
3. training (`model.train.train`, with --episodes-per-step and the options) for --minutes, or less
   if the limit needs it, on a copy of --resume-from (default runs/metanet: the committed
   checkpoint, never written to) or, with --from-scratch, a new run of the named preset
   (model.config.PRESETS); validations keep the best weights in best/ (and, in a run with
   average_decay, the weights' moving average in average/);
4. `metanet evaluate` at each --eval-ways, one-shot, --eval-episodes (seed 0, 5 queries a class,
   the evaluation alphabets, or the 423 test characters for a run on the 1,200 / 423 split:
   `--preset paper-1200`), on best/, fewer episodes if the time left needs it (the record says);
5. the archive, in --out (default $OUT): run.tar.gz (last/: weights, Adam and RNG state, which
   `metanet train --resume` continues; best/; average/; history.jsonl; train_config.json; curve.png),
   gpu-train-<date>-<device>.json (device, recipe, timings, training state, evaluations),
   train-throughput-<date>-<device>.json and gpu-train.log (everything printed).

Unpack the run with `tar xzf run.tar.gz -C <run dir>` and continue it anywhere with `metanet train
--resume --run-dir <run dir>`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import train_throughput  # noqa: E402  (run as a script: the repository first)
from model.checkpoint import load_model  # noqa: E402
from model.config import PRESETS, TrainConfig  # noqa: E402
from model.data import EpisodeSampler, OmniglotSplit, scoring_split, training_splits  # noqa: E402
from model.evaluate import evaluate  # noqa: E402
from model.metanet import MetaNet  # noqa: E402
from model.train import augment_of, batched_loss_fn, is_batched, train, train_step  # noqa: E402

ARCHIVED = ("last", "best", "average", "history.jsonl", "train_config.json", "curve.png")
EVAL_SHARE_MIN_SECONDS = 5.0  # an evaluation given less than this is skipped, not started


class Tee:
    """Writes to a stream and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                        help="where the archive, the records and the log go (default: $OUT)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training's time budget")
    parser.add_argument("--limit-minutes", type=float,
                        help="the whole command's wall-clock limit (default: --minutes + 4)")
    parser.add_argument("--resume-from", type=Path, default=REPO / "runs" / "metanet",
                        help="the run to continue (copied; never written to)")
    parser.add_argument("--from-scratch", action="store_true", help="a new run of --preset instead")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                        help="the recipe of a run from scratch (and of the throughput bench)")
    parser.add_argument("--episodes-per-step", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="TrainConfig.bf16: autocast of the conv trunks")
    parser.add_argument("--compile", action="store_true", help="TrainConfig.compile: the read compiled")
    parser.add_argument("--lr", type=float, help="Adam's rate from now on (default: the run's or preset's)")
    parser.add_argument("--val-every", type=int, default=5000,
                        help="episodes between validations (300 20-way episodes take ~25 s on an H200)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="any other TrainConfig field, e.g. --set val_every=5000")
    parser.add_argument("--channels", type=int, help="conv width of a run from scratch (smoke runs)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for smoke runs")
    parser.add_argument("--bench-seconds", type=float, default=60.0, help="0 skips the throughput bench")
    parser.add_argument("--bench-modes", default="fp32", help="the bench's --modes")
    parser.add_argument("--bench-shapes", default=train_throughput.DEFAULT_SHAPES)
    parser.add_argument("--bench-episodes-per-step", default="1,2,4,8,16")
    parser.add_argument("--eval-ways", default="5,20", help="one-shot ways to evaluate, comma-separated")
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--eval-seconds", type=float, default=150.0,
                        help="kept for the evaluations out of the limit")
    parser.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required where $OUT is not set")
    if args.limit_minutes is None:
        args.limit_minutes = args.minutes + 4
    if args.episodes_per_step < 1 or args.minutes < 0 or args.limit_minutes <= 0:
        parser.error("--episodes-per-step must be at least 1, --minutes at least 0, --limit-minutes above 0")
    try:
        args.eval_way_list = [int(v) for v in args.eval_ways.split(",") if v]
    except ValueError:
        parser.error(f"--eval-ways takes comma-separated integers, not {args.eval_ways!r}")
    args.overrides = {}
    for item in args.set:  # checked now, not after minutes of loading and training
        field, _, value = item.partition("=")
        if field not in TrainConfig.__dataclass_fields__ or field == "model":
            parser.error(f"--set {item!r}: {field!r} is not a TrainConfig field")
        try:
            args.overrides[field] = json.loads(value)
        except ValueError:
            parser.error(f"--set {item!r}: the value must be JSON (a number, true/false, a list ...)")
    if not args.from_scratch and not (args.resume_from / "last" / "state.json").is_file():
        parser.error(f"--resume-from {args.resume_from}: no last/state.json there (or give --from-scratch)")
    return args


def check_device(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name="cpu", threads=torch.get_num_threads())
    return info


def recipe(args: argparse.Namespace, run: Path) -> TrainConfig:
    """The run's config (resumed) or the preset's (from scratch), with this command's settings."""
    if args.from_scratch:
        cfg = PRESETS[args.preset]
        if args.channels:
            model = dataclasses.replace(cfg.model, channels=args.channels, rep_dim=args.channels,
                                        hidden_dim=args.channels)
            cfg = dataclasses.replace(cfg, model=model)
    else:
        cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    overrides: dict[str, Any] = {"episodes": max(cfg.episodes, 10_000_000),  # the clock ends the run
                                 "episodes_per_step": args.episodes_per_step, "bf16": args.bf16,
                                 "compile": args.compile, "val_every": args.val_every}
    if args.lr is not None:
        overrides["lr"] = args.lr
    overrides.update(args.overrides)
    return TrainConfig.from_dict({**cfg.to_dict(), **overrides})


def largest_size(cfg: TrainConfig, n_drawings: int) -> tuple[int, int, int]:
    """The mix's largest episode, as (n_way, shots, n_query): the most support examples, then the
    most queries (bounds of `model.train.sample_episode_size`): memory's worst case."""
    sizes = []
    for n_way in range(cfg.min_way, cfg.max_train_way + 1):
        most = max(1, min(cfg.max_shot, cfg.model.max_examples // n_way, 60 // n_way))
        n_query = max(1, min(cfg.query_per_class, cfg.max_queries // n_way, n_drawings - most))
        sizes.append((n_way * most, n_way * n_query, n_way, most, n_query))
    _, _, n_way, shots, n_query = max(sizes)
    return n_way, shots, n_query


def probe(cfg: TrainConfig, split: OmniglotSplit, device: str) -> tuple[TrainConfig, list[str]]:
    """One step at the mix's largest episode; fewer episodes a step while it runs out of memory,
    cuDNN off if it refuses. Returns the config that fits and what was changed."""
    notes: list[str] = []
    size = largest_size(cfg, split.images.shape[1])
    while True:
        try:
            torch.manual_seed(0)
            model = MetaNet(cfg.model).to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            sampler = EpisodeSampler(split, rotate=cfg.rotate, device=device, augment=augment_of(cfg))
            loss_fn = batched_loss_fn(model, cfg) if is_batched(cfg) else None
            started = time.perf_counter()
            step = train_step(model, optimizer, sampler, np.random.default_rng(0), cfg, cfg.lr, loss_fn, size)
            loss = step.loss.item()
            print(f"probe: {size[0]}-way {size[1]}-shot {size[2]} queries x {cfg.episodes_per_step} episodes "
                  f"a step: loss {loss:.3f}, {time.perf_counter() - started:.2f} s (first step)", flush=True)
            if device.startswith("cuda"):
                print(f"probe: peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB", flush=True)
            return cfg, notes
        except torch.cuda.OutOfMemoryError:
            if cfg.episodes_per_step == 1:
                raise
            notes.append(f"out of memory at {cfg.episodes_per_step} episodes a step: halved")
            cfg = dataclasses.replace(cfg, episodes_per_step=cfg.episodes_per_step // 2)
        except RuntimeError as exc:
            if "cudnn" not in str(exc).lower() or not torch.backends.cudnn.enabled:
                raise
            notes.append(f"cuDNN refused ({str(exc)[:200]}): turned off")
            torch.backends.cudnn.enabled = False
        finally:
            model = optimizer = loss_fn = None  # type: ignore[assignment]
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        print("probe:", notes[-1], flush=True)


def run_bench(args: argparse.Namespace, split: OmniglotSplit, seconds: float) -> dict[str, Any] | None:
    if seconds <= 0:
        return None
    argv = ["--device", args.device, "--preset", args.preset, "--seconds", str(seconds),
            "--modes", args.bench_modes, "--shapes", args.bench_shapes,
            "--episodes-per-step", args.bench_episodes_per_step, "--warmup", "1", "--steps", "10",
            "--row-seconds", "2"]
    if args.channels:
        argv += ["--channels", str(args.channels)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    bench_args = train_throughput.parse_args(argv)
    bench_args.argv = argv
    result = train_throughput.run(bench_args, split)
    path = args.out / f"train-throughput-{dt.date.today()}-{train_throughput.device_slug(args.device)}.json"
    train_throughput.write_result(result, path, train_throughput.markdown(result))
    return result


def run_evaluations(args: argparse.Namespace, weights: Path, deadline: float) -> list[dict[str, Any]]:
    """One-shot accuracy of `weights` at each --eval-ways, as `metanet evaluate --seed 0` gives it,
    over as many of --eval-episodes as the time left allows (the first 10 time an episode)."""
    model = load_model(weights, args.device)
    test = scoring_split(args.data_dir, args.split, model.config.image_size)
    results = []
    for i, way in enumerate(args.eval_way_list):
        share = (deadline - time.monotonic()) / (len(args.eval_way_list) - i)
        if way > min(model.max_way, len(test.images)):
            results.append({"way": way, "shot": 1, "skipped": f"above the weights' max_way {model.max_way} "
                            f"or the {len(test.images)} test characters"})
            continue
        if share < EVAL_SHARE_MIN_SECONDS:
            results.append({"way": way, "shot": 1, "skipped": "out of time"})
            continue
        started = time.monotonic()
        evaluate(model, test, way=way, shot=1, episodes=min(10, args.eval_episodes), seed=0)
        per_episode = (time.monotonic() - started) / min(10, args.eval_episodes)
        episodes = max(2, min(args.eval_episodes, int(0.9 * (share - per_episode * 10) / per_episode)))
        result = evaluate(model, test, way=way, shot=1, episodes=episodes, seed=0)
        record = {**result.to_dict(), "model_version": model.version, "weights": weights.name,
                  "episodes_asked": args.eval_episodes, "seconds": round(time.monotonic() - started, 1)}
        print(json.dumps(record), flush=True)
        results.append(record)
    return results


def archive(run: Path, target: Path) -> None:
    with tarfile.open(target, "w:gz") as tar:
        for name in ARCHIVED:
            if (run / name).exists():
                tar.add(run / name, arcname=name,
                        filter=lambda info: None if info.name.endswith(".tmp") else info)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    deadline = started + 60 * args.limit_minutes
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpu-train.log", "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)), \
            contextlib.redirect_stderr(Tee(sys.stderr, log)):
        return _main(args, started, deadline)


def _main(args: argparse.Namespace, started: float, deadline: float) -> int:
    record: dict[str, Any] = {"command": " ".join(["python3", "bench/gpu_train.py", *sys.argv[1:]]),
                              "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "limit_minutes": args.limit_minutes, "phases": {}}
    phases = record["phases"]

    def phase_done(name: str, since: float) -> float:
        now = time.monotonic()
        phases[name] = round(now - since, 1)
        return now

    record["device"] = check_device(args.device)
    print("device:", json.dumps(record["device"]), flush=True)
    t = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    run = work / "run"
    run.mkdir()
    if args.from_scratch:
        record["first_step"], record["start"] = 0, f"from scratch, preset {args.preset}"
    else:
        for name in ("last", "train_config.json", "history.jsonl", "best", "average"):
            source = args.resume_from / name
            if source.is_dir():
                shutil.copytree(source, run / name, ignore=shutil.ignore_patterns("*.tmp"))
            elif source.is_file():
                shutil.copy2(source, run / name)
        record["first_step"] = json.loads((run / "last" / "state.json").read_text())["step"]
        record["start"] = f"resumed from {args.resume_from} at step {record['first_step']}"
    cfg = recipe(args, run)
    args.split = record["split"] = cfg.split
    splits = training_splits(args.data_dir, cfg.split, cfg.model.image_size)
    t = phase_done("load", t)
    cfg, record["probe_notes"] = probe(cfg, splits[0], args.device)
    t = phase_done("probe", t)

    evaluation_and_archive = args.eval_seconds + 20
    left = deadline - time.monotonic() - evaluation_and_archive
    bench_seconds = min(args.bench_seconds, max(0.0, left) / 3)
    bench = run_bench(args, splits[0], bench_seconds)
    record["bench"] = None if bench is None else f"train-throughput-{dt.date.today()}-" \
        f"{train_throughput.device_slug(args.device)}.json"
    t = phase_done("bench", t)

    train_seconds = max(0.0, min(60 * args.minutes, deadline - time.monotonic() - evaluation_and_archive))
    record["recipe"] = cfg.to_dict()
    print(f"training {train_seconds:.0f} s, {cfg.episodes_per_step} episodes a step,", record["start"],
          flush=True)
    state = train(cfg, run, device=args.device, resume=not args.from_scratch, max_seconds=train_seconds,
                  progress=False, splits=splits)
    t = phase_done("train", t)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line]
    for row in history:
        if row["step"] > record["first_step"]:
            print(json.dumps(row), flush=True)
    saved = json.loads((run / "last" / "state.json").read_text())
    record["state"] = {"step": state.step, "best_val": state.best_val, "lr": state.lr,
                       "training_seconds_all_runs": round(saved["seconds"], 1)}
    record["episodes_trained"] = state.step - record["first_step"]
    record["episodes_per_s"] = round(record["episodes_trained"] / max(phases["train"], 1e-9), 2)
    print(f"trained {record['episodes_trained']} episodes in {phases['train']:.0f} s "
          f"({record['episodes_per_s']} a second) to step {state.step}; best validation "
          f"{state.best_val if state.best_val >= 0 else 'none yet'}", flush=True)

    path = args.out / f"gpu-train-{dt.date.today()}-{train_throughput.device_slug(args.device)}.json"
    archive(run, args.out / "run.tar.gz")
    path.write_text(json.dumps(record, indent=2) + "\n")  # now, in case the evaluations overrun
    record["evaluations"] = run_evaluations(args, run / "best", deadline - 20)
    phase_done("evaluate", t)
    record["seconds"] = round(time.monotonic() - started, 1)
    path.write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} in {record['seconds']:.0f} s (limit {60 * args.limit_minutes:.0f} s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
