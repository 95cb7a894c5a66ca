"""A checksum of the tensors (and plain values) in a nested structure, to catch files changed after saving.

``digest(obj)`` hashes (SHA-256) every tensor's key path, dtype, shape and bytes and every other
leaf's ``repr``, walking dicts, lists and tuples in order. ``ns.save`` and fine-tuning checkpoints
store it next to what they hold and check it on load: a file with a few bytes changed no longer
loads silently with a corrupted weight.
"""
from __future__ import annotations

import hashlib

import torch


def _feed(h, obj, path: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _feed(h, value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}:{type(obj).__name__}{len(obj)}".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{path}/{i}")
    else:
        h.update(f"{path}={obj!r};".encode())


def digest(obj) -> str:
    """Hex SHA-256 of ``obj``'s tensors and values (module docstring)."""
    h = hashlib.sha256()
    _feed(h, obj, "")
    return h.hexdigest()
