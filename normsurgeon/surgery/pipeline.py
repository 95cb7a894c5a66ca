"""``convert`` and ``plan``: trace → find sites → plan → rewrite → transfer → verify → report.

The rewrite swaps each norm module in place in the module tree (a deep copy unless
``inplace=True``), so the model keeps its class, methods, attributes and forward: train/eval
behaviour of everything else is untouched and state_dict keys of unchanged layers stay the
same. Every new module is built and checked on meta tensors against the shapes seen at its
call site before anything is installed, so a failed conversion leaves the model as it was,
even with ``inplace=True``.

Nothing here knows a particular target: a target reads what it needs from the one shared
``GraphContext`` (its ``context``) and finishes the model after install (its ``finalize``, whose
undo runs if a later step fails); see ``registry.py``.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .graph.functional_sites import functional_sites
from .graph.graph_context import GraphContext
from .graph.probe import check_input_size, check_on_meta, computation_key
from .graph.sites import Analysis, Site, analyze
from .report import ConversionReport, SiteRow
from .sources import UnsupportedSource
from .targets.registry import Built, ConversionError, SiteInfo, SkipSite, get_target

Patterns = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def _patterns(value: Patterns, argname: str):
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        return [value]
    value = list(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{argname}= takes glob patterns of qualified names (str or list of str) "
                        f"or a callable(name, module) -> bool")
    return value


def _matches(pats, site: Site) -> bool:
    if callable(pats):
        return any(pats(n, site.module) for n in site.names)
    return any(fnmatch.fnmatchcase(n, p) for p in pats for n in site.names)


def _warn_unmatched(pats, sites: list[Site], argname: str) -> None:
    if pats is None or callable(pats):
        return
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for s in sites for n in s.names):
            warnings.warn(f"{argname} pattern {p!r} matches no normalization site "
                          f"(site names look like {sites[0].name!r})" if sites else
                          f"{argname} pattern {p!r} matches nothing: the model has no normalization site",
                          UserWarning, stacklevel=4)


def _site_options(site: Site, to: str, options: dict, overrides: dict | None) -> tuple[str, dict]:
    opts = dict(options)
    for pattern, extra in (overrides or {}).items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in site.names):
            extra = dict(extra)
            if "to" in extra:
                new_to = extra.pop("to")
                if new_to != to:
                    to, opts = new_to, {}
            opts.update(extra)
    return to, opts


def _row(site: Site, status: str, target: str | None, **kw) -> SiteRow:
    return SiteRow(site.name, type(site.module).__name__, target, status, calls=site.calls,
                   input_shape=site.input_shape,
                   aliases=site.aliases, **kw)


def _build_all(analysis: Analysis, to: str, include, exclude, overrides, options, dry_run, graphs: GraphContext):
    rows, builds = [], []
    dropped_acts: dict[str, list[str]] = {}  # target -> sites whose fused activation it dropped
    for site in analysis.sites:
        if site.match.unsupported:
            rows.append(_row(site, "unsupported", None, reason=site.match.unsupported))
            continue
        if (include is not None and not _matches(include, site)) or \
                (exclude is not None and _matches(exclude, site)):
            rows.append(_row(site, "excluded", None, reason="not selected by include=/exclude="))
            continue
        site_to, site_opts = _site_options(site, to, options, overrides)
        target = get_target(site_to)
        target.check_options(site_opts)
        try:
            source = site.match.reader(site.module)
            info = SiteInfo(site.name, site.input_shape, graphs.context_for(target.context).get(site.name))
            built: Built = target.build(source, info, site_opts)
        except (SkipSite, UnsupportedSource) as why:
            rows.append(_row(site, "skipped", site_to, reason=str(why)))
            continue
        if _drops_fused_activation(source, built):
            built.dropped.append(f"act ({type(source.act).__name__})")
            dropped_acts.setdefault(site_to, []).append(site.name)
        notes = ([site.match.note] if site.match.note else []) + built.notes
        if site.inside_leaf:
            notes.append(f"inside leaf module '{site.inside_leaf}' (no graph context; swapped as a module)")
        elif site.calls == 0:
            notes.append("not called by the traced forward (converted anyway)")
        elif site.calls and site.calls > 1:
            notes.append(_shared_call_note(site.calls, target.batch_dependent))
        rows.append(_row(site, "planned" if dry_run else "converted", site_to,
                         new_type=type(built.module).__name__, exact=built.exact,
                         transferred=built.transferred, reset=built.reset, dropped=built.dropped,
                         notes=notes))
        builds.append((site, built, target))
    for site_to, names in dropped_acts.items():
        warnings.warn(f"target {site_to!r} dropped the activation fused into {len(names)} timm NormAct layer(s) "
                      f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): the converted model skips "
                      f"that nonlinearity. Give the new layer source.act (as the built-in targets do, see "
                      f"examples/custom_target.py) or set Built.consumes_activation if it applies it itself",
                      UserWarning, stacklevel=4)
    return rows, builds


def _shared_call_note(calls: int, batch_dependent: bool) -> str:
    """Why a norm module called at several places in the forward stays one module."""
    why = ("its batch state (running statistics, windows, memories) is shared by every call, as the "
           "source's was" if batch_dependent else "every call normalizes with the same weights, as before")
    return f"called {calls} times in the forward: kept as one shared module ({why}); give each call its own " \
           f"norm module in the model to convert them separately"


def _drops_fused_activation(source, built: Built) -> bool:
    """A fused activation (timm NormAct ``act``) that the new module neither holds nor applies."""
    if source.act is None or built.consumes_activation:
        return False
    return not any(m is source.act or type(m) is type(source.act) for m in built.module.modules())


def _install(model: nn.Module, site: Site, built: Built) -> None:
    old, new = site.module, built.module
    tensors = [t for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False))
               if t.is_floating_point()]
    if tensors:
        new.to(device=tensors[0].device, dtype=tensors[0].dtype)
    frozen = getattr(old, "weight", None) is not None and isinstance(old.weight, nn.Parameter) \
        and not old.weight.requires_grad
    if frozen:
        for p in new.parameters(recurse=False):
            p.requires_grad_(False)
    old_parts = dict(old.named_modules())
    for name, part in new.named_modules():  # each part takes the flag of its counterpart (act, drop), else the norm's
        part.training = old_parts[name].training if name in old_parts else old.training
    new.site_name = site.name
    site.install(model, new)


def _verify(builds: list, analysis: Analysis) -> str:
    """Each new module, alone on meta tensors, maps every input shape seen at its site to the
    output shape the original produced (distinct cases run once). Batch-dependent targets are
    run in train and eval mode, the others (same computation in both) in eval mode."""
    if analysis.probe.error:
        return f"skipped: the model does not run on meta tensors ({analysis.probe.error})"
    done: dict[tuple, str | None] = {}
    checked = 0
    for site, built, target in builds:
        computation = computation_key(built.module)
        for io in set(site.io_shapes):
            key = (computation, io)
            if key not in done:
                modes = (True, False) if target.batch_dependent else (False,)
                done[key] = check_on_meta(built.module, *io, modes=modes)
            if done[key]:
                raise ConversionError(f"the new {type(built.module).__name__} at '{site.name}' does not "
                                      f"fit its call site: {done[key]}. The input model is unchanged.")
            checked += 1
    unprobed = sum(1 for site, _, _ in builds if not site.io_shapes)
    text = f"{checked} call(s) checked on meta tensors ({len(done)} distinct)"
    return text + (f"; {unprobed} site(s) not reached by the probe forward" if unprobed else "")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}. Pass the model "
                        f"object (e.g. timm.create_model(...) or torchvision.models.resnet50()).")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{type(model).__name__} is a TorchScript module (torch.jit.script or trace): its layers "
                        f"are compiled code that cannot be swapped. Convert the eager model (the nn.Module you "
                        f"scripted), then script the converted one.")
    meta = next((n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model's weights are on the meta device (e.g. {meta!r}), so they hold no values to "
                         f"transfer. Materialize and load them first (model.to_empty(device='cpu'), then "
                         f"model.load_state_dict(...)), or build the model on a real device.")


def _warn_unmatched_overrides(overrides: dict | None, sites: list[Site]) -> None:
    for pattern in overrides or {}:
        if not any(fnmatch.fnmatchcase(n, pattern) for s in sites for n in s.names):
            warnings.warn(f"overrides pattern {pattern!r} matches no normalization site"
                          + (f" (site names look like {sites[0].name!r})" if sites else ""), UserWarning, stacklevel=4)


def _contexts(graphs: GraphContext, targets: list) -> None:
    """The graph context every target used asks for, computed once each before any build."""
    for target in targets:
        graphs.context_for(target.context)


@dataclass
class _Run:
    """What the shared first half of ``plan`` and ``convert`` produced."""

    work: nn.Module  # the model to change (a deep copy unless inplace)
    analysis: Analysis
    graphs: GraphContext
    report: ConversionReport
    builds: list  # (Site, Built, Target) of every site to convert


def _run(model, to, include, exclude, overrides, input_size, options, dry_run, inplace) -> _Run:
    _check_model(model)
    target = get_target(to)
    target.check_options(options)
    for pattern, extra in (overrides or {}).items():
        extra = dict(extra)
        get_target(extra.pop("to", target.name)).check_options(extra)
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides= takes {{pattern: {{option: value}}}}, got {type(overrides).__name__}")
    input_size = check_input_size(model, input_size)
    work = model if inplace else copy.deepcopy(model)
    analysis = analyze(work, input_size)
    module_sites = [s.name for s in analysis.sites if s.match.reader]
    calls, analysis.functional = functional_sites(work, analysis.functional, analysis.probe)  # F.layer_norm & co.: sites too
    analysis.sites += calls
    _warn_unmatched(include, analysis.sites, "include")
    _warn_unmatched(exclude, analysis.sites, "exclude")
    _warn_unmatched_overrides(overrides, analysis.sites)
    graphs = GraphContext(work, analysis, module_sites)
    _contexts(graphs, [target] + [get_target(o.get("to", target.name)) for o in (overrides or {}).values()])
    rows, builds = _build_all(analysis, target.name, include, exclude, overrides, options, dry_run, graphs)
    report = ConversionReport(
        target.name, type(model).__name__, dict(options), rows, analysis.functional,
        {"ok": analysis.trace.ok, "error": analysis.trace.error, "leaves_added": analysis.trace.leaves_added},
        {"input": list(analysis.example.shape) if analysis.example is not None else None,
         "error": analysis.probe.error}, dry_run=dry_run)
    if not analysis.sites:
        warnings.warn(f"{type(model).__name__} has no normalization layer: nothing to convert",
                      UserWarning, stacklevel=3)
    if analysis.trace.error:
        warnings.warn(f"torch.fx could not trace {type(model).__name__}: {analysis.trace.error}. "
                      f"Falling back to module swap: every site is still converted as a module, "
                      f"but no graph context is available.", UserWarning, stacklevel=3)
    skipped = report.sites("skipped") + report.sites("unsupported")
    if skipped:
        warnings.warn(f"{len(skipped)} normalization site(s) left as they were "
                      f"({', '.join(r.name for r in skipped[:5])}{', ...' if len(skipped) > 5 else ''}); "
                      f"see the report for why", UserWarning, stacklevel=3)
    return _Run(work, analysis, graphs, report, builds)


def plan(model: nn.Module, to: str, *, include: Patterns = None, exclude: Patterns = None,
         overrides: dict | None = None, input_size: tuple[int, ...] | None = None,
         **options) -> ConversionReport:
    """What ``convert`` would do, site by site, without touching ``model``."""
    report = _run(model, to, include, exclude, overrides, input_size, options,
                  dry_run=True, inplace=False).report
    report.verify = "not run (dry run)"
    return report


def convert(model: nn.Module, to: str, *, include: Patterns = None, exclude: Patterns = None,
            inplace: bool = False, overrides: dict | None = None,
            input_size: tuple[int, ...] | None = None, **options) -> nn.Module:
    """Replace every normalization site of ``model`` with the target ``to``.

    Args:
        model: any ``nn.Module`` (timm, torchvision, or built from their parts).
        to: a target name, see ``available_targets()`` (the README's target table).
        include / exclude: glob patterns on qualified names ('layer4.*') or a callable
            ``(name, module) -> bool`` selecting which sites to convert.
        inplace: modify ``model`` itself instead of a deep copy.
        overrides: ``{pattern: {option: value, 'to': other_target}}`` per-site settings;
            later patterns win.
        input_size: (C, H, W) for the shape probe (default: the timm pretrained_cfg, else 224).
        **options: target options, e.g. ``num_groups=8`` / ``group_size=16`` for 'gn', ``eps``.

    Returns:
        A model of the same class with the new norms; its report is ``model.normsurgeon_report``
        and its recipe (for ``normsurgeon.save``/``load``) ``model.normsurgeon_recipes``.

    Example:
        >>> new = normsurgeon.convert(timm.create_model("resnet50"), to="gn", num_groups=32)
        >>> print(new.normsurgeon_report)
    """
    run = _run(model, to, include, exclude, overrides, input_size, options, dry_run=False, inplace=inplace)
    work, analysis, report = run.work, run.analysis, run.report
    report.verify = _verify(run.builds, analysis)  # before installing: a failure changes nothing
    if not report.verified and run.builds:
        warnings.warn(f"the conversion could not be verified: {report.verify}. The new modules were not checked "
                      f"against their call sites; check input_size= ({tuple(analysis.example.shape[1:]) if analysis.example is not None else None} "
                      f"was used) or run the model once before trusting it", UserWarning, stacklevel=2)
    for site, built, _ in run.builds:
        _install(work, site, built)
    _finalize(run)
    recipe = {"to": report.target, "include": _recipe_patterns(include),
              "exclude": _recipe_patterns(exclude), "overrides": overrides,
              "input_size": list(input_size) if input_size else None, "options": dict(options)}
    work.normsurgeon_report = report
    work.normsurgeon_recipes = list(getattr(model, "normsurgeon_recipes", [])) + [recipe]
    from ..distributed.guard import install_guard
    install_guard(work)  # an error, not a silent loss, after torch's/timm's convert_sync_batchnorm
    return work


def _finalize(run: _Run) -> None:
    """Each distinct ``finalize`` of the targets used, once, over the sites its targets built; when one
    raises ConversionError, the earlier ones and every install are undone (the model is as it was)."""
    by_hook: dict[Callable, list] = {}
    for site, built, target in run.builds:
        if target.finalize is not None:
            by_hook.setdefault(target.finalize, []).append((site, built))
    undo = []
    try:
        for hook, installed in by_hook.items():
            step = hook(run.work, installed, run.graphs, run.report)
            if step is not None:
                undo.append(step)
    except ConversionError:
        for step in reversed(undo):
            step()
        for site, _, _ in reversed(run.builds):
            site.restore(run.work)
        raise


def _recipe_patterns(value: Patterns):
    if callable(value):
        return "<callable>"
    return [value] if isinstance(value, str) else (list(value) if value is not None else None)
