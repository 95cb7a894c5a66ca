"""cbn and mbn: the two targets that keep state across training iterations.

cbn (Cross-Iteration BN): ``window=k`` (default 4: current + 3 past), ``burnin`` optimizer steps
of plain BatchNorm first (default 0), ``rho`` (1 = the paper's compensation, 0 = plain averaging).
Each site is paired with the conv producing its input (``producers.py``); a site without one
(input from an add, a pool, a concat, a shared or weight-standardized conv, or no traced graph)
stays BatchNorm, with the reason in the report. BatchNorm affine and running statistics carry
over: eval is BatchNorm exactly, and so is training during the burn-in.

mbn (Memorized BN with double forward): ``memory=k`` batches pooled (default 4, counting the
current one; k = 1 is BatchNorm), ``decay`` the weight ratio of consecutive entries (default 1:
uniform). Affine and running statistics carry over, and all k memory entries start at the
running statistics, so eval is function-preserving right after conversion.

Both need ``normsurgeon.after_step(model, inputs)`` after every optimizer step (``finetune`` calls
it): cbn to count its burn-in, mbn for the double forward. A loop that never calls it is warned
about once.
"""
from __future__ import annotations

from ... import layers
from ..graph.producers import Producer, producer_context
from ..sources import SourceNorm
from .transfer import Transfer
from .registry import SiteInfo, SkipSite, register_target
from .standard import build_bn

HOOK_NOTE = ("needs normsurgeon.after_step(model, inputs) after every optimizer step "
             "(normsurgeon.finetune calls it)")


def _kept_as_bn(source: SourceNorm, site: SiteInfo, options: dict, reason: str):
    built = build_bn(source, site, {k: v for k, v in options.items() if k in ("eps", "momentum")})
    built.notes.insert(0, f"kept as BatchNorm: {reason}")
    return built


def _conv_summary(conv) -> str:
    parts = [f"{conv.in_channels}→{conv.out_channels}", "x".join(map(str, conv.kernel_size))]
    if tuple(conv.stride) != (1, 1):
        parts.append(f"stride {tuple(conv.stride)}")
    if conv.groups > 1:
        parts.append("depthwise" if conv.groups == conv.in_channels == conv.out_channels else f"groups {conv.groups}")
    if conv.bias is not None:
        parts.append("bias")
    return ", ".join(parts)


def build_cbn(source: SourceNorm, site: SiteInfo, options: dict):
    window, burnin, rho = options.get("window", 4), options.get("burnin", 0), options.get("rho", 1.0)
    layers.CrossIterationBatchNorm(1, (1, 1, 1, 1), window=window, burnin=burnin, rho=rho)  # validates
    producer = site.context
    if source.channels_last:
        return _kept_as_bn(source, site, options, "a channels-last norm (N, *, C) is not fed by a Conv2d")
    if producer is None:
        return _kept_as_bn(source, site, options, "no traced graph at this site, so the conv producing "
                                                  "its input is unknown")
    if not isinstance(producer, Producer):
        return _kept_as_bn(source, site, options, str(producer))
    conv = producer.conv
    if conv.out_channels != source.num_channels:
        return _kept_as_bn(source, site, options, f"its conv '{producer.name}' has {conv.out_channels} "
                                                  f"output channels, the norm {source.num_channels}")
    from_batch = source.kind == "batch"
    has_stats = source.kind in ("batch", "frozen_batch") and source.has_statistics
    module = layers.CrossIterationBatchNorm(
        source.num_channels, tuple(conv.weight.shape), conv.groups, options.get("eps", source.eps or 1e-5),
        options.get("momentum", source.momentum if from_batch else 0.1), affine=source.affine,
        track_running_stats=source.track_running_stats if from_batch else True, window=window,
        burnin=burnin, rho=rho, act=source.act, drop=source.drop, statistics_pending=not has_stats)
    t = Transfer(source, module).affine().statistics()
    module.attach(conv, producer.name)
    t.note(f"statistics over {window} iterations compensated for conv '{producer.name}' "
           f"({_conv_summary(conv)}); rho={rho}; {module.state_bytes()} bytes of window state")
    if burnin:
        t.note(f"BatchNorm for the first {burnin} optimizer steps; {HOOK_NOTE} to count them")
    if module.statistics_pending:
        t.note("the first training batch sets the running statistics (calibrate or train before eval)")
    same = from_batch and "eps" not in options and "momentum" not in options
    return t.exact(("train+eval" if window == 1 else "eval") if same else "no")


def build_mbn(source: SourceNorm, site: SiteInfo, options: dict):
    memory, decay = options.get("memory", 4), options.get("decay", 1.0)
    layers.MemorizedBatchNorm(1, memory=memory, decay=decay)  # validates the options
    if source.kind == "batch" and not source.track_running_stats:
        raise SkipSite("the source BatchNorm keeps no running statistics (it uses batch statistics in "
                       "eval); MBN's inference uses its memory, which would change the eval function")
    module = layers.MemorizedBatchNorm(
        source.num_channels, options.get("eps", source.eps or 1e-5),
        source.momentum if source.kind == "batch" else 0.1, affine=source.affine, memory=memory,
        decay=decay, channels_last=source.channels_last, act=source.act, drop=source.drop)
    t = Transfer(source, module).affine().statistics()
    has_stats = source.kind in ("batch", "frozen_batch") and source.has_statistics
    untrained = source.num_batches_tracked is not None and int(source.num_batches_tracked) == 0
    if has_stats and not untrained:
        module.seed_memory(module.running_mean.clone(), module.running_var.clone())
        t.note(f"all {memory} memory entries start at the running statistics")
    elif has_stats:
        # A BatchNorm that never saw a batch holds its initial (0, 1), not data: seeding the memory
        # with it would pool (0, 1) into the first k − 1 training batches. Eval is unchanged (an
        # empty memory leaves running_mean/var at the source's values).
        t.note("empty memory: the source BatchNorm never saw a batch (num_batches_tracked = 0); the "
               "first training batches fill it")
    else:
        t.note("empty memory: the first training batch fills it (calibrate or train before eval)")
    t.note(f"memory of {memory} batches, weights decay^j with decay={decay}; {HOOK_NOTE} (double forward)")
    same = source.kind == "batch" and has_stats and "eps" not in options
    return t.exact(("train+eval" if memory == 1 else "eval") if same else "no")


register_target("cbn", build_cbn, batch_dependent=True, context=producer_context,
                options=("window", "burnin", "rho", "momentum"),
                summary="Cross-Iteration BN: statistics over a window of iterations, compensated to the "
                        "producing conv's current weights; window=, burnin= (optimizer steps), rho=")
register_target("mbn", build_mbn, batch_dependent=True, options=("memory", "decay"),
                summary="Memorized BN: statistics pooled over a memory of recent batches, refreshed by a "
                        "double forward after each step (normsurgeon.after_step); memory=, decay=")
