"""`metanet`: the command line for meta-training, evaluation and serving, and for using a running
service. The commands come from their packages: `model.cli` (train, evaluate, calibrate,
export-onnx), `serve` here, and `metanet_client.cli` (tasks create|ls|get|rm, classify). Options
that several commands share (--json, --url, --api-key, --timeout, --retries) go before or after
the command's name alike."""

from __future__ import annotations

import argparse
import sys

from metanet_client.cli import add_client_commands, output_options
from model.cli import add_model_commands


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (flags override the METANET_* environment)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--data-dir", help="where the task store lives (default ./var)")
    p.add_argument("--checkpoint", help="weights directory (default: the shipped weights)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto: CUDA when present)")
    p.add_argument("--cache-bytes", type=int, help="budget of the task-memory cache")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
    p.add_argument("--torch-threads", type=int, help="torch CPU threads")
    p.add_argument("--processes", type=int,
                   help="server processes on one port (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="where queries run (default torch)")
    p.add_argument("--onnx-path", help="the ONNX query path (exported there when missing)")
    p.add_argument("--m-dtype", choices=["float32", "float16", "bfloat16"], help="dtype of cached M")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.process.server import serve
    from service.settings import Settings

    names = ("host", "port", "data_dir", "checkpoint", "device", "cache_bytes", "max_body_bytes",
             "torch_threads", "processes", "backend", "onnx_path", "m_dtype", "log_level")
    return serve(Settings(**{k: getattr(args, k) for k in names if getattr(args, k) is not None}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanet", description=__doc__)
    output = output_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub, output)
    _add_serve(sub)
    add_client_commands(parser, sub, output)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"metanet {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> bool:
    """A missing file, a bad value, or what the model refuses (weights that are missing or do not
    match, a task it cannot take): a one-line message, not a traceback."""
    if isinstance(exc, FileNotFoundError | ValueError):
        return True
    errors = sys.modules.get("model.errors")  # not imported by the client commands: no torch there
    return errors is not None and isinstance(exc, errors.MetaNetError)


if __name__ == "__main__":
    sys.exit(main())
