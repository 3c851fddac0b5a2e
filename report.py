"""The paper-style table: the results dict (``results.json`` schema) and its text formats."""
from __future__ import annotations

import csv
import io
from typing import Any

DETECTOR_ORDER = ("KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN")
ROWS = ("base", "hfc")


def results_dict(*, dataset: str, arch: str, attack: str, detector_attack: str, epsilon_256: float,
                 n_eval: int, success: dict[str, float], detectors: dict[str, dict[str, dict]],
                 **extra: Any) -> dict[str, Any]:
    """Assemble ``results.json``: per detector and row ("base"/"hfc") at least auc and tnr90."""
    ordered = {name: detectors[name] for name in DETECTOR_ORDER if name in detectors}
    ordered.update({k: v for k, v in detectors.items() if k not in ordered})
    return {"dataset": dataset, "arch": arch, "attack": attack, "detector_attack": detector_attack,
            "epsilon_256": float(epsilon_256), "n_eval": int(n_eval),
            "success": {row: float(success[row]) for row in success},
            "detectors": {name: {row: {"auc": float(m["auc"]), "tnr90": float(m["tnr90"]),
                                       **({"layer_auc": {k: float(v) for k, v in m["layer_auc"].items()}}
                                          if "layer_auc" in m else {})}
                                 for row, m in rows.items()} for name, rows in ordered.items()},
            **extra}


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows_present = [r for r in ROWS if r in results["success"]]
    header = ["detector"] + [f"{r} {m}" for r in rows_present for m in ("AUC", "TNR@90")]
    lines = [header]
    for name, per_row in results["detectors"].items():
        cells = [name]
        for r in rows_present:
            metrics = per_row.get(r)
            cells += [f"{metrics['auc']:.3f}", f"{metrics['tnr90']:.3f}"] if metrics else ["-", "-"]
        lines.append(cells)
    aucs = {r: [rows[r]["auc"] for rows in results["detectors"].values() if r in rows] for r in rows_present}
    mean = ["mean"]
    for r in rows_present:
        mean += [f"{sum(aucs[r]) / len(aucs[r]):.3f}" if aucs[r] else "-", ""]
    lines.append(mean)
    lines.append(["success"] + sum(([f"{results['success'][r]:.3f}", ""] for r in rows_present), []))
    return lines


def format_table(results: dict[str, Any], fmt: str = "md") -> str:
    """The table as Markdown (``md``), CSV (``csv``) or aligned plain text (``text``)."""
    title = (f"{results['dataset']} / {results['arch']} / {results['attack']} "
             f"(eps = {results['epsilon_256']:g}/256, detectors fitted on {results['detector_attack']}, "
             f"n_eval = {results['n_eval']})")
    return _render(title, _rows(results), fmt)


def _render(title: str, lines: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(lines)
        return buffer.getvalue()
    if fmt == "md":
        out = [f"**{title}**", "", "| " + " | ".join(lines[0]) + " |",
               "|" + "|".join("---" for _ in lines[0]) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in lines[1:]]
        return "\n".join(out) + "\n"
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = [title] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    return "\n".join(out) + "\n"


def format_layer_table(results: dict[str, Any], fmt: str = "md") -> str:
    """Per-layer AUCs of the per-layer detectors (KD, LID, MAHA, DNN), one table each: which
    layers still give the AEs away. Empty when the results hold none."""
    rows_present = [r for r in ROWS if r in results["success"]]
    parts = []
    for name, per_row in results["detectors"].items():
        layer_names = next((m["layer_auc"] for m in per_row.values() if "layer_auc" in m), None)
        if not layer_names:
            continue
        lines = [["layer"] + [f"{r} AUC" for r in rows_present]]
        for layer in layer_names:
            lines.append([layer] + [f"{per_row[r]['layer_auc'][layer]:.3f}" if "layer_auc" in per_row.get(r, {})
                                    else "-" for r in rows_present])
        lines.append(["combined"] + [f"{per_row[r]['auc']:.3f}" if r in per_row else "-" for r in rows_present])
        parts.append(_render(f"{name}: AUC of each layer's score", lines, fmt))
    return "\n".join(parts)
