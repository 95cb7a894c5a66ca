"""RMSNorm sources (torch nn.RMSNorm, timm RmsNorm/RmsNorm2d) convert by their documented rule;
FilterResponseNorm and EvoNorm are sites reported as unsupported, with why."""
from __future__ import annotations

import warnings

import pytest
import timm.layers as tl
import torch
from torch import nn

import normsurgeon as ns


def _convert(model, to, size, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ns.convert(model, to=to, input_size=size, **options)


@pytest.mark.parametrize("norm, channels_last", [(lambda: nn.RMSNorm(8, eps=1e-6), True), (lambda: tl.RmsNorm(8), True),
                                                 (lambda: tl.RmsNorm2d(8), False)])
def test_rms_norm_to_pn_copies_gamma_and_matches_where_the_mean_over_channels_is_zero(norm, channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(norm())
    with torch.no_grad():
        model[0].weight.copy_(1 + 0.3 * torch.randn(8))
    new = _convert(model, "pn", (4, 8) if channels_last else (8, 3, 3))
    (row,) = new.normsurgeon_report.rows
    assert (row.status, row.exact, row.transferred, row.reset) == ("converted", "no", ["weight"], ["bias"])
    x = torch.randn(2, 4, 8) if channels_last else torch.randn(2, 8, 3, 3)
    axis = -1 if channels_last else 1
    centred = x - x.mean(axis, keepdim=True)  # the rule's exact case: mean over C is 0
    torch.testing.assert_close(new(centred), model(centred), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(new(x + 1), model(x + 1), atol=1e-3)  # elsewhere it is not the same function


@pytest.mark.parametrize("to", ["gn", "ln", "bn", "frozen_bn", "proxy_gn"])
def test_rms_norm_2d_converts_to_channel_first_targets(to):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), tl.RmsNorm2d(8), nn.ReLU())
    new = _convert(model, to, (3, 4, 4), **({"num_groups": 2} if to in ("gn", "proxy_gn") else {}))
    (row,) = new.normsurgeon_report.rows
    assert row.status == ("skipped" if to == "frozen_bn" else "converted")
    new.train()(torch.randn(2, 3, 4, 4)).sum().backward()


@pytest.mark.parametrize("cls", [tl.FilterResponseNormTlu2d, tl.FilterResponseNormAct2d, tl.EvoNorm2dB0,
                                 tl.EvoNorm2dS0, tl.EvoNorm2dS1, tl.EvoNorm2dS2a])
def test_filter_response_and_evonorm_are_unsupported_sites_with_a_reason(cls):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), cls(8))
    with pytest.warns(UserWarning, match="left as they were"):
        report = ns.plan(model, to="gn", input_size=(3, 4, 4))
    (row,) = report.rows
    assert row.status == "unsupported"
    assert row.reason.startswith("Filter Response Normalization" if "FilterResponse" in cls.__name__ else "EvoNorm")
    assert "no transfer rule" in row.reason
