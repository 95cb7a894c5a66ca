"""normsurgeon.photo_task: a labeled task of real photos, splits from disjoint regions of each photo."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
from normsurgeon.photo_task import PIP_PHOTOS, available_photos, load_photo, photo_task  # noqa: E402

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def small_task():
    return photo_task(["chelsea", "coffee", "camera", "grace_hopper"], size=32, train_per_class=6,
                      val_per_class=2, test_per_class=4, seed=3)


def test_pip_photos_are_all_there_without_system_packages():
    photos = available_photos(system=False)
    assert [name for name, _ in photos] == list(PIP_PHOTOS) and len(photos) == 19
    for name, source in photos:
        image = load_photo(source)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256, name


def test_shapes_labels_and_counts(small_task):
    assert small_task.classes == ["chelsea", "coffee", "camera", "grace_hopper"]
    for split, per_class in zip(SPLITS, (6, 2, 4)):
        x, y = getattr(small_task, split)
        assert x.shape == (4 * per_class, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(torch.bincount(y, minlength=4), torch.full((4,), per_class))
        assert small_task.boxes[split].shape == (4 * per_class, 4)


def test_splits_come_from_disjoint_regions_of_each_photo(small_task):
    """No pixel of a photo is in crops of two different splits."""
    for label, source in enumerate(small_task.sources):
        height, width = load_photo(source).shape[:2]
        owner = np.full((height, width), -1)
        for index, split in enumerate(SPLITS):
            y = getattr(small_task, split)[1]
            for top, left, h, w in small_task.boxes[split][y == label].tolist():
                assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
                region = owner[top:top + h, left:left + w]
                assert np.isin(region, (-1, index)).all(), f"{source}: {split} overlaps another split"
                region[...] = index


def test_each_crop_is_its_box_resized(small_task):
    """Recomputed from the photo and the recorded box, with torch instead of PIL: same image."""
    x, y = small_task.test
    for i in (0, 5, 11):
        top, left, h, w = small_task.boxes["test"][i].tolist()
        photo = torch.from_numpy(load_photo(small_task.sources[int(y[i])]).copy()).permute(2, 0, 1).float() / 255
        crop = torch.nn.functional.interpolate(photo[None, :, top:top + h, left:left + w], size=(32, 32),
                                               mode="bicubic", antialias=True, align_corners=False)[0]
        assert torch.allclose(x[i] * 0.5 + 0.5, crop.clamp(0, 1), atol=0.08), i  # Lite0: mean = std = 0.5


def test_deterministic_in_the_seed(small_task):
    again = photo_task(["chelsea", "coffee", "camera", "grace_hopper"], size=32, train_per_class=6,
                       val_per_class=2, test_per_class=4, seed=3)
    assert torch.equal(again.train[0], small_task.train[0]) and torch.equal(again.boxes["test"], small_task.boxes["test"])
    other = photo_task(["chelsea", "coffee"], size=32, train_per_class=6, val_per_class=2, test_per_class=4, seed=4)
    assert not torch.equal(other.boxes["train"], small_task.boxes["train"][:12])


def test_a_folder_of_photos(tmp_path):
    from PIL import Image

    for name in ("astronaut", "rocket", "coins"):
        Image.fromarray(load_photo(name)).save(tmp_path / f"{name}.png")
    task = photo_task(tmp_path, size=24, train_per_class=2, val_per_class=1, test_per_class=1)
    assert task.classes == ["astronaut", "coins", "rocket"] and len(task.train[1]) == 6


def test_bad_input(tmp_path):
    from PIL import Image

    Image.fromarray(load_photo("astronaut")).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match="at least 2 photos.*got 1"):
        photo_task(tmp_path)
    with pytest.raises(ValueError, match="no images found"):
        photo_task(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        photo_task(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="share the class name"):
        photo_task(["chelsea", "chelsea"])
    with pytest.raises(ValueError, match="train_per_class and test_per_class must be ≥ 1"):
        photo_task(["chelsea", "coffee"], test_per_class=0)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="too small"):
        photo_task(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the image"):
        photo_task([str(tmp_path / "broken.jpg"), "chelsea"])


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty
