"""`metanet tasks …` and `metanet classify`: the user commands, talking to a running service through
`metanet_client`. Nothing heavy loads at import, and torch never: `metanet tasks ls` stays quick.
`python -m metanet_client` runs these commands alone, where only the client is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from metanet_client import ClassifyResult, MetaNetClient, Task

T = TypeVar("T")

EXIT_API_ERROR = 1  # the service answered with an error
EXIT_USAGE = 2  # bad arguments or bad local input (argparse exits 2 as well)
EXIT_UNREACHABLE = 3  # nothing answered at the URL
PAGE_SIZE = 200  # the service's largest page

EXIT_CODES = (f"exit status: 0 done; {EXIT_API_ERROR} the service refused the request (its error type "
              f"and message are printed); {EXIT_USAGE} bad arguments or local files; {EXIT_UNREACHABLE} "
              "the service could not be reached")


class UsageError(Exception):
    """Bad local input (a folder without labels, a file that is not an image): exit 2."""


def output_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --json to the top-level parser, and return the parent parser that gives it to a command.

    An option both before the command (`metanet --json tasks ls`) and after it (`metanet tasks ls
    --json`): after the command its default is SUPPRESS, so it does not reset what came before."""
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of a table (commands that print results)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")
    return output


def add_client_commands(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction,
                        output: argparse.ArgumentParser) -> None:
    """Register the client commands. --url/--api-key/--timeout/--retries, and --json (`output`),
    work before the command (`metanet --url U tasks ls`) and after it (`metanet tasks ls --url U`)."""
    _add_connection_options(parser, None)
    conn = argparse.ArgumentParser(add_help=False)
    _add_connection_options(conn, argparse.SUPPRESS)
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="no progress bar while reading images")

    def command(subs: argparse._SubParsersAction, name: str, run: Callable, help: str,
                parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help, epilog=EXIT_CODES, parents=[conn, *parents])
        p.set_defaults(func=_client_command(run))
        return p

    tasks = sub.add_parser("tasks", help="register, list, show and delete tasks on a running service",
                           description="Manage the tasks (support sets) of a running service.")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="{create,ls,get,rm}")

    p = command(tsub, "create", _tasks_create, "register a task from a folder with one subfolder per label",
                [output, progress])
    p.add_argument("dir", type=Path, metavar="DIR",
                   help="a folder holding one subfolder per label, each holding that label's images")
    p.add_argument("--name", help="the task's name (default: the folder's name)")

    p = command(tsub, "ls", _tasks_ls, "list the tasks, oldest first", [output])
    p.add_argument("--limit", type=_at_least_1, help="show at most this many")

    p = command(tsub, "get", _tasks_get, "show one task", [output])
    p.add_argument("task_id", metavar="TASK_ID")

    p = command(tsub, "rm", _tasks_rm, "delete tasks")
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")

    p = command(sub, "classify", _classify, "classify image files against a registered task",
                [output, progress])
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="also list the K most likely labels")
    p.add_argument("--explain", action="store_true",
                   help="show the attention over the support examples behind each prediction")
    p.add_argument("--min-confidence", type=_probability, metavar="P",
                   help="answer 'none of these' for an image whose best label's probability is below P "
                        "(0..1; default 0: every image gets a label)")


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _add_connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # After the command the default is SUPPRESS, so an option given only before it is not reset.
    parser.add_argument("--url", default=default,
                        help="the service's base URL, for the client commands (default: $METANET_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=default,
                        help="API key (default: $METANET_API_KEY; the variable keeps it out of `ps`)")
    parser.add_argument("--timeout", type=float, default=default, help="seconds to wait for an answer (60)")
    parser.add_argument("--retries", type=int, default=default, metavar="N",
                        help="resend a request refused as busy (429) or not ready (503) up to N times, "
                             "after the wait the service asks for (0; `tasks create` is never resent)")


def connection(args: argparse.Namespace) -> tuple[str, str | None]:
    """Where the service is: the options, else the client's environment. (This is the client's
    configuration; the service reads its own in its settings.)"""
    url = getattr(args, "url", None) or os.environ.get("METANET_URL") or "http://127.0.0.1:8000"
    api_key = getattr(args, "api_key", None) or os.environ.get("METANET_API_KEY") or None
    return url, api_key


Command = Callable[[argparse.Namespace], int]


