"""Blockwise reconstruction vs end-to-end distillation for EfficientNet-Lite0 BN → GN.

Experiment (not product code). The converted student S = calibrate(convert(T, "gn"), T) is
distilled from the original T (timm ``tf_efficientnet_lite0``, real ImageNet weights) for a
budget of process CPU time (one thread, training steps only; evaluation is not counted), and
top-1 agreement and KL(T ‖ S) are measured on 96 held-out crops of the training photos at
1, 3, 6 and 10 CPU minutes.

Notation: T = t_K ∘ … ∘ t_1 and S = s_K ∘ … ∘ s_1 split into the same K units:
u_1 = conv_stem+bn1, u_2..u_{K-1} = the stages ``model.blocks[i]`` (``--units stage``, 7) or
every single block inside them (``--units block``, 16), u_K = conv_head+bn2+pool+classifier.
The teacher's activations are a_0 = x, a_k = t_k(a_{k-1}).

Variants (``--variant``):

* ``e2e`` — end-to-end logit distillation (the baseline of ``run.py``):
      L = KL(softmax(T(x)) ‖ softmax(S(x)))   (batchmean, T = 1)
  AdamW on ``ns.param_groups(S, 5e-5)``, lr 3e-4, batch 16.

* ``blockwise`` — parallel blockwise reconstruction. One teacher forward per batch (no grad)
  records every a_k; every student unit gets the *teacher's* input for that unit and must
  reproduce the teacher's output:
      L = Σ_k ‖s_k(a_{k-1}) − a_k‖² / (n_k · Var(a_k))  +  KL(softmax(a_K) ‖ softmax(s_K(a_{K-1})))
  (n_k = number of elements; Var over the whole batch tensor, so each term is scale-free and
  ≈ 1 for a trivial predictor). Since the a_{k-1} are teacher tensors, no gradient flows
  between units: one backward trains K independent regression problems at once, each with a
  short gradient path. Cost per step ≈ one teacher forward + one student forward/backward,
  i.e. the same as e2e.

* ``blockwise_then_e2e`` — ``blockwise`` until ``--switch`` CPU minutes, then a fresh AdamW
  (lr ``--e2e-lr``) on the e2e loss for the rest of the budget (fixes the errors that compound
  when the units are chained, which blockwise training never sees).

Optional knobs for other variants: ``--norm-lr-mult`` (lr multiplier for normalization
affine parameters), ``--temperature`` (KL temperature, T² scaled), ``--batch``.

Data, exactly as ``run.py``: eval = ``PhotoCrops(TRAIN_PHOTOS, 96, 160, seed=3)``,
calibration = ``PhotoCrops(TRAIN_PHOTOS, 64, 160, seed=1)``, training stream
``PhotoCrops(TRAIN_PHOTOS, 1_000_000, 160, seed=10)`` read in order 0, 1, 2, … (batch i is
items [i·B, (i+1)·B)). The CPU clock covers building the batch, the teacher forward and the
student step.

``--save-at M --save-path P`` stores the student at the first step past M CPU minutes;
``--resume P`` continues from such a state (step, CPU clock and data position included), so
``blockwise_then_e2e`` can reuse the first M minutes of a ``blockwise`` run with the same
seed and lr (identical by construction; the 1/3-minute rows are then the blockwise ones).

    PYTHONPATH=. python analysis/conversion_fidelity/blockwise_experiment.py --variant e2e
    PYTHONPATH=. python analysis/conversion_fidelity/blockwise_experiment.py --variant blockwise --lr 1e-3
    PYTHONPATH=. python analysis/conversion_fidelity/blockwise_experiment.py --variant blockwise_then_e2e --switch 4
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon as ns
from normsurgeon import zoo
from normsurgeon.photo_crops import TRAIN_PHOTOS, PhotoCrops
from normsurgeon.training import evaluate
from run import append_row  # this folder's run.py (the script's folder is on sys.path)

HERE = Path(__file__).parent
SIZE = 160
WARMUP = 20  # linear warm-up steps, as run.py's finetune call


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batchmean."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    log_target=True, reduction="batchmean") * t * t


def units(model: nn.Module, granularity: str) -> list[nn.Module]:
    """The model as a chain of units: stem, stages or blocks, head (modules are shared)."""
    stem = nn.Sequential(model.conv_stem, model.bn1)
    if granularity == "stage":
        body = list(model.blocks)
    else:
        body = [block for stage in model.blocks for block in stage]
    head = nn.Sequential(model.conv_head, model.bn2, model.global_pool, model.classifier)  # drop_rate is 0
    return [stem, *body, head]


def is_norm_affine(name: str, module_of: dict) -> bool:
    owner = module_of[name.rsplit(".", 1)[0]] if "." in name else None
    return isinstance(owner, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)) or "norm" in type(owner).__name__.lower()


def make_optimizer(student: nn.Module, lr: float, norm_lr_mult: float) -> torch.optim.Optimizer:
    groups = ns.param_groups(student, 5e-5, lr=lr)
    if norm_lr_mult != 1.0:
        modules = dict(student.named_modules())
        split = []
        for g in groups:
            norm = [(p, n) for p, n in zip(g["params"], g["param_names"]) if is_norm_affine(n, modules)]
            rest = [(p, n) for p, n in zip(g["params"], g["param_names"]) if not is_norm_affine(n, modules)]
            for part, mult in ((rest, 1.0), (norm, norm_lr_mult)):
                if part:
                    split.append(dict(g, params=[p for p, _ in part], param_names=[n for _, n in part], lr=lr * mult))
        groups = split
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=lr)


def set_lr(opt: torch.optim.Optimizer, step_in_phase: int) -> None:
    scale = min(1.0, (step_in_phase + 1) / WARMUP)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale


def e2e_loss(student, teacher, x, temperature):
    with torch.no_grad():
        t = teacher(x)
    return kl(student(x), t, temperature)


def blockwise_loss(s_units, t_units, x, temperature):
    with torch.no_grad():
        acts = [x]
        for u in t_units:
            acts.append(u(acts[-1]))
    loss = 0.0
    for k, u in enumerate(s_units):
        out, target = u(acts[k]), acts[k + 1]
        loss = loss + F.mse_loss(out, target) / target.var().clamp_min(1e-8)
    return loss + kl(out, acts[-1], temperature)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["e2e", "blockwise", "blockwise_then_e2e"], required=True)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (e2e) / 1e-3 (blockwise)")
    p.add_argument("--e2e-lr", type=float, default=3e-4, help="lr of the e2e phase of blockwise_then_e2e")
    p.add_argument("--units", choices=["stage", "block"], default="block")
    p.add_argument("--switch", type=float, default=4.0, help="CPU minutes of blockwise before e2e")
    p.add_argument("--minutes", nargs="+", type=float, default=[1, 3, 6, 10])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--norm-lr-mult", type=float, default=1.0)
    p.add_argument("--save-at", type=float, default=None)
    p.add_argument("--save-path", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--tag", default="", help="free text for the CSV")
    p.add_argument("--out", default=str(HERE / "blockwise_results.csv"))
    args = p.parse_args()
    torch.set_num_threads(1)
    lr = args.lr if args.lr is not None else (3e-4 if args.variant == "e2e" else 1e-3)

    torch.manual_seed(0)
    teacher = zoo.efficientnet_lite0().eval()
    heldout = PhotoCrops(TRAIN_PHOTOS, 96, SIZE, seed=3).batch()
    calibration = PhotoCrops(TRAIN_PHOTOS, 64, SIZE, seed=1).batch()
    train = PhotoCrops(TRAIN_PHOTOS, 1_000_000, SIZE, seed=10)
    student = ns.calibrate(ns.convert(teacher, to="gn"), teacher, calibration)
    for q in teacher.parameters():
        q.requires_grad_(False)
    t_units, s_units = units(teacher, args.units), units(student, args.units)
    cache: dict = {}

    def record(minute_mark, cpu_s, steps, phase):
        m = evaluate(student, heldout, teacher, batch_size=48, teacher_cache=cache)
        row = {"variant": args.variant, "lr": lr, "units": args.units if args.variant != "e2e" else "",
               "switch_min": args.switch if args.variant == "blockwise_then_e2e" else "",
               "e2e_lr": args.e2e_lr if args.variant == "blockwise_then_e2e" else "",
               "batch": args.batch, "temperature": args.temperature, "norm_lr_mult": args.norm_lr_mult,
               "tag": args.tag, "mark_min": minute_mark, "cpu_min": round(cpu_s / 60, 3), "steps": steps,
               "phase": phase, "agreement": round(m["eval_agreement"], 4), "kl": round(m["eval_kl"], 4)}
        append_row(Path(args.out), row)

    phase = "e2e" if args.variant == "e2e" else "blockwise"
    opt = make_optimizer(student, lr, args.norm_lr_mult)
    step, phase_step, cpu = 0, 0, 0.0
    if args.resume:
        state = torch.load(args.resume)
        student.load_state_dict(state["student"])
        step, cpu = state["step"], state["cpu"]
        if state["phase"] == phase:
            opt.load_state_dict(state["opt"])
            phase_step = state["phase_step"]
        print(f"resumed at step {step}, {cpu / 60:.2f} CPU min", flush=True)
    else:
        record(0, 0.0, 0, "calibrated")
    marks = [m for m in sorted(args.minutes) if m * 60 > cpu]
    saved = args.save_at is None or args.save_at * 60 <= cpu
    student.train()
    while marks:
        if args.variant == "blockwise_then_e2e" and phase == "blockwise" and cpu >= args.switch * 60:
            phase, phase_step = "e2e", 0
            opt = make_optimizer(student, args.e2e_lr, args.norm_lr_mult)
        t0 = time.process_time()
        x = torch.stack([train[i] for i in range(step * args.batch, (step + 1) * args.batch)])
        set_lr(opt, phase_step)
        if phase == "e2e":
            loss = e2e_loss(student, teacher, x, args.temperature)
        else:
            loss = blockwise_loss(s_units, t_units, x, args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cpu += time.process_time() - t0
        step, phase_step = step + 1, phase_step + 1
        if step % 20 == 0:
            print(f"step {step} cpu {cpu / 60:.2f} min {phase} loss {loss.item():.4f}", flush=True)
        if not saved and cpu >= args.save_at * 60:
            torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "step": step, "cpu": cpu,
                        "phase": phase, "phase_step": phase_step}, args.save_path)
            saved = True
        while marks and cpu >= marks[0] * 60:
            record(marks.pop(0), cpu, step, phase)
            student.train()


if __name__ == "__main__":
    main()
