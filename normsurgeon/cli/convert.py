"""``normsurgeon convert``: convert MODEL, print the report, save it with ``normsurgeon.save``.

A conversion whose verification could not run (the shape probe failed: often a wrong
``--input-size``) is not saved unless ``--no-verify`` says to.
"""
from __future__ import annotations

from ..console import out
from .common import check_writable, print_load_hint
from .options import conversion_command
from .plan import show, start


def add_parser(sub) -> None:
    p = conversion_command(sub, "convert", help="convert a model and save it",
                           description="Convert, print the report and save the converted model with "
                                       "normsurgeon.save (state_dict + recipe, no pickled code).")
    p.add_argument("--no-verify", action="store_true",
                   help="save the conversion even when it could not be verified on meta tensors")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to save (e.g. out/gn.pt)")
    p.set_defaults(run=run)


def run(args) -> int:
    import normsurgeon as ns

    check_writable(args.output)
    model, kwargs = start(args)
    new = ns.convert(model, args.to, **kwargs)
    report = new.normsurgeon_report
    if not report.verified and not args.no_verify:
        raise ValueError(f"the conversion could not be verified ({report.verify}), so nothing was saved. Check "
                         f"--input-size (C H W of one input), or pass --no-verify to save it unverified")
    show(report, args)
    ns.save(new, args.output)
    if args.json == "-":
        return 0
    out("")
    out(f"saved to {args.output} (state_dict + conversion recipe + checksum; loads with torch.load(weights_only=True))"
        + ("" if report.verified else " UNVERIFIED (--no-verify)"))
    print_load_hint(args.output, args)
    return 0
