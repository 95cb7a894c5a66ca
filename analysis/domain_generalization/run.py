"""Leave-one-domain-out on digit domains: plain BN vs DSBN + BN-Embedding mixture (Segu et al.).

Question: does a network with one BN statistics set per source domain, mixed at test time by
BN-Embedding distances (normsurgeon.BNEnsemble), generalize to an unseen domain better than one
BN model trained on the mixed source domains? Does the mixture weighting beat uniform weights?
How far is it from DSBN given the unseen domain's own statistics?

Data: sklearn's digits at 24×24 under six mild, realistic shifts (normsurgeon.domains.digits
MILD_DOMAINS: clean, tilted ±10–20°, faded contrast 0.25 + 0.5·x, soft blur, grainy noise
σ 0.15, elastic). Per seed the digits are split 70/30 (the same split in every domain); training
uses the five source domains' 70%, testing the held-out domain's 30% (and the source domains' 30%
for in-domain accuracy and domain recognition). Model: a 3-block CNN (conv 3×3 → BN → ReLU,
widths 16/32/32, two max-pools, global average pool, linear), the same initialization for both
models per seed; Adam 3e-3 with cosine decay, 8 epochs, batch 64. Plain BN: batches mixed over
the source domains. DSBN: convert(cnn, to="dsbn", domains=sources), domain-pure batches
(DomainBatchSampler).

Evaluation on the held-out domain:
  bn           the plain BN model
  bne          DSBN + BNEnsemble (softmax outputs weighted by the BNE mixture weights)
  bne_fitted   the same, with embeddings calibrated on the source training digits
               (BNEnsemble.fit_embeddings: per-domain mean and covariance of per-image statistics,
               Mahalanobis distance)
  uniform      DSBN, softmax outputs averaged with equal weights
  best_source  DSBN through the one source domain that scores best on the held-out domain,
               chosen in hindsight with the labels (an upper bound for picking one source domain)
  oracle       DSBN with statistics of the held-out domain itself: every dsbn layer's statistics
               re-estimated on the held-out domain's unlabeled test images (one pass in train
               mode, transductive, no labels); the held-out domain has no slot of its own, and
               with shared γ, β every slot then gives the same network
  bn_target    control for `oracle`: the plain BN model with the same re-estimation (AdaBN)
Also, on the source domains' test digits: in-domain accuracy (bn; dsbn routed to the true domain)
and how often a sample gets its highest BNE weight on its own domain (all layers = BNEnsemble,
and each dsbn layer alone).

Run: .venv/bin/python analysis/domain_generalization/run.py   (about 15 minutes on 1 CPU thread)
Writes results.csv, source_domains.csv, table.md, results.png next to this file.
"""
from __future__ import annotations

import copy
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
from normsurgeon.domains.digits import MILD_DOMAINS, digit_domains  # noqa: E402
from normsurgeon.domains.ensemble import mixture_weights, wasserstein_to_domains  # noqa: E402
from normsurgeon.domains.routing import domain_layers  # noqa: E402
from normsurgeon.domains.sampler import DomainBatchSampler  # noqa: E402
from normsurgeon.layers import BatchNorm, DomainSpecificBatchNorm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = MILD_DOMAINS
SIZE = 24
SEEDS = (0, 1, 2)
EPOCHS, BATCH, LR = 8, 64, 3e-3
METHODS = ("bn", "bne", "bne_fitted", "uniform", "best_source", "oracle", "bn_target")


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(model, x, y, d, batches, steps_per_epoch: int, route: bool):
    opt = torch.optim.Adam(model.parameters(), LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.15)
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
            sched.step()
    return model.eval()


