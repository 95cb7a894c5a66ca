"""Every code block of README.md runs.

Python blocks run as written, each in a fresh namespace, in a temporary working folder, with small
local stand-ins for the names a block uses without defining them (``model``, ``images``, ``loader``
... and the modules ``ns``, ``torch``, ``torchvision``, ``timm`` of the first block). Three things
differ from a user's machine, and only these: pretrained weights are not downloaded (random
initialisation instead), ``ns.finetune`` stops after 2 steps, and a block that needs Opacus is
skipped without it. Bash blocks: every ``normsurgeon`` command line is parsed by the real parser;
``targets`` and ``plan`` lines run for real, ``convert`` lines and the default ``diagnose`` in the
slow suite; ``finetune`` and ``demo`` lines (minutes of CPU) are parsed only, their behaviour is
tested in test_cli.py. ``make`` and ``pip`` lines are not run.
"""
from __future__ import annotations

import ast
import builtins
import copy
import functools
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normsurgeon as ns
from normsurgeon.cli import build_parser, main
from normsurgeon.cli.options import join_negative_values

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = [shlex.split(line, comments=True) for lang, code in BLOCKS if lang == "bash"
            for line in code.replace("\\\n", " ").splitlines() if line.strip().startswith("normsurgeon ")]
# `torchrun ... -m normsurgeon ARGS` lines: ARGS parsed as a normsurgeon command line
COMMANDS += [["normsurgeon"] + words[words.index("normsurgeon") + 1:] for words in
             (shlex.split(line, comments=True) for lang, code in BLOCKS if lang == "bash"
              for line in code.replace("\\\n", " ").splitlines() if line.strip().startswith("torchrun "))]
STEP_CAP = 2


def free_names(code: str) -> set[str]:
    """Names a block reads before it defines them, statement by statement (``model = f(model)`` reads
    the ``model`` it was given); a for/with target is defined before its body runs."""
    bound, free = set(dir(builtins)), set()

    def loads(node) -> None:
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        free.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                    and n.id not in bound and n.id not in local)

    def binds(node) -> None:
        bound.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))

    def scan(statements) -> None:
        for st in statements:
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in st.names)
            elif isinstance(st, ast.For):
                loads(st.iter), binds(st.target), scan(st.body), scan(st.orelse)
            elif isinstance(st, ast.With):
                for item in st.items:
                    loads(item.context_expr)
                    if item.optional_vars is not None:
                        binds(item.optional_vars)
                scan(st.body)
            elif isinstance(st, ast.FunctionDef):  # its body reads the names free at the definition
                bound.add(st.name)
                loads(st)
            elif isinstance(st, (ast.If, ast.While)):
                loads(st.test), scan(st.body), scan(st.orelse)
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                loads(st.value) if st.value is not None else None
                for target in getattr(st, "targets", [getattr(st, "target", None)]):
                    binds(target)
            else:
                loads(st)
    scan(ast.parse(code).body)
    return free


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pacs_folder(root: Path) -> None:
    """A tiny root/domain/class/image tree named PACS/, as the dsbn block expects."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for domain in ("art_painting", "photo"):
        for label in ("dog", "horse"):
            folder = root / "PACS" / domain / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


@functools.lru_cache(maxsize=1)
def _resnet50() -> nn.Module:
    return timm.create_model("resnet50").eval()


STAND_INS = {
    "ns": lambda: ns, "torch": lambda: torch, "torchvision": lambda: torchvision, "timm": lambda: timm,
    "model": lambda: copy.deepcopy(_resnet50()),
    "new": lambda: ns.convert(_resnet50(), to="gn"),
    "images": lambda: images(32), "train_data": lambda: images(16, seed=1), "held_out": lambda: images(8, seed=2),
    "val_images": lambda: images(8, seed=2),
    "unlabeled_batches": lambda: list(images(8, seed=3).split(4)), "batches": lambda: list(images(8, seed=4).split(4)),
    "x": lambda: images(4, seed=5), "x_unseen": lambda: images(4, seed=6), "criterion": lambda: nn.CrossEntropyLoss(),
    "loader": lambda: DataLoader(TensorDataset(images(8, seed=7), torch.randint(0, 1000, (8,))), batch_size=4),
}


@pytest.fixture
def offline_and_short(monkeypatch, tmp_path):
    """No downloads (pretrained → random weights), finetune capped at STEP_CAP steps, cwd a fresh folder."""
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, **kw))
    resnet50 = torchvision.models.resnet50
    monkeypatch.setattr(torchvision.models, "resnet50", lambda weights=None, **kw: resnet50(**kw))
    finetune = ns.finetune

    def short(*args, steps=None, eval_every=None, checkpoint_every=100, **kw):
        cap = lambda v: None if v is None else min(v, STEP_CAP)  # noqa: E731
        return finetune(*args, steps=cap(steps), eval_every=cap(eval_every), checkpoint_every=cap(checkpoint_every),
                        progress=False, **kw)
    monkeypatch.setattr(ns, "finetune", short)
    monkeypatch.chdir(tmp_path)
    pacs_folder(tmp_path)
    return tmp_path


HEAVY = ("ns.finetune(", "ns.diagnose(", "opacus")  # blocks that train or sweep batch sizes: the slow suite


@pytest.mark.parametrize("code", [pytest.param(code, marks=[pytest.mark.slow] if any(h in code for h in HEAVY) else [])
                                  for code in PYTHON], ids=[f"python block {i}" for i in range(len(PYTHON))])
def test_python_block_runs(code, offline_and_short):
    if "opacus" in code:
        pytest.importorskip("opacus")
    missing = free_names(code) - set(STAND_INS)
    assert not missing, f"the block uses {sorted(missing)}: give them a stand-in here, or define them in the block"
    namespace = {name: STAND_INS[name]() for name in free_names(code)}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code


def test_blocks_were_found():
    assert len(PYTHON) >= 8 and len(COMMANDS) >= 10


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:3]) for c in COMMANDS])
def test_command_line_parses(argv):
    args = build_parser().parse_args(join_negative_values(argv[1:]))
    assert callable(args.run)


def _run(argv, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(argv[1:])
    out, err = capsys.readouterr()
    assert code == 0, err


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[1] in ("targets", "plan")],
                         ids=lambda c: " ".join(c[:3]))
def test_cheap_command_lines_run(argv, tmp_path, monkeypatch, capsys):
    _run(argv, tmp_path, monkeypatch, capsys)
    for i, token in enumerate(argv):
        if token in ("-o", "--json") and argv[i + 1] != "-":
            assert (tmp_path / argv[i + 1]).exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[1] == "convert" or c[1:3] == ["diagnose", "-o"]],
                         ids=lambda c: " ".join(c[:3]))
def test_convert_and_default_diagnose_lines_run(argv, tmp_path, monkeypatch, capsys):
    if "--weights" in argv:  # the user's checkpoint: a timm state_dict of that architecture
        torch.save(timm.create_model(argv[2]).state_dict(), tmp_path / argv[argv.index("--weights") + 1])
    _run(argv, tmp_path, monkeypatch, capsys)
