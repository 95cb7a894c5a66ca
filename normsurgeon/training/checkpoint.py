"""Atomic fine-tuning checkpoints: everything needed to continue bit-identically.

A checkpoint holds the model, optimizer and scheduler state, the step and data position,
the RNG states (torch, numpy, python; CUDA when used), the history so far and a fingerprint
of the model (class, normsurgeon recipe, parameter and buffer names and shapes) and of the
run's settings. It is written to a temporary file in the same folder and moved into place
with ``os.replace``, so a run killed at any moment leaves either the previous checkpoint or
the new one, never a torn file. Loading uses ``weights_only=True``.
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

FORMAT = "normsurgeon-finetune/1"
CHECKPOINT_NAME = "checkpoint.pt"


def model_fingerprint(model: nn.Module) -> dict:
    """Class, recipe and a hash of every state_dict key with its shape and dtype."""
    entries = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    recipes = getattr(model, "normsurgeon_recipes", None)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "recipe": json.dumps(recipes, sort_keys=True, default=str) if recipes is not None else None,
            "state": hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]}


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
    torch.save(dict(payload, format=FORMAT), tmp)
    with open(tmp, "rb") as f:  # the bytes are on disk before the rename makes them the checkpoint
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: Path) -> dict | None:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable normsurgeon fine-tuning checkpoint ({err}); move it away "
                         f"or choose another checkpoint_dir") from err
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
