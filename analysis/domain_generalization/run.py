"""Leave-one-domain-out on digit domains: plain BN vs DSBN + BN-Embedding mixture (Segu et al.).

Question: does a network with one BN statistics set per source domain, mixed at test time by
BN-Embedding distances (normsurgeon.BNEnsemble), generalize to an unseen domain better than one
BN model trained on the mixed source domains? And does the mixture weighting beat uniform
weights, and how close does it get to the best single source domain?

Data: sklearn's digits, upsampled to 32×32, under five real transformations
(normsurgeon.domains.digits: clean, rotated, inverted, blurred, noisy). Per seed the digits are
split 70/30 (the same split in every domain); training uses the source domains' 70%, testing
the held-out domain's 30%. Model: a 3-block CNN (conv 3×3 → BN → ReLU, widths 16/32/32, two
max-pools, global average pool, linear), same initialization for both models per seed; Adam
3e-3, 4 epochs, batch 64. Plain BN: batches mixed over the source domains. DSBN:
convert(cnn, to="dsbn", domains=sources), domain-pure batches (DomainBatchSampler).
Evaluation on the held-out domain:
  bn        the plain BN model
  bne       DSBN + BNEnsemble (softmax outputs weighted by the BNE mixture weights)
  uniform   DSBN, softmax outputs averaged with equal weights
  oracle    DSBN through the single source domain that scores best on the held-out domain
            (chosen in hindsight: an upper bound for picking one domain)
Also: how often a test sample of a *source* domain gets its highest BNE weight on its own domain.

Run: .venv/bin/python analysis/domain_generalization/run.py   (about 3 CPU minutes, 1 thread)
Writes results.csv, identification.csv, table.md, results.png next to this file.
"""
from __future__ import annotations

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import normsurgeon as ns  # noqa: E402
from normsurgeon.domains.digits import digit_domains  # noqa: E402
from normsurgeon.domains.sampler import DomainBatchSampler  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = ("clean", "rotated", "inverted", "blurred", "noisy")
SEEDS = (0, 1, 2)
EPOCHS, BATCH, LR = 4, 64, 3e-3
METHODS = ("bn", "bne", "uniform", "oracle")


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(model, x, y, d, batches, route: bool):
    opt = torch.optim.Adam(model.parameters(), LR)
    model.train()
    for epoch in range(EPOCHS):
        for idx in batches(epoch):
            idx = torch.as_tensor(idx)
            if route:
                with ns.domain(model, d[idx]):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
            else:
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(probs, y) -> float:
    return (probs.argmax(1) == y).float().mean().item()


