"""The paper-style table: the results dict (``results.json`` schema) and its text formats.

As a command, it gathers saved results into one table without re-scoring anything (the README's
tables are made this way; the command that made a table is printed under it):

    python report.py runs_synthetic/resnet50/I_FGSM_Linf_4/hfc_*/results.json --format md
    python report.py --layers MAHA runs_synthetic/resnet50/I_FGSM_Linf_4/hfc_*/results.json
    python report.py --two-sided runs_synthetic/resnet50/I_FGSM_Linf_4/hfc_*/results.json
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

DETECTOR_ORDER = ("KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN")
ROWS = ("base", "hfc")


def results_dict(*, dataset: str, arch: str, attack: str, detector_attack: str, epsilon_256: float,
                 n_eval: int, success: dict[str, float], detectors: dict[str, dict[str, dict]],
                 **extra: Any) -> dict[str, Any]:
    """Assemble ``results.json``: per detector and row ("base"/"hfc") at least auc and tnr90, and
    their bootstrap intervals ``auc_ci`` / ``tnr90_ci`` ([lo, hi]) when the reports carry them
    (``evaluation.score_table``; its ``summary_fields()`` go in ``extra``: ``success_ci``,
    ``mean_auc``, ``mean_auc_ci``, ``mean_auc_of``, ``bootstrap``)."""
    ordered = {name: detectors[name] for name in DETECTOR_ORDER if name in detectors}
    ordered.update({k: v for k, v in detectors.items() if k not in ordered})
    return {"dataset": dataset, "arch": arch, "attack": attack, "detector_attack": detector_attack,
            "epsilon_256": float(epsilon_256), "n_eval": int(n_eval),
            "success": {row: float(success[row]) for row in success},
            "detectors": {name: {row: {"auc": float(m["auc"]), "tnr90": float(m["tnr90"]),
                                       **{key: _interval(m[key]) for key in CI_FIELDS if key in m},
                                       **({"layer_auc": {k: float(v) for k, v in m["layer_auc"].items()}}
                                          if "layer_auc" in m else {})}
                                 for row, m in rows.items()} for name, rows in ordered.items()},
            **extra}


CI_FIELDS = ("auc_ci", "tnr90_ci")


def _interval(pair) -> list[float]:
    lo, hi = pair
    return [float(lo), float(hi)]


def cell(value: float | None, interval=None, spec: str = ".3f") -> str:
    """A number, with its interval when there is one: ``0.790 [0.680, 0.880]``; "-" for None."""
    if value is None:
        return "-"
    text = format(value, spec)
    if interval is not None and len(interval) == 2 and None not in interval:
        text += f" [{format(interval[0], spec)}, {format(interval[1], spec)}]"
    return text


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows_present = [r for r in ROWS if r in results["success"]]
    header = ["detector"] + [f"{r} {m}" for r in rows_present for m in ("AUC", "TNR@90")]
    lines = [header]
    for name, per_row in results["detectors"].items():
        cells = [name]
        for r in rows_present:
            metrics = per_row.get(r)
            cells += ([cell(metrics["auc"], metrics.get("auc_ci")), cell(metrics["tnr90"], metrics.get("tnr90_ci"))]
                      if metrics else ["-", "-"])
        lines.append(cells)
    mean = ["mean"]
    for r in rows_present:
        value, interval = mean_auc(results, r)
        mean += [cell(value, interval), ""]
    lines.append(mean)
    success_ci = results.get("success_ci") or {}
    lines.append(["success"] + sum(([cell(results["success"][r], success_ci.get(r)), ""] for r in rows_present), []))
    return lines


def _row_aucs(results: dict[str, Any], row: str) -> list[float]:
    """The AUC of ``row`` under every detector in ``results`` that scored it: what both means average."""
    return [rows[row]["auc"] for rows in results["detectors"].values() if row in rows]


def mean_auc(results: dict[str, Any], row: str) -> tuple[float | None, list[float] | None]:
    """The mean AUC of a row over every detector in ``results`` and its interval: the stored
    ``mean_auc`` / ``mean_auc_ci`` when they are over those same detectors, else the mean
    computed here without an interval (results.json files written before the intervals)."""
    aucs = _row_aucs(results, row)
    if not aucs:
        return None, None
    names = [name for name, rows in results["detectors"].items() if row in rows]
    stored = (results.get("mean_auc") or {}).get(row)
    if stored is not None and set(results.get("mean_auc_of") or []) == set(names):
        return float(stored), (results.get("mean_auc_ci") or {}).get(row)
    return sum(aucs) / len(aucs), None


def two_sided_mean_auc(results: dict[str, Any], row: str) -> float | None:
    """The mean over the same detectors as ``mean_auc`` of max(AUC, 1 − AUC): each detector read
    in the direction that separates the row best. An AUC well below 0.5 means the AEs look *more*
    typical than benign images, which a defender who reads that tail flags as well as one above
    0.5; the plain mean counts it as hiding. The direction is chosen on the scored row itself, so
    this is that defender's best case, not a fitted detector (no interval)."""
    aucs = _row_aucs(results, row)
    return sum(max(a, 1.0 - a) for a in aucs) / len(aucs) if aucs else None


