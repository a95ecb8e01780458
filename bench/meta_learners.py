"""The meta learners both ways: the layers under autograd over all coordinates at once, and the
blocks of `COORDINATE_ROWS` coordinates that registration (no autograd) and training on a CPU run.

    python bench/meta_learners.py                           # 5-way 1-shot and 20-way 5-shot, 5 rounds
    python bench/meta_learners.py --rounds 1 --episodes 5x1 --out /tmp/m.json

Registration and training spend most of their time in the meta learners: `m` (an MLP, 2 -> 20 -> 20 -> 1) on
every coordinate of b's gradient for every support example, and `d` (an LSTM over the chunks'
gradients) on every coordinate of u's. Over a whole task's coordinates at once their (coords, 20)
activations went to memory and back between layers. This builds the inputs each learner gets for
an Omniglot episode of the shipped model (`MetaNet._per_example_grads`, then the preprocessing),
times each learner as layers (`net`, `nn.LSTM`) and the registration way (the module
without autograd), best of `--repeats` calls per round and the best round, the two ways
alternating so a slow minute of this shared machine hits both, with the largest difference
between their outputs; then the same for training's forward and backward (a fixed gradient from
above; autograd over every coordinate's activations against `_GradientsByBlock`, which recomputes
a block at a time in the backward), with the largest difference between the parameters'
gradients relative to the largest gradient; and the whole `MetaNet.register` as served.
Threads: torch's default (a registration runs on the whole team). Writes
bench/results/meta-learners-<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first)
from bench.serving import omniglot_ink  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.data import frame_drawings  # noqa: E402
from model.layers import preprocess_grad  # noqa: E402
from model.metanet import MetaNet, content_chunks  # noqa: E402


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def learner_inputs(model: MetaNet, x: torch.Tensor, y: torch.Tensor, n_way: int) -> dict[str, torch.Tensor]:
    """What m and d get at the registration of support set (x, y): b's gradient features (n, P, 2)
    and the sequence of u's chunk-mean gradient features (T, P_u, 2)."""
    grads_u, grads_b = model._per_example_grads(x, y, n_way)
    chunks = content_chunks(x, y, model.config.n_chunks)
    avg = torch.zeros(len(chunks), len(x))
    for t, idx in enumerate(chunks):
        avg[t, idx] = 1.0 / len(idx)
    p = model.config.grad_p
    return {"m": preprocess_grad(grads_b, p), "d": preprocess_grad(avg @ grads_u, p)}


def ways(model: MetaNet, name: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The learner's two ways over all its coordinates (the conv and fc parts, as MetaNet splits them)."""
    if name == "m":
        parts, n_conv = (model.m_conv, model.m_fc), model._n_conv_coords(model.b_params())

        def layers(f: torch.Tensor) -> torch.Tensor:
            conv, fc = f[:, :n_conv], f[:, n_conv:]
            return torch.cat([parts[0].net(conv).squeeze(-1), parts[1].net(fc).squeeze(-1)], 1)

        def served(f: torch.Tensor) -> torch.Tensor:
            return torch.cat([parts[0](f[:, :n_conv]), parts[1](f[:, n_conv:])], 1)
        return {"layers": layers, "blocks": served}
    lstms, n_conv = (model.d_conv, model.d_fc), model._n_conv_coords(model.u_path_params())

    def nn_lstm(s: torch.Tensor) -> torch.Tensor:
        outs = []
        for d, part in zip(lstms, (s[:, :n_conv], s[:, n_conv:]), strict=True):
            _, (h, _) = d.lstm(part)
            outs.append(d.out(h[-1]).squeeze(-1))
        return torch.cat(outs)

    def served_d(s: torch.Tensor) -> torch.Tensor:
        return torch.cat([lstms[0](s[:, :n_conv]), lstms[1](s[:, n_conv:])])
    return {"layers": nn_lstm, "blocks": served_d}


def training_ways(model: MetaNet, name: str) -> dict[str, Callable[[torch.Tensor, torch.Tensor], list]]:
    """Forward and backward of the learner from a gradient on its output: autograd over the layers,
    and the module as training runs it (by blocks on a CPU). Returns its parameters' gradients."""
    modules = (model.m_conv, model.m_fc) if name == "m" else (model.d_conv, model.d_fc)
    params = [p for module in modules for p in module.parameters()]

    def backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], list]:
        def run(feats: torch.Tensor, upstream: torch.Tensor) -> list:
            with torch.enable_grad():
                return list(torch.autograd.grad(fn(feats), params, upstream))
        return run
    return {way: backward(fn) for way, fn in ways(model, name).items()}