def _client_command(run: Callable[[MetaNetClient, argparse.Namespace], int]) -> Command:
    """Run a command with a client; report failures as one line on stderr with an exit status."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        from metanet_client import APIConnectionError, MetaNetAPIError, MetaNetClient

        prog = " ".join(["metanet", args.command] + ([args.tasks_command] if args.command == "tasks" else []))
        url, api_key = connection(args)
        timeout = getattr(args, "timeout", None) or 60.0
        retries = getattr(args, "retries", None) or 0
        try:
            with MetaNetClient(url, api_key, timeout=timeout, retries=retries) as client:
                return run(client, args)
        except MetaNetAPIError as exc:
            _fail(prog, f"{exc.type}: {exc.message}")
            return EXIT_API_ERROR
        except APIConnectionError as exc:
            _fail(prog, f"{exc} (is the service running? set --url or METANET_URL)")
            return EXIT_UNREACHABLE
        except (UsageError, ValueError) as exc:  # ImageError is a ValueError
            _fail(prog, str(exc))
            return EXIT_USAGE
        except BrokenPipeError:  # `metanet tasks ls | head`: stop quietly (as the Python docs advise)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return command


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------ commands


def _tasks_create(client: MetaNetClient, args: argparse.Namespace) -> int:
    files = support_folder(args.dir)
    examples = _encoded([path for _, path in files], not args.no_progress)
    labelled = [(label, image) for (label, _), image in zip(files, examples, strict=True)]
    name = args.name if args.name is not None else args.dir.resolve().name
    paths = [path for _, path in files]
    with _naming_files(paths):
        task = client.create_task(labelled, name=name)
    _print(args, task, functools.partial(_task_text, paths=paths))
    return 0


def _tasks_ls(client: MetaNetClient, args: argparse.Namespace) -> int:
    page_size = min(args.limit or PAGE_SIZE, PAGE_SIZE)  # fetch no more than --limit asks for
    tasks = list(itertools.islice(client.iter_tasks(page_size), args.limit))
    if args.json:
        print(json.dumps([_jsonable(t) for t in tasks], indent=2))
    elif not tasks:
        print("no tasks")
    else:
        rows = [[t.task_id, t.name or "-", str(t.n_way), str(t.n_examples), _when(t.created_at)]
                for t in tasks]
        print(table(["TASK_ID", "NAME", "WAY", "EXAMPLES", "CREATED"], rows))
    return 0


def _tasks_get(client: MetaNetClient, args: argparse.Namespace) -> int:
    _print(args, client.get_task(args.task_id), _task_text)
    return 0


def _tasks_rm(client: MetaNetClient, args: argparse.Namespace) -> int:
    """Delete each task; an unknown one is reported and skipped (as `rm` does), any other error stops."""
    from metanet_client import NotFound

    missing = 0
    for task_id in args.task_ids:
        try:
            client.delete_task(task_id)
        except NotFound as exc:
            _fail("metanet tasks rm", f"{exc.type}: {exc.message}")
            missing += 1
        else:
            print(f"deleted {task_id}")
    return EXIT_API_ERROR if missing else 0


def _classify(client: MetaNetClient, args: argparse.Namespace) -> int:
    images = _encoded(args.images, not args.no_progress)
    with _naming_files(args.images):
        result = client.classify(args.task_id, images, top_k=args.top_k, explain=args.explain,
                                 min_confidence=args.min_confidence)
    _print(args, result, functools.partial(_classify_text, args.images))
    return 0


# --------------------------------------------------------------------------------- local input


def support_folder(root: Path) -> list[tuple[str, Path]]:
    """(label, file) for every file in ROOT/<label>/, labels and files in name order. Hidden
    entries are skipped; anything else out of place is refused or reported, never silently lost."""
    if not root.is_dir():
        raise UsageError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    _warn_ignored([p for p in entries if not p.is_dir()], f"not in a label folder of {root}")
    if len(folders) < 2:
        raise UsageError(
            f"{root} has {len(folders)} label folder{'' if len(folders) == 1 else 's'}; a task needs at "
            "least two: one subfolder per label, each holding that label's images"
        )
    files, empty = [], []
    for folder in folders:
        inside = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        _warn_ignored([p for p in inside if not p.is_file()], "a folder inside a label folder")
        found = [p for p in inside if p.is_file()]
        files += [(folder.name, path) for path in found]
        if not found:
            empty.append(folder.name)
    if empty:
        raise UsageError(f"label folder{'s' if len(empty) > 1 else ''} without images in {root}: "
                         + ", ".join(empty))
    return files


def _warn_ignored(paths: list[Path], why: str) -> None:
    if paths:
        shown = ", ".join(str(p) for p in paths[:5]) + (", …" if len(paths) > 5 else "")
        print(f"metanet: ignoring {len(paths)} entr{'y' if len(paths) == 1 else 'ies'} ({why}): {shown}",
              file=sys.stderr)


def _encoded(paths: Sequence[Path], progress: bool) -> list[Any]:
    """Read and encode every file (with a progress bar), then report all the bad ones at once."""
    from metanet_client import ImageError, encode_image

    encoded, bad = [], []
    for path in _progress(paths, "reading images", progress):
        try:
            encoded.append(encode_image(path))
        except ImageError as exc:
            bad.append(str(exc))
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UsageError(f"{len(bad)} of {len(paths)} files cannot be sent as images:\n  {shown}")
    return encoded


def _progress(items: Sequence[T], desc: str, enabled: bool) -> Iterable[T]:
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed); else the items as they are."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="img", disable=None, leave=False)


@contextlib.contextmanager
def _naming_files(paths: Sequence[Path]) -> Iterator[None]:
    """Add the file behind an error's example/image index (`details.index`) to its message."""
    from metanet_client import MetaNetAPIError

    try:
        yield
    except MetaNetAPIError as exc:
        index = exc.details.get("index") if isinstance(exc.details, dict) else None
        if isinstance(index, int) and 0 <= index < len(paths):
            exc.message = f"{exc.message} (file {paths[index]})"
        raise


