"""``normsurgeon plan``: what a conversion would do, site by site (a dry run)."""
from __future__ import annotations

from ..console import out
from .common import check_selection, check_writable, create, model_label, write_json
from .options import add_conversion_arguments, add_model_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="show what a conversion would do, site by site",
                       description="Print the conversion report of a dry run: every normalization site, "
                                   "what it would become and how its weights are transferred.")
    add_model_arguments(p)
    add_conversion_arguments(p)
    p.set_defaults(run=run)


def selection(args, options: dict) -> dict:
    """The keyword arguments of ns.plan / ns.convert from the conversion flags."""
    return dict(include=args.include, exclude=args.exclude,
                input_size=tuple(args.input_size) if args.input_size else None, **options)


def run(args) -> int:
    import normsurgeon as ns

    options = check_selection(args)
    if args.json and args.json != "-":
        check_writable(args.json)
    model = create(args)
    report = ns.plan(model, args.to, **selection(args, options))
    if args.json == "-":
        write_json(report, "-")
        return 0
    out(f"model: {model_label(args)}")
    out(report.table())
    if args.json:
        write_json(report, args.json)
    return 0
