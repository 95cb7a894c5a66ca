"""Proxy Normalization: convert a torchvision ResNet-50 and a timm EfficientNet to proxy_gn,
see which sites got PN, and take one training step with the paper's weight-decay rule.

Run: .venv/bin/python examples/proxy_norm.py
(pretrained weights are off to stay offline; pass weights="DEFAULT" / pretrained=True for real use)
"""
import timm
import torch
import torchvision

import normsurgeon as ns

for model in (torchvision.models.resnet50(weights=None), timm.create_model("efficientnet_b0")):
    new = ns.convert(model, to="proxy_gn")  # GN(32-rule groups) + PN-Act where an activation follows
    report = new.normsurgeon_report
    with_pn = [r.name for r in report.converted if r.new_type == "ProxyNormAct"]
    print(f"{type(model).__name__}: {len(with_pn)} of {len(report.rows)} sites got PN-Act; "
          f"the others are plain GroupNorm (see the notes for why):")
    print(report.table(max_rows=6), "\n")

    # weight decay on conv/linear weights and, among norm parameters, only on PN's γ̃, β̃
    optimizer = torch.optim.SGD(ns.param_groups(new, weight_decay=5e-5), lr=0.01, momentum=0.9)
    images, labels = torch.randn(4, 3, 128, 128), torch.randint(0, 1000, (4,))
    new.train()
    loss = torch.nn.functional.cross_entropy(new(images), labels)
    loss.backward()
    optimizer.step()
    print(f"one training step: loss {loss.item():.3f}\n")
