"""``normsurgeon plan``: what a conversion would do, site by site (a dry run)."""
from __future__ import annotations

from ..console import out
from .common import check_selection, check_writable, create, model_label, write_json
from .options import conversion_command


def add_parser(sub) -> None:
    p = conversion_command(sub, "plan", help="show what a conversion would do, site by site",
                           description="Print the conversion report of a dry run: every normalization site, "
                                       "what it would become and how its weights are transferred.")
    p.set_defaults(run=run)


def selection(args, options: dict) -> dict:
    """The keyword arguments of ns.plan / ns.convert from the conversion flags."""
    return dict(include=args.include, exclude=args.exclude,
                input_size=tuple(args.input_size) if args.input_size else None, **options)


def start(args) -> tuple:
    """Check the target, its options and the --json path before building MODEL; (model, ns.plan/convert
    keyword arguments)."""
    options = check_selection(args)
    if args.json and args.json != "-":
        check_writable(args.json)
    return create(args), selection(args, options)


def run(args) -> int:
    import normsurgeon as ns

    model, kwargs = start(args)
    show(ns.plan(model, args.to, **kwargs), args)
    return 0


def show(report, args) -> None:
    """The report: JSON alone on stdout with --json -, else the model, the table, and --json FILE."""
    if args.json == "-":
        write_json(report, "-")
        return
    out(f"model: {model_label(args)}")
    out(report.table())
    if args.json:
        write_json(report, args.json)
