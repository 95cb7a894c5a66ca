"""cbn and mbn as conversion targets: producer pairing, function preservation, resume, chaining."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import normsurgeon as ns
from normsurgeon.layers import BatchNorm, CrossIterationBatchNorm, MemorizedBatchNorm

from conftest import randomize_norms


class Block(nn.Module):
    """Every kind of producer a norm can have."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)           # conv with bias
        self.stem_bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)  # strided
        self.down_bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.grouped_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)  # depthwise
        self.dw_bn = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.after_add = nn.BatchNorm2d(16)
        self.after_pool = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 1, bias=False)
        self.shared_bn1 = nn.BatchNorm2d(16)
        self.shared_bn2 = nn.BatchNorm2d(16)
        self.std = timm.layers.StdConv2d(16, 16, 1)
        self.std_bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        main = torch.relu(self.down_bn(self.down(x)))
        main = torch.relu(self.grouped_bn(self.grouped(main)))
        main = self.dw_bn(self.dw(main))
        x = self.after_add(main + self.shortcut(x))
        x = self.after_pool(nn.functional.avg_pool2d(x, 3, 1, 1))
        x = self.shared_bn1(self.shared(x)) + self.shared_bn2(self.shared(x))
        x = torch.relu(self.std_bn(self.std(x)))
        return self.head(x.mean((2, 3)))


def _block():
    torch.manual_seed(0)
    return randomize_norms(Block()).eval()


def _convert(model, to, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ns.convert(model, to=to, input_size=(3, 16, 16), **options)


def test_cbn_pairs_each_norm_with_its_conv_or_says_why():
    new = _convert(_block(), "cbn", window=3)
    rows = {r.name: r for r in new.normsurgeon_report.rows}
    for name, conv in (("stem_bn", "stem"), ("down_bn", "down"), ("grouped_bn", "grouped"),
                       ("dw_bn", "dw"), ("shortcut.1", "shortcut.0")):
        assert isinstance(new.get_submodule(name), CrossIterationBatchNorm), name
        assert new.get_submodule(name).conv_name == conv
        assert any(f"conv '{conv}'" in n for n in rows[name].notes)
    reasons = {"after_add": "add", "after_pool": "avg_pool2d", "shared_bn1": "called 2 times",
               "shared_bn2": "called 2 times", "std_bn": "StdConv2d"}
    for name, why in reasons.items():
        module = new.get_submodule(name)
        assert type(module) is BatchNorm, name
        assert any(n.startswith("kept as BatchNorm") and why in n for n in rows[name].notes), rows[name].notes
    assert "depthwise" in " ".join(rows["dw_bn"].notes) and "bias" in " ".join(rows["stem_bn"].notes)


@pytest.mark.parametrize("to", ["cbn", "mbn"])
def test_eval_function_preserved_right_after_conversion(to):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model, size in ((_block(), 16), (randomize_norms(torchvision.models.resnet18(num_classes=10)).eval(), 32),
                        (randomize_norms(timm.create_model("efficientnet_b0", num_classes=10)).eval(), 32)):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = ns.convert(model, to=to, input_size=(3, size, size))
        with torch.no_grad():
            ref, out = model(x), new(x)
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max()), (type(model).__name__, to)


def _loop(model, batches, opt):
    outs = []
    for x in batches:
        out = model(x)
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ns.after_step(model, x)
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize("to,options", [("cbn", {"window": 3, "burnin": 2}), ("mbn", {"memory": 3})])
def test_checkpoint_resume_continues_the_same_trajectory(tmp_path, to, options):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(8)]
    model = _convert(_block(), to, **options).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _loop(model, batches[:4], opt)
    ns.save(model, tmp_path / "mid.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    copied = copy.deepcopy(model)
    copied_opt = torch.optim.SGD(copied.parameters(), lr=0.05, momentum=0.9)
    copied_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict aliases tensors)
    expected = _loop(model, batches[4:], opt)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = ns.load(tmp_path / "mid.pt", _block()).train()
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for other, other_opt in ((resumed, resumed_opt), (copied, copied_opt)):
        got = _loop(other, batches[4:], other_opt)
        for a, b in zip(expected, got):
            assert torch.equal(a, b)
        for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(p, q), name
    layer = next(m for m in model.modules() if isinstance(m, (CrossIterationBatchNorm, MemorizedBatchNorm)))
    if to == "cbn":  # the state really was in use: past burn-in, window full
        assert layer._steps == 8 and bool(layer.past_valid.all())


def test_chained_conversion_away_from_cbn():
    model = _convert(_block(), "cbn")
    back = _convert(model, "bn")
    assert not any(isinstance(m, CrossIterationBatchNorm) for m in back.modules())
    x = torch.randn(2, 3, 16, 16)
    back.train()(x).sum().backward()  # the orphaned taps are harmless
    again = _convert(model, "cbn", window=2)
    again.train()(x).sum().backward()
    again(x)


def test_plan_options_are_checked():
    with pytest.raises(ValueError, match="window"):
        _convert(_block(), "cbn", window=0)
    with pytest.raises(TypeError, match="memory"):
        _convert(_block(), "mbn", window=3)