def with_target_statistics(model, x):
    """A copy of ``model`` whose BN statistics (dsbn: slot 0) are those of ``x``: every layer
    pending, one train-mode forward of the whole unlabeled set (momentum 1 once), then eval."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, DomainSpecificBatchNorm):
            m.statistics_pending[0] = True
        elif isinstance(m, BatchNorm):
            m.statistics_pending = True
    with torch.no_grad():
        if domain_layers(model):
            with ns.domain(model, 0):
                model(x)
        else:
            model(x)
    return model.eval()


def per_layer_distances(model, x) -> torch.Tensor:
    """(L, N, K) BNE distances of ``x`` to each domain at each dsbn layer (as BNEnsemble computes them)."""
    layers = [m for _, m in domain_layers(model)]
    k, n, out = layers[0].num_domains, x.shape[0], []

    def observe(layer, args):
        mean, var = layer.instance_statistics(args[0])
        out.append(wasserstein_to_domains(mean.view(k, n, -1), var.view(k, n, -1), layer))

    handles = [m.register_forward_pre_hook(observe) for m in layers]
    try:
        with torch.no_grad(), ns.domain(model, torch.arange(k).repeat_interleave(n)):
            model(x.repeat(k, 1, 1, 1))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out)


def accuracy(probs, y) -> float:
    return (probs.argmax(1) == y).float().mean().item()


def one_fold(images, labels, train_idx, test_idx, target, seed):
    sources = tuple(n for n in DOMAINS if n != target)
    src = torch.stack([images[DOMAINS.index(n)] for n in sources])  # (K, N, 1, S, S)
    x = src[:, train_idx].reshape(-1, 1, SIZE, SIZE)
    y = labels[train_idx].repeat(len(sources))
    d = torch.arange(len(sources)).repeat_interleave(len(train_idx))
    torch.manual_seed(seed)
    init = cnn()
    gen = torch.Generator().manual_seed(seed)
    bn = train(ns.convert(init, to="bn", input_size=(1, SIZE, SIZE)), x, y, d,
               lambda e: torch.randperm(len(x), generator=gen).split(BATCH), -(-len(x) // BATCH), route=False)
    sampler = DomainBatchSampler(d, BATCH, seed=seed)
    dsbn = train(ns.convert(init, to="dsbn", domains=sources, input_size=(1, SIZE, SIZE)), x, y, d,
                 lambda e: iter(sampler), len(sampler), route=True)
    xt, yt = images[DOMAINS.index(target), test_idx], labels[test_idx]
    rows = []
    with torch.no_grad():
        rows.append(("bn", accuracy(bn(xt), yt)))
        probs, w = ns.BNEnsemble(dsbn, combine="probabilities")(xt, return_weights=True)
        rows.append(("bne", accuracy(probs, yt)))
        fitted = ns.BNEnsemble(dsbn, combine="probabilities").fit_embeddings(
            [src[k, train_idx] for k in range(len(sources))])  # the calibrated embeddings (Mahalanobis rule)
        rows.append(("bne_fitted", accuracy(fitted(xt), yt)))
        per_domain = []
        for k in range(len(sources)):
            with ns.domain(dsbn, k):
                per_domain.append(dsbn(xt).softmax(1))
        rows.append(("uniform", accuracy(torch.stack(per_domain).mean(0), yt)))
        singles = [accuracy(p, yt) for p in per_domain]
        rows.append(("best_source", max(singles)))
        adapted = with_target_statistics(dsbn, xt)
        with ns.domain(adapted, 0):
            rows.append(("oracle", accuracy(adapted(xt), yt)))
        rows.append(("bn_target", accuracy(with_target_statistics(bn, xt)(xt), yt)))

        # source domains' test digits: in-domain accuracy and domain recognition
        xs, ys = src[:, test_idx].reshape(-1, 1, SIZE, SIZE), labels[test_idx].repeat(len(sources))
        truth = torch.arange(len(sources)).repeat_interleave(len(test_idx))
        bn_hit = (bn(xs).argmax(1) == ys).float()
        with ns.domain(dsbn, truth):
            dsbn_hit = (dsbn(xs).argmax(1) == ys).float()
        _, ws = ns.BNEnsemble(dsbn)(xs, return_weights=True)
        dist = per_layer_distances(dsbn, xs)
        assert torch.allclose(mixture_weights(dist), ws, atol=1e-5)
        recognized = {"all": (ws.argmax(1) == truth).float(),
                      "all_fitted": (fitted(xs, return_weights=True)[1].argmax(1) == truth).float()}
        for layer in range(dist.shape[0]):
            recognized[f"layer{layer + 1}"] = (dist[layer].argmin(1) == truth).float()
    results = [dict(seed=seed, target=target, method=m, accuracy=a) for m, a in rows]

    def per_source(v):
        return v.view(len(sources), -1).mean(1).tolist()

    columns = {"bn_accuracy": per_source(bn_hit), "dsbn_accuracy": per_source(dsbn_hit)}
    columns.update({f"recognized_{k}": per_source(v) for k, v in recognized.items()})
    # where the misrecognized samples go: the other domain that most often gets the highest weight
    share = F.one_hot(ws.argmax(1), len(sources)).float().view(len(sources), -1, len(sources)).mean(1)
    share.fill_diagonal_(-1)
    source_rows = [dict(seed=seed, target=target, source=s, **{c: v[i] for c, v in columns.items()},
                        confused_with=sources[int(share[i].argmax())], confused_share=float(share[i].max()))
                   for i, s in enumerate(sources)]
    extra = dict(seed=seed, target=target, oracle_source=sources[max(range(len(singles)), key=singles.__getitem__)],
                 mean_weight=dict(zip(sources, w.mean(0).tolist())))
    return results, source_rows, extra


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    results, source_rows, extras = [], [], []
    for seed in SEEDS:
        images, labels, _ = digit_domains(DOMAINS, size=SIZE, seed=seed)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.7 * len(labels))
        for target in DOMAINS:
            r, s, e = one_fold(images, labels, perm[:cut], perm[cut:], target, seed)
            results += r
            source_rows += s
            extras.append(e)
            print(f"seed {seed} target {target:8s} " + " ".join(f"{x['method']}={x['accuracy']:.3f}" for x in r)
                  + f"  best={e['oracle_source']}  recognized={pd.DataFrame(s).recognized_all.mean():.3f}"
                  + f"  ({time.time() - start:.0f} s)", flush=True)
    res, src = pd.DataFrame(results), pd.DataFrame(source_rows)
    res.to_csv(os.path.join(HERE, "results.csv"), index=False)
    src.to_csv(os.path.join(HERE, "source_domains.csv"), index=False)

    summary = res.groupby(["target", "method"]).accuracy.agg(["mean", "std"]).unstack("method")
    avg = res.groupby(["seed", "method"]).accuracy.mean().unstack("method")
    lines = ["Held-out domain test accuracy, mean ± sd over seeds:", "",
             "| held-out domain | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for target in DOMAINS:
        lines.append(f"| {target} | " + " | ".join(
            f"{summary.loc[target, ('mean', m)]:.3f} ± {summary.loc[target, ('std', m)]:.3f}" for m in METHODS) + " |")
    lines.append("| **average** | " + " | ".join(f"**{avg[m].mean():.3f}** ± {avg[m].std():.3f}" for m in METHODS) + " |")
    wins = {m: int((avg["bne"] > avg[m]).sum()) for m in ("bn", "uniform")}
    lines += ["", f"Seeds where bne's average beats bn: {wins['bn']}/{len(SEEDS)}; beats uniform: "
                  f"{wins['uniform']}/{len(SEEDS)}."]
    rec_cols = [c for c in src.columns if c.startswith("recognized_")]
    by_source = src.groupby("source")[["bn_accuracy", "dsbn_accuracy"] + rec_cols].mean()
    lines += ["", "Source domains (their 30% test digits, pooled over the folds where they are a source, "
                  "and seeds): in-domain accuracy, and the share of samples whose highest BNE weight "
                  "(or, per layer, smallest distance) is on their own domain:", "",
              "| domain | bn accuracy | dsbn accuracy (routed) | recognized (BNE, all layers) | "
              + " | ".join(c.replace("recognized_", "") + " alone" for c in rec_cols[1:]) + " |",
              "|---" * (3 + len(rec_cols)) + "|"]
    for s in DOMAINS:
        row = by_source.loc[s]
        lines.append(f"| {s} | {row.bn_accuracy:.3f} | {row.dsbn_accuracy:.3f} | "
                     + " | ".join(f"{row[c]:.3f}" for c in rec_cols) + " |")
    overall = src[["bn_accuracy", "dsbn_accuracy"] + rec_cols].mean()
    lines.append("| **all** | " + " | ".join(f"**{overall[c]:.3f}**" for c in ["bn_accuracy", "dsbn_accuracy"] + rec_cols) + " |")
    confusion = src.groupby(["source", "confused_with"]).confused_share.agg(["size", "mean"])
    lines += ["", "Where misrecognized source samples go (the other domain most often given the highest "
                  "weight, in how many folds × seeds, and its mean share of the samples): " + "; ".join(
                      f"{s} → " + ", ".join(f"{c} ({int(r['size'])}×, {r['mean']:.2f})"
                                            for c, r in confusion.loc[s].sort_values("size", ascending=False).iterrows())
                      for s in DOMAINS) + "."]
    lines += ["", "Best single source domain per held-out domain (seeds " + ", ".join(map(str, SEEDS)) + "): "
              + "; ".join(f"{t}: {', '.join(e['oracle_source'] for e in extras if e['target'] == t)}" for t in DOMAINS) + ".",
              "", f"Mean BNE weight on each source domain (seed {SEEDS[0]}): " + "; ".join(
                  f"{e['target']} → " + ", ".join(f"{s} {v:.2f}" for s, v in e["mean_weight"].items())
                  for e in extras if e["seed"] == SEEDS[0]) + ".",
              "", f"Total run time: {time.time() - start:.0f} s on 1 CPU thread."]
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        means = [summary.loc[t, ("mean", m)] for t in DOMAINS]
        stds = [summary.loc[t, ("std", m)] for t in DOMAINS]
        ax.bar([i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(DOMAINS))], means, width,
               yerr=stds, label=m, capsize=2)
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_xlabel("held-out (unseen) domain")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(ncol=3, fontsize=8, loc="lower right")
    ax.set_title(f"Leave-one-domain-out, mean ± sd over {len(SEEDS)} seeds", fontsize=10)
    width = 0.8 / len(rec_cols)
    for j, c in enumerate(rec_cols):
        bx.bar([i + (j - (len(rec_cols) - 1) / 2) * width for i in range(len(DOMAINS))],
               [by_source.loc[s, c] for s in DOMAINS], width, label=c.replace("recognized_", ""))
    bx.axhline(0.9, color="k", lw=0.8, ls="--")
    bx.set_xticks(range(len(DOMAINS)), DOMAINS)
    bx.set_ylim(0, 1)
    bx.set_ylabel("own domain gets the highest weight")
    bx.legend(ncol=2, fontsize=8, loc="lower right")
    bx.set_title("BNE recognition of source domains (trained models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results.png"), dpi=120)


if __name__ == "__main__":
    main()
