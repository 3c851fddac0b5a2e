"""Figures for the report: the feature-space picture of one layer and the AUC of every detector
before and after HFC. Matplotlib draws off-screen (Agg); files are written atomically."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def pca_2d(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Project ``reference`` and ``others`` on the first two principal axes of ``reference``."""
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    axes = vt[:2].T
    return [(x - mean) @ axes for x in (reference, *others)]


def feature_space(path: Path, clean: np.ndarray, clean_labels: np.ndarray, base: np.ndarray,
                  hfc: np.ndarray, layer_name: str, class_names: list[str]) -> None:
    """Clean features (by class), base AEs and HFC AEs of one layer in the clean PCA plane."""
    clean_2d, base_2d, hfc_2d = pca_2d(clean, base, hfc)
    fig, ax = plt.subplots(figsize=(6, 5))
    for cls, name in enumerate(class_names):
        pts = clean_2d[clean_labels == cls]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.6, label=f"clean: {name}")
    ax.scatter(base_2d[:, 0], base_2d[:, 1], s=22, marker="x", c="black", label="base AEs")
    ax.scatter(hfc_2d[:, 0], hfc_2d[:, 1], s=22, marker="^", c="crimson", label="HFC AEs")
    ax.set_title(f"pooled features of {layer_name} (PCA of clean)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def auc_bars(path: Path, results: dict) -> None:
    """Detection AUC of every detector for the base and the HFC AEs."""
    names = list(results["detectors"])
    base = [results["detectors"][n]["base"]["auc"] for n in names]
    hfc = [results["detectors"][n]["hfc"]["auc"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(x - 0.2, base, 0.4, label=f"base ({results['attack']})")
    ax.bar(x + 0.2, hfc, 0.4, label="base + HFC")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("detection AUC")
    ax.set_title(f"{results['dataset']} / {results['arch']}: detectors before and after HFC")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def auc_vs_success(path: Path, compare: dict) -> None:
    """compare.py's picture: each row's mean detection AUC against its attack success."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = "osD^vP*Xph"
    for number, (name, row) in enumerate(compare["rows"].items()):
        if row.get("mean_auc") is None:  # no successful AE: nothing was scored
            continue
        ax.scatter(row["success"], row["mean_auc"], s=60 if name == "HFC" else 36, alpha=0.8,
                   marker=markers[number % len(markers)], label=name)
    ax.legend(fontsize=8, loc="upper left")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("attack success on A_eval")
    ax.set_ylabel("mean detection AUC (7 detectors)")
    ax.set_title(f"{compare['dataset']} / {compare['arch']} / {compare['attack']}: hidden and successful "
                 "is bottom right", fontsize=9)
    save_figure(fig, path)


def stress_curves(path: Path, stress: dict) -> None:
    """The stress test of one model: the deviation ratio (AEs' median / clean 99th percentile) against ε,
    one line per stage-end layer."""
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [float(e) for e in stress["epsilons_256"]]
    for layer in stress["layers"]:
        ratios = [stress["deviation"][f"{e:g}"][layer["name"]]["ratio_to_clean_p99"] for e in eps]
        ax.plot(eps, ratios, marker="o", label=layer["name"])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ε (×1/256)")
    ax.set_ylabel("median deviation / clean 99th pct")
    ax.set_title(f"{stress['dataset']} / {stress['arch']}: feature-deviation attack")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def stress_side_by_side(path: Path, side: dict) -> None:
    """Several models' stress tests, one panel per stage: the deviation ratio against ε per model."""
    stages = side["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3.4), sharey=True, squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for model in side["models"]:
            points = model["ratio_by_stage"][stage]
            eps = sorted(float(e) for e in points)
            ax.plot(eps, [points[f"{e:g}"] for e in eps], marker="o",
                    ls="--" if model["natural"] else "-", label=model["label"])
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("ε (×1/256)")
    axes[0][0].set_ylabel("median deviation / clean 99th pct")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


def ood_figure(path: Path, ood: dict, clean_examples: np.ndarray, lesioned: dict) -> None:
    """AUROC of each OOD score against the lesion radius, beside example images (a clean row, then
    one row per radius); images are uint8 N×3×H×W."""
    radii = sorted(lesioned)
    fig = plt.figure(figsize=(11, 1.9 * (len(radii) + 1)))
    grid = fig.add_gridspec(len(radii) + 1, 6, width_ratios=[2.2, 2.2, 1, 1, 1, 1])
    ax = fig.add_subplot(grid[:, :2])
    for score in ("mixture", "max_softmax", "maha"):
        ax.plot(radii, [ood["by_radius"][f"{r:g}"][score]["auroc"] for r in radii], marker="o", label=score)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("lesion radius (px at 256 px)")
    ax.set_ylabel("AUROC clean vs. lesioned")
    ax.set_title(f"{ood['dataset']} / {ood['arch']}")
    ax.legend(fontsize=8)
    rows = [("clean", clean_examples)] + [(f"r = {r:g}", lesioned[r]) for r in radii]
    for row, (label, images) in enumerate(rows):
        for col in range(min(4, len(images))):
            image_ax = fig.add_subplot(grid[row, 2 + col])
            image_ax.imshow(images[col].transpose(1, 2, 0))
            image_ax.set_xticks([])
            image_ax.set_yticks([])
            if col == 0:
                image_ax.set_ylabel(label, fontsize=8)
    save_figure(fig, path)


def sweep_figure(path: Path, sweep: dict, field: str, label: str) -> None:
    """A sweep's success and mean AUC (with its interval) against M or λ."""
    points = sweep["points"]
    x = np.array([p[field] for p in points], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    means = np.array([p["mean_auc"] for p in points], dtype=float)
    low = np.array([(p["mean_auc_ci"] or [np.nan, np.nan])[0] for p in points], dtype=float)
    high = np.array([(p["mean_auc_ci"] or [np.nan, np.nan])[1] for p in points], dtype=float)
    ax.errorbar(x, means, yerr=[means - low, high - means], marker="o", capsize=3, label="mean AUC (HFC AEs)")
    ax.plot(x, [p["success"] for p in points], marker="s", label="success")
    ax.plot(x, [p["base_mean_auc"] for p in points], ls=":", color="grey", label="mean AUC (base AEs)")
    if field == "lamda":
        positive = x[x > 0]
        ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    else:
        ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(label)
    ax.set_title(f"{sweep['dataset']} / {sweep['arch']} / {sweep['attack']}: {label} sweep")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def compare_2d3d(path: Path, result: dict) -> None:
    """The 2D-vs-3D comparison: base-attack success against ε, and the feature deviation per stage."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    eps = [float(e) for e in result["epsilons_256"]]
    for label, side in result["sides"].items():
        left.plot(eps, [side["success_by_eps"][f"{e:g}"] for e in eps], marker="o", label=f"{label} ({side['arch']})")
    left.axhline(result["success_bar"], color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set_xlabel("ε (×1/256)")
    left.set_ylabel("targeted I_FGSM success")
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=8)
    stages = list(result["deviation_3d_over_2d"])
    width = 0.38
    for k, (label, side) in enumerate(result["sides"].items()):
        right.bar(np.arange(len(stages)) + (k - 0.5) * width, [side["deviation_ratio_by_stage"][s] for s in stages],
                  width, label=label)
    right.axhline(1.0, color="grey", lw=0.8, ls=":")
    right.set_xticks(np.arange(len(stages)), [f"stage {s}" for s in stages])
    right.set_yscale("log")
    right.set_ylabel(f"median deviation / clean 99th pct (ε {result['stress_eps_256']:g}/256)")
    right.legend(fontsize=8)
    save_figure(fig, path)
