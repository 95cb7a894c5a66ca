"""``make_dp_ready``: a model that Opacus's ``PrivacyEngine.make_private`` accepts and whose
per-sample gradients are exact.

Checks, before anything is changed (a refusal names every site and says what to do):
  1. No layer computes batch statistics: every ``_BatchNorm`` (BN, SyncBN, timm's
     BatchNormAct2d, normsurgeon's bn/bgn/iebn/cbn/mbn) and dsbn. DP-SGD needs each sample's
     output, hence its gradient, to depend on that sample only. Opacus's validator matches
     exact types, so it passes such subclasses and ``make_private`` fails later on their buffers.
  2. Every trainable layer gets exact per-sample gradients in ``grad_sample_mode``: no buffer
     in a trainable layer (Opacus's rule), no random ``drop`` fused into a norm (it cannot be
     replayed), PN-Act without trainable activation parameters; with 'ew' (torch's expanded
     weights) no FrozenBatchNorm / PN-Act, which have no expanded-weights rule.
  3. Opacus's ``ModuleValidator.validate`` finds nothing else (LSTM, MultiheadAttention, ...).
Then, on a copy unless ``inplace=True``: in-place ops that break Opacus's per-sample hooks are
made out of place (``out_of_place.py``; 'ew' uses no hooks), every trainable conv gets its input
made contiguous first (Opacus 1.6's conv grad sampler silently returns wrong per-sample
gradients for channels-last activations: a ``channels_last`` model or input, timm's
``LayerNorm2d`` before a conv), and normsurgeon's grad samplers are registered
(``grad_samplers.py``). Train/eval flags stay as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import layers
from ..surgery.graph.probe import default_input_size
from .errors import NotDPReady

MODES = ("hooks", "functorch", "ghost", "ew")
BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm, layers.DomainSpecificBatchNorm)
_SHOWN = 8


def require_opacus():
    """The ``opacus`` module, or an ImportError saying how to install it."""
    try:
        import opacus
    except ImportError as exc:
        raise ImportError("DP-SGD support needs Opacus (>= 1.5): pip install 'normsurgeon[dp]' "
                          "(or pip install 'opacus>=1.5')") from exc
    return opacus


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _batch_statistics_sites(model: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, BATCH_STATISTICS)]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _layer_problem(module: nn.Module, mode: str) -> str | None:
    """Why ``module`` (trainable) gets no exact per-sample gradient in ``mode``, or None."""
    act = getattr(module, "act", None)
    if isinstance(module, layers.base.FusedActLayout) and mode in ("functorch", "ew") \
            and any(p.requires_grad for p in act.parameters()):
        return (f"its fused activation {type(act).__name__} has trainable parameters: with "
                f"grad_sample_mode={mode!r} Opacus counts them twice or has no rule for them; use "
                f"'hooks' (the default) or 'ghost'")
    if mode == "ew":
        if isinstance(module, (layers.FrozenBatchNorm, layers.ProxyNormAct)):
            return (f"{type(module).__name__} has no rule under torch's expanded weights: use "
                    f"grad_sample_mode='hooks' (the default), 'functorch' or 'ghost'")
        return None
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        return (f"{type(module).__name__} has trainable parameters and buffers ({', '.join(buffers)}), "
                f"which Opacus refuses: freeze it (requires_grad_(False)) or replace it")
    drop = getattr(module, "drop", None)
    if isinstance(module, layers.base.FusedActLayout) and type(drop) is not nn.Identity:
        return (f"its fused {type(drop).__name__} is random and cannot be replayed for per-sample "
                f"gradients: set .drop = nn.Identity() or exclude the layer")
    if isinstance(module, layers.ProxyNormAct) and any(p.requires_grad for p in module.act.parameters()):
        return (f"its activation {type(module.act).__name__} has trainable parameters, which get no "
                f"exact per-sample gradient through the proxy grid: freeze them or convert the site "
                f"to 'gn'/'ln'")
    return None


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input as a contiguous tensor (a no-op when it already is)."""
    return (args[0].contiguous(),) + args[1:] if args and isinstance(args[0], torch.Tensor) else args


