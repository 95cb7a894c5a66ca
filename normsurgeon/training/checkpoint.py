"""Atomic fine-tuning checkpoints: everything needed to continue bit-identically.

A checkpoint holds the model, optimizer and scheduler state, the step and data position,
the RNG states (torch, numpy, python; CUDA when used), the history so far and a fingerprint
of the run: the model (class, normsurgeon recipe, parameter and buffer names and shapes), the
teacher (a digest of its weights), the training data (its size and a digest of a sample of its
items) and the settings. A resume whose fingerprint differs is refused. The checkpoint is
written to a temporary file in the same folder and moved into place with ``os.replace``, so a
run killed at any moment leaves either the previous checkpoint or the new one, never a torn
file; a checksum of its content is checked on loading (``weights_only=True``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..digest import digest

FORMAT = "normsurgeon-finetune/1"
CHECKPOINT_NAME = "checkpoint.pt"
DATA_SAMPLE_ITEMS = 8


def model_fingerprint(model: nn.Module) -> dict:
    """Class, recipe and a hash of every state_dict key with its shape and dtype."""
    entries = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    recipes = getattr(model, "normsurgeon_recipes", None)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "recipe": json.dumps(recipes, sort_keys=True, default=str) if recipes is not None else None,
            "state": hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]}


def teacher_fingerprint(teacher: nn.Module | None) -> str | None:
    """A digest of the teacher's weights and buffers: a resume against another teacher is refused."""
    return None if teacher is None else digest(teacher.state_dict())[:16]


def data_fingerprint(dataset, loader) -> dict:
    """Size and a digest of up to ``DATA_SAMPLE_ITEMS`` evenly spaced items (first and last included) of a
    map-style dataset (a loader's own dataset if it has one); only the size for other iterables. Reading
    the items leaves every RNG as it was (an augmenting dataset draws from them)."""
    source = dataset if dataset is not None else getattr(loader, "dataset", None)
    if source is None or not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        return {"size": len(loader) if hasattr(loader, "__len__") else None, "sample": None}
    n = len(source)
    picks = sorted({round(i * (n - 1) / max(DATA_SAMPLE_ITEMS - 1, 1)) for i in range(min(n, DATA_SAMPLE_ITEMS))})
    saved = rng_state()
    try:
        sample = digest([source[i] for i in picks])[:16]
    finally:
        set_rng_state(saved)
    return {"size": n, "sample": sample}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _tensorize(random.getstate()),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_untensorize(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensorize(python_state):
    version, internal, gauss = python_state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _untensorize(stored):
    version, internal, gauss = stored
    return version, tuple(int(v) for v in internal.tolist()), gauss


def save_checkpoint(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    payload = dict(payload, format=FORMAT)
    torch.save(dict(payload, checksum=digest(payload)), tmp)
    with open(tmp, "rb") as f:  # the bytes are on disk before the rename makes them the checkpoint
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: Path) -> dict | None:
    from ..surgery.persist import read_checked

    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        payload = read_checked(path, "normsurgeon fine-tuning checkpoint")
    except ValueError as err:
        raise ValueError(f"{err}. Move it away or choose another checkpoint_dir (nothing was overwritten)") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a normsurgeon fine-tuning checkpoint (format "
                         f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}); "
                         f"choose another checkpoint_dir")
    return payload


def mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two fingerprints (nested one level)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return out
