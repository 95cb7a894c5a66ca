"""dsbn: domain-specific BatchNorm — exactness against BatchNorm, routing, per-sample routing,
BN-Embedding mixture weights against numpy, checkpoints, chaining and errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import normsurgeon as ns
from normsurgeon import layers
from normsurgeon.domains import domain_layers

from conftest import randomize_norms


def small_cnn(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5), nn.BatchNorm1d(5))


def data(*shape, seed=0, shift=0.0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_domain_is_batchnorm_exactly(momentum):
    torch.manual_seed(0)
    base = randomize_norms(small_cnn())
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.momentum = momentum
    dsbn = ns.convert(base, to="dsbn", domains=1, input_size=(3, 8, 8))
    assert dsbn.normsurgeon_report.converted and all(r.exact == "train+eval" for r in dsbn.normsurgeon_report.converted)
    ref = copy.deepcopy(base)
    for step in range(3):
        x = data(6, 3, 8, 8, seed=step, shift=step)
        ref.train(), dsbn.train()
        with ns.domain(dsbn, 0):
            y = dsbn(x)
        assert torch.equal(y, ref(x)), f"train step {step}"
    for (k, a), b in zip(buffers(ref).items(), buffers(dsbn).values()):
        assert torch.equal(a, b.reshape(a.shape)), k
    ref.eval(), dsbn.eval()
    x = data(4, 3, 8, 8, seed=9)
    with ns.domain(dsbn, "0"), torch.no_grad():
        assert torch.equal(dsbn(x), ref(x))


def test_every_domain_starts_as_the_pretrained_bn(resnet18):
    new = ns.convert(resnet18, to="dsbn", domains=["photo", "art", "sketch"], input_size=(3, 32, 32))
    assert all(isinstance(m, layers.DomainSpecificBatchNorm) for m in (new.bn1, new.layer1[0].bn2, new.layer4[1].bn2))
    x = data(3, 3, 32, 32)
    with torch.no_grad():
        expected = resnet18(x)
        for name in ("photo", "art", "sketch"):
            with ns.domain(new, name):
                assert torch.equal(new(x), expected)
    assert not any(isinstance(m, layers.DomainSpecificBatchNorm) for m in resnet18.modules()), "input modified"


def trained_on_domains(domains=3, per_domain_affine=False, steps=3):
    """A dsbn small_cnn whose domain k saw inputs shifted by 2k and scaled by 1 + k (cumulative
    averages: the running statistics are the domains' own)."""
    torch.manual_seed(0)
    model = ns.convert(randomize_norms(small_cnn()), to="dsbn", domains=domains, momentum=None,
                       per_domain_affine=per_domain_affine, input_size=(3, 8, 8))
    names = domain_layers(model)[0][1].domains
    model.train()
    with torch.no_grad():
        for step in range(steps):
            for k in range(len(names)):
                with ns.domain(model, k):
                    model(data(8, 3, 8, 8, seed=100 * k + step, shift=2.0 * k, scale=1.0 + k))
    return model.eval()


def test_statistics_of_a_domain_change_only_with_its_batches():
    model = trained_on_domains()
    before = buffers(model)
    model.train()
    with ns.domain(model, 1):
        model(data(8, 3, 8, 8, seed=7, shift=5.0))
    after = buffers(model)
    for key in before:
        assert torch.equal(before[key][[0, 2]], after[key][[0, 2]]), key
        assert not torch.equal(before[key][1], after[key][1]), key


@pytest.mark.parametrize("per_domain_affine", [False, True])
def test_mixed_batch_equals_domain_pure_sub_batches(per_domain_affine):
    model = trained_on_domains(per_domain_affine=per_domain_affine)
    mixed, pure = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    route = torch.tensor([2, 0, 2, 2, 0, 0, 2, 0])  # domain 1 absent
    x = data(8, 3, 8, 8, seed=3) + route.view(-1, 1, 1, 1).float()
    with ns.domain(mixed, route):
        y = mixed(x)
    y.square().sum().backward()
    expected = torch.empty_like(y)
    for k in (0, 2):
        with ns.domain(pure, k):
            out = pure(x[route == k])
        out.square().sum().backward()
        expected[route == k] = out.detach()
    assert torch.allclose(y, expected, atol=1e-6, rtol=0)
    for (k, a), b in zip(buffers(mixed).items(), buffers(pure).values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), k
    for (name, p), q in zip(mixed.named_parameters(), pure.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-5), name
    # eval: per-sample statistics equal the pure-domain eval forward
    mixed.eval(), pure.eval()
    with torch.no_grad(), ns.domain(mixed, ["2", "0", "1", "1", "0", "0", "2", "0"]):
        y = mixed(x)
    for k in range(3):
        keep = torch.tensor([2, 0, 1, 1, 0, 0, 2, 0]) == k
        with torch.no_grad(), ns.domain(pure, k):
            assert torch.allclose(y[keep], pure(x[keep]), atol=1e-5, rtol=1e-5)


def test_channels_last_layout_matches_channels_first():
    first = layers.DomainSpecificBatchNorm(6, ["a", "b"])
    last = layers.DomainSpecificBatchNorm(6, ["a", "b"], channels_last=True)
    x = data(4, 6, 3, 5)
    route = torch.tensor([1, 0, 1, 0])
    for layer in (first, last):
        layer.route = route
    assert torch.allclose(last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), first(x), atol=1e-6)
    assert torch.allclose(last.running_mean, first.running_mean) and torch.allclose(last.running_var, first.running_var)


