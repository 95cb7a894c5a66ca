"""The ``normsurgeon`` command line, one module per command.

    normsurgeon targets
    normsurgeon plan    [MODEL] --to gn [--include PAT ...] [--exclude PAT ...] [--option num_groups=8] [--json FILE]
    normsurgeon convert [MODEL] --to gn -o out/gn.pt [same selection and option flags] [--no-verify]
    normsurgeon diagnose [MODEL] [--to gn] [--data DIR] [--batch-sizes 2,8,32] -o out/diag/
    normsurgeon finetune [MODEL] --to proxy_gn [--calibrate] [--data DIR] [--steps N] [--minutes M] -o out/ft.pt
    normsurgeon demo [--to proxy_gn] [--steps 250] [--output out/demo/]

MODEL is a timm name (``resnet50``), ``torchvision:NAME`` (``torchvision:resnet50``), or
omitted for the embedded EfficientNet-Lite0 with real ImageNet weights (works offline);
``--weights PATH`` loads a local checkpoint into it, ``--pretrained`` takes the library's
weights (downloaded); without either, a timm/torchvision model has random weights (seed 0) and
the output says so. Errors go to stderr as one line with exit status 2 (``--traceback`` shows
the traceback); an unexpected failure exits with 1. ``python -m normsurgeon`` is the same program.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from . import convert, demo, diagnose, finetune, plan, targets
from .options import join_negative_values, parse_option, parse_value

EXIT_USAGE = 2
EXIT_INTERNAL = 1
COMMANDS = (targets, plan, convert, diagnose, finetune, demo)

__all__ = ["main", "build_parser", "parse_option", "parse_value"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # same as argparse, but says where to look
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normsurgeon",
                     description="Swap the normalization layers of pretrained timm/torchvision models.",
                     epilog="MODEL: a timm name (resnet50), torchvision:NAME (torchvision:resnet50), "
                            "or omitted for the embedded EfficientNet-Lite0 with real ImageNet weights.")
    parser.add_argument("--version", action="version", version=f"normsurgeon {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _warn_to_stderr(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error, 1 internal error)."""
    from ..surgery import ConversionError

    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_USAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _warn_to_stderr
            return args.run(args)
    except (ValueError, TypeError, OSError, ImportError, ConversionError, FloatingPointError) as err:
        if args.traceback:
            raise
        print(f"normsurgeon {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"normsurgeon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line, and how to see more
        if args.traceback:
            raise
        print(f"normsurgeon {args.command}: internal error: {type(err).__name__}: {err}. Rerun with --traceback "
              f"for the details and report them.", file=sys.stderr)
        return EXIT_INTERNAL
