"""bench/serving.py end to end at a toy size: the in-process half, a real service under the load
generator, the overload phases, the ceilings measured beside each phase, the record and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from api_tests.helpers import REPO


def test_a_small_serving_run_writes_its_record_with_the_ceilings_beside_each_phase(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    run = subprocess.run(
        [sys.executable, "bench/serving.py", "--backends", "torch", "--sizes", "1", "--concurrency", "1,2",
         "--seconds", "1", "--warmup", "0.5", "--batch-sizes", "1,8", "--inproc-seconds", "0.2",
         "--register-repeats", "1", "--overload-concurrency", "8", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "METANET_TORCH_THREADS": "2"})
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: a target missed, at this toy size
    record = json.loads(out.read_text())
    rows = record["service"]["torch"]["rows"] + record["service"]["torch"]["overload"]
    assert [(r["images_per_request"], r["concurrency"]) for r in rows] == [(1, 1), (1, 2), (1, 8), (1, 8)]
    # Phases this short may pass without an answer: a process's first request of the task rebuilds
    # its memory (a second or so on a loaded machine), and an overload client may spend the whole
    # phase waiting out a Retry-After. The service answered in at least one of them.
    assert any(row["images_per_s"] > 0 for row in rows)
    for row in rows:
        assert row["n_errors"] == 0
        before, after = row["ceilings_beside"]
        assert before > 0 and after > 0
        assert row["ratio_beside"] == round(2 * row["images_per_s"] / (before + after), 3)
    # consecutive phases share the ceiling measured between them
    for earlier, later in zip(rows, rows[1:], strict=False):
        assert earlier["ceilings_beside"][1] == later["ceilings_beside"][0]
    judged = {t["target"]: t for t in record["targets"] if t["backend"] == "torch"}
    assert "p99 of 1-image requests at concurrency 1 (ms)" in judged
    assert "/ in-process (beside)" in run.stdout and f"wrote {out}" in run.stdout


def test_the_thresholds_are_judged_on_unrounded_ratios() -> None:
    from bench.serving import targets

    def row(size: int, concurrency: int, images_per_s: float, **more: Any) -> dict[str, Any]:
        return {"images_per_request": size, "concurrency": concurrency, "images_per_s": images_per_s,
                "ratio": round(images_per_s / 1000, 3), "p99_ms": 8.0, **more}

    def overload(p99_ms: float) -> dict[str, Any]:
        return {"images_per_request": 1, "concurrency": 320, "clients": "wait Retry-After", "n_429": 5,
                "n_5xx": 0, "n_errors": 0, "p99_ms": p99_ms, "unloaded_p99_ms": 10.0,
                "p99_ratio": round(p99_ms / 10.0, 2)}

    inproc = {"backends": {b: {"ceiling_images_per_s": 1000.0, "single_query_ms": {"p50": 3.0}}
                           for b in ("a", "b")}}
    service = {  # an onnx 1-image c32 ratio of 0.59967, shown as 0.6
        "a": {"rows": [row(1, 1, 100.0), row(1, 32, 681.6, ceilings_beside=[1142.8, 1130.4]),
                       row(32, 32, 900.0)], "overload": [overload(30.04)]},
        "b": {"rows": [row(1, 1, 100.0), row(1, 32, 600.0), row(32, 32, 850.0)],
              "overload": [overload(30.0)]},
    }
    judged = {(t["backend"], t["target"].split(" /")[0].split(":")[0]): t for t in targets(inproc, service)}
    one = judged["a", "1-image requests at concurrency 32"]
    assert (one["value"], one["result"]) == (0.5997, "FAIL")
    assert judged["a", "32-image requests at concurrency 32"]["result"] == "PASS"
    late = [t for t in targets(inproc, service) if "p99 of admitted" in t["target"]]
    assert [(t["backend"], t["value"], t["result"]) for t in late] == [("a", 3.004, "FAIL"),
                                                                        ("b", 3.0, "PASS")]
    exact = judged["b", "1-image requests at concurrency 32"]  # no ceiling beside: the start's
    assert (exact["value"], exact["result"]) == (0.6, "PASS")
    assert judged["b", "32-image requests at concurrency 32"]["result"] == "PASS"


def test_service_settings_the_service_refuses_are_refused_at_once_naming_the_option(tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    for args, named in [(["--batch-linger-ms", "-1"], "--batch-linger-ms"),
                        (["--max-queue-wait-ms", "-5", "--processes", "999"], "--processes"),
                        (["--overload-forward-factor", "0.5"], "--overload-forward-factor")]:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "serving.py"), *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
