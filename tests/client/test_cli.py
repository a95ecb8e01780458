"""The client commands' local side: reading a support folder, options and environment, output,
and that they never load torch. (Against a real server: api_tests/test_cli.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from metanet_client.cli import (
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    _classify_text,
    _task_text,
    connection,
    support_folder,
    table,
)
from service.cli import build_parser, main


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 255).save(path)
    return path


def test_support_folder_lists_labels_and_files_in_name_order_skipping_hidden(tmp_path: Path) -> None:
    for rel in ("beta/2.png", "beta/1.png", "alpha/x.png"):
        image(tmp_path / rel)
    (tmp_path / ".git").mkdir()
    (tmp_path / "alpha" / ".DS_Store").write_text("")
    assert support_folder(tmp_path) == [("alpha", tmp_path / "alpha/x.png"),
                                        ("beta", tmp_path / "beta/1.png"), ("beta", tmp_path / "beta/2.png")]


def test_support_folder_warns_about_stray_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image(tmp_path / "a/1.png"), image(tmp_path / "b/1.png"), image(tmp_path / "stray.png")
    assert len(support_folder(tmp_path)) == 2
    assert "ignoring 1 entry" in capsys.readouterr().err


@pytest.mark.parametrize(("layout", "message"), [
    ((), "0 label folders"),
    (("only/1.png",), "1 label folder;"),
    (("a/1.png", "b/"), "without images in .*: b"),
])
def test_support_folder_refuses_what_cannot_be_a_task(tmp_path: Path, layout: tuple[str, ...],
                                                      message: str) -> None:
    for rel in layout:
        (tmp_path / rel).mkdir(parents=True) if rel.endswith("/") else image(tmp_path / rel)
    with pytest.raises(UsageError, match=message):
        support_folder(tmp_path)


def test_support_folder_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder"):
        support_folder(tmp_path / "nope")
    with pytest.raises(UsageError, match="not a folder"):
        support_folder(image(tmp_path / "file.png"))


def test_connection_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--url", "http://a", "tasks", "ls"]).url == "http://a"
    assert parser.parse_args(["tasks", "ls", "--url", "http://b"]).url == "http://b"
    assert parser.parse_args(["--url", "http://a", "classify", "T", "x.png", "--url", "http://b"]).url == "http://b"


def test_options_beat_the_environment_which_beats_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.delenv("METANET_URL", raising=False)
    monkeypatch.delenv("METANET_API_KEY", raising=False)
    assert connection(parser.parse_args(["tasks", "ls"])) == ("http://127.0.0.1:8000", None)
    monkeypatch.setenv("METANET_URL", "http://env")
    monkeypatch.setenv("METANET_API_KEY", "env-key")
    assert connection(parser.parse_args(["tasks", "ls"])) == ("http://env", "env-key")
    args = parser.parse_args(["tasks", "ls", "--url", "http://opt", "--api-key", "opt-key"])
    assert connection(args) == ("http://opt", "opt-key")


@pytest.mark.parametrize("command", [
    [], ["tasks"], ["tasks", "create"], ["tasks", "ls"], ["tasks", "get"], ["tasks", "rm"], ["classify"],
    ["train"], ["evaluate"], ["serve"],
])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: metanet {' '.join(command)}".rstrip())


def test_table_aligns_columns() -> None:
    assert table(["ID", "NAME"], [["abc", "x"], ["d", "longer"]]).splitlines() == [
        "ID   NAME", "abc  x", "d    longer"]


def test_an_empty_folder_exits_2_without_contacting_anyone(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["--url", "http://127.0.0.1:9", "tasks", "create", str(tmp_path)]) == EXIT_USAGE
    assert "0 label folders" in capsys.readouterr().err


def test_the_client_commands_never_import_torch_or_numpy() -> None:
    code = ("import sys; from service.cli import main; "
            "rc = main(['--url', 'http://127.0.0.1:9', '--timeout', '2', 'tasks', 'ls']); "
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'fastapi'}; "
            "print(rc, sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split("\n")[0] == f"{EXIT_UNREACHABLE} []", out.stdout + out.stderr


def test_the_client_alone_runs_its_commands_without_the_service_or_the_model() -> None:
    code = ("import sys, runpy; sys.argv = ['metanet_client', '--url', 'http://127.0.0.1:9', "
            "'--timeout', '2', 'tasks', 'ls']\n"
            "try:\n    runpy.run_module('metanet_client', run_name='__main__')\n"
            "except SystemExit as exc:\n    rc = exc.code\n"
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'model', 'service'}\n"
            "print(rc, sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split("\n")[0] == f"{EXIT_UNREACHABLE} []", out.stdout + out.stderr


def test_a_null_label_reads_none_of_these_beside_its_similarity() -> None:
    from metanet_client import ClassifyResult

    result = ClassifyResult.from_json({"model_version": "m", "predictions": [
        {"label": None, "confidence": 0.41, "support_similarity": 0.125,
         "top_k": [{"label": "a", "probability": 0.41}]},
        {"label": "b", "confidence": 0.9, "support_similarity": 0.875,
         "top_k": [{"label": "b", "probability": 0.9}]},
    ]})
    lines = _classify_text([Path("q1.png"), Path("q2.png")], result).splitlines()
    assert lines[0].split() == ["IMAGE", "LABEL", "CONFIDENCE", "SIMILARITY"]
    assert lines[1].startswith("q1.png  none of these  ") and lines[2].startswith("q2.png  b  ")
    assert lines[1].split()[-2:] == ["0.410", "0.125"] and lines[2].split()[-2:] == ["0.900", "0.875"]


def test_a_tasks_warnings_follow_its_table_naming_the_files_of_its_examples() -> None:
    from metanet_client import Task

    task = Task.from_json({
        "task_id": "t", "name": None, "labels": ["a", "b"], "n_way": 2, "n_examples": 2,
        "shots": {"a": 1, "b": 1},
        "model_version": "m", "created_at": "2026-01-01T00:00:00+00:00", "memory_bytes": 1, "warnings": [
            {"type": "indistinguishable_examples", "message": "examples 0 and 1 look the same",
             "details": {"example_indices": [0, 1], "labels": ["a", "b"], "cosine": 1.0}}]})
    text = _task_text(task, [Path("s/a/0.png"), Path("s/b/0.png")])
    assert text.splitlines()[-1] == ("warning: indistinguishable_examples: examples 0 and 1 look the same "
                                     "(files s/a/0.png, s/b/0.png)")
    assert "\nwarnings       1\n" in text
    assert _task_text(task).splitlines()[-1].endswith("look the same")  # `tasks get`: no files known


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "high"])
def test_min_confidence_must_be_a_probability(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["classify", "T", "x.png", "--min-confidence", value])
    assert exited.value.code == EXIT_USAGE and "--min-confidence" in capsys.readouterr().err
    args = build_parser().parse_args(["classify", "T", "x.png", "--min-confidence", "0.5"])
    assert args.min_confidence == 0.5


@pytest.mark.parametrize("argv", [
    ["--json", "classify", "T", "q.png"], ["classify", "T", "q.png", "--json"],
    ["--json", "tasks", "ls"], ["tasks", "ls", "--json"], ["--json", "evaluate"], ["evaluate", "--json"],
])
def test_json_goes_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).json is True


@pytest.mark.parametrize("argv", [["classify", "T", "q.png"], ["tasks", "get", "T"], ["evaluate"]])
def test_without_json_a_command_prints_tables(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).json is False


def test_connection_options_given_before_the_command_are_not_reset_after_it() -> None:
    args = build_parser().parse_args(["--url", "http://h:1", "--json", "tasks", "get", "T", "--timeout", "5"])
    assert (args.url, args.timeout, args.json) == ("http://h:1", 5.0, True)
