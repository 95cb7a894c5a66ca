"""Convert a timm ResNet to GroupNorm, read the report, save and reload it.

Run: .venv/bin/python examples/convert_and_save.py
(pretrained=False keeps it offline; with network access use pretrained=True.)
"""
import tempfile
from pathlib import Path

import timm
import torch

import normsurgeon as ns

model = timm.create_model("resnet50", pretrained=False)

print(ns.plan(model, to="gn", num_groups=32).summary())          # dry run
new = ns.convert(model, to="gn", num_groups=32, exclude="*downsample*")
print(new.normsurgeon_report.table(max_rows=8))

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "resnet50_gn.pt"
    ns.save(new, path)
    again = ns.load(path, timm.create_model("resnet50"))
    x = torch.randn(2, 3, 128, 128)
    print("reloaded model matches:", torch.allclose(again.eval()(x), new.eval()(x)))
