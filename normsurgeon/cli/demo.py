"""``normsurgeon demo``: the small-batch fine-tuning job (``normsurgeon.demo``)."""
from __future__ import annotations

from .options import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune a pretrained EfficientNet-Lite0 at batch 2: plain BN against normsurgeon",
                       description="The embedded EfficientNet-Lite0 (real ImageNet weights) gets a new head and is "
                                   "fine-tuned with labels at batch 2 on the offline photo task: BatchNorm as a "
                                   "plain loop trains it, normsurgeon's default (population statistics kept), and "
                                   "the conversion --to; then diagnose says why.")
    p.add_argument("--to", default="proxy_gn", metavar="TARGET",
                   help="the conversion compared with BatchNorm (default proxy_gn)")
    p.add_argument("--steps", type=positive_int, default=250, metavar="N",
                   help="optimizer steps of each fine-tuning run (default 250)")
    p.add_argument("--output", default="out/demo", metavar="DIR",
                   help="folder for the diagnostics report (default out/demo/)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run as run_demo

    return run_demo(to=args.to, output=args.output, steps=args.steps)
