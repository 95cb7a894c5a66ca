"""Save and load converted models without pickling graphs or classes.

A file holds the state_dict, the conversion recipe(s) and the report as plain data
(loadable with ``torch.load(weights_only=True)``), and a checksum of all of it (``digest``).
``load`` checks the checksum, re-applies the recipes to a freshly built base model and loads
the state_dict strictly, so the checkpoint survives refactors of normsurgeon's classes, never
executes pickled code, and a file changed after saving is refused instead of loading corrupted
weights.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ..digest import digest

FORMAT = "normsurgeon/1"


def read_checked(path, what: str, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` of a dict whose ``"checksum"`` must match its content."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged zip/pickle raises many kinds
        first = str(err).strip().split(". ")[0].splitlines()[0][:200] if str(err).strip() else ""
        raise ValueError(f"cannot read {path} as a {what} ({type(err).__name__}: {first}). The file "
                         f"is damaged (a partial copy or a disk error?) or not a {what}: re-create or re-copy it") from err
    if isinstance(blob, dict) and "checksum" in blob:
        stored = blob.pop("checksum")
        if digest(blob) != stored:
            raise ValueError(f"{path} is corrupted: its content does not match the checksum stored when it was "
                             f"saved (it changed after saving: a partial copy or a disk error?). Nothing was "
                             f"loaded; re-create or re-copy the file")
    elif isinstance(blob, dict):
        warnings.warn(f"{path} has no checksum (saved by an older normsurgeon): it cannot be checked for damage",
                      UserWarning, stacklevel=3)
    return blob


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state_dict plus the recipe that rebuilds its architecture (and a checksum) to
    ``path``; missing folders of ``path`` are created."""
    recipes = getattr(model, "normsurgeon_recipes", None)
    if not recipes:
        raise ValueError("this model was not made by normsurgeon.convert (it has no recipe); "
                         "save its state_dict with torch.save(model.state_dict(), path) instead")
    for recipe in recipes:
        for key in ("include", "exclude"):
            if recipe.get(key) == "<callable>":
                raise ValueError(f"the conversion used a callable {key}=; a recipe can only store "
                                 f"glob patterns. Convert with patterns to be able to save.")
    report = getattr(model, "normsurgeon_report", None)
    blob = {"format": FORMAT, "recipes": recipes, "state_dict": model.state_dict(),
            "model_type": type(model).__name__, "report_summary": report.summary() if report is not None else None}
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(dict(blob, checksum=digest(blob)), path)


def load(path: str | os.PathLike, base_model: nn.Module, map_location="cpu") -> nn.Module:
    """Rebuild the converted model from ``base_model`` (same architecture, any weights) and load it."""
    from .pipeline import convert

    blob = read_checked(path, "normsurgeon checkpoint", map_location)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a normsurgeon checkpoint (expected format {FORMAT!r})")
    if type(base_model).__name__ != blob["model_type"]:
        raise ValueError(f"{path} was saved from a {blob['model_type']}, got a "
                         f"{type(base_model).__name__} as base_model: build a fresh {blob['model_type']} (the "
                         f"architecture that was converted, any weights) and pass it as base_model")
    model = base_model
    for recipe in blob["recipes"]:
        model = convert(model, recipe["to"], include=recipe["include"], exclude=recipe["exclude"],
                        overrides=recipe["overrides"],
                        input_size=tuple(recipe["input_size"]) if recipe["input_size"] else None,
                        **recipe["options"])
    model.load_state_dict(blob["state_dict"], strict=True)
    return model
