"""make_dp_ready and whole models under Opacus: ResNet-18 (torchvision) and EfficientNet-B0 (timm).

For each batch-independent target: Opacus's ModuleValidator finds nothing, make_private with
the default grad sampler runs two steps, and the per-sample gradients of every parameter
equal a loop over single samples (float64). One cheap case per target runs by default; the
full matrix (both models × every target, and the other sampler modes) is marked slow.
"""
from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import normsurgeon as ns
from normsurgeon import layers
from normsurgeon.privacy import NotDPReady

from conftest import randomize_norms

TARGETS = {"gn": {}, "ln": {}, "in": {}, "pn": {}, "proxy_gn": {}, "proxy_ln": {},
           "frozen_bn": {"trainable_affine": True}}
# one cheap representative per target for the default run: (model, input size)
DEFAULT_CASES = {"gn": ("resnet18", 32), "ln": ("efficientnet_b0", 32), "in": ("resnet18", 64),
                 "pn": ("resnet18", 32), "proxy_gn": ("efficientnet_b0", 32),
                 "proxy_ln": ("resnet18", 32), "frozen_bn": ("efficientnet_b0", 32)}
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def needs_opacus():
    return pytest.importorskip("opacus", reason="Opacus is not installed: pip install 'normsurgeon[dp]'")


def base_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=5)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=5, drop_rate=0.0)
    return randomize_norms(model)


def converted(arch: str, to: str, size: int) -> nn.Module:
    return ns.convert(base_model(arch), to=to, input_size=(3, size, size), **TARGETS.get(to, {}))


def batch(size: int, n: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.arange(n) % 5


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def per_sample_errors(model: nn.Module, size: int, mode: str = "hooks") -> dict[str, float]:
    """Relative error of Opacus's per-sample gradients against a loop, per parameter (float64)."""
    from opacus import GradSampleModule
    model = copy.deepcopy(model).double().train()
    x, y = batch(size)
    x = x.double()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
            for i in range(len(x))]
    ref = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}
    wrapped = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    loss_fn(wrapped(x), y).backward()
    scale = max(r.abs().max() for r in ref.values())
    return {n: ((params[n].grad_sample - r).abs().max() / max(r.abs().max(), 1e-6 * scale)).item()
            for n, r in ref.items()}


def two_private_steps(model: nn.Module, size: int, mode: str = "hooks") -> None:
    from opacus import PrivacyEngine
    model.train()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = batch(size, n=6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    extra = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
    out = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                       noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                       grad_sample_mode=mode, **extra)
    private, optimizer = out[0], out[1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    steps = 0
    for xb, yb in out[-1]:
        optimizer.zero_grad()
        criterion(private(xb), yb).backward()
        optimizer.step()
        steps += 1
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert steps == 2
    assert all(torch.isfinite(a).all() for a in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def check_target(arch: str, to: str, size: int) -> None:
    from opacus.validators import ModuleValidator
    new = converted(arch, to, size)
    ready = ns.make_dp_ready(new, input_size=(3, size, size))
    assert ModuleValidator.validate(ready.train(), strict=False) == []
    errors = per_sample_errors(ready, size)
    assert len(errors) == sum(1 for p in ready.parameters() if p.requires_grad)
    assert max(errors.values()) <= 1e-5, {n: e for n, e in errors.items() if e > 1e-5}
    two_private_steps(ready, size)


@pytest.mark.parametrize("to", list(TARGETS))
def test_each_target_trains_under_opacus_with_exact_per_sample_gradients(to):
    needs_opacus()
    check_target(*DEFAULT_CASES[to][:1], to, DEFAULT_CASES[to][1])


@pytest.mark.slow
@pytest.mark.parametrize("to", list(TARGETS))
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_every_target_on_both_models(arch, to):
    needs_opacus()
    check_target(arch, to, 64)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["functorch", "ghost", "ew"])
@pytest.mark.parametrize("to", list(TARGETS))
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_other_sampler_modes_train_or_refuse_by_name(arch, to, mode):
    needs_opacus()
    size = 64 if to == "in" else 32  # instance statistics need 2 positions in the last stage
    new = converted(arch, to, size)
    if mode == "ew" and to in ("frozen_bn", "proxy_gn", "proxy_ln"):
        with pytest.raises(NotDPReady, match=r"bn1.*expanded weights.*grad_sample_mode='hooks'"):
            ns.make_dp_ready(new, grad_sample_mode=mode, input_size=(3, size, size))
        return
    ready = ns.make_dp_ready(new, grad_sample_mode=mode, input_size=(3, size, size))
    if mode == "functorch":
        errors = per_sample_errors(ready, size, mode)
        assert max(errors.values()) <= 1e-5
    two_private_steps(ready, size, mode)


# ---- what make_dp_ready changes, and what it leaves alone ----------------------------------

def test_the_users_model_is_left_alone_and_flags_are_kept():
    needs_opacus()
    new = converted("resnet18", "gn", 32)
    new.layer1.eval()  # a user's choice, kept
    flags = {n: m.training for n, m in new.named_modules()}
    state = {k: v.clone() for k, v in new.state_dict().items()}
    ready = ns.make_dp_ready(new, input_size=(3, 32, 32))
    assert ready is not new
    assert new.relu.inplace and "forward" not in new.layer1[0].__dict__
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in state.items())
    assert {n: m.training for n, m in new.named_modules()} == flags
    assert {n: m.training for n, m in ready.named_modules()} == flags
    assert not ready.relu.inplace and "forward" in ready.layer1[0].__dict__
    assert ready.state_dict().keys() == new.state_dict().keys()
    assert any("BasicBlock" in c and "out += identity" in c for c in ready.normsurgeon_dp_changes)
    x = batch(32)[0]
    torch.testing.assert_close(ready.eval()(x), new.eval()(x))


