"""proxy_gn / proxy_ln: Proxy Normalization (Labatie et al. 2021) as conversion targets.

A norm whose output goes through an elementwise activation φ becomes
``ProxyNormAct`` = GN/LN without affine → PN-Act(φ); the activation is taken out of the
data path at that call site (``pairing.py``). A timm NormAct layer brings its own φ. Any other
norm (last norm of a residual branch, shortcut norm, norm feeding an add) becomes a plain
GN/LN with affine, and the report says why.

Transfer: the pretrained γ, β move into PN-Act (they sit before φ in both), γ̃ = β̃ = 0
(reported as reset), batch statistics dropped. Not function-preserving: fine-tune or calibrate.
"""
from __future__ import annotations

from .. import layers
from .groups import resolve_groups
from .registry import SiteInfo, SkipSite, register_target
from .sources import SourceNorm
from .standard_targets import build_gn, build_ln
from .transfer import Transfer

PROXY_OPTIONS = ("proxy_eps", "proxy_points")


def _build_proxy(source: SourceNorm, site: SiteInfo, options: dict, groups: int, plain):
    fused = source.act is not None
    pairing = site.context
    if not fused and (pairing is None or not pairing.paired):
        why = pairing.reason if pairing is not None else "no graph context"
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


register_target("proxy_gn", build_proxy_gn, needs_context=True,
                options=("num_groups", "group_size") + PROXY_OPTIONS,
                summary="Proxy Norm: GroupNorm (no affine) + PN-Act fused with the following "
                        "activation; plain GroupNorm where no activation follows")
register_target("proxy_ln", build_proxy_ln, needs_context=True, options=PROXY_OPTIONS,
                summary="Proxy Norm: LayerNorm over (C, positions) (no affine) + PN-Act; plain "
                        "LayerNorm where no activation follows")
