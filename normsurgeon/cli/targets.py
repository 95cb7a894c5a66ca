"""``normsurgeon targets``: the conversion targets with their options."""
from __future__ import annotations

from ..console import out


def add_parser(sub) -> None:
    p = sub.add_parser("targets", help="list the conversion targets",
                       description="List the conversion targets with their options.")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..surgery import available_targets, get_target
    from ..surgery.targets.registry import COMMON_OPTIONS

    targets = available_targets()
    width = max(map(len, targets), default=0)
    for name, summary in targets.items():
        out(f"{name.ljust(width)}  {summary}")
        opts = list(get_target(name).options) + [o for o in COMMON_OPTIONS if o not in get_target(name).options]
        out(f"{''.ljust(width)}  options: {', '.join(opts)}")
    return 0
