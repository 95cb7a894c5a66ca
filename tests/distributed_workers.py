"""Rank processes for the synchronized-statistics tests (spawned by torch.multiprocessing, gloo, float64).

``run_target`` trains a tiny converted model for ``STEPS`` optimizer steps on fixed data and records
outputs, input gradients and parameter gradients at the first step and every buffer at the end. The
single-process reference calls it on the whole batch with local layers; each rank calls it on its
slice with ``sync_statistics``, summing parameter gradients over the ranks (the loss is the sum of
the ranks' losses, Σ out·R), so both runs take the same optimizer steps.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import normsurgeon as ns

STEPS = 3
BATCH = 4
OPTIONS = {"bn": {}, "bgn": {"num_groups": 2}, "iebn": {}, "cbn": {"window": 3}, "mbn": {"memory": 3},
           "dsbn": {"domains": 2}}
DOMAINS = torch.tensor([0, 0, 0, 1])  # with splits 2+2 and 3+1, rank 1 has no sample of domain 0


def build(target: str) -> nn.Module:
    """conv → BN → ReLU → conv → timm BatchNormAct2d(SiLU), converted to ``target``, float64."""
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU))
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(10)
    model = ns.convert(base, to=target, input_size=(3, 6, 6), **OPTIONS[target]).double()
    return model.train()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(BATCH, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 0.5,
            torch.randn(BATCH, 8, 6, 6, generator=gen, dtype=torch.float64))


def run_target(model: nn.Module, target: str, rows: slice, reduce=None) -> dict:
    """STEPS steps of SGD on rows ``rows`` of each batch; ``reduce(grads)`` sums gradients over ranks."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    record = {}
    for step in range(STEPS):
        x, r = data(step)
        x, r = x[rows].clone().requires_grad_(True), r[rows]
        opt.zero_grad()
        if target == "dsbn":
            route = DOMAINS[rows] if len(DOMAINS[rows]) else 0
            with ns.domain(model, route if isinstance(route, int) else route):
                out = model(x)
        else:
            out = model(x)
        (out * r).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        if reduce is not None:
            reduce(grads)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        if step in (0, STEPS - 1):  # the first step, and the last (CBN: a window with 2 entries)
            tag = "" if step == 0 else "_last"
            record["out" + tag] = out.detach().clone()
            record["input_grad" + tag] = x.grad.clone()
            record["param_grads" + tag] = [g.clone() for g in grads]
        opt.step()
        if target == "dsbn":
            route = DOMAINS[rows] if len(DOMAINS[rows]) else 0
            with ns.domain(model, route):
                ns.after_step(model, x.detach())
        else:
            ns.after_step(model, x.detach())
    record["buffers"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def rows_of(rank: int, split: tuple[int, int]) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def rank_main(rank: int, world: int, init_file: str, out_dir: str, targets: list, splits: list) -> None:
    """One rank: every (target, split) scenario, results saved to ``out_dir/{target}_{split}_{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for target in targets:
            for split in splits:
                model = ns.sync_statistics(build(target))

                def reduce(grads):
                    for g in grads:
                        dist.all_reduce(g)
                record = run_target(model, target, rows_of(rank, split), reduce)
                torch.save(record, os.path.join(out_dir, f"{target}_{split[0]}{split[1]}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def disagreeing_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 1 converts with other bgn groups: both ranks must raise at the first step, not hang."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build("bgn") if rank == 0 else ns.convert(build("bn").float(), to="bgn", num_groups=4,
                                                                      input_size=(3, 6, 6)).double()
        model = ns.sync_statistics(model)
        try:
            model(data(0)[0][:2])
            message = "no error"
        except RuntimeError as err:
            message = str(err)
        with open(os.path.join(out_dir, f"message_{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


FINETUNE = {"steps": 5, "lr": 0.05, "train_statistics": True, "progress": False, "seed": 0}


def small_resnet() -> nn.Module:
    """timm resnet10t (32 px) converted to mbn (memory of 2: synced double forward after every step), float64."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    return ns.convert(model, to="mbn", memory=2, input_size=(3, 32, 32)).double()


def finetune_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(24, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 5, (24,), generator=gen)


def recalibration_batches() -> list[torch.Tensor]:
    """Three batches of 8; each of 2 ranks reads rows rank::2 of each."""
    return list(finetune_data()[0][:24].split(8))


def finetune_rank(rank: int, world: int, init_file: str, out_dir: str, batch_size: int) -> None:
    """Interrupted after one step (max_seconds), resumed from the checkpoint with a fresh model."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ckpt = os.path.join(out_dir, "ckpt")
        first = ns.finetune(small_resnet(), finetune_data(), batch_size=batch_size, checkpoint_dir=ckpt,
                            max_seconds=1e-9, **FINETUNE)
        model = small_resnet()
        ns.finetune(model, finetune_data(), batch_size=batch_size, checkpoint_dir=ckpt, **FINETUNE)
        finetuned = {k: v.clone() for k, v in model.state_dict().items()}
        ns.recalibrate_bn(model, [x[rank::world] for x in recalibration_batches()])
        torch.save({"state": finetuned, "recalibrated": model.state_dict(), "first_steps": [r["step"] for r in first if "loss" in r],
                    "classes": sorted({type(m).__name__ for m in model.modules()})},
                   os.path.join(out_dir, f"finetuned_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def uneven_batches(rank: int) -> list[torch.Tensor]:
    """Rank 0 has three batches of 2, rank 1 two."""
    gen = torch.Generator().manual_seed(11 + rank)
    return list(torch.randn(2 * (3 - rank), 3, 6, 6, generator=gen, dtype=torch.float64).split(2))


def uneven_recalibration_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """recalibrate_bn with 3 batches on rank 0 and 2 on rank 1: both must finish (not hang)."""
    import warnings
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build("bn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ns.recalibrate_bn(model, uneven_batches(rank))
        torch.save({"state": model.state_dict(), "warnings": [str(w.message) for w in caught]},
                   os.path.join(out_dir, f"uneven_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(build("bn"), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()


def sharded_eval_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank its own 8 held-out images (different on each rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)


def sharded_eval_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """finetune with keep_best on each rank's own eval shard: the ranks must agree on the best state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(5)
        data = torch.randn(32, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
        model = tiny_classifier()
        history = ns.finetune(model, data, batch_size=4, steps=6, lr=0.5, eval_data=sharded_eval_data(rank),
                              eval_every=1, progress=False, seed=0)
        torch.save({"state": model.state_dict(), "history": list(history)},
                   os.path.join(out_dir, f"sharded_eval_{rank}.pt"))
    finally:
        dist.destroy_process_group()
