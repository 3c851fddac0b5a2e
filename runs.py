"""The runs directory: where every artifact lives, which stage makes it, and what it was made from.

``Run`` is the one owner of the layout of ``runs_<DATASET>/<name or arch>/``: every stage asks it
for the paths it reads and writes, and for the "run X first" hint naming the stage that makes a
missing artifact (with every flag that selects the run: ``-a``, ``-n``, ``--dataset``).

Every stage ends by writing a ``summary.json`` next to its artifacts with a ``record``: the stage,
its resolved settings, the code version, and the fingerprints (sha256) of the artifacts it read
(``inputs``) and wrote (``outputs``). Whether a stage is done for some settings, and whether its
outputs are stale because an input was re-made since, is answered from that record
(``Record.matches``, ``stale_inputs``), never from folder names.

    runs_<DATASET>/<arch>/
      split.json, checkpoint.pt, train_summary.json           train.py
      <ATTACK>/adv.npz, summary.json                          gen_base_adv.py (Noise_*: extract_features.py)
      <ATTACK>/detectors/                                     extract_features.py
      <ATTACK>/hfc_<key>/adv.npz, results.json, results.md    gmm_attack.py
      <ATTACK>/compare/compare.json, <row>/adv.npz, row.json  compare.py
      gmm_M<y>/mixtures.npz, summary.json                     get_GMM.py
      features/<part>/features.npz, summary.json              the first stage that needs them (cache)
      stress/stress.json, <piece>/                            stress_test.py
      ood/ood.json, radius<r>/                                ood_lesion.py
      sweeps/m_sweep.json, lambda_sweep.json                  sweeps.py
      <ATTACK>/transfer/<surrogate>/transfer.json             transfer.py
      report/                                                 reproduce.py
"""
from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets
from utils import UserError, read_json, replacing_dir, write_json

# Which script makes which artifact (for hints and for the README's layout).
STAGE_SCRIPTS = {"train": "train.py", "attack": "gen_base_adv.py", "noise": "extract_features.py",
                 "detectors": "extract_features.py", "mixtures": "get_GMM.py", "hfc": "gmm_attack.py",
                 "report": "reproduce.py", "compare": "compare.py", "stress": "stress_test.py",
                 "ood": "ood_lesion.py", "sweeps": "sweeps.py", "transfer": "transfer.py"}
SUMMARY = "summary.json"
SPLIT = "split.json"
CHECKPOINT = "checkpoint.pt"
TRAIN_SUMMARY = "train_summary.json"
AE_FILE = "adv.npz"
MIXTURES = "mixtures.npz"
RESULTS = "results.json"


@dataclass(frozen=True)
class Run:
    """One trained model's folder and everything made from it."""

    dataset: str
    arch: str
    name: str | None = None
    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "dataset", datasets.get(self.dataset).name)
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, config) -> "Run":
        """The run a stage's config selects (its ``dataset``, ``arch`` and ``name``)."""
        return cls(config.dataset, config.arch, config.name)

    @property
    def dir(self) -> Path:
        return self.root / f"runs_{self.dataset}" / (self.name or self.arch)

    # -- the artifacts, by the stage that makes them
    @property
    def split(self) -> Path:
        return self.dir / SPLIT

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def train_summary(self) -> Path:
        return self.dir / TRAIN_SUMMARY

    def ae_dir(self, attack: str) -> Path:
        return self.dir / attack

    def detectors_dir(self, attack: str) -> Path:
        return self.dir / attack / "detectors"

    def mixtures_dir(self, num_component: int) -> Path:
        return self.dir / f"gmm_M{num_component}"

    def hfc_dir(self, attack: str, key: str) -> Path:
        return self.dir / attack / f"hfc_{key}"

    def compare_dir(self, attack: str) -> Path:
        return self.dir / attack / "compare"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    # -- hints
    def select_flags(self) -> str:
        """The flags that select this run, to paste into a command."""
        return f"-a {self.arch}" + (f" -n {self.name}" if self.name else "") + f" --dataset {self.dataset}"

    def hint(self, stage: str, extra: str = "", when: str = "first") -> str:
        """``run <script> <flags selecting this run> <extra> first`` (``when="again"`` for an
        artifact that exists but is stale)."""
        return f"run {STAGE_SCRIPTS[stage]} {self.select_flags()}{' ' + extra if extra else ''} {when}"


# ----------------------------------------------------------------------------------- provenance