# -------------------------------------------------------------------------------------- output


def _print(args: argparse.Namespace, value: Any, as_text: Callable[[Any], str]) -> None:
    print(json.dumps(_jsonable(value), indent=2) if args.json else as_text(value))


def _jsonable(value: Any) -> Any:
    """A result dataclass as plain JSON (times in RFC 3339)."""
    def convert(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [convert(x) for x in v]
        return v

    return convert(dataclasses.asdict(value))


def _task_text(task: Task, paths: Sequence[Path] = ()) -> str:
    """The task as a table, then its warnings, each naming the files of its examples when the
    support set was read from them (`paths`, in support order)."""
    shots = ", ".join(f"{label} ({task.shots.get(label, 0)})" for label in task.labels)
    rows = [
        ["task_id", task.task_id], ["name", task.name or "-"], ["labels", f"{task.n_way}: {shots}"],
        ["examples", str(task.n_examples)], ["model_version", task.model_version],
        ["created_at", _when(task.created_at)],
        ["updated_at", _when(task.updated_at) if task.updated_at else "-"],
        ["memory_bytes", str(task.memory_bytes)],
        ["warnings", str(len(task.warnings)) if task.warnings else "none"],
    ]
    lines = [table(None, rows)]
    for warning in task.warnings:
        details = warning.details
        indices = details.get("example_indices") or [details.get("example_index")]
        files = [str(paths[i]) for i in indices if isinstance(i, int) and 0 <= i < len(paths)]
        named = f" ({'file' if len(files) == 1 else 'files'} {', '.join(files)})" if files else ""
        lines.append(f"warning: {warning.type}: {warning.message}{named}")
    return "\n".join(lines)


NONE_OF_THESE = "none of these"  # a prediction below --min-confidence (label null)


def _classify_text(paths: Sequence[Path], result: ClassifyResult) -> str:
    headers = ["IMAGE", "LABEL", "CONFIDENCE", "SIMILARITY"]
    show_top = any(len(p.top_k) > 1 for p in result)
    show_attention = any(p.attention for p in result)
    headers += ["TOP_K"] * show_top + ["ATTENTION (top 3)"] * show_attention
    rows = []
    for path, p in zip(paths, result, strict=True):
        similarity = "-" if p.support_similarity is None else f"{p.support_similarity:.3f}"
        row = [str(path), NONE_OF_THESE if p.label is None else p.label, f"{p.confidence:.3f}", similarity]
        if show_top:
            row.append(", ".join(f"{lp.label} {lp.probability:.3f}" for lp in p.top_k))
        if show_attention:
            strongest = sorted(p.attention or (), key=lambda a: -a.weight)[:3]
            row.append(", ".join(f"#{a.example_index} {a.label} {a.weight:.2f}" for a in strongest))
        rows.append(row)
    return table(headers, rows)


def _when(moment: datetime) -> str:
    return moment.isoformat(sep=" ", timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """`python -m metanet_client`: the client commands without the rest of `metanet`."""
    parser = argparse.ArgumentParser(prog="python -m metanet_client",
                                     description="Use a running MetaNet service: tasks and classify.")
    output = output_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(parser, sub, output)
    args = parser.parse_args(argv)
    return args.func(args)


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    lines = ([list(headers)] if headers else []) + [list(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