def timed(fns: dict[str, Callable[..., object]], args: tuple, rounds: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` calls a round, best round, the ways alternating."""
    times: dict[str, list[float]] = {way: [] for way in fns}
    for _ in range(rounds):
        for way, fn in fns.items():
            times[way].append(best_ms(lambda fn=fn: fn(*args), repeats))
    return {f"{way}_ms": round(min(t), 2) for way, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", default="5x1,20x5", help="WAYxSHOT, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="calls per way, learner and round")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("METANET_OMNIGLOT_DIR", "")))
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"meta-learners-{dt.date.today()}-cpu.json")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", args.episodes):
        parser.error(f"--episodes takes WAYxSHOT pairs separated by commas, not {args.episodes!r}")
    episodes = [tuple(int(v) for v in e.split("x")) for e in args.episodes.split(",")]
    if any(way < 2 or way > 20 or shot < 1 or shot > 5 for way, shot in episodes):
        parser.error(f"--episodes: way must be 2 to 20 and shot 1 to 5, got {args.episodes}")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1 (got {args.rounds} and {args.repeats})")

    model = load_model(None, "cpu")
    ink, _ = omniglot_ink(args.data_dir if str(args.data_dir) else None, 20, 0)
    x = torch.from_numpy(frame_drawings(ink))  # (20 characters, 20 drawings, 28, 28)
    rows = []
    for way, shot in episodes:
        support = x[:way, :shot].reshape(-1, 1, 28, 28)
        labels = [f"c{c}" for c in range(way) for _ in range(shot)]
        y = torch.arange(way).repeat_interleave(shot)
        # no_grad, as `MetaNet.register` (torch.func.grad and inference_mode do not mix)
        with torch.no_grad():
            inputs = learner_inputs(model, support, y, way)
            row: dict[str, object] = {"episode": f"{way}-way {shot}-shot"}
            for name, feats in inputs.items():
                fns = ways(model, name)
                diff = (fns["layers"](feats) - fns["blocks"](feats)).abs().max().item()
                row[name] = {"coordinates": int(feats[0].numel() // 2 if name == "d" else feats.numel() // 2),
                             **timed(fns, (feats,), args.rounds, args.repeats), "max_abs_diff": diff}
                train = training_ways(model, name)
                out_shape = feats.shape[1:-1] if name == "d" else feats.shape[:-1]  # d: after the last step
                upstream = torch.randn(out_shape, generator=torch.Generator().manual_seed(0))
                grads = {way: fn(feats, upstream) for way, fn in train.items()}
                scale = max(g.abs().max().item() for g in grads["layers"])
                diff = max((a - b).abs().max().item() for a, b in zip(*grads.values(), strict=True)) / scale
                row[f"{name}_training"] = {**timed(train, (feats, upstream), args.rounds, args.repeats),
                                           "max_rel_diff": diff}
            register = functools.partial(model.register, support, labels)
            row["register_ms"] = round(min(best_ms(register, args.repeats) for _ in range(args.rounds)), 1)
        rows.append(row)
    lines = ["| episode | learner | coordinates | layers ms | blocks ms | ratio | max diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("m", "d"):
            v = r[name]
            assert isinstance(v, dict)
            ratio = v["layers_ms"] / v["blocks_ms"]
            lines.append(f"| {r['episode']} | {name} | {v['coordinates']:,} | {v['layers_ms']:.1f} | "
                         f"{v['blocks_ms']:.1f} | {ratio:.2f} | {v['max_abs_diff']:.1e} |")
        for name in ("m", "d"):
            v, t = r[name], r[f"{name}_training"]
            assert isinstance(v, dict) and isinstance(t, dict)
            ratio = t["layers_ms"] / t["blocks_ms"]
            lines.append(f"| {r['episode']} | {name}, training's forward and backward | {v['coordinates']:,} "
                         f"| {t['layers_ms']:.1f} | {t['blocks_ms']:.1f} | {ratio:.2f} "
                         f"| {t['max_rel_diff']:.1e} (gradients, relative) |")
        lines.append(f"| {r['episode']} | whole `register`, as served | | | {r['register_ms']:.1f} | | |")
    result = {"command": " ".join(["python", "bench/meta_learners.py", *(argv or sys.argv[1:])]),
              "date": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "repeats": args.repeats, "rows": rows}
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
