"""Synchronized statistics: 2 ranks on CPU (gloo, float64) equal one process on the whole batch.

For every batch-statistics target (and timm's BatchNormAct2d layout, the last norm of the model), a
run with each rank on its part of a 4-sample batch equals one process on the whole batch within
1e-5 relative, in outputs, input and parameter gradients at the first step and every buffer (running
statistics, CBN windows, MBN memory, DSBN per-domain statistics) after 3 optimizer steps (with
``normsurgeon.after_step``: CBN counts, MBN double forward). Splits: 2+2, 3+1 and 4+0 (an empty rank).
With the data's domains [0, 0, 0, 1], the rank with the last sample never has a sample of domain 0.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as workers  # noqa: E402

TARGETS = ["bn", "bgn", "iebn", "dsbn", "cbn", "mbn"]
SPLITS = [(2, 2), (3, 1), (4, 0)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Runs every scenario once in 2 spawned ranks (one spawn for the module: ~10 s)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(workers.rank_main, args=(2, str(out / "init"), str(out), TARGETS, SPLITS), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("target", TARGETS)
def test_two_ranks_equal_one_process(rank_results, target, split):
    ref = workers.run_target(workers.build(target), target, slice(0, workers.BATCH))
    ranks = [torch.load(rank_results / f"{target}_{split[0]}{split[1]}_{r}.pt") for r in range(2)]
    for tag in ("", "_last"):  # at the first and the last of the 3 steps
        # outputs and input gradients: each rank holds its rows of the whole batch's
        out = torch.cat([r["out" + tag] for r in ranks])
        assert out.shape == ref["out" + tag].shape
        assert relative_error(out, ref["out" + tag]) < 1e-5
        assert relative_error(torch.cat([r["input_grad" + tag] for r in ranks]), ref["input_grad" + tag]) < 1e-5
        # summed parameter gradients, the same on both ranks; all parameters as one vector (the bias
        # of a conv followed by BatchNorm has a gradient of rounding size only)
        want = torch.cat([g.flatten() for g in ref["param_grads" + tag]])
        for rank in ranks:
            assert relative_error(torch.cat([g.flatten() for g in rank["param_grads" + tag]]), want) < 1e-5
    # every buffer after 3 steps (running statistics, windows, memories, per-domain statistics)
    for rank in ranks:
        assert rank["buffers"].keys() == ref["buffers"].keys()
        for key, want in ref["buffers"].items():
            got = rank["buffers"][key]
            if want.is_floating_point():
                assert relative_error(got, want) < 1e-5, key
            else:
                assert torch.equal(got, want), key
    for key in ranks[0]["buffers"]:  # identical on every rank, bit for bit
        assert torch.equal(ranks[0]["buffers"][key], ranks[1]["buffers"][key]), key


def test_local_reference_is_not_trivially_equal():
    """The check can fail: a rank normalizing its half alone (no sync) differs from the whole batch."""
    ref = workers.run_target(workers.build("bn"), "bn", slice(0, workers.BATCH))
    half = workers.run_target(workers.build("bn"), "bn", slice(0, 2))
    assert relative_error(half["out"], ref["out"][:2]) > 1e-3