def format_table(results: dict[str, Any], fmt: str = "md") -> str:
    """The table as Markdown (``md``), CSV (``csv``) or aligned plain text (``text``)."""
    title = (f"{results['dataset']} / {results['arch']} / {results['attack']} "
             f"(eps = {results['epsilon_256']:g}/256, detectors fitted on {results['detector_attack']}, "
             f"n_eval = {results['n_eval']})")
    return render(title, _rows(results), fmt)


def render(title: str, lines: list[list[str]], fmt: str) -> str:
    """Lines of cells (the first: the header) as CSV, Markdown (with ``title``) or aligned text."""
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
        parts.append(render(f"{name}: AUC of each layer's score", lines, fmt))
    return "\n".join(parts)


def layer_rows(results: dict[str, Any], detector: str, label: str, layers: list[str],
               with_base: bool = True) -> list[list[str]]:
    """One line per row of ``results`` for one per-layer detector: the AUC of each of ``layers``'
    scores ("-" where the row has none) and the combined AUC. A layer's AUC below 0.5 means the
    AEs score *more* benign than the benign images at that layer -- which a combination fitted on
    the base AEs may weigh either way."""
    per_row = results["detectors"].get(detector, {})
    lines = []
    for row in [r for r in ROWS if r in per_row and (with_base or r != "base")]:
        by_layer = per_row[row].get("layer_auc") or {}
        lines.append([label, row if row == "base" else _hfc_label(results)]
                     + [f"{by_layer[layer]:.3f}" if layer in by_layer else "-" for layer in layers]
                     + [cell(per_row[row]["auc"], per_row[row].get("auc_ci"))])
    return lines


def weight_rows(results: dict[str, Any], detector: str, label: str, layers: list[str], root: Path) -> list[list[str]]:
    """The line of the fitted detector's combination weights (``LayerDetector.layer_weights``),
    read from the detectors the results' record names (resolved against the runs' ``root``);
    none when that detector does not combine its layers by one logistic regression or is gone."""
    import detectors

    summary = ((results.get("record") or {}).get("inputs") or {}).get("detectors", {}).get("path")
    folder = None if summary is None else (root / summary).parent
    if folder is None or not (folder / "detectors.json").is_file():
        return []
    fitted = detectors.load_detectors(folder, [detector])[detector]
    by_layer = fitted.layer_weights() if isinstance(fitted, detectors.LayerDetector) else {}
    if not by_layer:
        return []
    return [[label, "combination weight (z-scored score)"]
            + [f"{by_layer[layer]:+.2f}" if layer in by_layer else "-" for layer in layers] + [""]]


def summary_rows(results: dict[str, Any], label: str, with_base: bool = True,
                 two_sided: bool = False) -> list[list[str]]:
    """One line per row of ``results`` ("base" unless ``with_base`` is False, "hfc"): AUC per
    detector, mean AUC (and with ``two_sided`` the two-sided mean, ``two_sided_mean_auc``),
    success, λ."""
    lines = []
    # Rows scored on A_fit (gmm_attack.py --images fit) are marked: the detectors were fitted there.
    part = " [A_fit]" if results.get("images_of") == "A_fit" else ""
    for row in [r for r in ROWS if r in results["success"] and (with_base or r != "base")]:
        lam = results.get("lamda") if row == "hfc" else None
        value, interval = mean_auc(results, row)
        per = {name: results["detectors"].get(name, {}).get(row) for name in DETECTOR_ORDER}
        lines.append([label, (row if row == "base" else _hfc_label(results)) + part]
                     + [cell(m["auc"], m.get("auc_ci")) if m else "-" for m in per.values()]
                     + [cell(value, interval)]
                     + ([cell(two_sided_mean_auc(results, row))] if two_sided else [])
                     + [cell(results["success"][row], (results.get("success_ci") or {}).get(row)),
                        "-" if lam is None else f"{lam:.3g}"])
    return lines


def _hfc_label(results: dict[str, Any]) -> str:
    settings = (results.get("record") or {}).get("settings", {})
    if results.get("lamda") == 0:  # the term is off: only the classification loss tells controls apart
        loss = settings.get("class_loss", "base")
        return "λ = 0 control" + ("" if loss == "base" else f" ({loss} κ {results.get('kappa')})")
    parts = [f"HFC ({settings.get('term', results.get('term', 'paper'))}"]
    if settings.get("exemplars", "train") != "train":
        parts.append(f" of {settings['exemplars']}")
    if settings.get("hfc_layers", "all") != "all":
        layers = results.get("term_layers") or []
        parts.append(f" on {settings['hfc_layers']}" + (f" ({len(layers)} taps)" if len(layers) > 1 else ""))
    if settings.get("class_loss", "base") != "base":
        parts.append(f", {settings['class_loss']} κ {results.get('kappa')}")
    if settings.get("term_after_hit"):
        parts.append(", after hit")
    if settings.get("lamda_fallback"):
        parts.append(", λ fallback")
    if (results.get("mixture_settings") or {}).get("reg_scale", "mean") != "mean":
        parts.append(f", {results['mixture_settings']['reg_scale']} reg")
    if (results.get("mixture_settings") or {}).get("covariance", "full") != "full":
        parts.append(f", {results['mixture_settings']['covariance']} cov")
    return "".join(parts) + f", λ {settings.get('lamda', results.get('lamda'))})"