@lru_cache(maxsize=256)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's content (cached per path, size and modification time)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise UserError(f"missing {path}") from None
    return _fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def array_digest(array) -> str:
    """sha256 of an array's dtype, shape and bytes (to record which images a set holds)."""
    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code (``+dirty`` when the work tree has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def record(stage: str, settings: dict[str, Any], inputs: dict[str, str | Path],
           outputs: Iterable[str | Path] = (), folder: str | Path | None = None) -> dict[str, Any]:
    """The provenance block a stage writes into its summary: what it was asked, from what, by what code.

    ``inputs`` maps a role ("checkpoint", "attack_set", ...) to an artifact file; its fingerprint
    is recorded. ``outputs`` are the stage's own artifact files, written before the summary and
    recorded by their path relative to ``folder`` (the summary's folder; default: the first
    output's folder)."""
    outputs = [Path(p) for p in outputs]
    base = Path(folder) if folder is not None else (outputs[0].parent if outputs else Path("."))
    return {"stage": stage, "settings": settings, "code_version": code_version(),
            "inputs": {role: {"path": str(path), "sha256": fingerprint(path)} for role, path in inputs.items()},
            "outputs": {path.relative_to(base).as_posix(): fingerprint(path) for path in outputs}}


def read_record(summary_path: Path) -> dict[str, Any] | None:
    """The record of a stage's summary, or None when there is no readable summary with one."""
    if not Path(summary_path).is_file():
        return None
    try:
        summary = read_json(summary_path, "stage summary")
    except UserError:
        return None
    rec = summary.get("record") if isinstance(summary, dict) else None
    return rec if isinstance(rec, dict) else None


def stale_inputs(rec: dict[str, Any], inputs: dict[str, str | Path]) -> list[str]:
    """The roles among ``inputs`` whose current content differs from what ``rec`` was made from
    (or that ``rec`` does not list)."""
    made_from = rec.get("inputs", {})
    stale = []
    for role, path in inputs.items():
        entry = made_from.get(role)
        if not isinstance(entry, dict) or not Path(path).is_file() or entry.get("sha256") != fingerprint(path):
            stale.append(role)
    return stale


def outputs_intact(rec: dict[str, Any], folder: Path) -> bool:
    """Whether every output the record lists is still there with the content it was written with."""
    outputs = rec.get("outputs", {})
    return bool(outputs) and all((folder / name).is_file() and fingerprint(folder / name) == digest
                                 for name, digest in outputs.items())


def is_done(summary_path: Path, settings: dict[str, Any], inputs: dict[str, str | Path],
            compare: Iterable[str] | None = None) -> bool:
    """Whether the stage whose summary is ``summary_path`` was made with these ``settings`` (only
    the keys in ``compare`` when given) from inputs with the current content, and its outputs are
    intact."""
    rec = read_record(summary_path)
    if rec is None:
        return False
    keys = list(settings) if compare is None else list(compare)
    made_with = rec.get("settings", {})
    if any(made_with.get(k) != settings.get(k) for k in keys):
        return False
    return not stale_inputs(rec, inputs) and outputs_intact(rec, Path(summary_path).parent)


def require_fresh(summary_path: Path, inputs: dict[str, str | Path], what: str, remake: str) -> None:
    """Refuse (one line) to use an artifact whose inputs changed since it was made."""
    rec = read_record(summary_path)
    if rec is None:
        raise UserError(f"{what} in {Path(summary_path).parent} has no provenance record (made by an older "
                        f"version?); {remake}")
    stale = stale_inputs(rec, inputs)
    if stale:
        raise UserError(f"{what} in {Path(summary_path).parent} is stale: its {', '.join(stale)} "
                        f"({', '.join(str(inputs[s]) for s in stale)}) changed since it was made; {remake}")


PIECE_FILE = "piece.json"


class Piece:
    """One resumable unit of a long stage (an attacker's AEs, one ε × layer of the stress test, ...):
    a folder with its outputs and ``piece.json`` (the result, and the record: settings, inputs'
    sha256, outputs' sha256). ``done()`` when the record has these settings, the inputs are
    unchanged and the outputs intact; ``write`` builds the folder beside the old one and swaps it
    in whole, so a stage cut off mid-way keeps every finished piece. A stage names itself in
    ``stage`` (a subclass attribute)."""
    stage = "piece"

    def __init__(self, folder: Path, settings: dict[str, Any], inputs: dict[str, Path]):
        self.folder, self.settings, self.inputs = Path(folder), settings, inputs

    @property
    def file(self) -> Path:
        return self.folder / PIECE_FILE

    def done(self) -> bool:
        return is_done(self.file, self.settings, self.inputs)

    @property
    def name(self) -> str:
        return self.folder.name

    def result(self) -> dict[str, Any]:
        return read_json(self.file, f"{self.stage} piece")["result"]

    def write(self, result: dict[str, Any], write_outputs: Callable[[Path], list[Path]]) -> dict[str, Any]:
        """Write the outputs (``write_outputs(staging) -> files``, at least one) and the record; returns
        the result as JSON has it, like a reused one."""
        with replacing_dir(self.folder) as staging:
            outputs = write_outputs(staging)
            rec = record(self.stage, self.settings, self.inputs, outputs, folder=staging)
            write_json(staging / PIECE_FILE, {"piece": self.folder.name, "result": result, "record": rec})
        return self.result()
