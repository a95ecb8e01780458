"""The distribution builds without setuptools' warnings: the licence as an SPDX string (the table
form is deprecated), and the weights and the demo page as package data of packages it finds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_licence_is_an_spdx_expression() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def test_a_wheel_builds_without_warnings_and_holds_the_weights_and_the_pages(tmp_path: Path) -> None:
    if tuple(int(part) for part in version("setuptools").split(".")[:2]) < (77, 0):
        pytest.skip("the SPDX licence needs setuptools 77 or later (pip's isolated build fetches it)")
    leftover = not (REPO / "build").exists()  # setuptools builds in ./build: removed again below
    try:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-v",
             "-w", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
    finally:
        if leftover:
            shutil.rmtree(REPO / "build", ignore_errors=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    said = build.stdout + build.stderr
    for warning in ("SetuptoolsDeprecationWarning", "is absent from the `packages` configuration",
                    "License classifiers are deprecated", "`project.license` as a TOML table"):
        assert warning not in said, warning
    (wheel,) = tmp_path.glob("*.whl")
    listing = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True,
                             text=True, check=True).stdout
    for name in ("model/weights/metanet.safetensors", "model/weights/config.json",
                 "service/http/static/app.js", "service/inference/engine.py", "metanet_client/cli.py"):
        assert name in listing, name
    assert "api_tests/" not in listing and "bench/" not in listing