def test_inplace_prepares_the_model_itself_and_a_second_call_changes_nothing():
    needs_opacus()
    new = converted("resnet18", "gn", 32)
    assert ns.make_dp_ready(new, inplace=True, input_size=(3, 32, 32)) is new
    assert not new.relu.inplace and len(new.conv1._forward_pre_hooks) == 1
    block_forward = new.layer1[0].forward
    assert ns.make_dp_ready(new, inplace=True, input_size=(3, 32, 32)).normsurgeon_dp_changes == []
    assert new.layer1[0].forward is block_forward and len(new.conv1._forward_pre_hooks) == 1


class InplaceBlock(nn.Module):
    """In-place ops of three kinds right after hooked layers."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = layers.GroupNorm(4, 2)

    def forward(self, x):
        out = self.norm(self.conv(x))
        if self.style == "method":
            out.relu_()
        elif self.style == "function":
            out = F.relu(out, inplace=True)
        else:
            out = torch.relu_(out)
        return out + x


@pytest.mark.parametrize("style", ["method", "function", "torch"])
def test_inplace_calls_after_a_hooked_layer_are_rewritten(style):
    needs_opacus()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), InplaceBlock(style), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 3, 6, 6))
    ready = ns.make_dp_ready(model, input_size=(3, 6, 6))
    assert "InplaceBlock" in " ".join(ready.normsurgeon_dp_changes)
    assert max(per_sample_errors(ready, 6).values()) < 1e-9
    x = batch(6)[0]
    torch.testing.assert_close(ready(x), model(x))


def test_an_inplace_op_in_an_already_rewritten_forward_is_made_out_of_place():
    """proxy_gn rewrites a block's forward to remove its functional ReLU; the block's
    ``add_`` after the second norm is then edited in that rewritten graph."""
    needs_opacus()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return y.add_(x)

    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), Block(), nn.Flatten(), nn.Linear(64, 5)))
    new = ns.convert(model, to="proxy_gn", num_groups=2, input_size=(3, 4, 4))
    assert "forward" in new[1].__dict__ and ".add_(" in new[1].forward.train_src
    ready = ns.make_dp_ready(new, input_size=(3, 4, 4))
    assert ".add_(" not in ready[1].forward.train_src and ".add_(" not in ready[1].forward.eval_src
    assert ".add_(" in new[1].forward.train_src  # the converted model keeps its own forward
    assert max(per_sample_errors(ready, 4).values()) < 1e-9
    x = batch(4)[0]
    torch.testing.assert_close(ready(x), new(x))


@pytest.mark.parametrize("layout", ["channels_last model", "timm LayerNorm2d before a conv"])
def test_channels_last_activations_get_exact_conv_per_sample_gradients(layout):
    """Opacus's own conv rule reads channels-last activations wrongly; make_dp_ready's
    contiguous conv inputs fix it (without them these per-sample errors are ~1)."""
    needs_opacus()
    norm = layers.GroupNorm(4, 2) if layout == "channels_last model" else timm.layers.LayerNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    if layout == "channels_last model":
        model = model.to(memory_format=torch.channels_last)
    assert max(per_sample_errors(model, 8).values()) > 0.1  # the defect, as Opacus has it
    ready = ns.make_dp_ready(model, input_size=(3, 8, 8))
    assert max(per_sample_errors(ready, 8).values()) < 1e-9


# ---- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("to,options", [("bn", {}), ("bgn", {"num_groups": 2}), ("iebn", {}), ("cbn", {}),
                                        ("mbn", {}), ("dsbn", {"domains": ["a", "b"]})])
def test_batch_dependent_targets_are_refused_naming_the_sites(to, options):
    needs_opacus()
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    new = ns.convert(model, to=to, input_size=(3, 8, 8), **options)
    with pytest.raises(NotDPReady, match=r"batch statistics.*'1' \(\w+\), '4' \(\w+\)|batch statistics.*1 \(\w+\), 4 \(\w+\)"):
        ns.make_dp_ready(new)
    with pytest.raises(NotDPReady, match="to='frozen_bn', trainable_affine=True"):
        ns.make_dp_ready(new)


def test_plain_batchnorm_is_refused_before_opacus_would_accept_then_fail():
    opacus = needs_opacus()
    model = converted("resnet18", "bn", 32)  # normsurgeon's BatchNorm, a _BatchNorm subclass
    assert opacus.validators.ModuleValidator.validate(model, strict=False) == []  # Opacus misses it
    with pytest.raises(NotDPReady, match=r"20 layer\(s\) compute batch statistics, .*: bn1 \(BatchNorm\), "
                                         r"layer1.0.bn1 \(BatchNorm\)"):
        ns.make_dp_ready(model)
    with pytest.raises(NotDPReady, match=r"bn1 \(BatchNorm2d\)"):
        ns.make_dp_ready(torchvision.models.resnet18())


def test_unsupported_layers_are_refused_naming_them():
    needs_opacus()

    class Scaled(nn.Module):  # trainable, with a buffer: Opacus cannot hook it
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            return x * self.gain.view(1, -1, 1, 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(), layers.GroupNorm(4, 2, drop=nn.Dropout(0.1)),
                          layers.ProxyNormAct(4, 2, nn.PReLU()), nn.LSTM(4, 4))
    with pytest.raises(NotDPReady) as info:
        ns.make_dp_ready(model)
    text = str(info.value)
    assert "1: Scaled has trainable parameters and buffers (count)" in text
    assert "2: its fused Dropout is random" in text
    assert "3: its activation PReLU has trainable parameters" in text
    assert "Opacus's ModuleValidator" in text and "LSTM" in text
    fused_prelu = nn.Sequential(nn.Conv2d(3, 4, 1), layers.GroupNorm(4, 2, act=nn.PReLU()))
    ns.make_dp_ready(fused_prelu, input_size=(3, 4, 4))  # exact with hooks (test_dp_grad_samplers)
    with pytest.raises(NotDPReady, match=r"1: its fused activation PReLU .*'functorch' Opacus counts"):
        ns.make_dp_ready(fused_prelu, grad_sample_mode="functorch")
    with pytest.raises(ValueError, match="grad_sample_mode='hook'.*'hooks'"):
        ns.make_dp_ready(nn.Linear(2, 2), grad_sample_mode="hook")


def test_an_inplace_op_that_cannot_be_rewritten_is_named_and_changes_nothing():
    needs_opacus()

    class TwoInputs(nn.Module):  # forward(x, scale): FX could bake in the default of `scale`
        def __init__(self):
            super().__init__()
            self.norm = layers.GroupNorm(4, 2)

        def forward(self, x, scale=1.0):
            out = self.norm(x)
            out *= scale
            return out

    model = nn.Sequential(nn.Conv2d(3, 4, 1), TwoInputs(), nn.ReLU(inplace=True))
    with pytest.raises(NotDPReady, match=r"'1' \(TwoInputs.*out \*= scale"):
        ns.make_dp_ready(model, inplace=True, input_size=(3, 4, 4))
    assert model[2].inplace and "forward" not in model[1].__dict__


def test_missing_opacus_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'normsurgeon\[dp\]'"):
        ns.make_dp_ready(nn.Linear(2, 2))
