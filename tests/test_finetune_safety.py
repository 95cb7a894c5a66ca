"""finetune never leaves the user worse off: frozen statistics by default, the best evaluated state,
and ``trainable=`` selecting exactly the documented parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.model_state import running_statistics_layers

from conftest import randomize_norms

BATCH_STATISTICS_TARGETS = {"bn": {}, "bgn": {"num_groups": 2}, "iebn": {}, "cbn": {"window": 2, "burnin": 0},
                            "mbn": {"memory": 2}, "dsbn": {"domains": ["a", "b"]}}


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return randomize_norms(net, seed=1).eval()


def labeled(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every layer with running statistics (windows, memories, counters too)."""
    return {f"{name}.{b}": t.clone() for name, m in running_statistics_layers(model)
            for b, t in m.named_buffers()}


def _finetune(model, data, **kw):
    options = dict(steps=4, batch_size=4, loss="labels", lr=0.05, progress=False, seed=1)
    if isinstance(model[1], ns.layers.DomainSpecificBatchNorm):
        with ns.domain(model, "a"):
            return ns.finetune(model, data, **dict(options, **kw))
    return ns.finetune(model, data, **dict(options, **kw))


@pytest.mark.parametrize("to", ["original"] + list(BATCH_STATISTICS_TARGETS))
def test_statistics_stay_frozen_by_default_and_move_with_train_statistics(to):
    base = small_bn_net()
    model = base if to == "original" else ns.convert(base, to=to, **BATCH_STATISTICS_TARGETS[to])
    before = statistics(model)
    gamma = model[1].weight.detach().clone()
    assert before, "the model has layers with running statistics"
    _finetune(model, labeled(16, seed=2))
    after = statistics(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed with frozen statistics"
    assert not torch.equal(model[1].weight, gamma), "γ should still train"
    _finetune(model, labeled(16, seed=2), train_statistics=True)
    moved = [k for k, v in statistics(model).items() if k.endswith("running_mean") and not torch.equal(v, before[k])]
    assert moved, "train_statistics=True must update the running statistics"


def test_frozen_statistics_train_on_population_statistics():
    """With frozen statistics a training forward is an eval-mode forward of the same batch."""
    import copy

    model = small_bn_net()
    reference = copy.deepcopy(model).eval()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.detach().clone())))
    ns.finetune(model, labeled(4, seed=3), steps=1, batch_size=4, loss="labels", lr=1e-3, optimizer="sgd",
                momentum=0.0, progress=False)
    x, out = seen[0]
    with torch.no_grad():
        assert torch.allclose(out, reference(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out, reference.train()(x), atol=1e-3)  # batch statistics would differ


def test_module_flags_are_given_back():
    model = small_bn_net().train()
    model[4].eval()  # a frozen stage, as detection code does
    flags = {name: m.training for name, m in model.named_modules()}
    _finetune(model, labeled(16, seed=2), eval_data=labeled(8, seed=4))
    assert {name: m.training for name, m in model.named_modules()} == flags
    model.eval()
    _finetune(model, labeled(16, seed=2))
    assert not any(m.training for m in model.modules())


def _good_start_then_noise():
    """A model, held-out data it gets all right (labelled by its own predictions), and training
    data with random labels that can only pull it away."""
    model = small_bn_net()
    held_x, _ = labeled(32, seed=6)
    with torch.no_grad():
        held_y = model(held_x).argmax(1)
    return model, labeled(32, seed=5), (held_x, held_y)


def test_the_best_evaluated_state_is_returned():
    model, noise, held_out = _good_start_then_noise()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = ns.finetune(model, noise, steps=6, batch_size=8, loss="labels", lr=1.0, optimizer="sgd",
                          eval_data=held_out, eval_every=2, progress=False)
    evaluations = [r for r in history if "eval_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4, 6]
    assert evaluations[0]["eval_accuracy"] == 1.0 and evaluations[-1]["eval_accuracy"] < 1.0  # the premise
    ranked = max(evaluations, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))
    restored = next(r for r in history if "restored_best_step" in r)
    assert restored["restored_best_step"] == ranked["step"]
    final = ns.training.evaluate(model, held_out)
    assert final["eval_accuracy"] == ranked["eval_accuracy"] == 1.0
    assert final["eval_loss"] == pytest.approx(ranked["eval_loss"], rel=1e-5)
    if ranked["step"] == 0:
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_keep_best_false_keeps_the_last_state():
    model, noise, held_out = _good_start_then_noise()
    history = ns.finetune(model, noise, steps=6, batch_size=8, loss="labels", lr=1.0, optimizer="sgd",
                          eval_data=held_out, keep_best=False, progress=False)
    assert not any("restored_best_step" in r for r in history)
    final = ns.training.evaluate(model, held_out)
    assert final["eval_accuracy"] < 1.0
    assert final["eval_loss"] == pytest.approx(history.last("eval_loss"), rel=1e-5)


def test_distillation_ranks_by_agreement_then_kl():
    from normsurgeon.training.best_state import BestState

    best = BestState(labels_first=False)
    net = nn.Linear(2, 2)
    assert best.offer(0, {"eval_agreement": 0.5, "eval_kl": 1.0}, net)
    assert not best.offer(1, {"eval_agreement": 0.5, "eval_kl": 1.5}, net)  # tie, worse KL
    assert best.offer(2, {"eval_agreement": 0.5, "eval_kl": 0.5}, net)      # tie, better KL
    assert not best.offer(3, {"eval_agreement": 0.4, "eval_kl": 0.1}, net)  # lower agreement
    assert best.step == 2
    labels = BestState(labels_first=True)
    assert labels.offer(0, {"eval_accuracy": 0.2, "eval_loss": 2.0, "eval_agreement": 0.9, "eval_kl": 0.1}, net)
    assert labels.offer(1, {"eval_accuracy": 0.3, "eval_loss": 2.5, "eval_agreement": 0.1, "eval_kl": 3.0}, net)


# ----------------------------------------------------------------------------- trainable
def _expected(model, predicate):
    return sorted(n for n, p in model.named_parameters() if predicate(n))


@pytest.mark.parametrize("trainable", ["all", "norm", "head", "norm+head", ["0.*", "8.bias"]])
def test_trainable_selects_exactly_the_documented_parameters(trainable):
    from normsurgeon.training.trainable import select_trainable

    model = ns.convert(small_bn_net(), to="proxy_gn", num_groups=2)
    norm = {"1.weight", "1.bias", "1.proxy_weight", "1.proxy_bias", "4.weight", "4.bias", "4.proxy_weight",
            "4.proxy_bias"}
    head = {"8.weight", "8.bias"}
    expected = {"all": {n for n, _ in model.named_parameters()}, "norm": norm, "head": head,
                "norm+head": norm | head}.get(trainable if isinstance(trainable, str) else "", {"0.weight", "8.bias"})
    assert set(select_trainable(model, trainable)) == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = labeled(16, seed=7)
    ns.finetune(model, (x, y), steps=3, batch_size=8, loss="labels", lr=0.1, trainable=trainable, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags are given back"


def test_trainable_head_on_timm_and_torchvision_models():
    import timm
    import torchvision

    from normsurgeon.training.trainable import select_trainable

    assert select_trainable(timm.create_model("resnet18", num_classes=5), "head") == ["fc.weight", "fc.bias"]
    assert select_trainable(torchvision.models.mobilenet_v3_small(num_classes=5), "head") == [
        "classifier.3.weight", "classifier.3.bias"]


def test_bad_input():
    model = small_bn_net()
    data = labeled(16, seed=2)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        ns.finetune(model, data, steps=1, loss="labels", trainable=["nothing.*"], progress=False)
    with pytest.raises(ValueError, match="unknown selection 'norms'.*all, norm, head"):
        ns.finetune(model, data, steps=1, loss="labels", trainable="norms", progress=False)
    with pytest.raises(ValueError, match="no classifier"):
        ns.finetune(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(8, 3, 4, 4), steps=1,
                    loss="labels", trainable="head", progress=False)
    with pytest.raises(ValueError, match="eval_data has 5 images: too few to rank"):
        ns.finetune(model, data, steps=1, loss="labels", eval_data=labeled(5, seed=3), progress=False)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="train_statistics"):
        ns.finetune(model, data, steps=1, loss="labels", train_statistics="yes", progress=False)
    ns.finetune(model, data, steps=1, batch_size=4, loss="labels", eval_data=labeled(5, seed=3), keep_best=False,
                progress=False)  # without ranking, a small eval set is fine
