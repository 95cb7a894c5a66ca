"""``normsurgeon finetune``: convert MODEL, optionally calibrate it, distill it from the original, save it.

Data: ``--data DIR`` (every 5th image held out, or ``--eval-data DIR``), by default random crops of
the offline photos (``normsurgeon.photo_crops``). Top-1 agreement and KL with the original on the
held-out images are printed before and after; the model is saved with ``ns.save`` and the
history next to it. ``--checkpoint-dir`` makes the run resumable: the same command again resumes.

Under ``torchrun --nproc-per-node N -m normsurgeon finetune ...`` the default process group is started
(gloo on CPU, nccl with CUDA), ``--batch-size`` is per process and ``ns.finetune`` shards the data;
only rank 0 prints and writes files.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

from ..console import out, wrap
from .common import check_selection, check_writable, create, data_config, load_folder, model_label, print_load_hint
from .options import add_model_arguments, add_site_selection, positive_float, positive_int

CALIBRATION_IMAGES = 64
UNLIMITED_STEPS = 1_000_000


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="convert, calibrate and distill from the original",
                       description="Convert MODEL, optionally calibrate it, fine-tune it by distillation from the "
                                   "original (unlabeled images: the original's predictions are the targets) and "
                                   "save it. Prints top-1 agreement and KL with the original on held-out images "
                                   "before and after. Re-running the same command with --checkpoint-dir resumes "
                                   "the run.")
    add_model_arguments(p)
    g = p.add_argument_group("conversion")
    g.add_argument("--to", required=True, metavar="TARGET",
                   help="target name (see 'normsurgeon targets'), e.g. proxy_gn, gn, ln")
    add_site_selection(g)
    g.add_argument("--calibrate", action="store_true",
                   help="normsurgeon.calibrate on (up to 64) training images before fine-tuning")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR",
                   help="folder of images (.jpg/.png/..., subfolders too; labels are not used): every 5th image is "
                        "held out, to measure agreement and to choose what is kept; default: random crops of the "
                        "offline photos (normsurgeon.photo_crops): training photos, validation photos that choose "
                        "what is kept, and held-out crops and photos that measure it")
    g.add_argument("--eval-data", metavar="DIR", help="folder of held-out images (with --data: then all of --data trains)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that cannot be decoded (they are listed) instead of stopping")
    g.add_argument("--size", type=positive_int, metavar="PX", help="input size in pixels (default: the model's, else 224)")
    g.add_argument("--eval-images", type=positive_int, default=96, metavar="N",
                   help="crops per validation and held-out set with the default data (default 96)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, metavar="N",
                   help="optimizer steps (default 100; with --minutes alone: until the time is spent)")
    g.add_argument("--minutes", type=positive_float, metavar="M",
                   help="stop after M minutes of process CPU time spent training (evaluation excluded)")
    g.add_argument("--lr", type=float, default=3e-4, metavar="LR", help="peak learning rate (default 3e-4)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="default adamw")
    g.add_argument("--scheduler", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule after the warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, default=20, metavar="N", help="linear warm-up (default 20)")
    g.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="default 16")
    g.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    g.add_argument("--eval-every", type=positive_int, default=25, metavar="N",
                   help="steps between evaluations on the validation images (default 25); the best evaluated "
                        "state, the start included, is kept")
    g.add_argument("--keep-last", action="store_true", help="keep the last state instead of the best evaluated one")
    g.add_argument("--train-statistics", action="store_true",
                   help="train with batch statistics and update the running estimates (default: BatchNorm-type "
                        "layers keep their population statistics)")
    g.add_argument("--trainable", default="all", metavar="WHICH", help="what trains: all (default), norm, head, norm+head")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write resumable checkpoints here; the same command again resumes from them")
    g.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="N",
                   help="steps between checkpoints (default 50; one is always written at the end)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to save the fine-tuned model (normsurgeon.save); FILE's stem + "
                        ".history.json / .history.csv are written next to it")
    p.set_defaults(run=run)


class Agreement:
    """Top-1 agreement and KL(original ‖ model) on fixed held-out sets; the original's logits are
    computed once per set and reused at every stage."""

    def __init__(self, original, sets: dict, batch_size: int = 48):
        self.original, self.sets, self.batch_size = original, sets, batch_size
        self.caches: dict = {name: {} for name in sets}

    def __call__(self, model) -> str:
        from ..training import evaluate

        metrics = {name: evaluate(model, x, self.original, self.batch_size, self.caches[name])
                   for name, x in self.sets.items()}
        return "; ".join(f"{name} ({len(self.sets[name])}): top-1 agreement {m['eval_agreement']:.1%}, "
                         f"KL {m['eval_kl']:.3g}" for name, m in metrics.items())


def held_out_split(n: int) -> list[int]:
    """Indices held out of an image folder: every 5th image (at least one, never all)."""
    return list(range(4, n, 5)) or [n - 1]


def _check(args) -> dict:
    from ..data import find_images

    options = check_selection(args)
    if not (0 < args.lr < float("inf")):
        raise ValueError(f"--lr must be a positive number, got {args.lr:g}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be ≥ 0, got {args.warmup_steps}")
    if args.eval_data is not None and args.data is None:
        raise ValueError("--eval-data needs --data (the default data has its own held-out photos)")
    check_writable(args.output)
    if args.data is not None:  # fail on a bad folder before building the model
        n = len(find_images(args.data))
        if args.eval_data is not None:
            find_images(args.eval_data)
        elif n < 2:
            raise ValueError(f"{args.data} holds {n} image: need at least 2 (every 5th, at least one, is held out "
                             f"to measure agreement), or give --eval-data DIR")
    return options


def _folder_data(args, size: int, cfg: dict):
    import torch

    x, _ = load_folder(args.data, size, cfg, skip_bad=args.skip_bad_images)
    if args.eval_data is not None:
        train, held = x, load_folder(args.eval_data, size, cfg, skip_bad=args.skip_bad_images)[0]
    else:
        idx = held_out_split(len(x))
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[idx] = False
        train, held = x[keep], x[idx]
    sets = {"held-out images": held}
    calibration = list(train[:CALIBRATION_IMAGES].split(args.batch_size))
    source = (f"{len(train)} images from {args.data}, {size} px (the same each epoch); the held-out images also "
              f"decide which calibration and which training state are kept")
    return train, sets, held, calibration, source  # held: also the validation set (numbers are optimistic)


def _photo_data(args, size: int, cfg: dict):
    from ..photo_crops import HELDOUT_PHOTOS, TRAIN_PHOTOS, VALIDATION_PHOTOS, PhotoCrops

    print("cropping the offline photos ...", file=sys.stderr, flush=True)
    crops = dict(size=size, mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]))
    train = PhotoCrops(TRAIN_PHOTOS, UNLIMITED_STEPS, seed=10, **crops)
    sets = {"new crops of the training photos": PhotoCrops(TRAIN_PHOTOS, args.eval_images, seed=3, **crops).batch(),
            "crops of held-out photos": PhotoCrops(HELDOUT_PHOTOS, args.eval_images, seed=2, **crops).batch()}
    calibration = list(PhotoCrops(TRAIN_PHOTOS, CALIBRATION_IMAGES, seed=1, **crops).batch().split(args.batch_size))
    validation = PhotoCrops(VALIDATION_PHOTOS, args.eval_images, seed=4, **crops).batch()
    source = (f"random crops of {len(TRAIN_PHOTOS)} offline photos (normsurgeon.photo_crops), {size} px; crops of "
              f"{len(VALIDATION_PHOTOS)} other photos decide which calibration and which training state are kept; "
              f"held out: other crops of the training photos and crops of {len(HELDOUT_PHOTOS)} photos used nowhere "
              f"else")
    return train, sets, validation, calibration, source


def _calibrate(converted, model, calibration, validation, measure):
    import normsurgeon as ns

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a rejection is reported below
        converted = ns.calibrate(converted, model, calibration, inplace=True, holdout=validation)
    check = converted.normsurgeon_calibration_check
    images = sum(len(b) for b in calibration)
    if check["kept"]:
        out(f"after calibrate ({images} training images): {measure(converted)}")
    else:
        out(wrap(f"calibrate ({images} training images): rejected, the fit would lower agreement on the "
                 f"{check['held_out']} validation images ({check['agreement_before']:.1%} → "
                 f"{check['agreement_after']:.1%}, KL {check['kl_before']:.3g} → {check['kl_after']:.3g}); "
                 f"fine-tuning starts from the converted model"))
    return converted


def run(args) -> int:
    from ..distributed.ranks import start_from_environment

    ranks = start_from_environment()  # under torchrun; None in a single process
    if ranks is None or ranks.main:
        return _run(args, writes=True)
    # the other ranks train alongside, silently (an error still reaches stderr: main prints it after
    # this block), and write nothing
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return _run(args, writes=False)


def _run(args, writes: bool) -> int:
    import normsurgeon as ns

    options = _check(args)
    steps = args.steps or (UNLIMITED_STEPS if args.minutes is not None else 100)
    start = time.perf_counter()
    model = create(args).eval()
    cfg = data_config(model)
    size = args.size or int(cfg["input_size"][-1])
    train, sets, validation, calibration, source = (_folder_data if args.data is not None else _photo_data)(
        args, size, cfg)
    out(f"model: {model_label(args)}, converted to {args.to!r}, distilled from the original")
    out(f"data: {source}")
    converted = ns.convert(model, args.to, include=args.include, exclude=args.exclude, **options)
    measure = Agreement(model, sets, batch_size=2 * args.batch_size)
    out(f"before (converted): {measure(converted)}")
    if args.calibrate:
        converted = _calibrate(converted, model, calibration, validation, measure)
    keep_best = not args.keep_last and len(validation) >= 8
    if not args.keep_last and not keep_best:
        out(f"note: {len(validation)} validation images are too few to rank training states (8 needed): the last "
            f"state is kept")
    history = ns.finetune(converted, train, teacher=model, steps=steps, lr=args.lr, optimizer=args.optimizer,
                          batch_size=args.batch_size, scheduler=args.scheduler, warmup_steps=args.warmup_steps,
                          seed=args.seed, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                          max_seconds=None if args.minutes is None else 60 * args.minutes, clock="cpu",
                          eval_data=validation if keep_best else None, eval_every=args.eval_every,
                          keep_best=keep_best, train_statistics=args.train_statistics, trainable=args.trainable)
    done = max((r["step"] for r in history if "step" in r), default=0)
    cpu = max((r.get("cpu_s", 0.0) for r in history), default=0.0)
    stopped = next((r["stopped"] for r in reversed(history) if "stopped" in r), None)
    restored = next((r for r in history if "restored_best_step" in r), None)
    kept = (f"; kept the state of step {restored['restored_best_step']}, the best on the validation images"
            if restored else "")
    out(f"after fine-tuning ({done} step{'s' if done != 1 else ''}, {cpu / 60:.2f} CPU minutes"
        f"{', stopped: ' + stopped if stopped else ''}{kept}): {measure(converted)}")
    if not writes:
        return 0
    ns.save(converted, args.output)
    written = [args.output] + [str(p) for p in history.save(os.path.splitext(args.output)[0] + ".history")]
    out("")
    out(f"done in {time.perf_counter() - start:.1f} s; written: {', '.join(written)}")
    if args.checkpoint_dir:
        out(f"checkpoints in {args.checkpoint_dir}: the same command again resumes an interrupted run"
            + ("; a larger --minutes continues this one" if args.steps is None and args.minutes else ""))
    print_load_hint(args.output, args)
    return 0
