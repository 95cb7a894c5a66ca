"""Reading user data as batches of model inputs.

Data may be a tensor (one batch), or an iterable of tensors, of (x, y, ...) tuples/lists (x is
taken), or of dicts with an ``"input"`` key. Every batch is checked: batched, finite.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch


def first_tensor(batch, what: str) -> torch.Tensor:
    """The model input of one batch: the tensor itself, ``batch[0]`` or ``batch["input"]``."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    elif isinstance(batch, dict):
        batch = batch.get("input")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{what}: each batch must be a tensor, an (x, y, ...) tuple or a dict with 'input', "
                        f"got {type(batch).__name__}")
    return batch


def check_inputs(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(f"{what}: inputs must be batched (N, C, ...), got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: a batch contains {bad} NaN/inf values; clean the data first")
    return x


def input_batches(data, num_batches: int | None, what: str) -> Iterator[torch.Tensor]:
    """Yield up to ``num_batches`` checked input tensors; raise when there is none."""
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"{what}: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(data, torch.Tensor):
        source: Iterable = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        source = data
    else:
        raise TypeError(f"{what}: data must be a tensor or an iterable of batches, got {type(data).__name__}")
    count = 0
    for batch in itertools.islice(source, num_batches):
        x = check_inputs(first_tensor(batch, what), what)
        if x.shape[0] == 0:
            continue
        count += 1
        yield x
    if count == 0:
        raise ValueError(f"{what}: data is empty (no batch with at least one sample)")
