"""One-call GPU training burst for a lent GPU machine (see DEVELOPERS.md and README "Training").

Probes CUDA with one episode (falling back to PyTorch's own kernels if cuDNN refuses the
150k-sequence LSTM batch), times episodes, meta-trains for a time budget from scratch or from a
run directory, evaluates briefly, and archives the run's checkpoint files in $OUT so a later session
on CPU resumes them with `metanet train --resume`.

    python3 bench/gpu_burst.py --seconds 450 [--resume-from DIR] [--lr 1e-4 --lr-halve-every 1500
                               --restart-schedule] [--set FIELD=JSON ...] [--tag NAME]
                               [--eval-last --eval-episodes 1000 --eval-seconds 160]

The run's files come back as $OUT/NAME.tar.gz (last/, best/, history.jsonl, train_config.json).
best/ holds the burst's best validation if it beat the run's; a run directory carried in without
best/ (runs/metanet/best is not in git) gets the last weights there, marked "val": null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.config import TrainConfig  # noqa: E402
from model.data import EpisodeSampler, load_split, train_val_split  # noqa: E402
from model.evaluate import evaluate  # noqa: E402
from model.metanet import MetaNet  # noqa: E402
from model.train import train  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_episodes(splits, n: int, device: str) -> float:
    model = MetaNet().to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sampler = EpisodeSampler(splits[0], rotate=True, device=device)
    rng = np.random.default_rng(0)
    for i in range(n + 3):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        ep = sampler.sample(rng, 20, 1, 5)
        loss, _ = model.episode_loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 20, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=450)
    parser.add_argument("--run-dir", default="/tmp/metanet-run")
    parser.add_argument("--resume-from", help="a run directory to continue")
    parser.add_argument("--eval-seconds", type=float, default=60)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--eval-last", action="store_true", help="check the last weights too, after best/")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    parser.add_argument("--lr", type=float, help="Adam's rate (default: the run's)")
    parser.add_argument("--lr-halve-every", type=int, help="episodes per halving (default: the run's)")
    parser.add_argument("--restart-schedule", action="store_true",
                        help="count the halving from the resumed step (a warm restart at --lr)")
    parser.add_argument("--val-every", type=int, default=1000)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--tag", default="run", help="name of the archive written to $OUT")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a TrainConfig field, e.g. --set multi_shot_prob=0.15")
    args = parser.parse_args()
    config_overrides = {}  # checked now, before minutes of data loading and probing
    for item in args.set:
        field, _, value = item.partition("=")
        if field not in TrainConfig.__dataclass_fields__ or field == "model":
            parser.error(f"--set {item!r}: {field!r} is not a TrainConfig field")
        try:
            config_overrides[field] = json.loads(value)
        except ValueError:
            parser.error(f"--set {item!r}: the value must be JSON (a number, true/false, a list ...)")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print("torch", torch.__version__, "device", name, flush=True)
    splits = train_val_split(load_split(None, "background"))
    try:
        per_episode = time_episodes(splits, 10, device)
    except RuntimeError as exc:
        print("cuDNN path failed, falling back to native kernels:", exc, flush=True)
        torch.backends.cudnn.enabled = False
        per_episode = time_episodes(splits, 10, device)
    print(f"20-way 1-shot training episode: {1000 * per_episode:.1f} ms", flush=True)

    run = Path(args.run_dir)
    if args.resume_from:
        shutil.copytree(args.resume_from, run, dirs_exist_ok=True)
    saved = run / "train_config.json"
    cfg = TrainConfig.from_dict(json.loads(saved.read_text())) if saved.is_file() else TrainConfig()
    overrides = {"episodes": 200_000, "val_every": args.val_every, "val_episodes": args.val_episodes,
                 "checkpoint_every": 500}
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.lr_halve_every is not None:
        overrides["lr_halve_every"] = args.lr_halve_every
    overrides.update(config_overrides)
    last_state = run / "last" / "state.json"
    if args.restart_schedule and last_state.is_file():
        overrides["lr_schedule_start"] = json.loads(last_state.read_text())["step"]
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
    print("recipe:", json.dumps(overrides), flush=True)
    started = time.time()
    state = train(cfg, run, device=device, resume=bool(args.resume_from), max_seconds=args.seconds,
                  progress=False, splits=splits)
    print(f"trained to step {state.step} in {time.time() - started:.0f}s; best val {state.best_val:.4f}")
    print((run / "history.jsonl").read_text(), flush=True)

    # One archive per run ($OUT takes few files): last/, best/, history.jsonl and train_config.json.
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / f"{args.tag}.tar.gz", "w:gz") as tar:
        for name in ("last", "best", "history.jsonl", "train_config.json"):
            if (run / name).exists():
                tar.add(run / name, arcname=name,
                        filter=lambda info: None if info.name.endswith(".tmp") else info)
    wanted = ("best", "last") if args.eval_last else ("best",)
    checked = [name for name in wanted if (run / name).is_dir()]
    if not checked or args.eval_episodes <= 0:
        return 0

    from model.checkpoint import load_model

    test = load_split(None, "evaluation")
    deadline = time.time() + args.eval_seconds
    for name in checked:
        model = load_model(run / name, device)
        for way in (5, 20):
            if time.time() > deadline:
                return 0
            r = evaluate(model, test, way=way, shot=1, episodes=args.eval_episodes, seed=0)
            print(json.dumps({**r.to_dict(), "weights": name, "note": "GPU quick check"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
