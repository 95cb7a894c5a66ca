"""``finetune``: a plain training loop for converted models, by distillation and/or labels.

One step: read a batch (x, labels?, domain?) → student forward (routed to the batch's domain
when the model has domain-specific BN) → loss → backward → optimizer step → scheduler step →
``after_step(model, x)`` (the step hooks of stateful layers, see ``step_hooks``).

Loss, with s the student's logits and t the teacher's (T = ``temperature``):
    distill: T² · KL(softmax(t/T) ‖ softmax(s/T))   (mean over the batch)
             + feature_weight · per-site scale-free MSE of the pre-activations (see
             ``feature_distillation``; 0 by default)
    labels:  cross-entropy(s, y)
    both:    (1 − label_weight) · distill + label_weight · labels
``loss="auto"`` distills when a teacher is given, else uses the labels.

Never worse than the start, by default:
- ``train_statistics=False``: every layer with running statistics (torch/timm BatchNorm, bn,
  bgn, iebn, cbn, mbn, dsbn) normalizes with its population statistics during the run, as in
  eval mode, and does not update them; γ, β and everything else train. A function-preserving
  conversion then starts at zero distillation loss and small batches of narrow data cannot
  overwrite the pretrained statistics. ``train_statistics=True`` trains with batch statistics
  (what BatchNorm, BGN, CBN, MBN, IEBN do in their papers) and updates the running estimates.
- ``keep_best=True`` with ``eval_data``: the state before the first step and every evaluated
  state are ranked (``best_state``), and the model ends in the best one.
- ``trainable=`` chooses what trains: "all", "norm", "head", "norm+head", glob patterns or a
  callable (``trainable``).

The model is trained in place (that is what was asked); the teacher is only read, in eval
mode. A model passed in eval mode is put in train mode for the run; a model passed in train
mode keeps the eval flags of its submodules (a stage frozen with ``model.layer1.eval()``).
Every module's own flag is given back at the end.

With ``checkpoint_dir`` the run writes an atomic checkpoint every ``checkpoint_every`` steps
and at the end (the last state, and the best state so far), and ``history.json`` /
``history.csv``; calling ``finetune`` again with the same arguments resumes from it and ends
with the same weights, bit for bit on CPU, as an uninterrupted run. A checkpoint of another
model, recipe or configuration is refused before anything is written.

Under torchrun (an initialized process group of 2 or more ranks), ``batch_size`` is per process:
map-style data is sharded (each rank its rows of one global batch of ``batch_size`` × world size,
see ``data_order``; a DataLoader is taken as already sharded), the model runs in
DistributedDataParallel (``broadcast_buffers=False``), with ``train_statistics=True`` its
batch-statistics layers are synchronized (``normsurgeon.sync_statistics``, in place, undone at the
end), step hooks run on every rank, and only rank 0 prints and writes checkpoints. W ranks at batch B
train exactly as one process at batch B·W. A checkpoint resumes only with the same number of ranks.
Evaluation sums over every rank's ``eval_data`` (its own shard, or the same set on each), so every
rank ranks states alike and ends in the same best state.

Write your own loop instead? Keep three things: ``ns.param_groups(model, wd)`` for the
optimizer, ``ns.after_step(model, x)`` after every ``optimizer.step()``, and (for batch-
statistics targets) ``ns.recalibrate_bn(model, data)`` before evaluating.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.ranks import Ranks
from ..distributed.sync import synchronized
from ..domains.routing import router
from ..progress import Progress
from ..model_state import device_of, preserved, running_statistics_layers
from .batches import check_inputs
from .best_state import BestState, check_eval_size
from .checkpoint import (data_fingerprint, load_checkpoint, mismatch, model_fingerprint, rng_state, save_checkpoint,
                         set_rng_state, teacher_fingerprint)
from .history import History
from .data_order import DataOrder
from .feature_distillation import FeatureMatcher
from .param_groups import param_groups
from .step_hooks import after_step
from .trainable import only_trainable, select_trainable

LOSSES = ("auto", "distill", "labels", "both")


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(x, labels or None, domain or None) from a tensor, a tuple/list or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        return batch["input"], batch.get("label"), batch.get("domain")
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None), (batch[2] if len(batch) > 2 else None)
    raise TypeError(f"a batch must be a tensor, (x, y[, domain]) or a dict, got {type(batch).__name__}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * (t * t)


def _make_optimizer(model, optimizer, lr, weight_decay, momentum):
    groups = param_groups(model, weight_decay)
    if callable(optimizer):
        return optimizer(groups)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd', 'adamw' or a callable(param_groups) -> Optimizer, got {optimizer!r}")


def _make_scheduler(opt, scheduler, total: int, warmup: int):
    if callable(scheduler):
        return scheduler(opt, total)
    if scheduler not in ("cosine", "constant"):
        raise ValueError(f"scheduler must be 'cosine', 'constant' or a callable(optimizer, total_steps), "
                         f"got {scheduler!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check_arguments(model, teacher, lr, batch_size, steps, epochs, loss, temperature, label_weight,
                     checkpoint_every, max_seconds, clock):
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune expects an nn.Module, got {type(model).__name__}")
    if teacher is not None and (not isinstance(teacher, nn.Module) or teacher is model):
        raise ValueError("teacher must be another nn.Module (the original model), not the student itself")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    for name, value in (("steps", steps), ("epochs", epochs), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss in ("distill", "both") and teacher is None:
        raise ValueError(f"loss={loss!r} needs teacher= (the original model)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= label_weight <= 1:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")


@torch.no_grad()
def evaluate(model: nn.Module, data, teacher: nn.Module | None = None, batch_size: int = 64,
             teacher_cache: dict | None = None, ranks=None) -> dict:
    """eval_agreement / eval_kl with the teacher (when given), eval_accuracy / eval_loss (when
    labeled), eval_images (how many). Both models run in eval mode; every module's own flag is
    restored. With ``ranks`` (torchrun), the sums are over every rank's ``data`` (one all-reduce), so
    every rank gets the same metrics and keeps the same best state."""
    route = router(model)
    order = DataOrder(data, batch_size, seed=0, what="eval_data")
    batches = order.batches(0) if order.dataset is None else _in_order(order.dataset, batch_size)
    sums, count = {"agree": 0.0, "kl": 0.0, "correct": 0.0, "ce": 0.0}, 0
    labeled = False
    device = device_of(model)
    with preserved(model), (preserved(teacher) if teacher is not None else contextlib.nullcontext()):
        model.eval()
        if teacher is not None:
            teacher.eval()
        for i, batch in enumerate(batches):
            x, y, d = split_batch(batch)
            x = check_inputs(x, "eval_data").to(device)
            with route(d):
                out = model(x)
            n = x.shape[0]
            if teacher is not None:
                ref = teacher_cache.get(i) if teacher_cache is not None else None
                if ref is None:
                    ref = teacher(x.to(device_of(teacher))).to(out.device)
                    if teacher_cache is not None:
                        teacher_cache[i] = ref
                sums["agree"] += float((out.argmax(1) == ref.argmax(1)).sum())
                sums["kl"] += float(distillation_loss(out, ref, 1.0)) * n
            if y is not None:
                labeled = True
                y = y.to(out.device)
                sums["correct"] += float((out.argmax(1) == y).sum())
                sums["ce"] += float(F.cross_entropy(out, y, reduction="sum"))
            count += n
    if ranks is not None:
        sums, count, labeled = ranks.sum_over_ranks(sums, count, labeled)
    metrics = {"eval_images": count}
    if teacher is not None:
        metrics.update(eval_agreement=sums["agree"] / count, eval_kl=sums["kl"] / count)
    if labeled:
        metrics.update(eval_accuracy=sums["correct"] / count, eval_loss=sums["ce"] / count)
    return metrics


def _in_order(dataset, batch_size):
    from torch.utils.data import default_collate

    for start in range(0, len(dataset), batch_size):
        yield default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _refuse_other_world(saved: int, now: int, directory) -> None:
    if saved != now:
        raise ValueError(
            f"the checkpoint in {directory} was written by a run of {saved} process(es) and this run has {now}: "
            f"the data order and the per-process batches depend on the number of processes. Resume with the same "
            f"number (torchrun --nproc-per-node {saved}; plain python for 1), or use another checkpoint_dir. "
            f"Nothing was overwritten.")


def finetune(model: nn.Module, train_data, *, teacher: nn.Module | None = None, steps: int | None = None,
             epochs: int | None = None, lr: float = 0.01, optimizer: str | Callable = "sgd",
             batch_size: int = 32, weight_decay: float = 5e-5, momentum: float = 0.9,
             scheduler: str | Callable = "cosine", warmup_steps: int = 0, loss: str = "auto",
             temperature: float = 1.0, label_weight: float = 0.5, feature_weight: float = 0.0,
             eval_data=None, eval_every: int | None = None, keep_best: bool = True,
             train_statistics: bool = False, trainable: str | Iterable[str] | Callable = "all",
             checkpoint_dir=None, checkpoint_every: int = 100, resume: bool = True, seed: int = 0,
             max_seconds: float | None = None, clock: str = "wall", grad_clip: float | None = None,
             log_every: int = 10, progress: bool = True) -> History:
    """Train ``model`` in place for ``steps`` optimizer steps (or ``epochs``); return its History.

    ``train_data``: a tensor of inputs, a tuple (inputs, labels[, domains]) of tensors, a
    ``Dataset`` (items x, (x, y) or (x, y, domain)) or a ``DataLoader``/iterable of batches.
    ``max_seconds`` stops early once that much training time (``clock`` "wall" or "cpu":
    process CPU time; evaluation excluded) has been spent; the schedule still spans ``steps``.
    ``eval_data`` is evaluated before the first step, every ``eval_every`` steps and at the end
    (agreement and KL with the teacher, accuracy with labels); with ``keep_best`` (default) the
    model ends in the best evaluated state (``eval_data`` needs ≥ 8 images), and the History has
    a ``restored_best_step`` row when that is not the last one. ``train_statistics`` (default
    False: population statistics, frozen) and ``trainable`` (default "all") are explained in the
    module docstring.
    """
    _check_arguments(model, teacher, lr, batch_size, steps, epochs, loss, temperature, label_weight,
                     checkpoint_every, max_seconds, clock)
    if not isinstance(train_statistics, bool) or not isinstance(keep_best, bool):
        raise TypeError(f"train_statistics and keep_best must be True or False, got {train_statistics!r}, "
                        f"{keep_best!r}")
    names = select_trainable(model, trainable)
    ranks = Ranks.current()
    progress = progress and (ranks is None or ranks.main)  # rank 0 alone prints and writes
    with contextlib.ExitStack() as restore:  # every module's flag and requires_grad come back at the end
        restore.enter_context(preserved(model))
        if teacher is not None:
            restore.enter_context(preserved(teacher))
            teacher.eval()
        restore.enter_context(only_trainable(model, names))
        if not model.training:
            model.train()
        frozen = [] if train_statistics else [m for _, m in running_statistics_layers(model) if m.training]
        for m in frozen:
            m.training = False  # population statistics, not updated; the module's children keep their mode
        if ranks is not None and train_statistics:
            restore.enter_context(synchronized(model))
        extra_settings = {"trainable": names if len(names) < len(list(model.parameters())) else "all",
                          "train_statistics": train_statistics, "keep_best": keep_best}
        order = DataOrder(train_data, batch_size, seed, ranks=ranks)
        if order.dataset is not None and len(order.dataset) < batch_size:
            warnings.warn(f"batch_size={batch_size} is larger than the {len(order.dataset)} training samples: every "
                          f"step uses all {len(order.dataset)} of them (one step per epoch); use a smaller "
                          f"batch_size or more data", UserWarning, stacklevel=3)
        if epochs is not None:
            if order.steps_per_epoch is None:
                raise ValueError("epochs= needs data with a length; give steps= for an endless iterable")
            steps = epochs * order.steps_per_epoch
        mode = loss if loss != "auto" else ("distill" if teacher is not None else "labels")
        opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
        sched = _make_scheduler(opt, scheduler, steps, warmup_steps)
        settings = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "loss": mode,
                    "optimizer": optimizer if isinstance(optimizer, str) else "custom",
                    "scheduler": scheduler if isinstance(scheduler, str) else "custom",
                    "weight_decay": weight_decay, "momentum": momentum, "warmup_steps": warmup_steps,
                    "temperature": temperature, "label_weight": label_weight, "feature_weight": feature_weight,
                    **extra_settings}
        if ranks is not None:
            settings["world_size"] = ranks.world  # (absent in one process: older checkpoints still match)
        if feature_weight < 0 or (feature_weight > 0 and teacher is None):
            raise ValueError(f"feature_weight must be ≥ 0 and needs teacher= when > 0, got {feature_weight}")
        matcher = FeatureMatcher(model, teacher) if feature_weight > 0 else None
        fingerprint = {"model": model_fingerprint(model), "settings": settings,
                       "teacher": teacher_fingerprint(teacher), "data": data_fingerprint(order.dataset, order.loader)}
        directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        history, step, epoch, position, clocks, epoch_rng = History(), 0, 0, 0, {"wall": 0.0, "cpu": 0.0}, None
        if ranks is not None and ranks.any(eval_data is None) and ranks.any(eval_data is not None):
            raise ValueError(f"finetune under {ranks.world} processes: some ranks were given eval_data and some "
                             f"not; evaluation combines every rank's eval_data, so give it on every rank (its own "
                             f"shard or the same set) or on none")
        best = BestState(labels_first=mode in ("labels", "both")) if keep_best and eval_data is not None else None
        saved = load_checkpoint(directory) if directory is not None else None
        if saved is not None:
            if not resume:
                raise FileExistsError(f"{directory} already holds a fine-tuning checkpoint and resume=False: move it "
                                      f"away or choose another checkpoint_dir (nothing was overwritten)")
            before = saved["fingerprint"]
            _refuse_other_world(before["settings"].get("world_size", 1), ranks.world if ranks else 1, directory)
            if before.get("teacher") != fingerprint["teacher"]:
                raise ValueError(f"the checkpoint in {directory} was trained against another teacher (its weights "
                                 f"differ: digest {before.get('teacher')} then, {fingerprint['teacher']} now); "
                                 f"resume with the same teacher, or use another checkpoint_dir. Nothing was "
                                 f"overwritten.")
            if before.get("data") != fingerprint["data"]:
                then, now = before.get("data") or {}, fingerprint["data"]
                raise ValueError(f"the checkpoint in {directory} was trained on other data ({then.get('size')} "
                                 f"samples, sample digest {then.get('sample')} then; {now['size']} samples, "
                                 f"{now['sample']} now); resume with the same training data, or use another "
                                 f"checkpoint_dir. Nothing was overwritten.")
            diff = mismatch(before, fingerprint)
            if diff:
                raise ValueError(f"the checkpoint in {directory} belongs to a different model, recipe or setting "
                                 f"({'; '.join(diff[:3])}); use another checkpoint_dir, or the same arguments to "
                                 f"resume. Nothing was overwritten.")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            step, epoch, position = saved["step"], saved["epoch"], saved["position"]
            clocks, epoch_rng = dict(saved["clocks"]), saved.get("epoch_rng")
            history = History(saved["history"])
            if saved.get("best") is not None and best is not None:
                best.load_state_dict(saved["best"])
            set_rng_state(saved["rng"])
            if progress:
                print(f"finetune: resuming from step {step} of {steps} ({directory})", file=sys.stderr, flush=True)

        def checkpoint() -> None:
            if directory is None:
                return
            if ranks is None or ranks.main:
                save_checkpoint(directory, {"fingerprint": fingerprint, "model": model.state_dict(),
                                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                            "step": step, "epoch": epoch, "position": position, "clocks": clocks,
                                            "epoch_rng": epoch_rng, "rng": rng_state(), "history": list(history),
                                            "best": best.state_dict() if best is not None else None})
                history.save(directory / "history")
            if ranks is not None:
                ranks.barrier()  # no rank goes on (and perhaps resumes from the folder) before it is written

        route, device = router(model), device_of(model)
        net = ranks.ddp(model) if ranks is not None else model  # DDP after a resume: every rank loaded it
        teacher_cache: dict = {}

        def evaluation() -> None:
            metrics = evaluate(model, eval_data, teacher, 2 * batch_size, teacher_cache, ranks)
            if best is not None:
                check_eval_size(metrics)
                best.offer(step, metrics, model)
            history.append({"step": step, **metrics})

        if step == 0 and frozen:
            history.append({"step": 0, "frozen_statistics": len(frozen)})
        if step == 0 and eval_data is not None:
            evaluation()  # the start: a run with keep_best never ends below it
        by_time = max_seconds is not None  # the bar counts the budget's clock, not the step cap
        bar = (Progress("finetune", total=round(max_seconds), unit=f"{clock}-s", initial=round(clocks[clock]),
                        enabled=progress) if by_time else
               Progress("finetune", total=steps, unit="step", initial=step, enabled=progress))
        window = {"loss": 0.0, "n": 0, "samples": 0, "wall": 0.0}
        out_of_time = max_seconds is not None and clocks[clock] >= max_seconds
        try:
            while step < steps and not out_of_time:
                if order.dataset is None:  # a loader: its shuffling draws from the torch RNG at iter()
                    if position == 0 or epoch_rng is None:
                        epoch_rng = torch.get_rng_state()
                        batches = order.batches(epoch, position)
                    else:
                        now = torch.get_rng_state()
                        torch.set_rng_state(epoch_rng)
                        batches = order.batches(epoch, position)
                        torch.set_rng_state(now)
                else:
                    batches = order.batches(epoch, position)
                for batch in batches:
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    x, y, d = split_batch(batch)
                    x = check_inputs(x, "train_data").to(device)
                    if mode in ("labels", "both") and y is None:
                        raise ValueError(f"loss={mode!r} needs labels, but the batches carry only inputs; give "
                                         f"(inputs, labels) or a teacher")
                    with route(d):
                        if matcher is not None:
                            matcher.clear()
                        out = net(x)
                        terms = []
                        if mode in ("distill", "both"):
                            with torch.no_grad():
                                ref = teacher(x.to(device_of(teacher))).to(out.device)
                            if ref.shape != out.shape:
                                raise ValueError(f"the teacher outputs {tuple(ref.shape)} but the student "
                                                 f"{tuple(out.shape)}: distillation needs the same output "
                                                 f"(same classes); pass labels instead or adapt the head")
                            share = 1 - label_weight if mode == "both" else 1
                            terms.append(distillation_loss(out, ref, temperature) * share)
                            if matcher is not None:
                                terms.append(feature_weight * matcher.loss())
                        if mode in ("labels", "both"):
                            share = label_weight if mode == "both" else 1
                            terms.append(F.cross_entropy(out, y.to(out.device)) * share)
                        value = sum(terms)
                        if not torch.isfinite(value):
                            raise FloatingPointError(f"finetune: the loss became {float(value)} at step {step}; "
                                                     f"lower lr (now {sched.get_last_lr()[0]:.3g}) or check the data")
                        opt.zero_grad(set_to_none=True)
                        value.backward()
                        if grad_clip is not None:
                            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                        opt.step()
                        sched.step()
                        after_step(model, x)
                    step, position = step + 1, position + 1
                    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                    clocks["wall"] += wall
                    clocks["cpu"] += cpu
                    window["loss"] += float(value.detach())
                    window["n"] += 1
                    window["samples"] += x.shape[0]
                    window["wall"] += wall
                    out_of_time = max_seconds is not None and clocks[clock] >= max_seconds
                    if ranks is not None and max_seconds is not None:
                        out_of_time = ranks.any(out_of_time)  # every rank stops at the same step
                    if by_time:  # the time budget advances every step, however slow the steps
                        bar.update_to(min(round(clocks[clock]), round(max_seconds)), step=step)
                    if step % log_every == 0 or step == steps or out_of_time:
                        row = {"step": step, "epoch": epoch, "loss": window["loss"] / window["n"],
                               "lr": opt.param_groups[0]["lr"], "samples_per_s": window["samples"] / window["wall"],
                               "wall_s": clocks["wall"], "cpu_s": clocks["cpu"]}
                        history.append(row)
                        postfix = {"loss": row["loss"], "img/s": f"{row['samples_per_s']:.1f}"}
                        if by_time:
                            bar.update_to(bar.n, step=step, **postfix)
                        else:
                            bar.update(window["n"], **postfix)
                        window = {"loss": 0.0, "n": 0, "samples": 0, "wall": 0.0}
                    due = eval_data is not None and eval_every and step % eval_every == 0
                    if due and step < steps and not out_of_time:
                        evaluation()
                    if step % checkpoint_every == 0 or step == steps:
                        checkpoint()
                    if step >= steps or out_of_time:
                        break
                else:
                    epoch, position = epoch + 1, 0
                    continue
                if position >= (order.steps_per_epoch or math.inf):
                    epoch, position = epoch + 1, 0
            evaluated = any(r.get("step") == step and any(k.startswith("eval_") for k in r) for r in history)
            if eval_data is not None and not evaluated:
                evaluation()
            if out_of_time:
                history.append({"step": step, "stopped": f"max_seconds={max_seconds} ({clock} clock) reached"})
            checkpoint()  # the last state: a resumed or continued run goes on from it, not from the best
            if best is not None and best.step != step:
                best.restore(model)
                history.append({"step": step, "restored_best_step": best.step, f"best_{best.metric}": best.score[0]})
                if directory is not None and (ranks is None or ranks.main):
                    history.save(directory / "history")
        finally:
            bar.close()
            if matcher is not None:
                matcher.remove()
        return history
