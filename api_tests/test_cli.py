"""The `metanet` client commands (`python -m service.cli …`) against the real server: create a task
from a folder, list, show, classify, delete, and every failure as a message and an exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api_tests.helpers import REPO, Server, encode, free_port, glyph

SHAPES = ("circle", "cross", "triangle")


def run_cli(url: str | None, *args: str | Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`metanet ARGS` in a subprocess, pointed at URL through $METANET_URL (None: left unset)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("METANET_")}
    if url is not None:
        environment["METANET_URL"] = url
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def failed(result: subprocess.CompletedProcess[str], status: int, *phrases: str) -> str:
    """The command failed with STATUS and a one-line-per-problem message naming every phrase."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """shapes/<label>/<n>.png: two drawings per label (one of them a JPEG)."""
    root = tmp_path / "shapes"
    for kind in SHAPES:
        (root / kind).mkdir(parents=True)
        glyph(kind).save(root / kind / "0.png")
        glyph(kind, shift=(4, 4)).save(root / kind / "1.jpg", "JPEG")
    return root


@pytest.fixture
def query_files(tmp_path: Path) -> list[Path]:
    paths = []
    for kind, shift in (("cross", (-4, 1)), ("circle", (3, -2)), ("triangle", (2, 3))):
        paths.append(tmp_path / f"query-{kind}.png")
        glyph(kind, shift=shift).save(paths[-1])
    return paths


def test_create_ls_get_classify_rm(server: Server, folder: Path, query_files: list[Path]) -> None:
    task = as_json(run_cli(server.url, "tasks", "create", "--name", "cli-shapes", folder, "--json"))
    assert (task["name"], task["labels"], task["n_examples"]) == ("cli-shapes", list(SHAPES), 6)
    task_id = task["task_id"]

    assert as_json(run_cli(server.url, "tasks", "get", task_id, "--json")) == task
    shown = ok(run_cli(server.url, "tasks", "get", task_id))
    assert "cli-shapes" in shown and "3: circle (2), cross (2), triangle (2)" in shown

    assert task in as_json(run_cli(server.url, "tasks", "ls", "--json"))
    listing = ok(run_cli(server.url, "tasks", "ls")).splitlines()
    assert listing[0].split() == ["TASK_ID", "NAME", "WAY", "EXAMPLES", "CREATED"]
    assert any(line.split()[:4] == [task_id, "cli-shapes", "3", "6"] for line in listing[1:])

    explained = run_cli(server.url, "classify", task_id, *query_files, "--top-k", "2", "--explain", "--json")
    result = as_json(explained)
    assert [p["label"] for p in result["predictions"]] == ["cross", "circle", "triangle"]
    assert all(len(p["top_k"]) == 2 and len(p["attention"]) == 6 for p in result["predictions"])
    table = ok(run_cli(server.url, "classify", task_id, *query_files, "--top-k", "2")).splitlines()
    assert table[0].split() == ["IMAGE", "LABEL", "CONFIDENCE", "SIMILARITY", "TOP_K"]
    assert [line.split()[:2] for line in table[1:]] == [
        [str(query_files[0]), "cross"], [str(query_files[1]), "circle"], [str(query_files[2]), "triangle"]]
    assert [float(line.split()[3]) for line in table[1:]] == pytest.approx(
        [p["support_similarity"] for p in result["predictions"]], abs=1e-3)

    assert ok(run_cli(server.url, "tasks", "rm", task_id)) == f"deleted {task_id}\n"
    failed(run_cli(server.url, "tasks", "get", task_id), 1, "metanet tasks get: error: task_not_found:",
           task_id)
    assert task_id not in ok(run_cli(server.url, "tasks", "ls"))


def test_registration_warnings_name_the_files_and_min_confidence_answers_none_of_these(
    server: Server, tmp_path: Path,
) -> None:
    root = tmp_path / "doubtful"
    for label, kind in (("circle", "circle"), ("ring", "circle"), ("cross", "cross")):
        (root / label).mkdir(parents=True)
        glyph(kind).save(root / label / "0.png")  # the same circle under two labels
    created = ok(run_cli(server.url, "tasks", "create", root))
    warnings = [line for line in created.splitlines() if line.startswith("warning: ")]
    pair = next(line for line in warnings if line.startswith("warning: indistinguishable_examples: "))
    assert f"(files {root / 'circle' / '0.png'}, {root / 'ring' / '0.png'})" in pair
    assert any(line.startswith("warning: misclassified_example: ") for line in warnings)
    task_id = next(line.split()[1] for line in created.splitlines() if line.startswith("task_id"))
    shown = ok(run_cli(server.url, "tasks", "get", task_id))
    assert "indistinguishable_examples" in shown and str(root) not in shown  # no files to name
    assert len(as_json(run_cli(server.url, "tasks", "get", task_id, "--json"))["warnings"]) == len(warnings)

    query = root / "circle" / "0.png"
    picky = ok(run_cli(server.url, "classify", task_id, query, "--min-confidence", "1")).splitlines()
    assert picky[0].split() == ["IMAGE", "LABEL", "CONFIDENCE", "SIMILARITY"]
    assert picky[1].startswith(f"{query}  none of these  ")
    result = as_json(run_cli(server.url, "classify", task_id, query, "--min-confidence", "1", "--json"))
    assert result["predictions"][0]["label"] is None
    for bad in ("1.5", "-0.1", "nan", "high"):
        refused = run_cli(server.url, "classify", task_id, query, "--min-confidence", bad)
        assert refused.returncode == 2 and "--min-confidence" in refused.stderr


def test_the_task_name_defaults_to_the_folders_name(server: Server, folder: Path) -> None:
    assert as_json(run_cli(server.url, "tasks", "create", folder, "--json"))["name"] == "shapes"


def test_url_and_key_options_work_before_the_command_and_beat_the_environment(server: Server) -> None:
    wrong = f"http://127.0.0.1:{free_port()}"
    ok(run_cli(wrong, "--url", server.url, "tasks", "ls"))
    ok(run_cli(wrong, "tasks", "ls", "--url", server.url, "--api-key", "ignored-without-keys"))


def test_rm_deletes_what_exists_reports_what_does_not_and_exits_1(server: Server, folder: Path) -> None:
    task_id = as_json(run_cli(server.url, "tasks", "create", folder, "--json"))["task_id"]
    result = run_cli(server.url, "tasks", "rm", "no-such-task", task_id)
    assert result.returncode == 1 and result.stdout == f"deleted {task_id}\n"
    assert "metanet tasks rm: error: task_not_found: no task 'no-such-task'" in result.stderr


def test_classify_against_an_unknown_task_prints_the_api_error(server: Server,
                                                               query_files: list[Path]) -> None:
    failed(run_cli(server.url, "classify", "no-such-task", query_files[0]), 1,
           "metanet classify: error: task_not_found: no task 'no-such-task'")


def test_an_image_the_server_cannot_decode_is_named_by_file(server: Server, folder: Path,
                                                            tmp_path: Path) -> None:
    task_id = as_json(run_cli(server.url, "tasks", "create", folder, "--json"))["task_id"]
    truncated = tmp_path / "truncated.png"  # a PNG header, so it passes the local check; no pixel data
    truncated.write_bytes(encode(glyph("circle"))[:60])
    failed(run_cli(server.url, "classify", task_id, folder / "circle" / "0.png", truncated), 1,
           "invalid_image: images[1]", f"(file {truncated})")


def test_top_k_below_1_is_the_apis_invalid_input(server: Server, folder: Path,
                                                 query_files: list[Path]) -> None:
    task_id = as_json(run_cli(server.url, "tasks", "create", folder, "--json"))["task_id"]
    failed(run_cli(server.url, "classify", task_id, query_files[0], "--top-k", "0"), 1,
           "invalid_input: top_k")


def test_a_folder_with_more_labels_than_allowed_is_the_apis_error(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(13):  # 26 examples: more than the test server's max_examples (24)
        (root / f"label-{i:02d}").mkdir(parents=True)
        for kind in ("circle", "cross"):
            glyph(kind, shift=(i % 5, 0)).save(root / f"label-{i:02d}" / f"{kind}.png")
    failed(run_cli(server.url, "tasks", "create", root, "--no-progress"), 1, "metanet tasks create: error: ")


@pytest.mark.parametrize(("layout", "phrases"), [
    ({}, ["0 label folders", "at least two"]),
    ({"only/a.png": "png"}, ["1 label folder;", "at least two"]),
    ({"a/1.png": "png", "b/": None}, ["label folder without images", ": b"]),
    ({"a/1.png": "png", "b/1.png": "png", "b/notes.txt": "text", "b/2.png": "text"},
     ["2 of 4 files cannot be sent as images", "notes.txt: not an image file", "2.png: not an image file"]),
])
def test_bad_folders_exit_2_saying_what_is_wrong(tmp_path: Path, layout: dict[str, str | None],
                                                phrases: list[str]) -> None:
    root = tmp_path / "support"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif content == "png":
            glyph("circle").save(path)
        else:
            path.write_text("not an image")
    # Nothing listens at the URL: these must fail before any request.
    failed(run_cli(f"http://127.0.0.1:{free_port()}", "tasks", "create", root), 2,
           "metanet tasks create: error: ", *phrases)


def test_a_missing_folder_or_image_exits_2(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    failed(run_cli(url, "tasks", "create", tmp_path / "nope"), 2, "no such folder")
    failed(run_cli(url, "classify", "some-task", tmp_path / "nope.png"), 2, "nope.png: no such file")


def test_a_service_that_is_not_there_exits_3_with_a_hint() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    failed(run_cli(url, "tasks", "ls"), 3, f"cannot reach {url}", "is the service running?")
    failed(run_cli(None, "--url", url, "tasks", "get", "x"), 3, f"cannot reach {url}")
