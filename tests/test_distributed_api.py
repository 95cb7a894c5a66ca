"""sync_statistics / unsync: copies and in place, state kept, save/load, and the bad inputs."""
from __future__ import annotations

import copy
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normsurgeon as ns
from normsurgeon.distributed import synced_layers

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as workers  # noqa: E402


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_two_ranks(worker, tmp_path, limit_s: int) -> None:
    """Spawn ``worker(rank, 2, init_file, out_dir)`` on 2 ranks; fail (killing them) if they hang."""
    context = mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung")


def test_without_a_process_group_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group.*torchrun|torchrun.*init_process_group"):
        ns.sync_statistics(workers.build("bn"))


def test_a_synced_model_whose_group_is_gone_raises_at_forward(one_rank_group):
    synced = ns.sync_statistics(workers.build("bn"))
    dist.destroy_process_group()
    try:
        with pytest.raises(RuntimeError, match="init_process_group"):
            synced(workers.data(0)[0])
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.mark.parametrize("target", ["bn", "bgn", "iebn", "dsbn", "cbn", "mbn"])
def test_sync_is_a_copy_and_unsync_restores_local_layers_with_identical_state(one_rank_group, target):
    model = workers.build(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    synced = ns.sync_statistics(model)
    assert [type(m) for m in model.modules()] == kinds  # the user's model is untouched
    assert synced_layers(synced) and not synced_layers(model)
    assert synced.state_dict().keys() == before.keys()
    local = ns.unsync(synced)
    assert [type(m) for m in local.modules()] == kinds and synced_layers(synced)
    for key, value in local.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert ns.sync_statistics(model, inplace=True) is model and synced_layers(model)
    assert ns.unsync(model, inplace=True) is model and not synced_layers(model)


def test_one_rank_equals_local_layers_and_survives_deepcopy(one_rank_group):
    model = workers.build("bgn")
    synced = copy.deepcopy(ns.sync_statistics(model))  # (a process group is not copied: default group)
    x = workers.data(0)[0]
    torch.testing.assert_close(synced(x), model(x), rtol=1e-12, atol=1e-12)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:the conversion could not be verified")  # a float64 base model
def test_save_load_round_trips_a_synced_model(one_rank_group, tmp_path):
    from timm.layers import BatchNormAct2d
    synced = ns.sync_statistics(workers.build("mbn"))
    synced(workers.data(0)[0])
    ns.save(synced, tmp_path / "synced.pt")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU)).double()
    loaded = ns.load(tmp_path / "synced.pt", base)  # local layers, the synced model's state
    assert not synced_layers(loaded)
    for key, value in synced.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = ns.sync_statistics(loaded)
    x = workers.data(1)[0]
    torch.testing.assert_close(again.eval()(x), synced.eval()(x), rtol=0, atol=0)


def test_torch_and_timm_batchnorms_are_refused_not_left_local(one_rank_group):
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), BatchNormAct2d(4))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\).*3 \(BatchNormAct2d\).*to='bn'"):
        ns.sync_statistics(model)
    synced = ns.sync_statistics(ns.convert(model, to="bn", input_size=(3, 8, 8)))
    assert len(synced_layers(synced)) == 2
    assert isinstance(synced[3].act, nn.ReLU)  # timm's fused activation is kept


def test_ranks_that_disagree_on_layer_shapes_raise_on_every_rank_without_hanging(tmp_path):
    run_two_ranks(workers.disagreeing_rank, tmp_path, limit_s=300)
    for rank in range(2):
        message = (tmp_path / f"message_{rank}.txt").read_text()
        assert "ranks disagree" in message and "(4,)" in message and "BatchGroupNorm" in message, message


def test_synchronized_leaves_a_model_without_batch_statistics_alone(one_rank_group):
    from normsurgeon.distributed.sync import synchronized
    model = ns.convert(workers.build("bn").float(), to="gn", input_size=(3, 6, 6))
    with synchronized(model):
        assert not synced_layers(model)
    synced = workers.build("bn")
    with synchronized(synced):
        assert len(synced_layers(synced)) == 2
    assert not synced_layers(synced)


def test_channels_last_layout_synced_in_a_group_of_one_equals_the_local_layer(one_rank_group):
    from normsurgeon.layers import BatchNorm
    local = nn.Sequential(BatchNorm(6, channels_last=True, act=nn.GELU())).double()
    synced = ns.sync_statistics(local)
    x = torch.randn(3, 5, 5, 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(synced(x2), local(x), rtol=1e-12, atol=1e-12)
    local(x).square().sum().backward()
    synced(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(synced[0].running_var, local[0].running_var, rtol=1e-12, atol=0)


def test_recalibration_with_uneven_batch_counts_stops_at_the_shortest_rank_without_hanging(tmp_path):
    """Rank 0 has 3 batches, rank 1 has 2: both stop after 2 (rank 0 warns that it left one unread),
    with the statistics of one process over the first two batches of both ranks."""
    run_two_ranks(workers.uneven_recalibration_rank, tmp_path, limit_s=120)
    reference = workers.build("bn")
    both = [workers.uneven_batches(r) for r in range(2)]
    ns.recalibrate_bn(reference, [torch.cat([both[0][i], both[1][i]]) for i in range(2)])
    results = [torch.load(tmp_path / f"uneven_{r}.pt") for r in range(2)]
    assert any("another rank ran out of batches after 2" in w for w in results[0]["warnings"])
    assert not any("ran out of batches" in w for w in results[1]["warnings"])
    for result in results:
        for key, want in reference.state_dict().items():
            torch.testing.assert_close(result["state"][key], want, rtol=1e-9, atol=1e-12, msg=key)


def test_finetune_evaluates_over_every_ranks_eval_shard_and_the_ranks_keep_the_same_best_state(tmp_path):
    run_two_ranks(workers.sharded_eval_rank, tmp_path, limit_s=120)
    results = [torch.load(tmp_path / f"sharded_eval_{r}.pt") for r in range(2)]
    evals = [[row for row in r["history"] if "eval_accuracy" in row] for r in results]
    assert evals[0] == evals[1] and len(evals[0]) == 7  # the start and 6 steps, the same on both ranks
    assert all(row["eval_images"] == 16 for row in evals[0])  # 8 on each rank
    # the metrics of the start are those of one process on both shards together
    both = [torch.cat(t) for t in zip(*(workers.sharded_eval_data(r) for r in range(2)))]
    from normsurgeon.training.finetune import evaluate
    start = evaluate(workers.tiny_classifier(), tuple(both), batch_size=8)
    assert evals[0][0]["eval_accuracy"] == pytest.approx(start["eval_accuracy"])
    assert evals[0][0]["eval_loss"] == pytest.approx(start["eval_loss"], rel=1e-9)
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key