def one_fold(images, labels, train_idx, test_idx, target, seed):
    sources = tuple(n for n in DOMAINS if n != target)
    src = torch.stack([images[DOMAINS.index(n)] for n in sources])  # (K, N, 1, 32, 32)
    x = src[:, train_idx].reshape(-1, 1, 32, 32)
    y = labels[train_idx].repeat(len(sources))
    d = torch.arange(len(sources)).repeat_interleave(len(train_idx))
    torch.manual_seed(seed)
    init = cnn()
    gen = torch.Generator().manual_seed(seed)
    bn = train(ns.convert(init, to="bn", input_size=(1, 32, 32)), x, y, d,
               lambda e: torch.randperm(len(x), generator=gen).split(BATCH), route=False)
    sampler = DomainBatchSampler(d, BATCH, seed=seed)
    dsbn = train(ns.convert(init, to="dsbn", domains=sources, input_size=(1, 32, 32)), x, y, d,
                 lambda e: iter(sampler), route=True)
    xt, yt = images[DOMAINS.index(target), test_idx], labels[test_idx]
    rows = []
    with torch.no_grad():
        rows.append(("bn", accuracy(bn(xt).softmax(1), yt)))
        probs, w = ns.BNEnsemble(dsbn, combine="probabilities")(xt, return_weights=True)
        rows.append(("bne", accuracy(probs, yt)))
        per_domain = []
        for k in range(len(sources)):
            with ns.domain(dsbn, k):
                per_domain.append(dsbn(xt).softmax(1))
        rows.append(("uniform", accuracy(torch.stack(per_domain).mean(0), yt)))
        singles = [accuracy(p, yt) for p in per_domain]
        rows.append(("oracle", max(singles)))
        # domain identification on the source domains' held-out digits
        xs = src[:, test_idx].reshape(-1, 1, 32, 32)
        _, ws = ns.BNEnsemble(dsbn)(xs, return_weights=True)
        truth = torch.arange(len(sources)).repeat_interleave(len(test_idx))
        hits = (ws.argmax(1) == truth).float().view(len(sources), -1).mean(1)
    results = [dict(seed=seed, target=target, method=m, accuracy=a) for m, a in rows]
    ident = [dict(seed=seed, target=target, source=s, identified=h) for s, h in zip(sources, hits.tolist())]
    extra = dict(seed=seed, target=target, oracle_source=sources[max(range(len(singles)), key=singles.__getitem__)],
                 mean_weight=dict(zip(sources, w.mean(0).tolist())))
    return results, ident, extra


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    results, ident, extras = [], [], []
    for seed in SEEDS:
        images, labels, _ = digit_domains(DOMAINS, size=32, seed=seed)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.7 * len(labels))
        for target in DOMAINS:
            r, i, e = one_fold(images, labels, perm[:cut], perm[cut:], target, seed)
            results += r
            ident += i
            extras.append(e)
            print(f"seed {seed} target {target:9s} " + " ".join(f"{x['method']}={x['accuracy']:.3f}" for x in r)
                  + f"  oracle={e['oracle_source']}  ({time.time() - start:.0f} s)", flush=True)
    res, idf = pd.DataFrame(results), pd.DataFrame(ident)
    res.to_csv(os.path.join(HERE, "results.csv"), index=False)
    idf.to_csv(os.path.join(HERE, "identification.csv"), index=False)
    summary = res.groupby(["target", "method"]).accuracy.agg(["mean", "std"]).unstack("method")
    lines = ["| held-out domain | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for target in DOMAINS:
        lines.append(f"| {target} | " + " | ".join(
            f"{summary.loc[target, ('mean', m)]:.3f} ± {summary.loc[target, ('std', m)]:.3f}" for m in METHODS) + " |")
    avg = res.groupby(["seed", "method"]).accuracy.mean().unstack("method")
    lines.append("| **average** | " + " | ".join(f"**{avg[m].mean():.3f}** ± {avg[m].std():.3f}" for m in METHODS) + " |")
    ident_by_source = idf.groupby("source").identified.mean()
    lines += ["", f"Source-domain test digits whose highest BNE weight is on their own domain: "
                  f"{idf.identified.mean():.3f} overall (per source domain, over folds and seeds: "
              + ", ".join(f"{s} {ident_by_source[s]:.3f}" for s in DOMAINS) + ").",
              "", "Oracle source domain per held-out domain (seed 0, 1, 2): " + "; ".join(
                  f"{t}: {', '.join(e['oracle_source'] for e in extras if e['target'] == t)}" for t in DOMAINS) + ".",
              "", "Mean BNE weight on each source domain (seed 0): " + "; ".join(
                  f"{e['target']} → " + ", ".join(f"{s} {v:.2f}" for s, v in e["mean_weight"].items())
                  for e in extras if e["seed"] == 0) + ".",
              "", f"Total run time: {time.time() - start:.0f} s on 1 CPU thread."]
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.2
    for j, m in enumerate(METHODS):
        means = [summary.loc[t, ("mean", m)] for t in DOMAINS]
        stds = [summary.loc[t, ("std", m)] for t in DOMAINS]
        ax.bar([i + (j - 1.5) * width for i in range(len(DOMAINS))], means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_xlabel("held-out (unseen) domain")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    ax.set_title(f"Leave-one-domain-out on digit domains, mean ± sd over {len(SEEDS)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results.png"), dpi=120)


if __name__ == "__main__":
    main()
