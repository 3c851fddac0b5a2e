"""Small shared helpers: errors for the CLI, devices, seeds, run directories, atomic I/O."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main()``; turn a UserError (or a missing file) into one line and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def canonical_dataset(name: str) -> str:
    """Case-insensitive data-set name -> its canonical spelling (from ``datasets.REGISTRY``)."""
    import datasets  # here, not at the top: datasets imports utils
    return datasets.get(name).name


def run_dir(dataset: str, arch: str, name: str | None = None, root: str | Path = ".") -> Path:
    """``runs_<DATASET>/<name or arch>/`` -- where every stage reads and writes its artifacts."""
    return Path(root) / f"runs_{canonical_dataset(dataset)}" / (name or arch)


def get_device(flag: str | None = None) -> torch.device:
    """``--device`` value -> torch.device; default: CUDA when present, else CPU."""
    if flag in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as err:
        raise UserError(f"invalid --device {flag!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {flag} asked for CUDA but no CUDA device is available")
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path, what: str = "file", hint: str = "") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {what} {path}" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"corrupt {what} {path}: {err}") from None


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save arrays as .npz atomically. Object arrays are refused (they would need pickle)."""
    path = Path(path)
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"array {key!r} has dtype object; it would need pickle")
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | Path, what: str = "arrays", hint: str = "") -> dict[str, np.ndarray]:
    """Load every array of an .npz (never with pickle) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {what} {path}" + (f"; {hint}" if hint else ""))
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"corrupt {what} {path}: {err}") from None


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float32 N×3×H×W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def batches(n: int, batch_size: int):
    """Yield slices covering range(n) in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def prepare_runtime(device_flag: str | None, seed: int, threads: int | None = None) -> torch.device:
    """The common start of every stage: CPU threads, the device, deterministic cuDNN, the seed."""
    if threads:
        torch.set_num_threads(threads)
    device = get_device(device_flag)
    if device.type == "cuda":
        # Same seed -> same arrays: no autotuned (possibly non-deterministic) conv algorithms.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    set_seed(seed)
    return device


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A stage script's parser, with the flags that locate its run: ``-a``, ``-n``, ``--dataset``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-a", "--arch", default="resnet50", help="model architecture (default: resnet50)")
    parser.add_argument("-n", "--name", default=None, help="run name under runs_<DATASET>/ (default: the arch)")
    parser.add_argument("--dataset", default="synthetic", help="APTOS, CXR or synthetic (default: synthetic)")
    return parser


def add_runtime_flags(parser: argparse.ArgumentParser, seed_help: str = "seed of every random choice") -> None:
    """``--seed``, ``--device`` and ``--threads`` (see ``prepare_runtime``)."""
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
