"""The paper-style table of every HFC result under some runs folders, without re-scoring anything.

Reads every ``results.json`` (gmm_attack.py's) under the given runs folders (default: every
``runs_*/`` in the current folder; a results.json file may be given too) and writes one table:
a row per data set × arch × base attack × {base, +HFC}, one +HFC row per results folder,
labelled by its settings key (``hfc_<key>``); columns: each detector's AUC [95% CI] and TNR@90,
the mean AUC [CI] and the success rate [CI] (the bootstrap intervals of ``evaluation.score_table``;
results written before them print without). The same cell found for several seeds (the record's
seed differs, every other setting is the same, e.g. ``fd0/runs_synthetic``, ``fd1/...``) is one
row of mean ± sd over the seeds. The base row of a run is the one every HFC result of it repeats.

    python tables.py fd0/runs_synthetic fd1/runs_synthetic fd2/runs_synthetic --out tables

Writes ``<out>/table.md``, ``table.csv`` and ``table.json`` (every number, per seed, with its
interval and the files it came from), and prints the table.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cli
import report
import runs
import utils

FORMATS = ("md", "csv", "text")
FILES = {"md": "table.md", "csv": "table.csv", "json": "table.json"}
# Settings that identify a base row (the AEs and the detectors that score them); the other HFC
# settings only change the HFC row.
BASE_SETTINGS = ("dataset", "arch", "attack", "detector", "noise", "limit")


@dataclass
class Config:
    folders: list[str] = field(default_factory=list)  # positional: runs folders or results.json files
    out: str = cli.flag("tables", "folder the table is written to (table.md, table.csv, table.json)")
    format: str = cli.flag("md", "format of the printed table", choices=FORMATS)

    @classmethod
    def from_argv(cls, argv=None) -> Config:
        parser = cli.parser_for(cls)
        parser.add_argument("folders", nargs="*", metavar="RUNS",
                            help="runs folders (runs_<DATASET>/) or results.json files "
                                 "(default: every runs_*/ in the current folder)")
        return cls(**vars(parser.parse_args(argv)))


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


# ----------------------------------------------------------------------------------- reading

def results_files(folders: list[str]) -> list[Path]:
    """Every results.json under the folders (sorted, each once); a UserError for a missing path,
    a folder without any, or no runs_*/ folder in the cwd when none is given."""
    if not folders:
        found = sorted(p for p in Path.cwd().glob("runs_*") if p.is_dir())
        if not found:
            raise utils.UserError(f"no runs_*/ folder in {Path.cwd()}; name the runs folders to tabulate")
        folders = [str(p) for p in found]
    files: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_file():
            files.append(folder)
        elif folder.is_dir():
            inside = sorted(folder.rglob(runs.RESULTS))
            if not inside:
                raise utils.UserError(f"no {runs.RESULTS} under {folder}; run gmm_attack.py first")
            files += inside
        else:
            raise utils.UserError(f"no such runs folder or results file: {folder}")
    unique = {p.resolve(): p for p in files}
    return [unique[key] for key in sorted(unique)]


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _replicate(results: dict[str, Any], row: str, seed: Any, source: str) -> dict[str, Any]:
    """One row of one results file: its numbers and intervals."""
    dets = {name: {"auc": per_row[row]["auc"], "auc_ci": per_row[row].get("auc_ci"),
                   "tnr90": per_row[row]["tnr90"], "tnr90_ci": per_row[row].get("tnr90_ci")}
            for name, per_row in results["detectors"].items() if row in per_row}
    mean, mean_ci = report.mean_auc(results, row)
    return {"seed": seed, "source": source, "n_eval": results.get("n_eval"), "detectors": dets,
            "mean_auc": mean, "mean_auc_ci": mean_ci, "success": results["success"][row],
            "success_ci": (results.get("success_ci") or {}).get(row)}


def collect(files: list[Path]) -> list[dict[str, Any]]:
    """The table's rows, each with the replicates (one per seed) it is made of, in table order."""
    groups: dict[tuple, dict[str, Any]] = {}
    for path in files:
        results = utils.read_json(path, "HFC results", "run gmm_attack.py first")
        if not isinstance(results, dict) or not {"detectors", "success", "attack"} <= set(results):
            raise utils.UserError(f"{path} is not an HFC results file (gmm_attack.py's results.json)")
        settings = dict((results.get("record") or {}).get("settings") or {})
        seed = settings.pop("seed", None)
        run_dir = path.resolve().parents[2]
        key = path.parent.name.removeprefix("hfc_")
        ident = {"dataset": results.get("dataset"), "arch": results.get("arch"), "run": run_dir.name,
                 "attack": results["attack"], "detector_attack": results.get("detector_attack", results["attack"])}
        base_settings = {k: settings.get(k) for k in BASE_SETTINGS}
        for row in [r for r in report.ROWS if r in results["success"]]:
            if row == "base":
                group_key = (*ident.values(), "base", _frozen(base_settings))
                replicate_id = str(run_dir)  # a run's base row is repeated by each of its HFC results
                label = "base" + ("" if ident["detector_attack"] == ident["attack"]
                                  else f" (detectors: {ident['detector_attack']})")
            else:
                group_key = (*ident.values(), "hfc", _frozen(settings) if settings else key)
                replicate_id = str(path.resolve())
                label = f"+HFC {key}"
            group = groups.setdefault(group_key, {**ident, "row": row, "label": label, "key": key if row != "base"
                                                  else None, "replicates": {}})
            replicate = _replicate(results, row, seed, str(path))
            first = group["replicates"].setdefault(replicate_id, replicate)
            if first is not replicate and (first["detectors"], first["success"]) != (replicate["detectors"],
                                                                                    replicate["success"]):
                print(f"warning: the base row of {path} differs from that of {first['source']} (made from other "
                      f"detectors or images?); the table shows the latter's", file=sys.stderr)

    def order(group):
        return (str(group["dataset"]), str(group["arch"]), group["run"], group["attack"], group["detector_attack"],
                group["row"] != "base", group["label"])
    rows = sorted(groups.values(), key=order)
    for group in rows:
        group["replicates"] = sorted(group["replicates"].values(),
                                     key=lambda r: (r["seed"] is None, str(r["seed"]), r["source"]))
    return rows


