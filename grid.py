"""The papers' main table as one command: a grid of runs, its stages run as Ray tasks.

    python grid.py grids/cpu.toml                      # a local Ray on this machine
    python grid.py grids/paper.toml --address auto     # join a running Ray cluster
    python grid.py grids/cpu.toml --dry-run            # list the tasks and which are done

The grid file (TOML, or JSON with the same keys) lists data sets, archs, base attacks, the
attack whose detectors score every row, M, λ and seeds; ``grids/cpu.toml`` is the CPU-sized
example. Each cell (data set × arch × seed × attack × M × λ) is the main job's chain of stages
(``reproduce.plan``): train once per data set × arch × seed, each base attack once, the
detectors once, the mixtures once per M, HFC once per cell. A stage whose artifacts are up to
date (its record says it was made with the same settings from the current inputs) is skipped
before Ray starts, so a finished grid is checked in seconds and runs nothing. The rest run as
Ray tasks, each after the tasks whose artifacts it reads, each asking Ray for the CPUs it uses
(``--cpus-per-task``, also its torch threads) and for a GPU when CUDA is present. A task that
fails is reported with its stage, its cell and the last line of its error; the tasks that need
its artifacts are not run, and every other task goes on. At the end ``tables.py`` writes the
paper-style table of every result under the grid's runs folders.

Writes ``<root>/grid_summary.json`` (every task: stage, cell, status, seconds, error) and
``<root>/<--tables>/table.{md,csv,json}``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import cli
import datasets
import reproduce
import tables
import utils

REPO = Path(__file__).resolve().parent
# Keys of a grid file, with their defaults; each list key crosses with the others.
GRID_KEYS = {
    "datasets": None,                  # required: [{name, data_root?, image_size?, epochs?, max_train_per_class?, limit?}]
    "archs": ["resnet50"],
    "attacks": ["I_FGSM_Linf_1"],      # base attacks, one row pair (base, +HFC) each
    "detector_attack": None,           # the attack whose fitted detectors score every row (default: each row's own)
    "num_components": [8],             # M
    "lamdas": ["auto"],                # λ, or "auto"
    "seeds": [0],
    "stages": {},                      # {stage: {field: value}}: any stage setting the main job has no flag for
}
DATASET_KEYS = ("name", "data_root", "image_size", "epochs", "max_train_per_class", "limit", "stages")
STAGES = ("train", "attack", "detector_attack", "detectors", "mixtures", "hfc")
# Which stages' artifacts each stage reads (reproduce.plan's stage names; where a row's own attack
# fits the detectors, its "attack" stage is also its "detector_attack").
NEEDS = {"train": (), "attack": ("train",), "detector_attack": ("train",), "detectors": ("detector_attack",),
         "mixtures": ("train",), "hfc": ("attack", "detectors", "mixtures")}


@dataclass
class Config:
    grid: str = ""  # positional: the grid file
    address: str | None = cli.flag(None, "Ray cluster to join, e.g. auto or ray://host:10001 (default: start a "
                                         "local Ray on this machine)")
    root: str = cli.flag(".", "folder the runs_<DATASET>/ folders are made in")
    cpus: int | None = cli.flag(None, "CPUs a local Ray may use (default: all of this machine's)",
                                check=cli.at_least(1))
    cpus_per_task: int = cli.flag(1, "CPUs each task asks for; also its torch threads and mixture fits",
                                  check=cli.at_least(1))
    gpus_per_task: float = cli.flag(1.0, "GPUs each task asks for when CUDA is present (a fraction shares one)",
                                    check=cli.positive)
    device: str | None = cli.flag(None, "cpu, cuda, ... for every task (default: cuda where present)")
    dry_run: bool = cli.flag(False, "list the tasks and which are done; run nothing")
    tables: str = cli.flag("tables", "folder under --root for the table of the grid's results")

    @classmethod
    def from_argv(cls, argv=None) -> Config:
        parser = cli.parser_for(cls)
        parser.add_argument("grid", metavar="GRID", help="grid file (.toml or .json)")
        return cls(**vars(parser.parse_args(argv)))


@dataclass
class Task:
    """One stage of one or more cells (cells that share it share the task)."""
    key: str                       # the stage's summary path: what makes two cells' stages one task
    stage: reproduce.Stage
    cell: str                      # the first cell that needs it, for messages
    needs: list[str] = field(default_factory=list)
    status: str = "pending"        # done (skipped), ok, failed, blocked
    seconds: float | None = None
    error: str | None = None


# ----------------------------------------------------------------------------------- the grid

def read_grid(path: str | Path) -> dict[str, Any]:
    """The grid file's settings, every key checked; a UserError naming a bad one."""
    path = Path(path)
    if not path.is_file():
        raise utils.UserError(f"no such grid file: {path}")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            import tomllib  # Python 3.11+
            raw = tomllib.loads(path.read_text())
    except ImportError:
        raise utils.UserError("a TOML grid needs Python 3.11 or later; write the grid as .json") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise utils.UserError(f"{path} is not a valid {path.suffix.lstrip('.') or 'TOML'} file: {error}") from None
    if not isinstance(raw, dict):
        raise utils.UserError(f"{path}: expected a table of settings")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise utils.UserError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(GRID_KEYS)}")
    grid = {key: raw.get(key, default) for key, default in GRID_KEYS.items()}
    if not grid["datasets"]:
        raise utils.UserError(f"{path}: list at least one [[datasets]] entry with a name")
    for key in ("archs", "attacks", "num_components", "lamdas", "seeds"):
        if not isinstance(grid[key], list) or not grid[key]:
            raise utils.UserError(f"{path}: {key} must be a non-empty list")
    for entry in grid["datasets"]:
        if not isinstance(entry, dict) or "name" not in entry:
            raise utils.UserError(f"{path}: each datasets entry needs a name, e.g. {{name = \"CXR\"}}")
        extra = sorted(set(entry) - set(DATASET_KEYS))
        if extra:
            raise utils.UserError(f"{path}: unknown datasets key(s) {', '.join(extra)}; known: {', '.join(DATASET_KEYS)}")
        datasets.get(entry["name"])  # an unknown name stops here, with the list
    for where in [grid] + grid["datasets"]:
        stages = where.get("stages") or {}
        if not isinstance(stages, dict) or set(stages) - set(STAGES) or \
                not all(isinstance(v, dict) for v in stages.values()):
            raise utils.UserError(f"{path}: stages must be tables named after stages ({', '.join(STAGES)}), "
                                  f"e.g. [stages.hfc] term = \"normalised\"")
    grid["lamdas"] = [str(v) for v in grid["lamdas"]]
    return grid


def overrides_of(grid: dict[str, Any], entry: dict[str, Any], config: Config) -> dict[str, dict]:
    """The stage settings a cell of data set ``entry`` changes: the grid's, then the data set's."""
    merged = {"mixtures": {"jobs": config.cpus_per_task}}
    for stages in (grid.get("stages") or {}, entry.get("stages") or {}):
        for stage, changes in stages.items():
            merged[stage] = {**merged.get(stage, {}), **changes}
    return merged


def cells(grid: dict[str, Any], config: Config) -> list[tuple[str, reproduce.Config, str | None, dict]]:
    """(label, the cell's main-job config, its detector attack, its stage overrides) for every cell."""
    several_seeds = len(grid["seeds"]) > 1
    root = Path(config.root).resolve()
    # A data root is recorded in the model's provenance as the absolute, resolved folder, so the
    # same images reached through another relative path or link are the same setting.
    entries = [{**entry, "data_root": str((root / entry["data_root"]).resolve())} if entry.get("data_root")
               else entry for entry in grid["datasets"]]
    out = []
    for entry, arch, seed, attack, m, lam in product(entries, grid["archs"], grid["seeds"],
                                                     grid["attacks"], grid["num_components"], grid["lamdas"]):
        name = f"{arch}_seed{seed}" if several_seeds else None
        job = reproduce.Config(arch=arch, name=name, dataset=entry["name"], seed=seed, device=config.device,
                               threads=config.cpus_per_task, attack=attack, num_component=m, lamda=lam,
                               **{k: entry[k] for k in DATASET_KEYS[1:-1] if k in entry})
        label = f"{job.dataset}/{name or arch}/{job.attack}/M{m}/λ{lam}"
        overrides = overrides_of(grid, entry, config)
        if (grid["detector_attack"] or attack) == attack:
            overrides.pop("detector_attack", None)  # the row's own attack: no second base attack
        out.append((label, job, grid["detector_attack"], overrides))
    return out


def tasks_of(grid: dict[str, Any], config: Config) -> dict[str, Task]:
    """Every stage of every cell, once: keyed by the stage's summary path."""
    tasks: dict[str, Task] = {}
    for label, job, detector, overrides in cells(grid, config):
        try:
            stages = reproduce.plan(job, overrides, detector_attack=detector)
        except TypeError as error:  # a stages table names a field the stage does not have
            raise utils.UserError(f"{config.grid}: {error}") from None
        keys = {stage.name: str(stage.summary.resolve()) for stage in stages}
        keys.setdefault("detector_attack", keys["attack"])
        for stage in stages:
            key = keys[stage.name]
            if key not in tasks:
                needs = [keys[n] for n in NEEDS[stage.name] if keys[n] != key]
                tasks[key] = Task(key, stage, label, list(dict.fromkeys(needs)))
    return tasks


# ----------------------------------------------------------------------------------- running

