"""proxy_gn / proxy_ln: Proxy Normalization (Labatie et al. 2021) as conversion targets.

A norm whose output goes through an elementwise activation φ becomes
``ProxyNormAct`` = GN/LN without affine → PN-Act(φ); the activation is taken out of the
data path at that call site (``pairing.py``). A timm NormAct layer brings its own φ. Any other
norm (last norm of a residual branch, shortcut norm, norm feeding an add) becomes a plain
GN/LN with affine, and the report says why.

Transfer: the pretrained γ, β move into PN-Act (they sit before φ in both), γ̃ = β̃ = 0
(reported as reset), batch statistics dropped. Not function-preserving: fine-tune or calibrate.

After install, ``fuse_activations`` (the targets' ``finalize``) takes each consumed activation out
of the data path (swap to ``nn.Identity``, or a forward rewrite of the owner); after a rewrite it
runs the whole model on meta tensors, and a failure undoes it all.
"""
from __future__ import annotations

from torch import nn

from ... import layers
from ..graph import forward_rewrite
from ..graph.pairing import activation_context, apply_plan, pairings_and_plans
from ..graph.probe import meta_forward
from .groups import resolve_groups
from ..sources import SourceNorm
from .transfer import Transfer
from .registry import ConversionError, SiteInfo, SkipSite, register_target
from .standard import build_gn, build_ln

PROXY_OPTIONS = ("proxy_eps", "proxy_points")


def _build_proxy(source: SourceNorm, site: SiteInfo, options: dict, groups: int, plain):
    fused = source.act is not None
    pairing = site.context
    if not fused and (pairing is None or not pairing.paired):
        why = pairing.reason if pairing is not None else (
            "no graph context at this site, so the activation it feeds is unknown (functional norm calls "
            "and norms inside leaf modules are not paired with activations)")
        plain_options = {k: v for k, v in options.items() if k not in PROXY_OPTIONS}
        built = plain(source, site, dict(plain_options, fold_statistics=False))
        built.notes.insert(0, f"no PN: {why}")
        return built
    positions = site.positions(source.channels_last)
    if positions is not None and source.num_channels // groups * positions < 2:
        raise SkipSite(f"GroupNorm({groups} groups) on input {site.input_shape} would be over a single value")
    act = source.act if fused else pairing.activation
    module = layers.ProxyNormAct(
        source.num_channels, groups, act, options.get("eps", source.eps or 1e-5),
        proxy_eps=options.get("proxy_eps", layers.proxy_norm.DEFAULT_PROXY_EPS),
        proxy_points=options.get("proxy_points", layers.proxy_norm.DEFAULT_PROXY_POINTS),
        channels_last=source.channels_last, drop=source.drop)
    t = Transfer(source, module).affine().drop_statistics()
    t.built.reset += ["proxy_weight", "proxy_bias"]
    how = f"fused {type(act).__name__}" if fused else f"{type(act).__name__} from {pairing.describe}"
    t.note(f"PN with φ = {how}")
    t.built.consumes_activation = not fused
    return t.exact("no")


def build_proxy_gn(source: SourceNorm, site: SiteInfo, options: dict):
    groups = resolve_groups(source.num_channels, options.get("num_groups"), options.get("group_size"),
                            where=site.name)
    return _build_proxy(source, site, options, groups, build_gn)


def build_proxy_ln(source: SourceNorm, site: SiteInfo, options: dict):
    return _build_proxy(source, site, options, 1, build_ln)


def fuse_activations(work: nn.Module, installed: list, graphs, report):
    """Take each activation a PN-Act consumes out of the data path; verify the whole model on meta
    tensors, or undo it all and raise ``ConversionError``. Returns the undo."""
    consumed = [site.name for site, built in installed if built.consumes_activation]
    if not consumed:
        return None
    pairings, plans = pairings_and_plans(graphs)
    undo = []

    def undo_all():
        for step in reversed(undo):
            step()

    rewrite: dict[str, set[str]] = {}
    for name in consumed:
        pairing = pairings[name]
        if pairing.removal == "swap":
            act = work.get_submodule(pairing.act_name)
            identity = nn.Identity()
            identity.training = act.training
            work.set_submodule(pairing.act_name, identity)
            undo.append(lambda n=pairing.act_name, a=act: work.set_submodule(n, a))
        else:
            rewrite.setdefault(pairing.owner, set()).add(name)
    modes_differ = False
    for owner_name, names in rewrite.items():
        owner = work.get_submodule(owner_name)
        apply_plan(owner, plans[owner_name], names)
        undo.append(lambda o=owner: forward_rewrite.uninstall(o))
        modes_differ |= owner.forward.train_src != owner.forward.eval_src
    if not rewrite:  # an activation swapped for nn.Identity keeps every shape: no whole-model run needed
        report.verify += f"; {len(consumed)} activation(s) fused (each module swapped for nn.Identity)"
        return undo_all
    analysis = graphs.analysis
    if analysis.probe.error or analysis.example is None:
        report.verify += "; the rewritten model was not run (no meta probe)"
        return undo_all
    # swapped modules and PN-Act compute the same in both modes: one eval-mode run covers
    # them, unless a rewritten forward has a different train-mode graph
    for train in ((True, False) if modes_differ else (False,)):
        result = meta_forward(work, analysis.example, {}, train=train)
        if result.error:
            undo_all()
            raise ConversionError(f"the model with activations fused into PN-Act fails a "
                                  f"{'train' if train else 'eval'}-mode forward: {result.error}. "
                                  f"The input model is unchanged.")
    report.verify += (f"; {len(consumed)} activation(s) fused ({sum(map(len, rewrite.values()))} by "
                      f"forward rewrite in {len(rewrite)} module(s)); whole model ran on meta tensors "
                      f"in {'train and eval mode' if modes_differ else 'eval mode (same graphs in both)'}")
    return undo_all


register_target("proxy_gn", build_proxy_gn, context=activation_context, finalize=fuse_activations,
                options=("num_groups", "group_size") + PROXY_OPTIONS,
                summary="Proxy Norm: GroupNorm (no affine) + PN-Act fused with the following "
                        "activation; plain GroupNorm where no activation follows")
register_target("proxy_ln", build_proxy_ln, context=activation_context, finalize=fuse_activations,
                options=PROXY_OPTIONS,
                summary="Proxy Norm: LayerNorm over (C, positions) (no affine) + PN-Act; plain "
                        "LayerNorm where no activation follows")