def format_compare_table(compare: dict[str, Any], fmt: str = "md") -> str:
    """compare.py's table (``compare.json``): one line per row -- success, mean AUC, the AUC of
    every detector, λ and the attack's seconds per image."""
    lines = [["row", "success", "mean AUC", *DETECTOR_ORDER, "λ", "s/image"]]
    number = lambda value, spec=".3f": "-" if value is None else format(value, spec)  # noqa: E731
    for name, row in compare["rows"].items():
        per = row.get("detectors") or {}
        lines.append([name, cell(row["success"], row.get("success_ci")),
                      cell(row.get("mean_auc"), row.get("mean_auc_ci")),
                      *[cell((per.get(d) or {}).get("auc"), (per.get(d) or {}).get("auc_ci")) for d in DETECTOR_ORDER],
                      number(row.get("lamda"), ".3g"), number(row.get("seconds_per_image"), ".3g")])
    title = (f"{compare['dataset']} / {compare['arch']} / {compare['attack']}: adaptive attacks at HFC's schedule "
             f"(eps = {compare['epsilon_256']:g}/256, alpha = {compare['step_size_256']:g}/256, "
             f"T = {compare['steps']}, n_eval = {compare['n_eval']}; detection AUC on A_eval)")
    return render(title, lines, fmt)


def main(argv=None) -> str:
    import argparse

    import utils

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files (gmm_attack.py's)")
    parser.add_argument("--format", default="md", choices=("md", "csv", "text"), help="table format (default: md)")
    parser.add_argument("--label", default="run", choices=("run", "seed", "dataset", "root"),
                        help="what names each row's run: its folder, its seed, its data set, or the folder "
                             "holding its runs_<DATASET>/ (default: run)")
    parser.add_argument("--layers", metavar="DETECTOR", default=None,
                        help="instead of the summary, the AUC of each layer's score of this per-layer detector "
                             "(KD, LID, MAHA, DNN) beside its combined AUC")
    parser.add_argument("--two-sided", action="store_true",
                        help="add the two-sided mean AUC: the mean of max(AUC, 1 - AUC), each detector read in "
                             "the direction that separates the row best (AEs more typical than benign images "
                             "count as seen, not hidden)")
    args = parser.parse_args(argv)
    if args.two_sided and args.layers is not None:
        raise utils.UserError("--two-sided adds a column to the summary table, not to --layers")
    loaded = [(path, utils.read_json(path, "HFC results", "run gmm_attack.py first")) for path in args.results]
    layers: list[str] = []
    if args.layers is not None:
        for _, results in loaded:
            for metrics in results["detectors"].get(args.layers, {}).values():
                layers += [name for name in metrics.get("layer_auc", {}) if name not in layers]
        if not layers:
            raise utils.UserError(f"no per-layer AUCs of {args.layers} in these results (per-layer detectors: "
                                  "KD, LID, MAHA, DNN)")
    lines = ([["run", "row", *layers, f"{args.layers} combined"]] if args.layers is not None
             else [["run", "row", *DETECTOR_ORDER, "mean AUC", *(["two-sided mean AUC"] if args.two_sided else []),
                    "success", "λ"]])
    bases_shown = set()
    for path, results in loaded:
        record = results.get("record") or {}
        run_dir = Path(path).resolve().parents[2]
        label = {"run": f"{run_dir.parent.name}/{run_dir.name}",
                 "seed": f"seed {record.get('settings', {}).get('seed', '?')}",
                 "dataset": f"{results['dataset']} {results['arch']} {results['attack']}",
                 "root": run_dir.parents[1].name}[args.label]
        # The base row of the same run, attack and images is shown once.
        base_key = (str(run_dir), results["attack"], results["n_eval"], results["detector_attack"],
                    results.get("images_of", "A_eval"))
        with_base = base_key not in bases_shown
        lines += (layer_rows(results, args.layers, label, layers, with_base) if args.layers is not None
                  else summary_rows(results, label, with_base=with_base, two_sided=args.two_sided))
        if args.layers is not None and with_base:
            lines += weight_rows(results, args.layers, label, layers, run_dir.parents[1])
        bases_shown.add(base_key)
    command = "python report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    parts = " and ".join(sorted({results.get("images_of", "A_eval") for _, results in loaded}))
    what = f"{args.layers}: AUC of each layer's score on {parts}" if args.layers is not None else f"AUC on {parts}"
    table = render(f"{what} ({command})", lines, args.format)
    print(table)
    return table


if __name__ == "__main__":
    import utils

    utils.run_cli(main)
