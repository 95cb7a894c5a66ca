"""Domain data for dsbn: the root/domain/class/image folder loader, domain-pure batches, the
digit domains test bed, and dsbn across the architecture matrix."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import normsurgeon as ns
from normsurgeon import layers
from normsurgeon.data import load_domain_folder
from normsurgeon.domains.digits import DOMAINS, MILD_DOMAINS, digit_domains
from normsurgeon.domains.sampler import DomainBatchSampler


def write_tree(root, spec):
    """spec: {domain: {class: count}}; image (d, c, i) is a flat colour encoding its indices."""
    for d, (domain, classes) in enumerate(spec.items()):
        for c, (cls, count) in enumerate(classes.items()):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(count):
                colour = np.full((12, 16, 3), (40 * d, 40 * c + 20, 10 * i), dtype=np.uint8)
                Image.fromarray(colour).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_domain_folder_loader(tmp_path):
    write_tree(tmp_path, {"photo": {"dog": 2, "cat": 1}, "art": {"cat": 3}, "sketch": {"horse": 1, "dog": 1}})
    folder = load_domain_folder(tmp_path, size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert folder.domain_names == ["art", "photo", "sketch"] and folder.classes == ["cat", "dog", "horse"]
    assert folder.images.shape == (8, 3, 8, 8)
    assert folder.domains.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert folder.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert folder.paths[:2] == ["art/cat/img0.jpg", "art/cat/img1.png"]
    # the pixels are the ones written: green channel encodes the class index within its domain
    assert abs(folder.images[5, 1].mean().item() - 20 / 255) < 0.02  # photo/dog is photo's first class
    assert len(load_domain_folder(tmp_path, size=8, limit=1).paths) == 3


def test_domain_folder_errors(tmp_path):
    write_tree(tmp_path / "a", {"d1": {"c": 1}})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "d1" / "stray.png")
    with pytest.raises(ValueError, match="domain 'd1' has images outside class folders.*stray.png"):
        load_domain_folder(tmp_path / "a", size=8)
    write_tree(tmp_path / "b", {"d1": {"c": 1}})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b" / "root.png")
    with pytest.raises(ValueError, match="not a root/domain/class/image tree"):
        load_domain_folder(tmp_path / "b", size=8)
    with pytest.raises(FileNotFoundError):
        load_domain_folder(tmp_path / "missing")


def test_domain_batch_sampler():
    domains = torch.tensor([0] * 10 + [1] * 7 + [2] * 1)
    sampler = DomainBatchSampler(domains, 4, seed=0)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert all(len(set(domains[b].tolist())) == 1 for b in batches)
        seen = sorted(i for b in batches for i in b)
        assert seen == list(range(17)), "every sample once; domain 2's single sample is dropped"
    assert first != second and len(sampler) == len(first) == 3 + 2
    assert list(DomainBatchSampler(domains, 4, seed=0)) == first
    assert all(len(b) == 4 for b in DomainBatchSampler(domains, 4, drop_last=True))
    with pytest.raises(ValueError, match="batch_size"):
        DomainBatchSampler(domains, 1)


def test_digit_domains_are_real_transformations():
    images, labels, names = digit_domains(size=16, seed=1)
    assert names == DOMAINS and images.shape == (6, 1797, 1, 16, 16) and labels.shape == (1797,)
    clean = images[0]
    assert torch.allclose(images[names.index("inverted")], 1 - clean)
    for name in ("rotated", "blurred", "noisy", "elastic"):
        other = images[names.index(name)]
        assert (other - clean).abs().mean() > 0.02, name
    # blur keeps the mean and lowers the pixel variance; rotation moves ink but not its amount
    blurred = images[names.index("blurred")]
    assert blurred.var() < clean.var() and abs(blurred.mean() - clean.mean()) < 0.01
    assert torch.equal(digit_domains(("noisy",), size=16, seed=1)[0][0], digit_domains(("noisy",), size=16, seed=1)[0][0])
    with pytest.raises(ValueError, match="unknown digit domain"):
        digit_domains(("sepia",))


def test_mild_digit_domains_are_milder_versions_of_the_strong_ones():
    images, _, names = digit_domains(MILD_DOMAINS, size=16, seed=1)
    strong, _, strong_names = digit_domains(DOMAINS, size=16, seed=1)
    clean = images[0]
    assert torch.equal(clean, strong[0])
    assert torch.allclose(images[names.index("faded")], 0.25 + 0.5 * clean)
    for mild, hard in (("tilted", "rotated"), ("soft", "blurred"), ("grainy", "noisy")):
        change = (images[names.index(mild)] - clean).abs().mean()
        assert 0.01 < change < (strong[strong_names.index(hard)] - clean).abs().mean(), mild
    soft = images[names.index("soft")]
    assert soft.var() < clean.var() and abs(soft.mean() - clean.mean()) < 0.01


@pytest.mark.slow
def test_dsbn_across_the_architecture_matrix():
    """Every architecture of the matrix converts to dsbn (2 domains) and trains with a mixed batch."""
    from architectures import ARCHITECTURES
    from test_matrix import all_finite, build, total

    failures = []
    for arch, _, size in ARCHITECTURES:
        model, size = build(arch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = ns.convert(model, to="dsbn", domains=["a", "b"], input_size=(3, size, size))
        if not any(isinstance(m, layers.DomainSpecificBatchNorm) for m in new.modules()):
            continue  # no BatchNorm-like site that dsbn serves (reasons are in the report)
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            new.train()
            try:
                with ns.domain(new, torch.tensor([0, 1, 1, 0])):
                    out = new(x)
            except ValueError as err:  # BN over (batch x tokens) rows: only domain-pure routing applies
                assert "folds positions or patches into the batch axis" in str(err), str(err)
                with ns.domain(new, 1):
                    out = new(x)
            total(out).backward()
            new.eval()
            with torch.no_grad(), ns.domain(new, "b"):
                ok = all_finite(out) and all_finite(new(x))
            if not ok:
                failures.append(f"{arch}: not finite")
        except Exception as exc:  # noqa: BLE001  (collected, reported together)
            failures.append(f"{arch}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