# --- BN embeddings and the mixture ---------------------------------------------------------

def run_on_path(model, x, k):
    """The model's output on domain path k (float64 numpy) and, for every dsbn layer whose input
    has > 1 position, (layer, input reshaped to (N, C, positions))."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach().numpy().astype(np.float64))))
               for _, m in domain_layers(model)]
    with torch.no_grad(), ns.domain(model, k):
        out = model(x).numpy().astype(np.float64)
    for h in handles:
        h.remove()
    flat = [(m, inp.reshape(inp.shape[0], inp.shape[1], -1)) for m, inp in seen
            if inp.ndim >= 3 and np.prod(inp.shape[2:]) >= 2]
    return out, flat


def numpy_weights(model, x):
    """The documented formula, computed independently: per path k, the recorded inputs of every
    dsbn layer with > 1 position, W2 to domain k, normalized over domains per layer, averaged,
    inverted."""
    layers_ = [m for _, m in domain_layers(model)]
    k_count = layers_[0].num_domains
    dist = []  # [k][l] -> (N,)
    outputs = []
    for k in range(k_count):
        out, seen = run_on_path(model, x, k)
        outputs.append(out)
        row = []
        for m, flat in seen:
            mean, std = flat.mean(axis=2), flat.std(axis=2)
            mu = m.running_mean[k].double().numpy()
            sigma = np.sqrt(m.running_var[k].double().numpy())
            row.append(np.sqrt(((mean - mu) ** 2).sum(1) + ((std - sigma) ** 2).sum(1)))
        dist.append(row)
    d = np.array(dist)  # (K, L, N)
    d = d / d.sum(axis=0, keepdims=True)
    agg = d.mean(axis=1).T  # (N, K)
    w = (1 / agg) / (1 / agg).sum(axis=1, keepdims=True)
    pred = np.einsum("nk,kn...->n...", w, np.stack(outputs))
    return w, pred


@pytest.mark.parametrize("batched", [True, False])
def test_mixture_weights_follow_the_documented_formula(batched):
    model = trained_on_domains()
    x = torch.cat([data(2, 3, 8, 8, seed=50 + k, shift=2.0 * k, scale=1.0 + k) for k in range(3)])
    ensemble = ns.BNEnsemble(model, batched=batched).eval()
    with torch.no_grad():
        pred, w = ensemble(x, return_weights=True)
    w_np, pred_np = numpy_weights(model, x)
    assert w.shape == (6, 3) and torch.allclose(w.sum(1), torch.ones(6))
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pred.numpy(), pred_np, rtol=1e-4, atol=1e-5)
    assert (w.argmax(1) == torch.arange(3).repeat_interleave(2)).all(), "samples not closest to their own domain"


def numpy_mahalanobis_weights(model, calibration, x, shrinkage=0.1):
    """The calibrated rule, computed independently: per path k, features [m, log(v + eps)] of every
    dsbn layer with > 1 position; domain k's mean and covariance (shrunk to the diagonal, + 1e-5 ·
    mean diag · I) over its calibration samples on path k; Mahalanobis distance; inverse weights."""
    def features(inputs, k):
        out, seen = run_on_path(model, inputs, k)
        blocks = []
        for m, flat in seen:
            blocks += [flat.mean(2), np.log(flat.var(2) + m.eps)]
        return np.concatenate(blocks, 1), out

    dist, outputs = [], []
    for k, cal in enumerate(calibration):
        f, _ = features(cal, k)
        mean, cov = f.mean(0), np.cov(f.T)
        cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
        cov += 1e-5 * np.diag(cov).mean() * np.eye(len(mean))
        ft, out = features(x, k)
        diff = ft - mean
        dist.append(np.sqrt(np.einsum("nf,fg,ng->n", diff, np.linalg.inv(cov), diff)))
        outputs.append(out)
    inv = 1 / np.array(dist).T  # (N, K)
    w = inv / inv.sum(1, keepdims=True)
    return w, np.einsum("nk,kn...->n...", w, np.stack(outputs))


@pytest.mark.parametrize("batched", [True, False])
def test_calibrated_mahalanobis_weights_follow_the_documented_formula(batched):
    model = trained_on_domains()
    calibration = [data(40, 3, 8, 8, seed=200 + k, shift=2.0 * k, scale=1.0 + k) for k in range(3)]
    x = torch.cat([data(2, 3, 8, 8, seed=50 + k, shift=2.0 * k, scale=1.0 + k) for k in range(3)])
    ensemble = ns.BNEnsemble(model, batched=batched).eval()
    assert ensemble.rule == "wasserstein"
    ensemble.fit_embeddings({str(k): c for k, c in enumerate(calibration)})
    assert ensemble.rule == "mahalanobis" and ensemble.embedding_cov.shape == (3, 32, 32)  # 2 layers × 8 ch × 2
    with torch.no_grad():
        pred, w = ensemble(x, return_weights=True)
    w_np, pred_np = numpy_mahalanobis_weights(model, calibration, x)
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(pred.numpy(), pred_np, rtol=1e-3, atol=1e-4)
    assert (w.argmax(1) == torch.arange(3).repeat_interleave(2)).all()
    # the paper's rule stays available after fitting
    with torch.no_grad():
        _, w_paper = ns.BNEnsemble(model, distance="wasserstein", batched=batched)(x, return_weights=True)
    np.testing.assert_allclose(w_paper.numpy(), numpy_weights(model, x)[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="fit_embeddings"):
        ns.BNEnsemble(model, distance="mahalanobis")(x)
    with pytest.raises(ValueError, match="missing"):
        ns.BNEnsemble(model).fit_embeddings({"0": calibration[0]})
    # a saved fitted ensemble loads into a fresh one (and an unfitted state unfits it)
    fresh = ns.BNEnsemble(model, batched=batched).eval()
    fresh.load_state_dict(ensemble.state_dict())
    assert fresh.rule == "mahalanobis"
    with torch.no_grad():
        assert torch.equal(fresh(x), pred)
    ensemble.load_state_dict(ns.BNEnsemble(model).state_dict())
    assert ensemble.rule == "wasserstein" and ensemble.embedding_mean is None


def test_mild_study_domains_are_recognized_by_calibrated_embeddings():
    """Issue 8 on the study's mild domains (analysis/domain_generalization, the elastic fold's five
    sources): the study's CNN trained briefly with dsbn; with calibrated embeddings >= 90% of
    held-out samples of a training domain get their highest weight on it (the paper's W2 rule
    gets 0.73-0.79 on the study's fully trained folds)."""
    import torch.nn.functional as F

    from normsurgeon.domains.digits import MILD_DOMAINS, digit_domains
    from normsurgeon.domains.sampler import DomainBatchSampler

    names = tuple(n for n in MILD_DOMAINS if n != "elastic")  # the sources of the study's elastic fold
    images, labels, _ = digit_domains(names, size=SIZE_MILD, seed=0)
    train, test = slice(0, N_MILD), slice(1400, 1600)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model = ns.convert(cnn, to="dsbn", domains=names, input_size=(1, SIZE_MILD, SIZE_MILD)).train()
    x = images[:, train].reshape(-1, 1, SIZE_MILD, SIZE_MILD)
    y = labels[train].repeat(len(names))
    d = torch.arange(len(names)).repeat_interleave(N_MILD)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(EPOCHS_MILD):
        for idx in DomainBatchSampler(d, 64, seed=0):
            idx = torch.as_tensor(idx)
            with ns.domain(model, d[idx]):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ensemble = ns.BNEnsemble(model.eval()).fit_embeddings(list(images[:, train]))
    truth = torch.arange(len(names)).repeat_interleave(200)
    with torch.no_grad():
        _, w = ensemble(images[:, test].reshape(-1, 1, SIZE_MILD, SIZE_MILD), return_weights=True)
    hit = (w.argmax(1) == truth).float()
    per_domain = hit.view(len(names), -1).mean(1)
    assert hit.mean() >= 0.9, dict(zip(names, per_domain.tolist()))


EPOCHS_MILD, SIZE_MILD, N_MILD = 2, 24, 800  # 2 epochs, the study's 24 px, 800 training digits per domain


def test_batched_and_looped_ensembles_agree_and_probabilities_sum_to_one():
    model = trained_on_domains()
    x = data(5, 3, 8, 8, seed=1, shift=1.0)
    with torch.no_grad():
        a, wa = ns.BNEnsemble(model, combine="probabilities")(x, return_weights=True)
        b, wb = ns.BNEnsemble(model, combine="probabilities", batched=False)(x, return_weights=True)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(wa, wb, atol=1e-5)
    assert torch.allclose(a.sum(-1), torch.ones(5), atol=1e-5)


# the first version of analysis/domain_generalization (strong shifts); its current mild domains
# are not recognized this well (0.73 on this calibrated net; see that study's README)
STUDY_DOMAINS = ("clean", "rotated", "inverted", "blurred", "noisy")


def test_training_domains_are_recognized_on_digit_domains():
    """On digits under strong real transformations, a test sample of a training domain gets its
    highest weight on that domain for >= 90% of samples."""
    from normsurgeon.domains.digits import digit_domains

    names = STUDY_DOMAINS
    images, _, _ = digit_domains(names, size=32, seed=0)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model = ns.convert(cnn, to="dsbn", domains=names, momentum=None, input_size=(1, 32, 32)).train()
    with torch.no_grad():  # population statistics of each domain from its first 1000 digits
        for k in range(len(names)):
            for batch in images[k, :1000].split(100):
                with ns.domain(model, k):
                    model(batch)
    test = images[:, 1000:1300].reshape(-1, 1, 32, 32)
    truth = torch.arange(len(names)).repeat_interleave(300)
    with torch.no_grad():
        _, w = ns.BNEnsemble(model.eval())(test, return_weights=True)
    hit = (w.argmax(1) == truth).float()
    per_domain = hit.view(len(names), -1).mean(1)
    assert hit.mean() >= 0.9 and per_domain.min() >= 0.8, dict(zip(names, per_domain.tolist()))


# --- checkpoints, chaining --------------------------------------------------------------------

@pytest.mark.parametrize("per_domain_affine", [False, True])
def test_save_load_keeps_every_domain(tmp_path, per_domain_affine):
    torch.manual_seed(0)
    base = small_cnn()
    model = ns.convert(base, to="dsbn", domains=["a", "b", "c"], per_domain_affine=per_domain_affine,
                       input_size=(3, 8, 8)).train()
    with torch.no_grad():
        for k in range(3):
            with ns.domain(model, k):
                model(data(8, 3, 8, 8, seed=k, shift=k))
            if per_domain_affine:
                model[1].weight[k].add_(k)
    ns.save(model, tmp_path / "dsbn.pt")
    again = ns.load(tmp_path / "dsbn.pt", small_cnn()).eval()
    model.eval()
    assert again[1].domains == ("a", "b", "c") and again[1].per_domain_affine == per_domain_affine
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    x = data(4, 3, 8, 8, seed=5)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            with ns.domain(model, name), ns.domain(again, name):
                assert torch.equal(model(x), again(x))
    # a plain state_dict round trip too
    fresh = ns.convert(small_cnn(), to="dsbn", domains=["a", "b", "c"], per_domain_affine=per_domain_affine,
                       input_size=(3, 8, 8))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh[4].running_var, model[4].running_var)


