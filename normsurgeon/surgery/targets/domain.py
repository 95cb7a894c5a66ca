"""dsbn: every BatchNorm becomes a domain-specific BatchNorm (one statistics set per domain).

Options: ``domains=`` (required) the number K of source domains or their names;
``per_domain_affine=False`` (γ, β shared, the BNE paper's "share all parameters except BN
statistics") or True (γ, β per domain too); ``momentum``, ``eps``.

Transfer: the source's running statistics (and step counter) go into every domain slot and
γ, β are copied (into every slot when per domain), so the converted model computes exactly
what the source BatchNorm computed, under any domain, in train and eval. A source without
batch statistics (GroupNorm, LayerNorm, ...) gives pending slots: each domain's first training
batch sets its statistics.
"""
from __future__ import annotations

from ... import layers
from ...layers.domain_batch_norm import domain_names
from ..sources import SourceNorm
from .transfer import Transfer
from .registry import SiteInfo, register_target


def build_dsbn(source: SourceNorm, site: SiteInfo, options: dict):
    if "domains" not in options:
        raise ValueError("dsbn needs domains=: the number of source domains (domains=3) or their names "
                         "(domains=['photo', 'art', 'cartoon'])")
    names = domain_names(options["domains"])
    per_domain = options.get("per_domain_affine", False)
    if not isinstance(per_domain, bool):
        raise ValueError(f"per_domain_affine must be True or False, got {per_domain!r}")
    from_batch = source.kind in ("batch", "frozen_batch") and source.has_statistics
    module = layers.DomainSpecificBatchNorm(
        source.num_channels, names, options.get("eps", source.eps or 1e-5),
        options.get("momentum", source.momentum if source.kind == "batch" else 0.1),
        affine=source.affine, per_domain_affine=per_domain,
        channels_last=source.channels_last, act=source.act, drop=source.drop,
        statistics_pending=not from_batch)
    t = Transfer(source, module).affine().statistics()
    t.note(f"{len(names)} domain slot(s) ({', '.join(names)}), each starting from the source's "
           + ("statistics" if from_batch else "first training batch of that domain")
           + ("; γ, β per domain" if module.per_domain_affine else "; γ, β shared"))
    if not from_batch:
        return t.exact("no")
    if source.kind == "frozen_batch":
        t.note("frozen statistics become running statistics: training now uses batch statistics")
    unchanged = "eps" not in options and "momentum" not in options
    return t.exact(("train+eval" if source.kind == "batch" else "eval") if unchanged else "no")


register_target("dsbn", build_dsbn, batch_dependent=True, options=("domains", "per_domain_affine", "momentum"),
                summary="Domain-specific BN: one statistics set per domain (domains=K or names), routed "
                        "with normsurgeon.domain(); BNEnsemble mixes domains for unseen ones")