def execute(stage: reproduce.Stage, root: str, *upstream: dict) -> dict:
    """Run one stage in ``root`` (a Ray task's body): its status, seconds and the last line of its
    error. Not run when a stage it needs failed."""
    if any(not result["ok"] for result in upstream):
        return {"ok": False, "blocked": True, "error": "not run: a stage it needs failed"}
    os.chdir(root)
    start = time.perf_counter()
    try:
        stage.call(stage.config)
    except BaseException as error:  # noqa: BLE001 - reported with its stage; the grid goes on
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return {"ok": False, "seconds": time.perf_counter() - start,
                "error": f"{type(error).__name__}: {lines[-1]}"}
    return {"ok": True, "seconds": time.perf_counter() - start}


def start_ray(config: Config):
    """A local Ray (the default) or the cluster at --address, with this repository importable."""
    import ray

    if config.address:
        excludes = [".git", ".venv", "runs_*", "datasets", "*.pt", "*.npz", ".cache"]
        ray.init(address=config.address, runtime_env={"working_dir": str(REPO), "excludes": excludes},
                 log_to_driver=True)
    else:
        ray.init(num_cpus=config.cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}})
    return ray


def run_tasks(todo: list[Task], config: Config, root: Path) -> None:
    """Submit every task to Ray, each with the results of the tasks it needs as arguments (Ray runs
    it after them); wait for all, recording each one's status."""
    import torch
    from tqdm import tqdm

    ray = start_ray(config)
    try:
        gpus = config.gpus_per_task if torch.cuda.is_available() else 0
        remote = ray.remote(execute).options(num_cpus=config.cpus_per_task, num_gpus=gpus, max_retries=0)
        refs: dict[str, Any] = {}
        for task in todo:  # in plan order, so every task's needs were submitted before it
            upstream = [refs[k] for k in task.needs if k in refs]  # the others are up to date
            refs[task.key] = remote.remote(task.stage, str(root), *upstream)
        task_of = {refs[task.key]: task for task in todo}
        pending = list(refs.values())
        with tqdm(total=len(pending), desc="grid tasks", unit="task") as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                task = task_of[ready[0]]
                result = ray.get(ready[0])
                task.seconds = result.get("seconds")
                task.status = "ok" if result["ok"] else "blocked" if result.get("blocked") else "failed"
                task.error = result.get("error")
                if task.status == "failed":
                    tqdm.write(f"FAILED {task.stage.name} of {task.cell} "
                               f"({json.dumps(task.stage.config.settings(), default=str)}): {task.error}")
                bar.update(1)
    finally:
        ray.shutdown()


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def run(config: Config) -> dict:
    """Expand the grid, run what is not up to date, write the summary and the table; returns the summary."""
    started = time.perf_counter()
    grid = read_grid(config.grid)
    root = Path(config.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(root)  # the stages' run folders are relative to the working folder
    try:
        tasks = tasks_of(grid, config)
        for task in tasks.values():
            if task.stage.is_done():
                task.status = "done"
    finally:
        os.chdir(cwd)
    todo = [t for t in tasks.values() if t.status == "pending"]
    n_cells = len(cells(grid, config))
    print(f"grid {config.grid}: {n_cells} cells, {len(tasks)} tasks, "
          f"{len(tasks) - len(todo)} up to date, {len(todo)} to run")
    for task in todo if config.dry_run else []:
        print(f"  {task.stage.name:16s} {task.cell}")
    if todo and not config.dry_run:
        run_tasks(todo, config, root)

    counts = {s: sum(t.status == s for t in tasks.values()) for s in ("done", "ok", "failed", "blocked", "pending")}
    table = None
    folders = [str(root / f"runs_{datasets.get(e['name']).name}") for e in grid["datasets"]]
    folders = [f for f in dict.fromkeys(folders) if Path(f).is_dir()]
    if folders and not config.dry_run:
        try:
            table = tables.run(tables.Config(folders=folders, out=str(root / config.tables)))
        except utils.UserError as error:  # no results yet (every HFC task failed): the summary says so
            print(f"no table: {error}")
    summary = {"grid": str(config.grid), "root": str(root), "settings": dict(vars(config)),
               "cells": n_cells, "counts": counts, "seconds": time.perf_counter() - started,
               "table": str(root / config.tables) if table else None,
               "tasks": [{"stage": t.stage.name, "cell": t.cell, "summary": t.key, "status": t.status,
                          "seconds": t.seconds, "error": t.error} for t in tasks.values()]}
    if not config.dry_run:
        utils.write_json(root / "grid_summary.json", summary)
    failed = [t for t in tasks.values() if t.status == "failed"]
    print(f"grid: {counts['done']} up to date, {counts['ok']} run, {counts['failed']} failed, "
          f"{counts['blocked']} not run (a stage they need failed)"
          + (f", {counts['pending']} to run (--dry-run)" if config.dry_run else "") + f"; {summary['seconds']:.0f} s")
    for task in failed:
        print(f"  failed: {task.stage.name} of {task.cell}: {task.error}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
