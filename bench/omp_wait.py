"""How torch's OpenMP threads should wait in the service: classify latency in process under each
wait policy, alone and beside a busy thread of another process (what the event loop is to the
model thread).

    python bench/omp_wait.py                 # the run the README quotes
    python bench/omp_wait.py --seconds 1     # quicker, noisier

Each policy runs in a fresh process (the OpenMP runtime reads its variables once, at load), on the
shipped weights and one 20-way 1-shot task of random strokes: 1-image classify latency (p50, p99)
and 16-image images/s, with torch's whole thread team and then with one intra-op thread, first
alone, then with a pure-Python busy loop in another process taking one core. Policies: libgomp's
default (spin 300,000 iterations, then sleep), OMP_WAIT_POLICY=ACTIVE (spin without end),
OMP_WAIT_POLICY=PASSIVE (sleep at once) and GOMP_SPINCOUNT=10000 (a short spin). The service sets
PASSIVE, and runs forwards of few images on one thread (METANET_ONE_THREAD_BELOW_IMAGES).
Writes bench/results/omp-wait-<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import write_result  # noqa: E402  (run as a script: the repository first on the path)

POLICIES = {
    "libgomp default (spin 300k)": {},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "OMP_WAIT_POLICY=PASSIVE (service default)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def measure(seconds: float) -> dict[str, float]:
    """In the child: 1-image latency and 16-image throughput of `classify` on the shipped weights."""
    import numpy as np
    import torch

    from model.checkpoint import load_model

    model = load_model(None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    size = model.config.image_size
    support = torch.from_numpy((rng.random((20, size, size)) > 0.8).astype(np.float32))
    memory = model.register(support, [f"c{i}" for i in range(20)])
    queries = torch.from_numpy((rng.random((16, size, size)) > 0.8).astype(np.float32))

    def timings(x: torch.Tensor) -> list[float]:
        for _ in range(3):
            model.classify(memory, x)
        out, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            model.classify(memory, x)
            out.append(time.perf_counter() - t)
        return sorted(out)

    def figures(suffix: str = "") -> dict[str, float]:
        one, sixteen = timings(queries[:1]), timings(queries)
        return {f"p50_ms_1{suffix}": round(1000 * one[len(one) // 2], 2),
                f"p99_ms_1{suffix}": round(1000 * one[int(0.99 * len(one))], 2),
                f"images_per_s_16{suffix}": round(16 * len(sixteen) / sum(sixteen), 1)}

    team = figures()
    torch.set_num_threads(1)  # as the service runs small batches (METANET_ONE_THREAD_BELOW_IMAGES)
    return {**team, **figures("_1_thread")}


def spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def run_policy(env: dict[str, str], seconds: float, busy: bool) -> dict[str, float]:
    child_env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES} | env
    stop = multiprocessing.Event()
    hog = multiprocessing.Process(target=spin, args=(stop,)) if busy else None
    if hog is not None:
        hog.start()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(seconds)], env=child_env,
                              cwd=REPO, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            stop.set()
            hog.join()
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = ["| policy | threads | 1 image p50 / p99 ms, alone | beside a busy process | 16 images/s, alone "
             "| beside |", "|---|---|---|---|---|---|"]
    for name, row in result["policies"].items():
        alone, busy = row["alone"], row["beside_busy_process"]
        for threads, k in (("all", ""), ("1", "_1_thread")):
            lines.append(f"| {name} | {threads} | {alone['p50_ms_1' + k]} / {alone['p99_ms_1' + k]} | "
                         f"{busy['p50_ms_1' + k]} / {busy['p99_ms_1' + k]} | "
                         f"{alone['images_per_s_16' + k]} | {busy['images_per_s_16' + k]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per figure")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.child:
        print(json.dumps(measure(args.seconds)))
        return 0
    policies = {}
    for name, env in POLICIES.items():
        policies[name] = {"env": env, "alone": run_policy(env, args.seconds, busy=False),
                          "beside_busy_process": run_policy(env, args.seconds, busy=True)}
        print(name, json.dumps(policies[name]), file=sys.stderr, flush=True)
    result = {"command": "python bench/omp_wait.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": dt.date.today().isoformat(), "cpu_count": os.cpu_count(), "policies": policies}
    write_result(result, Path(args.out) / f"omp-wait-{result['date']}-cpu.json", markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
