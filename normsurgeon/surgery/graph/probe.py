"""Input shapes at each norm site, from one forward on meta tensors (no compute, no copy).

The model's parameters and buffers are swapped for meta tensors for the duration of one
forward and put back afterwards (the very same objects), so nothing real is computed or
modified. (``torch.func.functional_call`` does not restore modules registered under two
names, hence the small swap below.) Models that cannot run on meta tensors (``.item()``, data-dependent
shapes) are reported, not fatal: shapes are then unknown.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ...model_state import preserved
from .tracing import failure_location


@dataclass
class ProbeResult:
    """(input shape, output shape) per call of each watched module (by qualname), or an error."""

    shapes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = field(default_factory=dict)
    error: str | None = None


@contextlib.contextmanager
def on_meta(model: nn.Module):
    """Temporarily replace every parameter and buffer of ``model`` by a meta tensor."""
    saved = []
    for module in {id(m): m for m in model.modules()}.values():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    saved.append((store, name, tensor))
                    meta = tensor.to("meta")
                    store[name] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        yield model
    finally:
        for store, name, tensor in saved:
            store[name] = tensor


def check_input_size(model: nn.Module, input_size) -> tuple[int, ...] | None:
    """``input_size`` as a tuple of ints, checked against the model's first convolution (its number of
    spatial axes and input channels); a clear ValueError saying what to pass otherwise."""
    if input_size is None:
        return None
    try:
        size = tuple(input_size)
    except TypeError:
        raise TypeError(f"input_size must be a sequence of ints (C, H, W), got {input_size!r}") from None
    if not size or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise TypeError(f"input_size must be ints (C, H, W) without the batch axis, got {input_size!r}")
    if any(v < 1 for v in size):
        raise ValueError(f"input_size {size} has a size below 1: every entry must be a positive number of "
                         f"channels or pixels, e.g. (3, 224, 224)")
    conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is not None:
        name, m = conv
        axes = len(m.kernel_size)
        example = (m.in_channels,) + (224,) * axes
        if len(size) != axes + 1:
            raise ValueError(f"input_size {size} has {len(size)} values, but the model's first convolution "
                             f"'{name}' ({type(m).__name__}) takes inputs of {axes + 1} values without the batch "
                             f"axis: (C{', H, W' if axes == 2 else ', ...'}), e.g. {example}")
        if size[0] != m.in_channels:
            raise ValueError(f"input_size {size} has {size[0]} channel(s), but the model's first convolution "
                             f"'{name}' expects {m.in_channels}: e.g. {(m.in_channels,) + size[1:]}")
    return size


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W): the image size a timm patch embedding was built for, else the ``input_size`` of a timm
    ``pretrained_cfg``, else (3, 224, 224)."""
    embed = getattr(model, "patch_embed", None)
    img_size, proj = getattr(embed, "img_size", None), getattr(embed, "proj", None)
    if img_size is not None and isinstance(proj, nn.modules.conv._ConvNd) and getattr(embed, "strict_img_size", True):
        return (proj.in_channels, *tuple(img_size))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def computation_key(module: nn.Module) -> tuple:
    """What a module computes, up to the values in its tensors: per submodule its class, its settings
    (every scalar attribute except ``*_name`` ones, which say where a layer sits, e.g. CBN's
    ``conv_name``) and the shape and dtype of each tensor it holds. Two modules with the same key map
    an input shape to the same output shape, so shape checks run once per key and input shape."""
    parts = []
    for name, part in module.named_modules():
        settings, tensors = [], []
        for key, value in sorted(vars(part).items()):
            if key.endswith("_name") or key in ("_modules", "_parameters", "_buffers"):
                continue
            if isinstance(value, (bool, int, float, str, type(None))) or \
                    (isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                settings.append((key, value))
            elif isinstance(value, torch.Tensor):
                tensors.append((key, tuple(value.shape), value.dtype))
        for store in (part._parameters, part._buffers):
            tensors += [(key, tuple(t.shape), t.dtype) for key, t in store.items() if t is not None]
        parts.append((name, type(part), tuple(settings), tuple(tensors)))
    return tuple(parts)


@contextlib.contextmanager
def _passing_through(channels: dict[nn.Module, tuple[int, bool]]):
    """Each module of ``channels`` ({module: (C, channels_last)}, registered normalization sources)
    returns a meta tensor of its input's shape instead of running, after checking that the input
    has C channels on its channel axis, as the module would (an instance ``forward``, removed on
    exit). A normalization maps its input to an output of the same shape."""
    saved = [(m, m.__dict__.get("forward")) for m in channels]

    def through(module, c, last):
        def forward(x, *args, **kwargs):
            axis = -1 if last else 1
            if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[axis] != c:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{type(module).__name__} expects {c} channels on axis {axis}, got input {shape}")
            return x.new_empty(x.shape)
        return forward

    for m, (c, last) in channels.items():
        m.forward = through(m, c, last)
    try:
        yield
    finally:
        for m, forward in saved:
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def meta_forward(model: nn.Module, example: torch.Tensor, watch: dict[str, nn.Module],
                 train: bool = False, pass_through: dict[nn.Module, tuple[int, bool]] | None = None) -> ProbeResult:
    """Run ``model`` on meta copies of its tensors and ``example``; record inputs of ``watch``.

    ``pass_through``: {module: (C, channels_last)} of the normalization sources, which check their
    input's channels and pass its shape on instead of running: their meta kernels were most of the
    probe's cost (BatchNorm's is a Python decomposition, ~0.6 ms a call; ResNet-50 has 53).
    """
    result = ProbeResult()
    handles = []
    names_by_module: dict[int, list[str]] = {}
    for name, module in watch.items():
        names_by_module.setdefault(id(module), []).append(name)

    def record(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            for name in names_by_module[id(module)]:
                result.shapes.setdefault(name, []).append((tuple(args[0].shape), tuple(output.shape)))

    watched = list({id(m): m for m in watch.values()}.values())
    for module in watched:
        handles.append(module.register_forward_hook(record))
    try:
        with preserved(model), torch.no_grad(), on_meta(model), \
                _passing_through(pass_through or {}):
            model.train(train)
            model(example.to("meta"))
    except Exception as exc:  # noqa: BLE001  (reported to the caller)
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} at {failure_location(exc)}"
    finally:
        for h in handles:
            h.remove()
    return result


def check_on_meta(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                  modes: tuple[bool, ...] = (True, False)) -> str | None:
    """Run ``module`` alone on a meta input in each training mode of ``modes``; the problem, or
    None if it maps ``input_shape`` to ``output_shape`` in all of them."""
    try:
        with preserved(module):
            for train in modes:
                module.train(train)
                with torch.no_grad(), on_meta(module):
                    out = module(torch.empty(input_shape, device="meta"))
                if tuple(out.shape) != tuple(output_shape):
                    return (f"{'train' if train else 'eval'}-mode output shape {tuple(out.shape)} differs "
                            f"from the original's {tuple(output_shape)} for input {tuple(input_shape)}")
    except Exception as exc:  # noqa: BLE001  (reported to the caller)
        return f"{type(exc).__name__}: {exc}"
    return None
