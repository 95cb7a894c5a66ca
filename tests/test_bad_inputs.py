"""Bad inputs across the API and the command line, one table row each.

Every row checks three things:
- the message says what was wrong (``what``) and what to do (``todo``), both as regexes;
- on the command line: exit status 2 and no traceback;
- the user's model (a digest of its state_dict and its per-module train/eval flags) and files (the
  bytes of every file in the test's folder, and no new file) are as they were before.
"""
from __future__ import annotations

import copy
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.cli import main
from normsurgeon.data import load_image_folder
from normsurgeon.digest import digest
from normsurgeon.models import create

from conftest import randomize_norms

timm = pytest.importorskip("timm")


def tiny(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))
    return randomize_norms(model, seed).eval()


class Other(nn.Module):
    """Another architecture: its norm sites have other names."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.stem(x)).mean((2, 3)))


@dataclass
class Ctx:
    """What a row acts on: a model, images, files in ``folder``; pytest's capsys and monkeypatch."""

    folder: Path
    model: nn.Module
    x: torch.Tensor
    capsys: object = None
    monkeypatch: object = None

    def saved(self) -> Path:
        """A file written by ns.save (a converted tiny model)."""
        path = self.folder / "gn.pt"
        if not path.exists():
            ns.save(ns.convert(tiny(), to="gn"), path)
        return path

    def checkpoint(self) -> Path:
        """A fine-tuning checkpoint of 2 steps against the tiny teacher."""
        directory = self.folder / "ckpt"
        if not directory.exists():
            ns.finetune(ns.convert(self.model, to="gn"), self.x, teacher=self.model, steps=2, batch_size=4,
                        checkpoint_dir=directory, progress=False)
        return directory

    def images(self, bad: bool) -> Path:
        from PIL import Image

        folder = self.folder / "images"
        folder.mkdir(exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        for i in range(4):
            Image.fromarray((torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        if bad:
            (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        return folder


def overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def corrupt_tensor(path: Path, key: str) -> None:
    """64 random bytes over the stored data of tensor ``key`` (found by its bytes in the file)."""
    tensor = torch.load(path, weights_only=True)["state_dict"][key]
    needle = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:64]
    offset = path.read_bytes().index(needle)
    overwrite(path, offset, torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1),
                                          dtype=torch.uint8).numpy().tobytes())


def corrupt_checkpoint(ctx: Ctx) -> None:
    path = ctx.checkpoint() / "checkpoint.pt"
    weight = torch.load(path, weights_only=True)["model"]["0.weight"]
    needle = weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:64]
    overwrite(path, path.read_bytes().index(needle), bytes(64))


def offline(ctx: Ctx) -> None:
    """No network and no cached weights: what a machine without access to the hubs sees."""
    import socket

    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    ctx.monkeypatch.setattr(socket, "create_connection", refuse)
    ctx.monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def cli(*argv) -> Callable:
    """Run the command line in-process; ``{folder}`` in an argument is the test's folder. Exit status 2 and
    no traceback; returns stderr."""
    def act(ctx: Ctx):
        code = main([a.format(folder=ctx.folder) for a in argv])
        out, err = ctx.capsys.readouterr()
        assert code == 2, (code, out, err)
        assert "Traceback" not in err + out
        return err
    return act


@dataclass
class Row:
    name: str
    action: Callable  # (ctx) -> None; raises, warns, or (CLI) returns stderr
    what: str  # regex: what was wrong
    todo: str  # regex: what to do
    expect: str = "error"  # "error", "warning" or "cli"
    setup: Callable | None = None  # (ctx) -> None: the user's files and circumstances before the bad call


def write(name: str, data: bytes) -> Callable:
    return lambda c: (c.folder / name).parent.mkdir(parents=True, exist_ok=True) or (c.folder / name).write_bytes(data)


