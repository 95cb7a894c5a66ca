"""``normsurgeon diagnose``: ``ns.diagnose`` on a folder of images (or the sample photos) → report."""
from __future__ import annotations

import os
import sys
import time

from ..console import out
from .common import check_enough, create, data_config, load_folder, model_label
from .options import add_model_arguments, add_site_selection, batch_sizes, options, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="pre-activation diagnostics on images → report",
                       description="Run normsurgeon.diagnose on a folder of images (or the sample photos), print "
                                   "the summary and save report.html / report.json. With --to, the converted "
                                   "model is diagnosed and compared with the original.")
    add_model_arguments(p)
    g = p.add_argument_group("conversion (optional)")
    g.add_argument("--to", metavar="TARGET", help="convert first (see 'normsurgeon targets') and compare with the original")
    add_site_selection(g)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR",
                   help="folder of images (.jpg/.png/..., subfolders too); default: the sample photos of skimage.data")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that cannot be decoded (they are listed) instead of stopping")
    g.add_argument("--size", type=positive_int, metavar="PX", help="input size in pixels (default: the model's, else 224)")
    g.add_argument("--limit", type=positive_int, metavar="N", help="use at most N images")
    g = p.add_argument_group("diagnostics")
    g.add_argument("--batch-sizes", type=batch_sizes, metavar="B1,B2,...",
                   help="batch sizes of the batch-statistics sweep, e.g. 2,8,32 (default: no sweep)")
    g.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="chunk size of the eval-mode recording (default 16)")
    g.add_argument("--max-batches", type=positive_int, default=64, metavar="N",
                   help="batches drawn per sweep batch size (default 64)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for report.html, report.json and the figures (created if needed)")
    p.set_defaults(run=run)


def run(args) -> int:
    import normsurgeon as ns

    from .. import zoo
    from ..data import find_images

    opts = options(args.option)
    if args.to is not None:
        from ..surgery import get_target

        get_target(args.to).check_options(opts)
    elif opts or args.include or args.exclude:
        raise ValueError("--option/--include/--exclude need --to TARGET")
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path exists and is not a folder: {args.output}")
    if args.data is not None:  # fail on a bad folder before building the model
        n_files = len(find_images(args.data))
        check_enough(min(n_files, args.limit or n_files), f"{min(n_files, args.limit or n_files)} images in "
                     f"{args.data}", args.batch_sizes)

    start = time.perf_counter()
    model = create(args)
    cfg = data_config(model)
    size = args.size or int(cfg["input_size"][-1])
    if args.data is not None:
        x, names = load_folder(args.data, size, cfg, args.limit, args.skip_bad_images)
        source = args.data
    else:
        print("loading the sample photos of skimage.data ...", file=sys.stderr, flush=True)
        x, names = zoo.sample_images(size, mean=cfg["mean"], std=cfg["std"])
        x, names = (x[:args.limit], names[:args.limit]) if args.limit is not None else (x, names)
        source = "the sample photos of skimage.data"
    check_enough(len(names), f"{len(names)} images from {source}", args.batch_sizes)

    reference = None
    if args.to is not None:
        reference = model
        model = ns.convert(model, args.to, include=args.include, exclude=args.exclude, **opts)
    out(f"model: {model_label(args)}" + (f", converted to {args.to!r} (compared with the original)"
                                         if reference is not None else ""))
    mean, std = (", ".join(f"{float(v):.3g}" for v in cfg[k]) for k in ("mean", "std"))
    out(f"data: {len(names)} images from {source}, {size} px, mean=({mean}), std=({std})")
    report = ns.diagnose(model, x, batch_sizes=args.batch_sizes, reference=reference, batch_size=args.batch_size,
                         max_batches=args.max_batches, data_source=source, progress=True)
    out("")
    out(report.summary())
    written = report.save(out_dir)
    out("")
    out(f"written to {args.output} in {time.perf_counter() - start:.1f} s:")
    for path in written:
        out(f"    {os.path.join(args.output, path.name)}")
    return 0
