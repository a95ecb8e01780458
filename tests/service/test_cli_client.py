"""The client commands' local side: reading a support folder, options and environment, output,
and that they never load torch. (Against a real server: api_tests/test_cli.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.cli import build_parser, main
from service.cli_client import EXIT_UNREACHABLE, EXIT_USAGE, UsageError, connection, support_folder, table


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
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'model', 'fastapi'}; "
            "print(rc, sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split("\n")[0] == f"{EXIT_UNREACHABLE} []", out.stdout + out.stderr