ROWS = [
    # ------------------------------------------------------------------ convert / plan (API)
    Row("input_size negative", lambda c: ns.convert(c.model, to="gn", input_size=(3, -5, 224)),
        r"\(3, -5, 224\) has a size below 1", r"e\.g\. \(3, 224, 224\)"),
    Row("input_size zero", lambda c: ns.plan(c.model, to="gn", input_size=(3, 0, 224)),
        r"size below 1", r"must be a positive number"),
    Row("input_size wrong channels", lambda c: ns.convert(c.model, to="gn", input_size=(1, 64, 64)),
        r"1 channel\(s\), but the model's first convolution '0' expects 3", r"e\.g\. \(3, 64, 64\)"),
    Row("input_size without channels", lambda c: ns.convert(c.model, to="gn", input_size=(64, 64)),
        r"has 2 values, but the model's first convolution", r"without the batch axis: \(C, H, W\)"),
    Row("input_size with batch axis", lambda c: ns.convert(c.model, to="gn", input_size=(1, 3, 64, 64)),
        r"has 4 values", r"without the batch axis"),
    Row("input_size not numbers", lambda c: ns.convert(c.model, to="gn", input_size="3x224x224"),
        r"input_size must be ints", r"\(C, H, W\) without the batch axis"),
    Row("scripted model", lambda c: ns.convert(torch.jit.script(c.model), to="gn"),
        r"TorchScript module", r"Convert the eager model"),
    Row("model on the meta device", lambda c: ns.convert(copy.deepcopy(c.model).to("meta"), to="gn"),
        r"weights are on the meta device", r"to_empty\(device='cpu'\).*load_state_dict"),
    Row("unknown target", lambda c: ns.convert(c.model, to="groupnorm"),
        r"unknown target 'groupnorm'", r"Available targets: bn, frozen_bn, gn"),
    Row("groups that do not divide", lambda c: ns.convert(c.model, to="gn", num_groups=3),
        r"num_groups=3 does not divide the 8 channels of '1'", r"overrides=\{'1'"),
    Row("override matching nothing", lambda c: ns.convert(c.model, to="gn", overrides={"head.*": {"num_groups": 2}}),
        r"overrides pattern 'head\.\*' matches no normalization site", r"site names look like '1'", "warning"),
    Row("include matching nothing", lambda c: ns.convert(c.model, to="gn", include="layer9.*"),
        r"include pattern 'layer9\.\*' matches no normalization site", r"site names look like", "warning"),
    # ------------------------------------------------------------------ save / load
    Row("save an unconverted model", lambda c: ns.save(c.model, c.folder / "x.pt"),
        r"not made by normsurgeon\.convert", r"torch\.save\(model\.state_dict\(\), path\)"),
    Row("load a file with a corrupted tensor", lambda c: ns.load(c.folder / "gn.pt", tiny(1)),
        r"corrupted: its content does not match the checksum", r"re-create or re-copy the file",
        setup=lambda c: corrupt_tensor(c.saved(), "3.weight")),
    Row("load a truncated file", lambda c: ns.load(c.folder / "gn.pt", tiny(1)),
        r"cannot read .* as a normsurgeon checkpoint", r"re-create or re-copy it",
        setup=lambda c: c.saved().write_bytes(c.saved().read_bytes()[:300])),
    Row("load onto another architecture", lambda c: ns.load(c.folder / "gn.pt", Other()),
        r"saved from a Sequential, got a Other", r"build a fresh Sequential .* pass it as base_model",
        setup=lambda c: c.saved()),
    # ------------------------------------------------------------------ diagnose
    Row("reference of another architecture", lambda c: ns.diagnose(c.model, c.x, reference=Other()),
        r"reference \(Other\) does not match the model \(Sequential\)", r"Pass the unconverted original"),
    Row("data with NaN", lambda c: ns.diagnose(c.model, c.x.clone().index_fill_(0, torch.tensor([1]), float("nan"))),
        r"contains \d+ NaN/inf values", r"remove or fix those samples"),
    Row("fewer samples than the batch size", lambda c: ns.diagnose(c.model, c.x, batch_sizes=[64]),
        r"data has 16 samples, fewer than the smallest batch size 64", r"pass more samples or smaller batch_sizes"),
    # ------------------------------------------------------------------ finetune
    Row("resume against another teacher",
        lambda c: ns.finetune(ns.convert(c.model, to="gn"), c.x, teacher=tiny(seed=5), steps=2, batch_size=4,
                              checkpoint_dir=c.folder / "ckpt", progress=False),
        r"trained against another teacher", r"resume with the same teacher, or use another checkpoint_dir",
        setup=lambda c: c.checkpoint()),
    Row("resume on other data",
        lambda c: ns.finetune(ns.convert(c.model, to="gn"), c.x + 1, teacher=c.model, steps=2, batch_size=4,
                              checkpoint_dir=c.folder / "ckpt", progress=False),
        r"trained on other data \(16 samples", r"resume with the same training data",
        setup=lambda c: c.checkpoint()),
    Row("resume from a corrupted checkpoint",
        lambda c: ns.finetune(ns.convert(c.model, to="gn"), c.x, teacher=c.model, steps=2, batch_size=4,
                              checkpoint_dir=c.folder / "ckpt", progress=False),
        r"corrupted: its content does not match the checksum", r"Move it away or choose another checkpoint_dir",
        setup=corrupt_checkpoint),
    Row("teacher with other classes",
        lambda c: ns.finetune(ns.convert(c.model, to="gn"), c.x, teacher=nn.Sequential(
            nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 7)), steps=1, batch_size=4,
                              progress=False),
        r"teacher outputs \(4, 7\) but the student \(4, 4\)", r"pass labels instead or adapt the head"),
    Row("batch larger than the data",
        lambda c: ns.finetune(ns.convert(c.model, to="gn"), c.x, teacher=c.model, steps=1, batch_size=64,
                              progress=False),
        r"batch_size=64 is larger than the 16 training samples", r"use a smaller batch_size or more data", "warning"),
    # ------------------------------------------------------------------ data and models
    Row("undecodable image", lambda c: load_image_folder(c.folder / "images", size=16),
        r"cannot decode image .*broken\.jpg", r"skip_bad=True \(--skip-bad-images\)",
        setup=lambda c: c.images(bad=True)),
    Row("pretrained weights offline", lambda c: create("resnet18", pretrained=True),
        r"cannot be reached", r"--weights FILE", setup=offline),
    Row("a normsurgeon file as base weights", lambda c: create("default", weights=c.folder / "gn.pt"),
        r"is a normsurgeon checkpoint of a converted model", r"normsurgeon\.load\(", setup=lambda c: c.saved()),
    # ------------------------------------------------------------------ command line
    Row("CLI: negative input size", cli("plan", "resnet18", "--to", "gn", "--input-size", "3", "-5", "224"),
        r"size below 1", r"e\.g\. \(3, 224, 224\)", "cli"),
    Row("CLI: one-channel input size",
        cli("convert", "resnet18", "--to", "gn", "--input-size", "1", "224", "224", "-o", "{folder}/out.pt"),
        r"1 channel\(s\).*expects 3", r"e\.g\. \(3, 224, 224\)", "cli"),
    Row("CLI: conversion that cannot be verified",
        cli("convert", "dla34", "--to", "gn", "--input-size", "3", "1", "1", "-o", "{folder}/out.pt"),
        r"could not be verified .*nothing was saved", r"--no-verify", "cli"),
    Row("CLI: undecodable image", cli("diagnose", "resnet18", "--data", "{folder}/images", "--size", "32",
                                      "-o", "{folder}/diag"),
        r"cannot decode image .*broken\.jpg", r"--skip-bad-images", "cli", setup=lambda c: c.images(bad=True)),
    Row("CLI: corrupted --weights file", cli("plan", "resnet18", "--to", "gn", "--weights", "{folder}/w.pth"),
        r"cannot read .*w\.pth", r"weights-only torch checkpoint", "cli", setup=write("w.pth", b"PK\x03\x04 no zip")),
    Row("CLI: output is a folder", cli("convert", "resnet18", "--to", "gn", "-o", "{folder}/images"),
        r"images is a folder", r"give a file name for the output, e\.g\. .*images/model\.pt", "cli",
        setup=lambda c: c.images(bad=False)),
    Row("CLI: output under a file", cli("convert", "resnet18", "--to", "gn", "-o", "{folder}/w.pth/out.pt"),
        r"w\.pth is a file, not a folder", r"choose another output path", "cli", setup=write("w.pth", b"x")),
    Row("CLI: corrupted fine-tuning checkpoint",
        cli("finetune", "resnet10t", "--to", "gn", "--steps", "1", "--size", "32", "--data", "{folder}/images",
            "--checkpoint-dir", "{folder}/ck", "-o", "{folder}/ft.pt"),
        r"cannot read .*checkpoint\.pt", r"Move it away or choose another checkpoint_dir", "cli",
        setup=lambda c: (c.images(bad=False), write("ck/checkpoint.pt", b"garbage")(c))),
    Row("CLI: --pretrained offline", cli("plan", "resnet18", "--pretrained", "--to", "gn"),
        r"cannot be reached", r"--weights FILE", "cli", setup=offline),
    Row("CLI: misspelled option", cli("diagnose", "resnet18", "--to", "gn", "--option", "num_grups=8",
                                      "-o", "{folder}/d"),
        r"num_grups", r"num_groups", "cli"),
    Row("CLI: negative learning rate", cli("finetune", "resnet10t", "--to", "gn", "--lr", "-1e-3",
                                           "-o", "{folder}/x.pt"),
        r"--lr must be a positive number, got -0\.001", r"must be a positive number", "cli"),
]


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, tmp_path, capsys, monkeypatch):
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ctx = Ctx(tmp_path, tiny(), x, capsys, monkeypatch)
    if row.setup is not None:
        row.setup(ctx)
    capsys.readouterr()
    model_before, flags_before = digest(ctx.model.state_dict()), [m.training for m in ctx.model.modules()]
    files_before = _files(tmp_path)

    if row.expect == "cli":
        message = row.action(ctx)
    elif row.expect == "warning":
        with pytest.warns(UserWarning) as caught:
            row.action(ctx)
        message = " ".join(str(w.message) for w in caught)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises((ValueError, TypeError)) as err:
                row.action(ctx)
        message = str(err.value)

    assert re.search(row.what, message, re.S), f"what was wrong: {row.what!r} not in {message!r}"
    assert re.search(row.todo, message, re.S), f"what to do: {row.todo!r} not in {message!r}"
    assert digest(ctx.model.state_dict()) == model_before, "the model's weights changed"
    assert [m.training for m in ctx.model.modules()] == flags_before, "the model's train/eval flags changed"
    after = _files(tmp_path)
    assert {k: after.get(k) for k in files_before} == files_before, "the user's files changed"
    if row.expect != "warning":
        assert set(after) == set(files_before), f"files written: {sorted(set(after) - set(files_before))}"


def test_the_table_is_wide():
    assert len({r.name for r in ROWS}) == len(ROWS) >= 25
    assert sum(r.expect == "cli" for r in ROWS) >= 8
