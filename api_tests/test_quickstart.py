"""The README's curl quickstart, run as pasted (but for the port) against a real server: it captures
the new task's id by itself and classifies a query with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from api_tests.helpers import REPO, Server, encode, glyph


def quickstart() -> str:
    """The README's first bash block that registers a task."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return next(block for block in blocks if "/v1/tasks" in block and "classify" in block)


def test_the_curl_quickstart_runs_as_pasted_and_captures_the_task_id(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    for name, kind, shift in (("alpha", "circle", (0, 0)), ("beta", "cross", (0, 0)),
                              ("gamma", "triangle", (0, 0)), ("query", "cross", (3, -2))):
        (tmp_path / f"{name}.png").write_bytes(encode(glyph(kind, shift=shift)))
    script = quickstart().replace("localhost:8000", f"127.0.0.1:{server.port}")
    assert "<task_id>" not in script.replace("/v1/tasks/<task_id>)", "")  # nothing to fill in by hand
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    said, answer = run.stdout.strip().splitlines()[-2:]
    task_id = said.removeprefix("registered task ")
    assert re.fullmatch(r"[0-9a-f]{32}", task_id), run.stdout
    result = json.loads(answer)
    assert result["task_id"] == task_id and result["predictions"][0]["label"] == "beta"
    assert client.delete(f"/v1/tasks/{task_id}").status_code == 204
