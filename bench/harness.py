"""What the bench commands share: the repository, the commit a result ran on, and writing a
result (its JSON to bench/results/, its Markdown summary to stdout). The server as a subprocess
lives with the black-box tests: api_tests/harness.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> str:
    """The checkout's commit, "-dirty" added when it has changes: what a recorded result ran."""
    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", *words], cwd=repo, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain") else "")


def write_result(result: dict[str, Any], path: Path, markdown: str) -> Path:
    """The JSON result to `path` (folders made), and its Markdown summary to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown)
    print(f"wrote {path}")
    return path