# ----------------------------------------------------------------------------------- numbers

def statistic(values: list[float | None], intervals: list | None = None) -> dict[str, Any]:
    """Over the replicates: the values, their mean, sd (over ≥ 2 seeds) and, for one, its interval."""
    present = [v for v in values if v is not None]
    mean = sum(present) / len(present) if present else None
    sd = (math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
          if len(present) >= 2 else None)
    ci = intervals[0] if intervals and len(values) == 1 else None
    return {"values": values, "mean": mean, "sd": sd, "ci": ci}


def text(stat: dict[str, Any], with_ci: bool = True) -> str:
    """``0.790 [0.680, 0.880]`` for one seed, ``0.790 ± 0.020`` over several, "-" for none."""
    if stat["mean"] is None:
        return "-"
    if stat["sd"] is not None:
        return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"
    return report.cell(stat["mean"], stat["ci"] if with_ci else None)


def detector_names(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's seven, then any other detector found (in the order first met)."""
    seen = [name for row in rows for rep in row["replicates"] for name in rep["detectors"]]
    return list(report.DETECTOR_ORDER) + [n for n in dict.fromkeys(seen) if n not in report.DETECTOR_ORDER]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON rows: every number as ``statistic`` (per seed values, mean, sd, interval)."""
    names = detector_names(rows)
    out = []
    for row in rows:
        reps = row["replicates"]
        dets = {}
        for name in names:
            per = [rep["detectors"].get(name) for rep in reps]
            if all(p is None for p in per):
                continue
            dets[name] = {metric: statistic([p[metric] if p else None for p in per],
                                            [p[f"{metric}_ci"] if p else None for p in per])
                          for metric in ("auc", "tnr90")}
        out.append({key: row[key] for key in ("dataset", "arch", "run", "attack", "detector_attack", "row", "label",
                                              "key")}
                   | {"seeds": [rep["seed"] for rep in reps], "n_eval": [rep["n_eval"] for rep in reps],
                      "sources": [rep["source"] for rep in reps], "detectors": dets,
                      "mean_auc": statistic([rep["mean_auc"] for rep in reps], [rep["mean_auc_ci"] for rep in reps]),
                      "success": statistic([rep["success"] for rep in reps], [rep["success_ci"] for rep in reps])})
    return out


def lines_of(json_rows: list[dict[str, Any]], names: list[str]) -> list[list[str]]:
    """The printed table: a header and one line per row."""
    header = ["data set", "arch", "attack", "row", "seeds", "n_eval"]
    for name in names:
        header += [f"{name} AUC", f"{name} TNR@90"]
    header += ["mean AUC", "success"]
    lines = [header]
    for row in json_rows:
        arch = row["arch"] if row["run"] == row["arch"] else f"{row['arch']} ({row['run']})"
        n_eval = sorted({n for n in row["n_eval"] if n is not None})
        cells = [str(row["dataset"]), str(arch), row["attack"], row["label"],
                 ", ".join("?" if s is None else str(s) for s in row["seeds"]),
                 "-" if not n_eval else str(n_eval[0]) if len(n_eval) == 1 else f"{n_eval[0]}–{n_eval[-1]}"]
        for name in names:
            det = row["detectors"].get(name)
            cells += [text(det["auc"]), text(det["tnr90"], with_ci=False)] if det else ["-", "-"]
        cells += [text(row["mean_auc"]), text(row["success"])]
        lines.append(cells)
    return lines


# ----------------------------------------------------------------------------------- the stage

def run(config: Config) -> dict:
    """Collect every results.json, write table.md / table.csv / table.json under ``config.out``."""
    if config.format not in FORMATS:
        raise utils.UserError(f"--format must be one of {', '.join(FORMATS)}, not {config.format!r}")
    files = results_files(list(config.folders))
    rows = collect(files)
    names = detector_names(rows)
    json_rows = table_rows(rows)
    lines = lines_of(json_rows, names)
    command = "python tables.py " + " ".join(config.folders or ["(every runs_*/)"])
    title = (f"Detection on A_eval: AUC [95% bootstrap CI by image] and TNR@90 per detector, mean AUC, success; "
             f"over several seeds mean ± sd ({command})")
    table = {"title": title, "columns": lines[0], "detectors": names, "rows": json_rows,
             "files": [str(p) for p in files]}
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise utils.UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_bytes(out / FILES["md"], report.render(title, lines, "md").encode())
    utils.atomic_write_bytes(out / FILES["csv"], report.render(title, lines, "csv").encode())
    utils.write_json(out / FILES["json"], table)
    print(report.render(title, lines, config.format))
    print(f"{len(json_rows)} rows from {len(files)} results files -> {out}/{{{', '.join(FILES.values())}}}",
          file=sys.stderr)
    return table


if __name__ == "__main__":
    utils.run_cli(main)