def test_chaining_pools_domains_and_one_domain_round_trips_exactly():
    model = trained_on_domains()
    bn = ns.convert(model, to="bn", momentum=0.1, input_size=(3, 8, 8))
    layer, pooled = model[1], bn[1]
    mean = layer.running_mean.double().mean(0)
    var = (layer.running_var.double() + layer.running_mean.double() ** 2).mean(0) - mean ** 2
    assert torch.allclose(pooled.running_mean.double(), mean) and torch.allclose(pooled.running_var.double(), var)
    one = ns.convert(randomize_norms(small_cnn()), to="dsbn", domains=1, input_size=(3, 8, 8))
    back = ns.convert(one, to="bn", input_size=(3, 8, 8)).eval()
    x = data(3, 3, 8, 8)
    with torch.no_grad(), ns.domain(one.eval(), 0):
        assert torch.equal(back(x), one(x))


def test_from_a_source_without_statistics_each_domain_starts_from_its_first_batch():
    gn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4))
    model = ns.convert(gn, to="dsbn", domains=2, input_size=(3, 8, 8)).train()
    x = data(8, 3, 8, 8, shift=3.0)
    with torch.no_grad(), ns.domain(model, 1):
        model(x)
        y = model[0](x)
    layer = model[1]
    assert torch.allclose(layer.running_mean[1], y.mean((0, 2, 3)), atol=1e-5)
    assert torch.equal(layer.running_mean[0], torch.zeros(4)) and layer.statistics_pending == [True, False]


