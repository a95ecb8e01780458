"""The model's own commands, for `metanet`: train, evaluate, calibrate, average and export-onnx.

Each imports what it needs when it runs, so the command line starts without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import TRAINING_SPLITS  # a plain module: no torch

if TYPE_CHECKING:
    from model.data import OmniglotSplit
    from model.metanet import MetaNet


def add_model_commands(sub: argparse._SubParsersAction, output: argparse.ArgumentParser) -> None:
    """Register the commands; `output` is the parent parser of the --json option."""
    _add_train(sub)
    _add_evaluate(sub, output)
    _add_calibrate(sub)
    _add_average(sub)
    _add_export_onnx(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="meta-train MetaNet on Omniglot background alphabets")
    p.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    p.add_argument("--run-dir", default="runs/metanet", help="checkpoints, history and curve go here")
    p.add_argument("--split", choices=TRAINING_SPLITS,
                   help="characters to train on: the background set less 4 validation alphabets "
                        "(default), or the 1,200 of the 1,200 / 423 split")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last")
    p.add_argument("--episodes", type=int, help="total training episodes")
    p.add_argument("--max-seconds", type=float, help="stop (with a checkpoint) after this long")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-episodes", type=int)
    p.add_argument("--val-ways", type=_ints, help="1-shot validation ways, comma-separated (default 5,20)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--min-way", type=int, help="smallest n_way of a training episode")
    p.add_argument("--max-train-way", type=int, help="largest n_way of a training episode")
    p.add_argument("--way-power", type=float,
                   help="draw n_way with probability proportional to n_way ** -this (0: uniformly; "
                        "1: 5-way episodes ten times as often as 50-way)")
    p.add_argument("--lr", type=float, help="Adam's learning rate (on --resume: the rate from now on)")
    p.add_argument("--lr-patience", type=int,
                   help="halve the rate when validation has not improved for this many episodes (0: never)")
    p.add_argument("--multi-shot-prob", type=float,
                   help="the share of episodes with 2..max_shot shots a class")
    p.add_argument("--uneven-prob", type=float,
                   help="the share of episodes whose classes each draw their own number of shots")
    p.add_argument("--augment-prob", type=float,
                   help="the share of drawings augmented (pen, small turns and shifts, low resolution)")
    p.add_argument("--augment-pen-max", type=int,
                   help="the widest pen of the augmentation: strokes dilated by up to this many pixels "
                        "of Omniglot's 105x105 frame")
    p.add_argument("--augment-episode-pen", type=float,
                   help="the share of episodes whose drawings all have one pen, thinner or thicker")
    p.add_argument("--average-decay", type=float,
                   help="keep a moving average of the weights, moved (1 - this) of the way to them "
                        "every episode (0.999: about the last 1,000 episodes; 0: none)")
    p.add_argument("--channels", type=int, help="conv width (64 in the paper; smaller for smoke tests)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import torch

    from model.config import TrainConfig
    from model.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    saved = Path(args.run_dir) / "train_config.json"
    resuming = args.resume and saved.is_file()
    cfg = TrainConfig.from_dict(json.loads(saved.read_text())) if resuming else TrainConfig()
    overrides = {
        k: getattr(args, k)
        for k in ("episodes", "seed", "val_every", "val_episodes", "val_ways", "checkpoint_every", "min_way",
                  "max_train_way", "way_power", "lr", "lr_patience", "multi_shot_prob", "uneven_prob",
                  "augment_prob", "augment_pen_max", "augment_episode_pen", "average_decay", "split")
        if getattr(args, k) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    if args.channels:
        model_cfg = dataclasses.replace(cfg.model, channels=args.channels, rep_dim=args.channels,
                                        hidden_dim=args.channels)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    state = train(cfg, args.run_dir, data_dir=args.data_dir, device=args.device, resume=args.resume,
                  max_seconds=args.max_seconds, progress=not args.no_progress)
    print(json.dumps({"step": state.step, "best_val": state.best_val, "run_dir": args.run_dir}))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction, output: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", help="N-way K-shot accuracy on the evaluation alphabets", parents=[output])
    p.add_argument("--weights", help="weights directory (default: the shipped weights)")
    p.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--queries", type=int, default=5, help="queries per class per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--m-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="hold each task's M in this dtype between registering and classifying, as the "
                   "service does with METANET_M_DTYPE (default float32)")
    p.add_argument("--test-set", choices=("evaluation", "423"), default="evaluation",
                   help="score on the evaluation alphabets (default) or on the 423 test characters of "
                        "the 1,200 / 423 split (weights trained with split 1200)")
    p.add_argument("--within-alphabet", action="store_true",
                   help="draw each task's classes from one alphabet (characters that look alike)")
    p.add_argument("--plot", metavar="PNG", help="evaluate the grid --ways x --shots (--episodes a point) "
                   "and write accuracy against n_way, one line per n_shot, to this PNG")
    p.add_argument("--ways", type=_ints, default=(5, 10, 20, 50), help="the grid's n_way values (5,10,20,50)")
    p.add_argument("--shots", type=_ints, default=(1, 5), help="the grid's n_shot values (1,5)")
    p.set_defaults(func=_evaluate)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _evaluate(args: argparse.Namespace) -> int:
    from model.checkpoint import load_model
    from model.data import load_split, scoring_split
    from model.evaluate import M_DTYPES, evaluate

    if args.plot:
        _check_matplotlib()  # before the grid's minutes of work, not after
    model = load_model(args.weights, args.device)
    if args.test_set == "423":
        split = scoring_split(args.data_dir, "1200", model.config.image_size)
    else:
        split = load_split(args.data_dir, "evaluation", model.config.image_size)
    if args.plot:
        return _evaluate_grid(args, model, split)
    result = evaluate(model, split, way=args.way, shot=args.shot, episodes=args.episodes,
                      seed=args.seed, queries_per_class=args.queries, m_dtype=M_DTYPES[args.m_dtype],
                      progress=not args.json, within_alphabet=args.within_alphabet)
    out = {**result.to_dict(), "model_version": model.version, "test_set": args.test_set}
    if args.json:
        print(json.dumps(out))
    else:
        where = " within one alphabet" if args.within_alphabet else ""
        print(f"{args.way}-way {args.shot}-shot{where} over {args.episodes} episodes, M in {args.m_dtype}: "
              f"{100 * result.accuracy:.2f}% ± {100 * (result.ci95 or 0.0):.2f} (95% CI), "
              f"ECE {result.ece:.3f}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the confidence temperatures on the validation alphabets")
    p.add_argument("--weights", required=True, help="weights directory: the temperatures are saved into it")
    p.add_argument("--data-dir", help="Omniglot directory (default: $METANET_OMNIGLOT_DIR)")
    p.add_argument("--episodes", type=int, default=200, help="tasks of each kind to fit on (200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from model.calibrate import FIT_TASKS, calibration_report, collect_answers, fit_temperatures
    from model.checkpoint import load_model, save_weights
    from model.data import load_split, train_val_split

    if args.episodes < 1:
        raise ValueError("--episodes must be at least 1")
    model = load_model(args.weights, args.device)
    _, validation = train_val_split(load_split(args.data_dir, "background", model.config.image_size))
    classes = len(validation.character)
    kinds = [k for k in FIT_TASKS
             if k.way <= min(model.max_way, classes) and k.examples <= model.config.max_examples]
    if not kinds:
        raise ValueError(f"the validation alphabets hold {classes} characters, too few to fit on")
    answers = collect_answers(model, validation, kinds, episodes=args.episodes, seed=args.seed)
    table = fit_temperatures(answers, model.config.max_way)
    before, after = calibration_report(answers, 1.0), calibration_report(answers, table)
    model.temperature.copy_(table)
    fitted = {str(way): round(float(table[way]), 4) for way in sorted(set(answers.ways.tolist()))}
    meta = json.loads((Path(args.weights) / "config.json").read_text())
    meta.pop("model", None)
    meta["calibration"] = {
        "temperatures": fitted, "episodes_per_kind": args.episodes, "seed": args.seed,
        "alphabets": validation.alphabets, "ece_before": before, "ece_after": after,
    }
    save_weights(model, args.weights, extra=meta)
    print(f"temperatures by number of classes {fitted} (linear in its log between them), fitted on "
          f"{len(answers.labels)} queries of the validation alphabets ({', '.join(validation.alphabets)}); "
          f"saved into {args.weights}")
    for name in before:
        print(f"  {name}: accuracy {100 * after[name]['accuracy']:.1f}%, ECE {before[name]['ece']:.3f} "
              f"-> {after[name]['ece']:.3f}")
    return 0


def _evaluate_grid(args: argparse.Namespace, model: MetaNet, split: OmniglotSplit) -> int:
    from model.evaluate import M_DTYPES, evaluate_grid
    from model.plots import plot_accuracy

    grid = evaluate_grid(model, split, ways=args.ways, shots=args.shots, episodes=args.episodes,
                         seed=args.seed, queries_per_class=args.queries, m_dtype=M_DTYPES[args.m_dtype],
                         progress=not args.json)
    if not grid.results:
        raise ValueError("no point of the grid fits the model and the data: "
                         + "; ".join(f"{s.way}-way {s.shot}-shot: {s.reason}" for s in grid.skipped))
    path = plot_accuracy(grid.results, args.plot, title=f"MetaNet {model.version} on held-out alphabets")
    if args.json:
        print(json.dumps({"model_version": model.version, "m_dtype": args.m_dtype, "plot": str(path),
                          "results": [r.to_dict() for r in grid.results],
                          "skipped": [dataclasses.asdict(s) for s in grid.skipped]}))
        return 0
    print(f"{'n_way':>5} {'n_shot':>6} {'accuracy':>9} {'95% CI':>7}")
    for r in grid.results:
        print(f"{r.way:>5} {r.shot:>6} {100 * r.accuracy:>8.2f}% {100 * (r.ci95 or 0.0):>6.2f}")
    for s in grid.skipped:
        print(f"skipped {s.way}-way {s.shot}-shot: {s.reason}")
    print(f"{args.episodes} episodes a point, M in {args.m_dtype}; plot written to {path}")
    return 0


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'metanet-service[train]'") from None


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "average", help="write the mean of weight sets of one architecture (then calibrate it)",
        description="Average weight sets element-wise into a new weights directory. A source is a "
                    "weights directory or a safetensors file beside a config.json, such as a run's "
                    "last/average.safetensors (given alone, it is written as weights). The "
                    "temperatures start at 1: run metanet calibrate next.",
    )
    p.add_argument("sources", nargs="+", help="weights directories or .safetensors files")
    p.add_argument("--out", required=True, help="weights directory to write")
    p.set_defaults(func=_average)


def _average(args: argparse.Namespace) -> int:
    from model.checkpoint import average_weights

    model = average_weights(args.sources, args.out)
    what = f"the mean of {len(args.sources)} weight sets" if len(args.sources) > 1 else args.sources[0]
    print(f"wrote {args.out} ({model.version}), {what}; "
          f"calibrate it with: metanet calibrate --weights {args.out}")
    return 0


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx", help="write the query path (images, Q*, R, M -> probabilities, attention) as ONNX",
        description="Export the query path of the weights as an ONNX graph (inputs: images, the six "
                    "tensors of Q*, R, M, n_way; outputs: probs, attention), check it against torch on "
                    "a random task, and print where it went. Serve it with METANET_BACKEND=onnx.",
    )
    p.add_argument("--weights", help="weights directory (default: the shipped weights)")
    p.add_argument("--out", default="metanet.onnx", help="file to write (default metanet.onnx)")
    p.set_defaults(func=_export_onnx)


def _export_onnx(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from model.checkpoint import load_model
    from model.onnx import OnnxQueryPath, export_onnx

    model = load_model(args.weights, "cpu")
    path = export_onnx(model, args.out)
    rng = np.random.default_rng(0)
    images = torch.from_numpy((rng.random((9, 1, 28, 28)) > 0.85).astype(np.float32))
    memory = model.register(images[:5], ["a", "b", "c", "a", "b"])
    got = OnnxQueryPath(path, model).classify(memory, images[5:]).probs
    gap = float((got - model.classify(memory, images[5:]).probs).abs().max())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset 18) from {model.version}; "
          f"max |p_onnx - p_torch| on a random task: {gap:.1e}")
    return 0
