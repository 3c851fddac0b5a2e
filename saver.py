"""Checkpoints: written atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from network import HierarchicalNet, build_model
from utils import UserError, atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, model: HierarchicalNet, meta: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """Save the weights plus ``meta`` (plain Python values only) to ``path`` atomically.

    ``meta`` records at least the data set, image size and class names; the arch, number of
    classes and layer names are added here. ``extra`` holds further tensors/state dicts
    (optimizer, scheduler) for ``--resume``.
    """
    meta = {**meta, "arch": model.arch, "num_classes": model.num_classes,
            "layer_names": list(model.layer_names), "layer_channels": list(model.layer_channels)}
    buffer = io.BytesIO()
    torch.save({"meta": meta, "state_dict": model.state_dict(), **(extra or {})}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


META_KEYS = ("arch", "num_classes", "layer_names")


def read_checkpoint(path: str | Path, hint: str = "run train.py first") -> dict[str, Any]:
    """The checkpoint's contents (``weights_only``); a missing, unreadable or foreign file (not
    written by ``save_checkpoint``) is a one-line UserError naming the file and ``hint``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing checkpoint {path}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is bad input
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} ({first}); {hint}") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS) or "state_dict" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no weights with arch, classes and "
                        f"layer names); {hint}")
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu", arch: str | None = None,
               hint: str = "run train.py first") -> tuple[HierarchicalNet, dict[str, Any]]:
    """Rebuild the model stored at ``path`` (a file, or a run directory), in eval mode."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".pt":  # a run directory, existing or not
        path = path / CHECKPOINT_NAME
    state = read_checkpoint(path, hint)
    meta = state["meta"]
    if arch is not None and arch != meta["arch"]:
        raise UserError(f"checkpoint {path} holds a {meta['arch']} model, not {arch}")
    model = build_model(meta["arch"], int(meta["num_classes"]))
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit arch {meta['arch']}: {first}") from None
    return model.to(device).eval(), meta