# --- errors -----------------------------------------------------------------------------------

def test_clear_errors():
    model = trained_on_domains(domains=["photo", "art", "sketch"])
    x = data(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="no domain chosen.*normsurgeon.domain"):
        model(x)
    with pytest.raises(ValueError, match="unknown domain 'phot'.*Did you mean 'photo'.*0='photo'"):
        with ns.domain(model, "phot"):
            pass
    with pytest.raises(ValueError, match="index 3 is out of range.*3 domain"):
        with ns.domain(model, 3):
            pass
    with pytest.raises(ValueError, match="index -1 is out of range"):
        with ns.domain(model, torch.tensor([0, -1])):
            pass
    with pytest.raises(TypeError, match="integer indices"):
        with ns.domain(model, torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match=r"per-sample domain tensor has shape \(3,\).*2 rows on the batch axis"):
        with ns.domain(model, torch.tensor([0, 1, 2])):
            model(x)
    assert all(m.route is None for _, m in domain_layers(model)), "a failed route left state behind"
    plain = small_cnn()
    with pytest.raises(ValueError, match="domain-specific BatchNorm layers, and Sequential has none.*to='dsbn'"):
        ns.BNEnsemble(plain)
    with pytest.raises(ValueError, match="no domain-specific BatchNorm.*to='dsbn'"):
        with ns.domain(plain, 0):
            pass
    with pytest.raises(RuntimeError, match="inference-only.*eval"):
        ns.BNEnsemble(model).train()(x)
    with pytest.raises(ValueError, match="dsbn needs domains="):
        ns.convert(plain, to="dsbn", input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="unique"):
        ns.convert(plain, to="dsbn", domains=["a", "a"], input_size=(3, 8, 8))
    with pytest.raises(TypeError, match="unknown option 'domain'.*Did you mean 'domains'"):
        ns.convert(plain, to="dsbn", domain=2, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="2 or more samples per domain"):
        with ns.domain(model.train(), torch.tensor([0, 1])):
            model[1](data(2, 8, 1, 1))


def test_nested_contexts_restore_the_previous_route():
    model = trained_on_domains()
    with ns.domain(model, 2):
        with ns.domain(model, 0):
            assert model[1].route == 0
        assert model[1].route == 2
    assert model[1].route is None
    ns.set_domain(model, "1")
    assert all(m.route == 1 for _, m in domain_layers(model))
    ns.set_domain(model, None)
    assert model[1].route is None
