"""Small shared helpers: errors for the CLI, devices, seeds, run directories, atomic I/O."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; an artifact gets the mode ``open`` would give it (0666 less the umask)
    # so that colleagues sharing the runs folder can read it.
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


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


@contextlib.contextmanager
def replacing_dir(final: str | Path):
    """Write a folder's new content into a temporary sibling, then swap it into place: the old
    folder stays whole until the new one is complete (an error or an interrupt leaves it as it was)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        retired = None
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, retired / final.name)
        os.replace(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise UserError(f"corrupt {what} {path}: {err}" + (f"; {hint}" if hint else "")) from None


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
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array, not an archive
            raise ValueError("not an .npz archive")
        with data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"corrupt {what} {path} ({err})" + (f"; {hint}" if hint else "")) from None


def cache_dir_default() -> Path:
    """Where decoded or generated images are cached: ``$HFC_CACHE_DIR`` or ``.cache/``."""
    return Path(os.environ.get("HFC_CACHE_DIR") or ".cache")


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 channel-last -> float32 channel-first in [0, 1]: N×H×W×3 -> N×3×H×W, and volumes
    N×D×H×W×1 -> N×1×D×H×W."""
    # An image batch keeps the channel-last strides (oneDNN's faster 2D layout); a volume batch is
    # made contiguous (its 3D convolutions are faster so).
    floats = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, 1).float().div_(255.0)
    return floats if floats.dim() == 4 else floats.contiguous()


def batches(n: int, batch_size: int):
    """Yield slices covering range(n) in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def prepare_runtime(device_flag: str | None, seed: int, threads: int | None = None) -> torch.device:
    """The common start of every stage: CPU threads, the device, deterministic cuDNN, the seed."""
    if threads:
        torch.set_num_threads(threads)
    # A trained network's activations and gradients hold subnormal floats, which x86 CPUs
    # compute on slowly; flushing them to zero left the printed results unchanged (README: Time).
    torch.set_flush_denormal(True)
    device = get_device(device_flag)
    if device.type == "cuda":
        # Same seed -> same arrays: no autotuned (possibly non-deterministic) conv algorithms.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    set_seed(seed)
    return device
