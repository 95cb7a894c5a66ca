"""Resolve a MODEL spec (as the command line takes it) into an ``nn.Module``.

Three kinds of spec:

* ``None``, ``"default"`` or ``"efficientnet_lite0_embedded"``: timm's EfficientNet-Lite0
  with the real ImageNet weights that ship inside a pip package (``normsurgeon.zoo``), so
  it works offline. It always carries those weights; ``pretrained`` does not apply.
* ``"torchvision:NAME"``: ``torchvision.models.get_model(NAME)``; random init unless
  ``pretrained=True`` (torchvision's ``"DEFAULT"`` weights, downloaded on first use).
* anything else: a timm model name, ``timm.create_model(spec, pretrained=...)``, including
  timm's own ``hf-hub:`` / ``local-dir:`` prefixes and pretrained tags (``resnet50.a1_in1k``).

``weights=PATH`` loads a local checkpoint file strictly (every tensor of the model must be
in the file with its shape, and nothing else):

* timm models through timm's own loading path,
  ``timm.create_model(spec, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, which
  also applies the model's checkpoint filter (e.g. position-embedding resizing of ViTs) and
  unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` / ``"module."`` prefixes;
* torchvision models and the embedded default by ``load_state_dict(strict=True)`` of the
  file's raw state_dict or of its ``"state_dict"`` / ``"model"`` entry.

The file is read with ``torch.load(weights_only=True)``: no pickled code runs.

Random weights (a timm or torchvision name without ``pretrained``/``weights``, or the new head of
``num_classes``) are drawn from ``torch.manual_seed(seed)`` (default 0) in a forked RNG: the same
spec gives the same model in every run, and the caller's RNG is untouched. ``pretrained=True``
checks first whether the weights are cached or their host is reachable, and otherwise fails at
once with how to pass a local file, instead of retrying the download.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import socket
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
from torch import nn

DEFAULT_SPECS = (None, "default", "efficientnet_lite0_embedded")
TORCHVISION_PREFIX = "torchvision:"
_TIMM_SOURCE_PREFIXES = ("hf-hub", "hf_hub", "local-dir")

__all__ = ["create", "has_random_weights", "DEFAULT_SPECS", "TORCHVISION_PREFIX"]


def has_random_weights(spec: str | None, pretrained: bool = False, weights=None) -> bool:
    """Whether ``create(spec, pretrained, weights)`` gives a randomly initialised network."""
    return spec not in DEFAULT_SPECS and not pretrained and weights is None


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def create(spec: str | None, pretrained: bool = False, weights: str | os.PathLike | None = None,
           num_classes: int | None = None, seed: int | None = 0) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring for the spec forms).

    Args:
        spec: ``None``/``"default"`` (the embedded EfficientNet-Lite0 with real ImageNet
            weights), ``"torchvision:NAME"``, or a timm model name.
        pretrained: timm / torchvision pretrained weights. These are downloaded on first use:
            offline, use ``weights=`` or the embedded default instead.
        weights: path of a local checkpoint file loaded strictly into the model; excludes
            ``pretrained=True``.
        num_classes: size of the classifier head. With ``weights=`` the checkpoint is loaded
            strictly, so its head must have this size. On the embedded default without
            ``weights=`` it replaces the ImageNet head by a freshly initialised one.
        seed: seed of any random initialisation (module docstring); None draws from torch's
            global RNG instead.

    Returns:
        The model as its library builds it (timm and torchvision models in train mode, the
        embedded default in eval mode).

    Raises:
        ValueError: unknown name (with close names), a checkpoint that does not fit, or a
            file that is not a plain weights checkpoint.
        FileNotFoundError: ``weights`` names no file.

    Examples:
        >>> create(None)                                  # embedded Lite0, real weights, offline
        >>> create("resnet18")                            # timm, random init
        >>> create("resnet18", weights="r18.pth")         # timm, weights from a local file
        >>> create("torchvision:resnet50", pretrained=True)   # torchvision DEFAULT (downloads)
        >>> create("torchvision:resnet18", weights="tv_r18.pth", num_classes=10)
    """
    if weights is not None:
        if pretrained:
            raise ValueError("give either pretrained=True (library weights, downloaded) or "
                             "weights=PATH (a local checkpoint), not both")
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"a model spec is a string or None, got {type(spec).__name__}")
    if spec is not None:
        spec = spec.strip()
    with _seeded(seed):
        if spec in DEFAULT_SPECS:
            return _embedded(weights, num_classes)
        if spec.lower().startswith(TORCHVISION_PREFIX):
            return _torchvision(spec[len(TORCHVISION_PREFIX):].strip(), pretrained, weights, num_classes)
        return _timm(spec, pretrained, weights, num_classes)


# ----------------------------------------------------------------------------- kinds
def _embedded(weights, num_classes) -> nn.Module:
    from . import zoo

    model = zoo.efficientnet_lite0(pretrained=weights is None)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    if weights is not None:
        _load_strict(model, weights, f"the embedded {zoo.LITE0_TIMM_NAME}")
    return model


