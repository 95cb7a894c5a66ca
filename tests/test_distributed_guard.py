"""torch's and timm's convert_sync_batchnorm on a converted model: an error naming what was lost."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as workers  # noqa: E402


def _torch_converter(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _timm_converter(model):
    from timm.layers import convert_sync_batchnorm
    return convert_sync_batchnorm(model)


@pytest.mark.parametrize("converter", [_torch_converter, _timm_converter], ids=["torch", "timm"])
@pytest.mark.parametrize("target, lost", [("bgn", "BatchGroupNorm"), ("iebn", "attention_weight"),
                                          ("cbn", "past_mean"), ("mbn", "memory_mean"), ("bn", "SiLU")])
def test_converters_destroying_a_variant_raise_at_the_next_forward(converter, target, lost):
    model = workers.build(target)
    x = workers.data(0)[0]
    model(x)  # guarded and fine before
    broken = converter(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in broken.modules())  # the converter did replace
    for mode in (broken.train, broken.eval):
        mode()
        with pytest.raises(RuntimeError, match=rf"'[14]' was a normsurgeon .*{lost}.*sync_statistics"):
            broken(x)


def test_a_plain_batchnorm_is_equivalent_and_not_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    import normsurgeon as ns
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(ns.convert(model, to="bn", input_size=(3, 8, 8)))
    converted.eval()(torch.randn(2, 3, 8, 8))  # no error: nothing was lost
