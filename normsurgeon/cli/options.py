"""Argument types and argument groups shared by the commands."""
from __future__ import annotations

import argparse
import re

_NEGATIVE_NUMBER = re.compile(r"-\d*\.?\d+(?:[eE][-+]?\d+)?")


def parse_value(text: str):
    """``--option`` value: int, float, bool (true/false), None (none/null) or str.

    Quote a value to keep it a string: ``key="8"``.
    """
    s = text.strip()
    low = s.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` → ``(key, parsed value)``; argparse turns the error into exit status 2."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier() or not raw.strip():
        raise argparse.ArgumentTypeError(
            f"expected key=value with a Python-identifier key and a value (e.g. num_groups=8), got {text!r}")
    return key, parse_value(raw)


def options(pairs) -> dict:
    """The ``--option`` pairs as a dict; a key given twice is an error."""
    out: dict = {}
    for key, value in pairs or []:
        if key in out:
            raise ValueError(f"--option {key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _positive(convert, noun: str):
    """An argparse type: ``convert(text)`` that must be finite and > 0, else "expected a positive {noun}"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}")
        return value
    return parse


positive_int = _positive(int, "integer")
positive_float = _positive(float, "number")


def batch_sizes(text: str) -> list[int]:
    """``"2,8,32"`` → ``[2, 8, 32]`` (sorted, unique); each a positive integer."""
    try:
        values = [int(p.strip()) for p in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 2,8,32), got {text!r}")
    return sorted(set(values))


def join_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` → ``--lr=-1e-3``: argparse reads a token like -1e-3 as an option (its negative-number
    pattern has no exponent), so the value would never reach its check."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_NUMBER.fullmatch(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --pretrained, --weights, --num-classes."""
    g = parser.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="timm name, torchvision:NAME, or omitted for the embedded EfficientNet-Lite0 "
                        "with real ImageNet weights")
    g.add_argument("--pretrained", action="store_true",
                   help="timm/torchvision pretrained weights (downloaded on first use)")
    g.add_argument("--weights", metavar="PATH",
                   help="local checkpoint (state_dict, or a dict with 'state_dict'/'model') "
                        "loaded strictly into MODEL")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier head size")


def add_site_selection(group) -> None:
    """--include / --exclude / --option, shared by plan, convert, diagnose and finetune."""
    group.add_argument("--include", nargs="+", action="extend", metavar="PAT",
                       help="convert only sites whose qualified name matches a glob (e.g. 'layer4.*')")
    group.add_argument("--exclude", nargs="+", action="extend", metavar="PAT",
                       help="leave sites whose qualified name matches a glob")
    group.add_argument("--option", type=parse_option, action="append", metavar="KEY=VALUE",
                       help="target option, repeatable: --option num_groups=8 --option eps=1e-5 "
                            "(values: int, float, true/false, none, else string)")


def conversion_command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command that converts MODEL (plan, convert): the model and conversion flags."""
    parser = sub.add_parser(name, help=help, description=description)
    add_model_arguments(parser)
    add_conversion_arguments(parser)
    return parser


def add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    """--to, the site selection, --input-size, --json (plan and convert)."""
    g = parser.add_argument_group("conversion")
    g.add_argument("--to", required=True, metavar="TARGET",
                   help="target name (see 'normsurgeon targets'): bn, frozen_bn, gn, ln, in, pn, ...")
    add_site_selection(g)
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size of the shape probe (default: the model's config, else 3 224 224)")
    g.add_argument("--json", metavar="FILE",
                   help="also write the report as JSON ('-': JSON on stdout instead of the table)")
