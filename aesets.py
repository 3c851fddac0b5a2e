"""Adversarial-example sets on disk: ``<folder>/adv.npz`` + ``<folder>/summary.json``.

``adv.npz`` holds float32 ``clean`` and ``adv`` (N×3×H×W, or volumes N×1×D×H×W, in [0, 1], the same order), int64
``labels``, ``targets`` and ``index`` (positions in the run's test part; the order defines the
protocol's set A) and bool ``success``. Every save and every load checks the invariants of
docs/PROTOCOL.md §5 (L∞ ≤ ε, values in [0, 1], consistent shapes); a violation is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import runs
from utils import UserError, load_npz, read_json, save_npz, write_json

AE_FILE = "adv.npz"
SUMMARY_FILE = "summary.json"
LINF_TOLERANCE = 1e-6  # float32 rounding of x ± ε
ARRAYS = ("clean", "adv", "labels", "targets", "success", "index")


class InvariantError(UserError):
    """An AE set breaks the budget, the range or the shapes it must have."""


def _numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value), dtype=dtype)


def check_ae_set(arrays: dict[str, np.ndarray], eps: float | None, where: str = "AE set") -> None:
    """Raise InvariantError unless shapes, order, range and (when eps is given) budget hold."""
    clean, adv = arrays["clean"], arrays["adv"]
    if clean.ndim not in (4, 5) or clean.shape != adv.shape:
        raise InvariantError(f"{where}: clean {clean.shape} and adv {adv.shape} must be equal N×C×H×W (or "
                             "N×C×D×H×W) shapes")
    n = len(clean)
    for key in ("labels", "targets", "success", "index"):
        if arrays[key].shape != (n,):
            raise InvariantError(f"{where}: {key} has shape {arrays[key].shape}, expected ({n},)")
    if len(np.unique(arrays["index"])) != n or (n and arrays["index"].min() < 0):
        raise InvariantError(f"{where}: index must hold {n} distinct non-negative positions")
    for key in ("clean", "adv"):
        values = arrays[key]
        if n and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise InvariantError(f"{where}: {key} has values outside [0, 1] (or non-finite)")
    if eps is not None and n:
        linf = float(np.abs(adv - clean).max())
        if linf > eps + LINF_TOLERANCE:
            raise InvariantError(f"{where}: L∞ distance {linf * 256:.4f}/256 exceeds the budget {eps * 256:g}/256")


def ae_stats(clean: np.ndarray, adv: np.ndarray, success: np.ndarray) -> dict[str, Any]:
    """Number of images, success rate, max L∞ (units of 1/256) and mean L2 of a set."""
    diff = (adv - clean).reshape(len(clean), -1)
    return {
        "num_images": int(len(clean)),
        "success_rate": float(success.mean()) if len(clean) else 0.0,
        "max_linf_256": float(np.abs(diff).max() * 256) if len(clean) else 0.0,
        "mean_l2": float(np.linalg.norm(diff, axis=1).mean()) if len(clean) else 0.0,
    }


def save_ae_set(folder: str | Path, *, clean, adv, labels, targets, success, index, eps: float,
                meta: dict[str, Any], provenance: tuple[str, dict, dict] | None = None) -> dict[str, Any]:
    """Check and write ``adv.npz`` and ``summary.json`` (meta + eps + stats); returns the summary.

    ``provenance`` = (stage, settings, inputs) adds the stage's ``runs.record`` to the summary."""
    folder = Path(folder)
    arrays = {"clean": _numpy(clean, np.float32), "adv": _numpy(adv, np.float32),
              "labels": _numpy(labels, np.int64), "targets": _numpy(targets, np.int64),
              "success": _numpy(success, bool), "index": _numpy(index, np.int64)}
    check_ae_set(arrays, eps, where=f"refusing to save {folder / AE_FILE}")
    summary = {**meta, "eps": float(eps), "eps_256": float(eps) * 256,
               **ae_stats(arrays["clean"], arrays["adv"], arrays["success"])}
    save_npz(folder / AE_FILE, **arrays)
    if provenance is not None:
        stage, settings, inputs = provenance
        summary["record"] = runs.record(stage, settings, inputs, [folder / AE_FILE])
    write_json(folder / SUMMARY_FILE, summary)
    return summary


def load_ae_set(folder: str | Path, hint: str = "run gen_base_adv.py first") -> dict[str, Any]:
    """The arrays of ``folder/adv.npz`` (checked again), plus ``meta`` (summary.json) if present."""
    folder = Path(folder)
    arrays: dict[str, Any] = load_npz(folder / AE_FILE, what="AE set", hint=hint)
    missing = [key for key in ARRAYS if key not in arrays]
    if missing:
        raise UserError(f"{folder / AE_FILE} is not an AE set (it lacks {', '.join(missing)}); {hint}")
    meta = read_json(folder / SUMMARY_FILE, "AE summary", hint) if (folder / SUMMARY_FILE).is_file() else None
    if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("eps"), (int, float))):
        raise UserError(f"{folder / SUMMARY_FILE} is not an AE-set summary; {hint}")
    check_ae_set(arrays, None if meta is None else meta.get("eps"), where=str(folder / AE_FILE))
    if meta is not None:
        arrays["meta"] = meta
    return arrays


def rows_of(ae: dict[str, Any], index, what: str, hint: str) -> np.ndarray:
    """Positions in the AE set ``ae`` of the images with test-set ``index``, in that order;
    a UserError ("<what> lacks N images ...; <hint>") when some are not in it."""
    position = {int(i): p for p, i in enumerate(ae["index"])}
    missing = [int(i) for i in index if int(i) not in position]
    if missing:
        raise UserError(f"{what} lacks {len(missing)} images of the set asked for (e.g. test image {missing[0]}); "
                        f"{hint}")
    return np.array([position[int(i)] for i in index], dtype=np.int64)
