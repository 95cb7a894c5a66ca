"""normsurgeon.finetune: distillation works, a killed run resumes bit-identically, bad input is refused."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normsurgeon as ns
from normsurgeon.training import evaluate

WORKER = Path(__file__).parent / "scripts" / "finetune_worker.py"
ROOT = Path(__file__).parent.parent


def teacher_and_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    teacher.eval()
    return teacher, ns.convert(teacher, to="gn")


def images(n, seed):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_distillation_lowers_kl_on_held_out_data():
    teacher, student = teacher_and_student()
    held_out = images(128, seed=9)
    before = evaluate(student, held_out, teacher)["eval_kl"]
    history = ns.finetune(student, images(512, seed=1), teacher=teacher, steps=60, lr=3e-3, optimizer="adamw",
                          batch_size=32, eval_data=held_out, eval_every=30, progress=False)
    after = evaluate(student, held_out, teacher)["eval_kl"]
    assert after < 0.5 * before, (before, after)
    assert history.last("eval_kl") == pytest.approx(after)
    assert [r["step"] for r in history if "eval_kl" in r] == [0, 30, 60]  # the start is evaluated too
    first_logged = next(r for r in history if "loss" in r)
    assert all(k in first_logged for k in ("loss", "lr", "samples_per_s", "wall_s", "cpu_s"))
    assert not teacher.training  # modes restored; the teacher is never trained
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 teacher_and_student()[0].state_dict().values()))


def test_labels_train_and_history_files(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1) / 8 - 1
    y = torch.tensor(digits.target)
    _, student = teacher_and_student()
    history = ns.finetune(student, (x[:1400], y[:1400]), epochs=6, lr=1e-2, optimizer="adamw", batch_size=32,
                          eval_data=(x[1400:], y[1400:]), checkpoint_dir=tmp_path, progress=False)
    assert history.last("eval_accuracy") > 0.5
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == json.loads(json.dumps(list(history)))
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and {"epoch", "loss", "eval_accuracy"} <= set(header)


def _run_worker(ckpt, out, delay="0"):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), delay], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_bit_identically(tmp_path):
    reference = _run_worker(tmp_path / "ref", tmp_path / "ref.pt")
    killed = _run_worker(tmp_path / "run", tmp_path / "run.pt", delay="0.004")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.01)
    time.sleep(0.25)  # somewhere in the middle, possibly while a checkpoint is written
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reference.wait() == 0, reference.stdout.read().decode()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 48, f"the kill came at step {step}; the test needs it mid-run"
    resumed = _run_worker(tmp_path / "run", tmp_path / "run.pt")
    assert resumed.wait() == 0, resumed.stdout.read().decode()
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Crash(Exception):
    pass


def test_dataloader_run_interrupted_and_resumed_is_identical(tmp_path):
    """An iterable (shuffling DataLoader) resumes at the same batch with the same shuffle."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, 8, 8, generator=gen), torch.randint(0, 10, (40,), generator=gen))

    def run(directory, crash_at=None):
        torch.manual_seed(5)
        _, student = teacher_and_student()
        loader = DataLoader(data, batch_size=8, shuffle=True)
        calls = {"n": 0}
        if crash_at is not None:
            forward = student.forward

            def crashing(x):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise Crash
                return forward(x)
            student.forward = crashing
        ns.finetune(student, loader, steps=17, lr=0.05, batch_size=8, loss="labels", optimizer="sgd",
                    checkpoint_dir=directory, checkpoint_every=1, progress=False)
        return student

    ref = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=8)  # mid-epoch (5 batches per epoch)
    resumed = run(tmp_path / "b")
    for (k, v), w in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_bad_input(tmp_path):
    teacher, student = teacher_and_student()
    x = images(16, seed=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        ns.finetune(student, x, teacher=teacher, steps=2, lr=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        ns.finetune(student, x, teacher=teacher, steps=2, lr=-1e-3)
    with pytest.raises(ValueError, match="empty"):
        ns.finetune(student, torch.empty(0, 3, 8, 8), teacher=teacher, steps=2)
    with pytest.raises(ValueError, match="empty"):
        ns.finetune(student, [], teacher=teacher, steps=2)
    wrong = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    with pytest.raises(ValueError, match=r"teacher outputs \(8, 7\) but the student \(8, 10\)"):
        ns.finetune(student, x, teacher=wrong, steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        ns.finetune(student, x, steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="exactly one of steps= or epochs="):
        ns.finetune(student, x, teacher=teacher)
    with pytest.raises(ValueError, match="teacher must be another"):
        ns.finetune(student, x, teacher=student, steps=1)


def test_checkpoint_of_another_model_or_setting_is_refused_and_kept(tmp_path):
    teacher, student = teacher_and_student()
    x = images(32, seed=0)
    ns.finetune(student, x, teacher=teacher, steps=3, batch_size=8, checkpoint_dir=tmp_path, progress=False)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    other = ns.convert(teacher, to="ln")  # another recipe, same shapes
    with pytest.raises(ValueError, match="different model, recipe or setting"):
        ns.finetune(other, x, teacher=teacher, steps=3, batch_size=8, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="settings.lr: checkpoint 0.01 vs now 0.1"):
        ns.finetune(student, x, teacher=teacher, steps=3, lr=0.1, batch_size=8, checkpoint_dir=tmp_path,
                    progress=False)
    with pytest.raises(FileExistsError, match="resume=False"):
        ns.finetune(student, x, teacher=teacher, steps=3, batch_size=8, checkpoint_dir=tmp_path, resume=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .* as a normsurgeon fine-tuning checkpoint.*Move it away"):
        ns.finetune(student, x, teacher=teacher, steps=3, batch_size=8, checkpoint_dir=tmp_path)


def test_finished_run_called_again_changes_nothing(tmp_path):
    teacher, student = teacher_and_student()
    x = images(32, seed=0)
    first = ns.finetune(student, x, teacher=teacher, steps=4, batch_size=8, checkpoint_dir=tmp_path,
                        eval_data=x, progress=False)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    again = ns.finetune(student, x, teacher=teacher, steps=4, batch_size=8, checkpoint_dir=tmp_path,
                        eval_data=x, progress=False)
    assert list(again) == list(first)
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())


def test_resume_says_so_and_a_changed_teacher_or_data_is_refused(tmp_path, capsys):
    teacher, student = teacher_and_student()
    x = images(32, seed=0)
    run = dict(steps=4, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=2)
    ns.finetune(student, x, teacher=teacher, **run)
    assert "resuming" not in capsys.readouterr().err
    ns.finetune(student, x, teacher=teacher, **run)
    assert f"finetune: resuming from step 4 of 4 ({tmp_path})" in capsys.readouterr().err
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    other_teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        other_teacher[0].weight[0, 0, 0, 0] += 1e-3  # one weight differs
    with pytest.raises(ValueError, match="trained against another teacher"):
        ns.finetune(student, x, teacher=other_teacher, **run)
    other_data = x.clone()
    other_data[31, 0, 0, 0] += 1  # the last sample differs: it is in the fingerprint's sample
    with pytest.raises(ValueError, match="trained on other data"):
        ns.finetune(student, other_data, teacher=teacher, **run)
    with pytest.raises(ValueError, match=r"trained on other data \(32 samples.*; 24 samples"):
        ns.finetune(student, x[:24], teacher=teacher, **run)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved  # every refusal left it untouched


def test_time_budget_stops_early():
    teacher, student = teacher_and_student()
    history = ns.finetune(student, images(64, seed=0), teacher=teacher, steps=10_000, batch_size=8,
                          max_seconds=0.3, progress=False)
    last = max(r["step"] for r in history)
    assert 0 < last < 10_000
    assert "max_seconds" in history[-1]["stopped"]


def test_feature_distillation_pulls_every_site_towards_the_teacher():
    from normsurgeon.diagnostics.hooks import attach_preactivation_hooks

    teacher, student = teacher_and_student()
    held_out = images(64, seed=9)

    def site_errors(model):
        seen = {}
        for m, store in ((teacher, "t"), (model, "s")):
            hs = attach_preactivation_hooks(m, lambda n, z, store=store: seen.__setitem__((store, n), z.clone()))
            with torch.no_grad():
                m.eval()(held_out)
            for h in hs:
                h.remove()
        names = sorted(n for kind, n in seen if kind == "t")
        return [float(((seen["s", n] - seen["t", n]) ** 2).mean()) for n in names]

    before = site_errors(student)
    ns.finetune(student, images(256, seed=1), teacher=teacher, steps=40, lr=3e-3, optimizer="adamw",
                batch_size=32, feature_weight=1.0, progress=False)
    after = site_errors(student)
    assert len(before) == 2 and all(a < b for a, b in zip(after, before)), (before, after)
    with pytest.raises(ValueError, match="feature_weight"):
        ns.finetune(student, images(8, seed=1), steps=1, batch_size=8, loss="labels", feature_weight=1.0)


def test_batches_with_a_domain_are_routed_to_dsbn_layers():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = ns.convert(base, to="dsbn", domains=["a", "b", "c"])
    x = images(32, seed=2)
    y = torch.randint(0, 3, (32,))
    d = torch.tensor([0] * 16 + [2] * 16)  # domains a and c only; a DataLoader would give (x, y, d)
    before = model[1].running_mean.clone()
    ns.finetune(model, (x, y, d), steps=4, batch_size=8, loss="labels", lr=0.01, progress=False, seed=1,
                train_statistics=True)
    after = model[1].running_mean
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
    assert torch.equal(after[1], before[1])  # domain b saw no batch
    with pytest.raises(Exception, match="domain"):
        ns.finetune(model, (x, y), steps=1, batch_size=8, loss="labels", progress=False)
