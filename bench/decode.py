"""Query decoding on one thread, libspng against Pillow, in one run: the service's path for a
query image (base64 file -> grey levels -> the canonical framing, `service.images.model_inputs`),
32 images a request.

    python bench/decode.py                       # 5 rounds of 2 s per decoder and image kind
    python bench/decode.py --seconds 0.2 --rounds 1 --out /tmp/decode.json   # a smoke run

Image kinds: Omniglot evaluation drawings as 8-bit greyscale PNGs (what `bench/serving.py` sends),
which libspng decodes, and two that go to Pillow with either decoder (`images._grey_png`), as
controls: 1-bit PNGs (the dataset's own files) and RGBA PNGs (a browser canvas's export). Each
round times every decoder and kind in turn, so a slow minute of this shared machine hits both
decoders; the table gives each one's best round and the ratio of Pillow's time to libspng's. Writes
bench/results/decode-<date>-cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import git_commit, write_result  # noqa: E402  (run as a script: the repository first on the path)
from bench.serving import WAY, omniglot_ink  # noqa: E402
from service import images  # noqa: E402

SIZE = 28  # the shipped model's input side


def encoded(drawing: np.ndarray, kind: str) -> str:
    """A (105, 105) drawing, ink = 1, as a base64 PNG of the given kind."""
    paper = Image.fromarray((255 * (1 - drawing)).astype(np.uint8))
    img = {"grey 8-bit": paper, "grey 1-bit": paper.convert("1"),
           "RGBA canvas": Image.merge("RGBA", [Image.new("L", paper.size, 0)] * 3
                                      + [Image.fromarray((255 * drawing).astype(np.uint8))])}[kind]
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def per_image(requests: list[list[str]], seconds: float) -> float:
    """Seconds per image of model_inputs, a 32-image request at a time, for `seconds`."""
    limits = images.ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for request in requests:
            images.model_inputs(request, limits, SIZE)
            n += len(request)
    return elapsed / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per decoder, kind and round")
    parser.add_argument("--rounds", type=int, default=5)
    omniglot = os.environ.get("METANET_OMNIGLOT_DIR") or REPO.parent / "shared" / "data" / "omniglot"
    parser.add_argument("--data-dir", type=Path, default=Path(omniglot))
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"decode-{dt.date.today()}-cpu.json")
    args = parser.parse_args(argv)
    if not args.seconds > 0 or args.rounds < 1:
        parser.error(f"--seconds must be more than 0 (got {args.seconds}) and --rounds at least 1 "
                     f"(got {args.rounds})")
    if images.pyspng is None:
        parser.error("pyspng is not installed (pip install -e '.[serve]')")
    ink, source = omniglot_ink(args.data_dir, WAY, 2017)
    drawings = ink.reshape(-1, *ink.shape[2:])
    kinds = ["grey 8-bit", "grey 1-bit", "RGBA canvas"]
    requests = {kind: [[encoded(d, kind) for d in drawings[i:i + 32]] for i in range(0, len(drawings), 32)]
                for kind in kinds}
    spng = images.pyspng
    decoders = {"libspng": spng, "Pillow": None}
    times: dict[str, dict[str, list[float]]] = {k: {d: [] for d in decoders} for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            for name, module in decoders.items():
                images.pyspng = module
                try:
                    times[kind][name].append(per_image(requests[kind], args.seconds))
                finally:
                    images.pyspng = spng
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        best = {name: min(t) for name, t in times[kind].items()}
        rows.append({"kind": kind, "us_per_image": {n: round(1e6 * t, 1) for n, t in best.items()},
                     "pillow_over_libspng": round(best["Pillow"] / best["libspng"], 2),
                     "rounds_us": {n: [round(1e6 * x, 1) for x in t] for n, t in times[kind].items()}})
    result = {"command": " ".join(["python", "bench/decode.py", *(argv or sys.argv[1:])]),
              "date": str(dt.date.today()), "git_commit": git_commit(), "data": source,
              "images": f"{len(drawings)} drawings, 105x105, base64, 32 a request",
              "seconds": args.seconds, "rounds": args.rounds, "rows": rows}
    lines = ["| image | libspng µs/image | Pillow µs/image | Pillow / libspng |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['us_per_image']['libspng']} | {r['us_per_image']['Pillow']} | "
              f"{r['pillow_over_libspng']} |" for r in rows]
    write_result(result, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