def _torchvision(name: str, pretrained: bool, weights, num_classes) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown torchvision model {name!r}.{hint} "
                         f"torchvision.models.list_models() lists the {len(known)} known names.")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        cached = os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))
        _check_download(f"torchvision:{name}", [] if cached else [urlparse(url).hostname])
    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    if weights is not None:
        _load_strict(model, weights, f"torchvision {name}")
    return model


def _timm(spec: str, pretrained: bool, weights, num_classes) -> nn.Module:
    import timm

    prefix, sep, _ = spec.partition(":")
    if not (sep and prefix.lower() in _TIMM_SOURCE_PREFIXES):
        if sep:
            raise ValueError(f"unknown model source {prefix!r} in {spec!r}: use 'torchvision:NAME' for "
                             f"torchvision, a timm name (optionally 'hf-hub:' / 'local-dir:'), "
                             f"or 'default' for the embedded EfficientNet-Lite0")
        if spec.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or os.path.isfile(spec):
            raise ValueError(f"{spec!r} looks like a file, not a model name: give the architecture as "
                             f"MODEL and the checkpoint as weights= (--weights on the command line)")
        if not timm.is_model(spec):
            raise ValueError(_unknown_timm_message(spec))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        if pretrained and not sep:
            _check_download(spec, _timm_hosts(spec))
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    _read_state_dict(weights)  # a damaged or foreign file: say so, not "does not fit"
    overlay = {"file": weights}
    if num_classes is not None:
        # timm drops a checkpoint's head (and loads non-strictly) when num_classes differs
        # from the pretrained config's; declaring the file's head size keeps the load strict.
        overlay["num_classes"] = num_classes
    try:
        return timm.create_model(spec, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        _raise_if_not_plain_checkpoint(weights)
        raise ValueError(f"{weights} does not fit timm {spec}: {_short(err)}") from err


# ----------------------------------------------------------------------------- downloads
def _timm_hosts(spec: str) -> list[str]:
    """Hosts timm would download ``spec``'s weights from; [] when they are cached already."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec)
    if cfg is None:
        return []
    if cfg.hf_hub_id:
        import huggingface_hub

        names = [n for n in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if n]
        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, n), str) for n in names):
            return []
        return [urlparse(huggingface_hub.constants.ENDPOINT).hostname]
    if cfg.url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        return [] if os.path.isfile(cached) else [urlparse(cfg.url).hostname]
    return []


def _check_download(spec: str, hosts: list[str], timeout: float = 3.0) -> None:
    """Fail at once, saying what to do, when pretrained weights must be downloaded from an unreachable host."""
    for host in filter(None, hosts):
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as err:
            raise ValueError(
                f"--pretrained needs to download the weights of {spec} from {host}, which cannot be reached "
                f"({err.strerror or err}; offline?). Download the checkpoint on a machine with a network and pass "
                f"it with --weights FILE (weights= in Python), or omit MODEL for the embedded EfficientNet-Lite0 "
                f"with real weights") from err


# ----------------------------------------------------------------------------- helpers
def _unknown_timm_message(spec: str) -> str:
    import timm

    names = timm.list_models()
    arch = spec.split(".", 1)[0]
    close = [n for n in timm.list_models(f"*{arch}*")][:8] if arch else []
    for n in difflib.get_close_matches(arch.lower(), names, n=5, cutoff=0.6):
        if n not in close:
            close.append(n)
    hint = f" Close timm names: {', '.join(close[:8])}." if close else ""
    return (f"unknown model {spec!r}: not a timm model name.{hint} For a torchvision model use "
            f"'torchvision:NAME' (e.g. 'torchvision:resnet50'); omit MODEL (or 'default') for the "
            f"embedded EfficientNet-Lite0 with real weights. timm.list_models('*{arch}*') searches timm.")


def _read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    import pickle

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {_short(err)}. Pass a file saved "
                         f"with torch.save(model.state_dict(), path), copied whole") from err
    _raise_if_normsurgeon(blob, path)
    if isinstance(blob, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), Mapping):
                blob = blob[key]
                break
    if not isinstance(blob, Mapping) or not blob or \
            not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"{path} holds no state_dict: expected a dict of tensors, or a dict with "
                         f"a 'state_dict' or 'model' entry holding one")
    return blob


def _load_strict(model: nn.Module, path: str, what: str) -> None:
    state_dict = _read_state_dict(path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {what}: {_short(err)}") from err


def _raise_if_normsurgeon(blob, path) -> None:
    if isinstance(blob, Mapping) and str(blob.get("format", "")).startswith("normsurgeon/"):
        raise ValueError(f"{path} is a normsurgeon checkpoint of a converted model: rebuild it with "
                         f"normsurgeon.load({str(path)!r}, base_model), not as weights of a base model")


def _raise_if_not_plain_checkpoint(path: str) -> None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (only looking for a better message)
        return
    _raise_if_normsurgeon(blob, path)


def _short(err: BaseException, lines: int = 12, width: int = 500) -> str:
    text = [t if len(t) <= width else t[:width] + " ..." for t in str(err).strip().splitlines()]
    out = "\n".join(text[:lines] + ([f"... ({len(text) - lines} more lines)"] if len(text) > lines else []))
    if "size mismatch" in out:
        out += ("\n(if only the classifier head differs, give the checkpoint's head size as "
                "num_classes= / --num-classes)")
    return out
