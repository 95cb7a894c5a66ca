"""Weight-transfer rules checked against what they promise, independently of the code."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon as ns

C, G = 12, 3


def pretrained_bn(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=gen))
        bn.running_mean.copy_(torch.randn(C, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(C, generator=gen) * 3 + 0.2)
    return nn.Sequential(bn).eval()


def inputs_with_population_group_statistics(bn: nn.BatchNorm2d, groups: int) -> torch.Tensor:
    """x whose per-sample statistics over each channel group equal the population's.

    Population statistics of a group come from the channels' (mean, var) as a mixture:
    mean_g = average of the channel means, var_g = average of (var_c + mean_c²) − mean_g².
    """
    mu = bn.running_mean.double().view(groups, -1)
    second = (bn.running_var.double() + bn.running_mean.double() ** 2).view(groups, -1)
    mean_g = mu.mean(1)
    std_g = (second.mean(1) - mean_g ** 2).sqrt()
    z = torch.randn(3, groups, C // groups * 25, dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, unbiased=False, keepdim=True)
    x = mean_g.view(1, -1, 1) + std_g.view(1, -1, 1) * z
    return x.view(3, C, 5, 5)


@pytest.mark.parametrize("to,groups,options", [("gn", G, {"num_groups": G}), ("ln", 1, {}),
                                               ("gn", C, {"num_groups": C})])
def test_folding_is_exact_when_sample_statistics_equal_population_ones(to, groups, options):
    model = pretrained_bn().double()
    x = inputs_with_population_group_statistics(model[0], groups)
    new = ns.convert(model, to=to, **options).eval()
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=1e-6)
    plain = ns.convert(model, to=to, fold_statistics=False, **options).eval()
    if to != "gn" or groups != C:
        assert not torch.allclose(plain(x), model(x), atol=1e-2)
    torch.testing.assert_close(plain[0].weight, model[0].weight)


def test_plain_transfer_copies_gamma_beta_and_reports_dropped_statistics():
    model = pretrained_bn()
    new = ns.convert(model, to="gn", fold_statistics=False)
    torch.testing.assert_close(new[0].bias, model[0].bias)
    row = new.normsurgeon_report.rows[0]
    assert row.transferred == ["weight", "bias"]
    assert row.dropped == ["running_mean", "running_var", "num_batches_tracked"]


def test_group_norm_source_to_bn_resets_statistics_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.GroupNorm(G, C))
    row = ns.convert(model, to="bn").normsurgeon_report.rows[0]
    assert row.reset == ["running_mean", "running_var"] and row.exact == "no"
    assert any("no batch statistics" in n for n in row.notes)


def test_conversion_values_are_copies_not_aliases():
    model = pretrained_bn()
    new = ns.convert(model, to="bn")
    with torch.no_grad():
        new[0].weight.add_(1)
        new[0].running_mean.add_(1)
    torch.testing.assert_close(pretrained_bn()[0].weight, model[0].weight)
    torch.testing.assert_close(pretrained_bn()[0].running_mean, model[0].running_mean)
