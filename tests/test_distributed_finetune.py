"""finetune under 2 ranks (gloo, float64): sharded data, DDP, synced statistics, step hooks (MBN's synced
double forward) on every rank, resume, rank-0 writes; recalibrate_bn over both ranks' data.

Two ranks at batch 4 for 5 steps (interrupted after step 1 and resumed from the checkpoint) end with
the weights of one uninterrupted process at batch 8, within 1e-5 relative (measured: 2e-14, float64).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import normsurgeon as ns

pytestmark = pytest.mark.slow  # two ranks train a ResNet for 5 steps twice: about a minute of CPU

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as workers  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    mp.spawn(workers.finetune_rank, args=(2, str(out / "init"), str(out), 4), nprocs=2, join=True)
    return out


def test_two_ranks_at_batch_4_equal_one_process_at_batch_8(two_rank_run):
    reference = workers.small_resnet()
    ns.finetune(reference, workers.finetune_data(), batch_size=8, **workers.FINETUNE)
    ranks = [torch.load(two_rank_run / f"finetuned_{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["first_steps"] == [1]  # the first call stopped after one step (then resumed)
        assert "SyncedBatchNorm" not in rank["classes"]  # unsynced again at the end
        for key, want in reference.state_dict().items():
            got = rank["state"][key]
            if want.is_floating_point():
                scale = want.abs().max().clamp_min(1e-12)
                assert ((got - want).abs().max() / scale).item() < 1e-5, key
            else:
                assert torch.equal(got, want), key
    moved = [k for k, v in reference.state_dict().items() if v.is_floating_point() and
             not torch.equal(v, workers.small_resnet().state_dict()[k])]
    assert moved  # the weights did change, the comparison is not trivial


def test_recalibrate_bn_over_two_ranks_equals_one_process_on_all_the_data(two_rank_run):
    ranks = [torch.load(two_rank_run / f"finetuned_{r}.pt") for r in range(2)]
    reference = workers.small_resnet()
    reference.load_state_dict(ranks[0]["state"])
    ns.recalibrate_bn(reference, workers.recalibration_batches())
    changed = False
    for key, want in reference.state_dict().items():
        if not want.is_floating_point():
            continue
        changed |= not torch.equal(want, ranks[0]["state"][key])
        for rank in ranks:
            got = rank["recalibrated"][key]
            assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item() < 1e-5, key
    assert changed


def test_rank_0_alone_wrote_the_checkpoint_and_another_world_size_is_refused(two_rank_run):
    files = sorted(p.name for p in (two_rank_run / "ckpt").iterdir())
    assert files and not any("rank" in f for f in files)
    with pytest.raises(ValueError, match=r"2 process\(es\) and this run has 1.*--nproc-per-node 2"):
        ns.finetune(workers.small_resnet(), workers.finetune_data(), batch_size=8,
                    checkpoint_dir=two_rank_run / "ckpt", **workers.FINETUNE)


def test_cli_finetune_under_torchrun_on_cpu(tmp_path):
    """`torchrun --nproc-per-node 2 -m normsurgeon finetune ...` on CPU: gloo, rank 0 alone prints and writes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", "2",
               "-m", "normsurgeon", "finetune", "resnet10t", "--to", "bn", "--train-statistics", "--steps", "2",
               "--batch-size", "4", "--size", "32", "--eval-images", "8", "-o", str(tmp_path / "r10.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("after fine-tuning (2 steps") == 1, result.stdout  # printed by rank 0 only
    assert (tmp_path / "r10.pt").exists() and (tmp_path / "r10.history.json").exists()
