"""Conversion fidelity: how close does each target get to the original EfficientNet-Lite0?

For each target: convert the embedded EfficientNet-Lite0 (real ImageNet weights), calibrate
on 64 photo crops, then distill from the original with ``normsurgeon.finetune`` and measure
top-1 agreement and KL(original ‖ converted) on held-out crops after convert, after calibrate,
and after each CPU-minute budget of distillation (process CPU time of the training steps,
one thread, evaluation excluded). The distillation points are one run: finetune is called
with max_seconds = 60·M for each budget M on the same checkpoint_dir, so each call resumes
the previous one exactly.

With normsurgeon's defaults (second round, 2026-12, ``results_defaults.csv``): calibration is
checked on crops of the 4 validation photos and kept only when it does not lower agreement
there; distillation keeps the population statistics of batch-statistics layers frozen and
returns the best state on the validation crops (evaluated every 25 steps, the start
included). Each budget point is measured twice: ``kept`` (the model finetune returns) and
``last`` (the last training state, read from the checkpoint). ``--recipe first-round``
reproduces the first round (no validation, statistics trained, last state).

Held-out sets (96 crops each, 160 px): ``same photos`` are new random crops of the 10
training photos (crops never seen in calibration or training); ``new photos`` are crops of 6
photos never used at all (coffee, flower, retina, moon, gravel, page).

    python analysis/conversion_fidelity/run.py [--targets gn proxy_gn ...] [--minutes 1 5 10 30]
    python analysis/conversion_fidelity/run.py --plot      # figures + tables from the CSVs
"""
from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import time
from pathlib import Path

import torch

import normsurgeon as ns
from normsurgeon import zoo
from normsurgeon.photo_crops import HELDOUT_PHOTOS, TRAIN_PHOTOS, VALIDATION_PHOTOS, PhotoCrops
from normsurgeon.training import evaluate
from normsurgeon.training.checkpoint import load_checkpoint

HERE = Path(__file__).parent
TARGETS = ["gn", "proxy_gn", "ln", "proxy_ln", "bgn", "iebn", "cbn", "mbn"]
OPTIONS = {"bgn": {"num_groups": "auto", "batch_size": 16}}
SIZE, BATCH, LR = 160, 16, 3e-4
FIELDS = ["target", "recipe", "stage", "state", "cpu_minutes", "steps", "kept_step", "calibration_kept",
          "agreement_same_photos", "kl_same_photos", "agreement_new_photos", "kl_new_photos"]


def append_row(path: Path, row: dict, fields: list[str] | None = None) -> None:
    """Append ``row`` to the CSV at ``path`` (header first if the file is new) and print it; ``fields``
    fixes the columns (missing ones left empty)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(row), restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(row, flush=True)


def measure(model, original, sets) -> dict:
    row = {}
    for name, x in sets.items():
        m = evaluate(model, x, original, batch_size=48)
        row[f"agreement_{name}"], row[f"kl_{name}"] = m["eval_agreement"], m["eval_kl"]
    return row


def run_target(to: str, minutes: list[float], out: Path, lr: float = LR, feature_weight: float = 0.0,
               scheduler: str = "constant", steps: int = 1_000_000, first_round: bool = False) -> None:
    torch.manual_seed(0)
    original = zoo.efficientnet_lite0()
    sets = {"same_photos": PhotoCrops(TRAIN_PHOTOS, 96, SIZE, seed=3).batch(),
            "new_photos": PhotoCrops(HELDOUT_PHOTOS, 96, SIZE, seed=2).batch()}
    validation = None if first_round else PhotoCrops(VALIDATION_PHOTOS, 96, SIZE, seed=4).batch()
    calibration = PhotoCrops(TRAIN_PHOTOS, 64, SIZE, seed=1).batch()
    train = PhotoCrops(TRAIN_PHOTOS, 1_000_000, SIZE, seed=10)
    recipe = ("first round" if first_round else "defaults") + f", adamw lr={lr:g}" + (
        f" cosine over {steps} steps" if scheduler == "cosine" else "") + (
        f" features={feature_weight:g}" if feature_weight else "")

    def write(stage: str, model, state: str = "kept", **extra) -> None:
        append_row(out, {"target": to, "recipe": recipe, "stage": stage, "state": state, **extra,
                         **measure(model, original, sets)}, None if first_round else FIELDS)

    converted = ns.convert(original, to=to, **OPTIONS.get(to, {}))
    write("convert", converted, cpu_minutes=0, steps=0)
    if first_round:
        calibrated = ns.calibrate(converted, original, calibration, augment=False, holdout=None)
    else:
        calibrated = ns.calibrate(converted, original, calibration, holdout=validation)
    write("calibrate", calibrated, cpu_minutes=0, steps=0,
          calibration_kept=calibrated.normsurgeon_calibration_check["kept"])
    last = copy.deepcopy(calibrated)
    with tempfile.TemporaryDirectory() as ckpt:
        for minute in minutes:
            history = ns.finetune(calibrated, train, teacher=original, steps=steps, lr=lr, optimizer="adamw",
                                  feature_weight=feature_weight,
                                  batch_size=BATCH, scheduler=scheduler, warmup_steps=20, checkpoint_dir=ckpt,
                                  checkpoint_every=1000, max_seconds=60 * minute, clock="cpu", progress=False,
                                  log_every=5, eval_data=validation, eval_every=25, keep_best=not first_round,
                                  train_statistics=first_round)
            done = max(r["step"] for r in history)
            cpu = max(r.get("cpu_s", 0) for r in history)
            kept = next((r["restored_best_step"] for r in reversed(history) if "restored_best_step" in r), done)
            write(f"distill {minute:g} min", calibrated, cpu_minutes=round(cpu / 60, 2), steps=done, kept_step=kept)
            if not first_round:
                last.load_state_dict(load_checkpoint(Path(ckpt))["model"])
                write(f"distill {minute:g} min", last, state="last", cpu_minutes=round(cpu / 60, 2), steps=done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--minutes", nargs="+", type=float, default=[1, 5, 10])
    parser.add_argument("--recipe", choices=["defaults", "first-round"], default="defaults")
    parser.add_argument("--out", default=None, help="CSV to append to (default results_defaults.csv, or "
                                                   "results.csv with --recipe first-round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--feature-weight", type=float, default=0.0, help="finetune's feature_weight")
    parser.add_argument("--scheduler", choices=["constant", "cosine"], default="constant",
                        help="cosine: decay to 0 over --steps (pick --steps to end inside the last budget)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="the schedule's length in steps")
    parser.add_argument("--plot", action="store_true", help="only draw the figure and table from --out")
    args = parser.parse_args()
    first_round = args.recipe == "first-round"
    out = Path(args.out or HERE / ("results.csv" if first_round else "results_defaults.csv"))
    if not args.plot:
        torch.set_num_threads(args.threads)
        start = time.process_time()
        for to in args.targets:
            run_target(to, args.minutes, out, args.lr, args.feature_weight, args.scheduler, args.steps, first_round)
        print(f"total CPU time {(time.process_time() - start) / 60:.1f} min")
        return
    from plot import plot, plot_defaults
    plot(HERE / "results.csv", HERE)
    plot_defaults(HERE / "results_defaults.csv", HERE)


if __name__ == "__main__":
    main()