def _contiguous_conv_inputs(model: nn.Module) -> int:
    """Hook every trainable conv that is not hooked yet (a second make_dp_ready adds none)."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and _trainable(m)
             and _contiguous_input not in m._forward_pre_hooks.values()]
    for conv in convs:
        conv.register_forward_pre_hook(_contiguous_input)
    return len(convs)


def _opacus_errors(model: nn.Module) -> list[str]:
    """``ModuleValidator.validate``'s findings, but the training flag (the user's to set)."""
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import IllegalModuleConfigurationError
    return [str(e) for e in ModuleValidator.validate(model, strict=False)
            if not (isinstance(e, IllegalModuleConfigurationError) and "training mode" in str(e))]


def check_dp(model: nn.Module, grad_sample_mode: str = "hooks") -> None:
    """Raise ``NotDPReady`` naming every site that DP-SGD in ``grad_sample_mode`` cannot train."""
    require_opacus()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if grad_sample_mode not in MODES:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r}: one of {', '.join(map(repr, MODES))}")
    batch = _batch_statistics_sites(model)
    if batch:
        raise NotDPReady(
            f"{len(batch)} layer(s) compute batch statistics, which DP-SGD forbids (a sample's output "
            f"and gradient would depend on the other samples of its batch): {_listing(batch)}. Convert "
            f"them to a batch-independent target first: normsurgeon.convert(model, to='frozen_bn', "
            f"trainable_affine=True) keeps the pretrained function (exact in eval mode); 'gn', 'ln', "
            f"'in', 'pn', 'proxy_gn', 'proxy_ln' are the other choices (include= picks sites).")
    sites_by_reason: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        why = _layer_problem(m, grad_sample_mode) if _trainable(m) else None
        if why:
            sites_by_reason.setdefault(why, []).append(name or "<root>")
    problems = [f"{_listing(sites)}: {why}" for why, sites in sites_by_reason.items()]
    problems += [f"Opacus's ModuleValidator: {e}" for e in _opacus_errors(model)]
    if problems:
        raise NotDPReady(f"DP-SGD with grad_sample_mode={grad_sample_mode!r} cannot train this "
                         f"model as it is. " + " | ".join(problems))


def make_dp_ready(model: nn.Module, *, grad_sample_mode: str = "hooks", inplace: bool = False,
                  input_size: tuple[int, ...] | None = None) -> nn.Module:
    """A model ready for ``opacus.PrivacyEngine().make_private(...)`` with exact per-sample gradients.

    Args:
        model: a model whose norms are batch-independent, e.g. ``normsurgeon.convert(m, to="gn")``
            ('gn', 'ln', 'in', 'pn', 'proxy_gn', 'proxy_ln', 'frozen_bn' with trainable_affine=True).
        grad_sample_mode: the mode you will pass to ``make_private``: 'hooks' (Opacus's default),
            'functorch', 'ghost' or 'ew'.
        inplace: prepare ``model`` itself instead of a deep copy.
        input_size: (C, H, W) for the meta-tensor probe that finds hook-breaking in-place ops
            (default: the timm pretrained_cfg, else (3, 224, 224)); nothing is computed.

    Returns:
        The prepared model (a copy unless ``inplace``); ``.normsurgeon_dp_changes`` lists what
        was changed. A refusal (``NotDPReady``) names the sites and changes nothing.

    Example:
        >>> model = normsurgeon.make_dp_ready(normsurgeon.convert(resnet, to="gn"))
        >>> model, optimizer, loader = PrivacyEngine().make_private(
        ...     module=model.train(), optimizer=opt, data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0)
    """
    check_dp(model, grad_sample_mode)
    from . import grad_samplers  # noqa: F401  (registers the per-sample gradient rules)
    from .out_of_place import make_out_of_place
    work = model if inplace else copy.deepcopy(model)
    changes = []
    if grad_sample_mode != "ew":
        size = tuple(input_size) if input_size else default_input_size(work)
        changes = make_out_of_place(work, torch.zeros((2,) + size))
        convs = _contiguous_conv_inputs(work)
        if convs:
            changes.append(f"contiguous input for {convs} conv(s) (Opacus's conv grad sampler "
                           f"misreads channels-last activations)")
    work.normsurgeon_dp_changes = changes
    return work
