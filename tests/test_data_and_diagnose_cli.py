"""normsurgeon.data.load_image_folder and the ``normsurgeon diagnose`` command, in-process."""
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

from normsurgeon.cli import main  # noqa: E402
from normsurgeon.data import load_image_folder  # noqa: E402


def make_images(folder, names, seed=0):
    """Random RGB images (varied sizes and modes) at ``folder/name`` for each name."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8))
        if i % 3 == 1:
            img = img.convert("L")  # grayscale: must come back as 3 channels
        img.save(path)
    return folder


@pytest.fixture
def image_dir(tmp_path):
    names = [f"{c}/img{i}.{ext}" for i, (c, ext) in
             enumerate(zip("abab" * 2, ["png", "jpg", "PNG", "jpeg", "bmp", "png", "JPG", "png"]))]
    return make_images(tmp_path / "imgs", names)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- load_image_folder
def test_load_image_folder_nested_count_shape_order(image_dir):
    (image_dir / "notes.txt").write_text("not an image")
    x, names = load_image_folder(image_dir, size=32)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert names == sorted(names) and len(names) == 8
    assert names[0] == "a/img0.png" and all("/" in n for n in names)
    assert {n.split("/")[0] for n in names} == {"a", "b"}
    assert torch.isfinite(x).all()
    # normalization: mean=0, std=1 leaves pixels in [0, 1]
    raw, _ = load_image_folder(image_dir, size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose((raw - 0.5) / 0.25, load_image_folder(image_dir, size=32, mean=(0.5,) * 3,
                                                                std=(0.25,) * 3)[0], atol=1e-5)
    y, first = load_image_folder(image_dir, size=16, limit=3)
    assert y.shape == (3, 3, 16, 16) and first == names[:3]


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        load_image_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found in .*empty.*\.jpg.*\.png"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no images found"):
        load_image_folder(tmp_path / "text")
    bad = make_images(tmp_path / "bad", ["ok.png"])
    (bad / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*zz_broken.jpg"):
        load_image_folder(bad, size=16)
    with pytest.raises(ValueError, match="limit"):
        load_image_folder(bad, limit=0)


# ----------------------------------------------------------------------------- CLI
def test_diagnose_cli_writes_report(capsys, image_dir, tmp_path):
    out_dir = tmp_path / "diag"
    code, out, err = run(capsys, "diagnose", "resnet18", "--data", image_dir, "--batch-sizes", "2,4",
                         "--size", "64", "--max-batches", "8", "-o", out_dir)
    assert code == 0, err
    assert (out_dir / "report.html").is_file() and (out_dir / "report.json").is_file()
    data = json.loads((out_dir / "report.json").read_text())
    assert data["meta"]["samples"] == 8 and data["meta"]["input_shape"] == [3, 64, 64]
    assert data["meta"]["batch_sizes"] == [2, 4] and data["reference"] is None
    assert "8 images from" in out and "normsurgeon diagnostics of" in out
    assert "resnet18 (random weights, seed 0" in out  # a newcomer sees that no trained weights were loaded
    listed = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert sorted(listed) == sorted(str(p) for p in out_dir.iterdir())  # every file written, and only those
    assert f"loading {image_dir}: 8/8 img" in err  # progress on stderr
    passes = re.findall(r"diagnose: forward passes: (\d+)/(\d+)", err)  # with its total from the start
    assert passes and len({total for _, total in passes}) == 1 and passes[-1][0] == passes[-1][1]


def test_diagnose_cli_to_gn_has_reference(capsys, image_dir, tmp_path):
    out_dir = tmp_path / "diag_gn"
    code, out, err = run(capsys, "diagnose", "resnet18", "--to", "gn", "--option", "num_groups=8",
                         "--data", image_dir, "--size", "48", "--limit", "4", "-o", out_dir)
    assert code == 0, err
    data = json.loads((out_dir / "report.json").read_text())
    assert data["reference"] == "ResNet" and data["reference_layers"]
    assert data["meta"]["samples"] == 4
    assert "converted to 'gn'" in out and "compared with reference" in out


@pytest.mark.parametrize("setup, message", [
    ("empty", "no images found"),
    ("text", "no images found"),
    ("missing", "not found"),
])
def test_diagnose_cli_bad_data_folder(capsys, tmp_path, setup, message):
    folder = tmp_path / "d"
    if setup != "missing":
        folder.mkdir()
    if setup == "text":
        (folder / "a.txt").write_text("x")
        (folder / "b.csv").write_text("1,2")
    code, out, err = run(capsys, "diagnose", "resnet18", "--data", folder, "-o", tmp_path / "o")
    assert code == 2 and message in err and "normsurgeon diagnose: error" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sizes", ["0,2", "2,x", "", "-4", "2.5"])
def test_diagnose_cli_bad_batch_sizes(capsys, image_dir, tmp_path, sizes):
    code, out, err = run(capsys, "diagnose", "resnet18", "--data", image_dir, "--batch-sizes", sizes,
                         "-o", tmp_path / "o")
    assert code == 2 and "--batch-sizes" in err and "positive integers" in err


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "16,32"], "fewer than the smallest batch size 16"),
    (["--batch-sizes", "2,4", "--limit", "3"], "fewer than the batch sizes 4"),
])
def test_diagnose_cli_too_few_images(capsys, image_dir, tmp_path, extra, message):
    code, out, err = run(capsys, "diagnose", "resnet18", "--data", image_dir, *extra, "-o", tmp_path / "o")
    assert code == 2 and message in err


def test_diagnose_cli_corrupt_image(capsys, image_dir, tmp_path):
    (image_dir / "a" / "zz.jpg").write_bytes(b"garbage")
    code, out, err = run(capsys, "diagnose", "resnet18", "--data", image_dir, "--size", "32",
                         "-o", tmp_path / "o")
    assert code == 2 and "cannot decode image" in err and "zz.jpg" in err


def test_diagnose_cli_default_model_and_sample_photos(capsys, tmp_path):
    out_dir = tmp_path / "diag_default"
    code, out, err = run(capsys, "diagnose", "--size", "64", "--limit", "4", "--batch-sizes", "2",
                         "--max-batches", "4", "-o", out_dir)
    assert code == 0, err
    assert "embedded EfficientNet-Lite0" in out and "4 images from the sample photos" in out
    assert "mean=(0.5, 0.5, 0.5)" in out  # the model's normalization, not ImageNet's
    data = json.loads((out_dir / "report.json").read_text())
    assert data["meta"]["samples"] == 4 and data["model"] == "EfficientNet"
