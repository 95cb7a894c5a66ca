"""normsurgeon: normalization surgery on pretrained vision models.

    import normsurgeon as ns
    new = ns.convert(model, to="gn")      # a new model of the same class; model is untouched
    print(ns.plan(model, to="pn"))         # what would happen, site by site
    ns.save(new, "gn.pt"); again = ns.load("gn.pt", fresh_model)
    opt = torch.optim.SGD(ns.param_groups(new, weight_decay=1e-4), lr=0.1)
    report = ns.diagnose(new, images, reference=model)   # what did the swap break? report.save("diag/")
    dg = ns.convert(model, to="dsbn", domains=["photo", "art"])   # one BN statistics set per domain
    with ns.domain(dg, "photo"): out = dg(x)            # route a batch; ns.BNEnsemble(dg) for unseen domains
    dp = ns.make_dp_ready(ns.convert(model, to="gn"))   # for Opacus's PrivacyEngine.make_private
    folded = ns.fold(new.eval())                         # deploy: eval-mode BN-type norms folded into convs
    ns.export_onnx(folded, example, "model.onnx")        # dynamic batch; ns.deploy.export_program: torch.export
    synced = ns.sync_statistics(new)                     # under torch.distributed: statistics over every rank
"""
from .surgery import (ConversionError, ConversionReport, SkipSite, available_targets, convert, plan,
                      register_source, register_target, unregister_target)
from .diagnostics import DiagnosticsReport, diagnose
from .deploy import export_onnx, fold
from .distributed import sync_statistics, unsync
from .domains import BNEnsemble, domain, set_domain
from .privacy import make_dp_ready
from .surgery.persist import load, save
from .training import after_step, calibrate, finetune, needs_step_hooks, param_groups, recalibrate_bn

__version__ = "0.1.0"
__all__ = ["convert", "plan", "save", "load", "param_groups", "calibrate", "finetune", "recalibrate_bn", "after_step", "needs_step_hooks", "available_targets", "register_target", "unregister_target",
           "register_source", "ConversionReport", "ConversionError", "SkipSite", "diagnose", "DiagnosticsReport",
           "domain", "set_domain", "BNEnsemble", "make_dp_ready", "fold", "export_onnx", "sync_statistics", "unsync"]
