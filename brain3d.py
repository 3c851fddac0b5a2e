"""The embedded synthetic 3D brain set: seeded T1-like brain volumes, half of them with lesions.

Why: the TMI 2023 version of HFC also attacks a 3D brain-CT classifier, but no labelled public 3D
brain set can be downloaded here, so that experiment cannot be rerun as published. This module
stands in for it with a 3D testbed built from what is already installed: the MNI152 (ICBM 2009a,
symmetric) T1 and grey/white-matter templates that the nilearn wheel carries. Nothing is fetched.

Geometry: volumes are uint8 N×S×S×S×1 (channel last) with axes D = axial (inferior→superior),
H = posterior→anterior, W = left→right, isotropic voxels. The template is cropped to a cube around
the brain's bounding box (a small margin left for the random pose), pre-smoothed against aliasing,
and each subject is sampled once on the S³ output grid through a random affine (rotation ±10° about
each axis, isotropic scale ±10 %, shift ±3 voxels) composed with a smooth elastic displacement (at
most about 1.5 voxels), so that a volume costs O(S³) whatever the template's resolution. Then an
intensity jitter (gamma, contrast, brightness) and, last, a little Gaussian noise inside the head.

Lesions (label 1 only): one to three ellipsoids, semi-axes 0.6–1.0 × r with r in [S/10, S/6]
voxels, randomly oriented, their soft masks elastically roughened and slightly blurred, filled with
a smoothed-noise texture, and blended into the tissue toward an intensity 0.35–0.55 brighter or
darker than the local tissue. Centres lie in the (eroded) warped brain mask; the first one is always
on the centre axial slice (D = S // 2), so ``brain3d_slices`` (that slice, grey in 3 channels) shows
a lesion for every label-1 subject. Anatomy, pose and jitter come from one random stream, lesions
from a second and noise from a third, all from ``np.random.default_rng([seed, pool, index, k])``:
a label-1 volume equals the same subject's label-0 volume outside its lesion masks, and every volume
depends only on (seed, id, label, size). ``BRAIN3D_VERSION`` names the generator (and its cache).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates
from tqdm import tqdm

from utils import UserError, cache_dir_default, load_npz, save_npz

BRAIN3D_VERSION = 1
BRAIN3D_TRAIN = 600   # default training-pool size (validation is carved from it)
BRAIN3D_TEST = 160
MIN_SIZE, MAX_SIZE = 16, 128
_POOL_CODE = {"train": 1, "test": 2}
_TEMPLATES = {key: f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz" for key in ("t1", "gm", "wm")}
_INSTALL = "pip install -r requirements.txt"
_CUBE_MARGIN = 1.15   # cube side / the brain's largest extent: room for the random scale and rotation
_ANATOMY, _LESIONS, _NOISE = 0, 1, 2   # the last element of each volume's rng seed


def brain3d_pool(part: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The "train" or "test" pool of n subjects: (ids "<part>/<i>", labels, strata = labels)."""
    if part not in _POOL_CODE:
        raise UserError(f"unknown brain3d pool {part!r} (expected 'train' or 'test')")
    if n < 2:
        raise UserError(f"the brain3d {part} set needs at least 2 volumes (got {n})")
    # Balanced classes: exactly half of each pool (rounded down) has lesions.
    labels = (np.random.default_rng([seed, _POOL_CODE[part], 7]).permutation(n) < n // 2).astype(np.int64)
    return np.array([f"{part}/{i}" for i in range(n)]), labels, labels


def check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise UserError(f"--image-size {size} is too small for brain3d (at least {MIN_SIZE})")
    if size > MAX_SIZE:
        raise UserError(f"--image-size {size} is too large for brain3d (at most {MAX_SIZE})")


def brain3d_volumes(ids, labels, seed: int, size: int, progress: bool = True, cache_dir=None) -> np.ndarray:
    """uint8 N×size×size×size×1 volumes (axes D, H, W, channel) for ids "train/<i>" or "test/<i>".

    Volumes come from ``cache_dir/brain3d_v{VERSION}_s{seed}_{size}.npz``; only those missing
    from it are generated, then the union is written back (atomically). A damaged cache file is
    regenerated.
    """
    check_size(size)
    folder = _check_templates()
    ids = [str(id_) for id_ in ids]
    labels = [int(label) for label in np.asarray(labels).reshape(-1)]
    if len(ids) != len(labels):
        raise UserError(f"brain3d: {len(ids)} ids but {len(labels)} labels")
    keys = [(id_, label) for id_, label in zip(ids, labels)]
    for id_ in ids:
        _parse_id(id_)
    path = Path(cache_dir if cache_dir is not None else cache_dir_default()) / \
        f"brain3d_v{BRAIN3D_VERSION}_s{seed}_{size}.npz"
    cached = _read_cache(path, size)
    missing = list(dict.fromkeys(key for key in keys if key not in cached))
    if missing:
        _templates(str(folder), size)   # load (once) before the bar starts
        for key in tqdm(missing, desc=f"generating brain3d at {size}³", disable=not progress):
            cached[key] = _volume(seed, key[0], key[1], size)
        order = list(cached)
        save_npz(path, ids=np.array([key[0] for key in order], dtype=str),
                 labels=np.array([key[1] for key in order], dtype=np.int64),
                 volumes=np.stack([cached[key] for key in order]))
    out = np.empty((len(keys), size, size, size, 1), dtype=np.uint8)
    for i, key in enumerate(keys):
        out[i, ..., 0] = cached[key]
    return out


def brain3d_slices(ids, labels, seed: int, size: int, progress: bool = True, cache_dir=None) -> np.ndarray:
    """uint8 N×size×size×3: the centre axial slice (D = size // 2) of the volumes, grey in 3 channels."""
    volumes = brain3d_volumes(ids, labels, seed, size, progress=progress, cache_dir=cache_dir)
    return np.ascontiguousarray(np.repeat(volumes[:, size // 2], 3, axis=-1))


# ----------------------------------------------------------------------------- cache

def _read_cache(path: Path, size: int) -> dict[tuple[str, int], np.ndarray]:
    """{(id, label): volume} from the cache file; empty when it is absent or damaged."""
    if not path.is_file():
        return {}
    try:
        data = load_npz(path, "brain3d cache")
        ids, labels, volumes = data["ids"], data["labels"], data["volumes"]
    except (UserError, KeyError):
        return {}
    if (volumes.dtype != np.uint8 or volumes.shape[1:] != (size, size, size)
            or not len(ids) == len(labels) == len(volumes)):
        return {}
    return {(str(id_), int(label)): volume for id_, label, volume in zip(ids, labels, volumes)}


# ----------------------------------------------------------------------------- templates

def _template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 templates (nilearn
    itself is not imported: that is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise UserError(f"the nilearn package (it ships the MNI152 brain templates) is not installed; {_INSTALL}")
    return Path(spec.origin).parent / "datasets" / "data"


def _check_templates() -> Path:
    folder = _template_dir()
    for name in _TEMPLATES.values():
        if not (folder / name).is_file():
            raise UserError(f"missing brain template {folder / name} (it comes with nilearn); {_INSTALL}")
    return folder


@functools.lru_cache(maxsize=4)
def _templates(folder: str, size: int) -> dict[str, np.ndarray | float]:
    """The cropped, pre-smoothed templates for one output size (loaded once per process).

    Returns t1 (in [0, 0.9]), brain (grey + white matter probability) and support (the head: where
    T1 is non-zero), as float32 D×H×W arrays, plus ``origin`` (template voxel of the cube's first
    corner, per axis) and ``step`` (template voxels per output voxel)."""
    import nibabel

    def load(key: str) -> np.ndarray:
        # nibabel's (x, y, z) = (left→right, posterior→anterior, inferior→superior) -> (D, H, W).
        return np.ascontiguousarray(nibabel.load(Path(folder) / _TEMPLATES[key]).get_fdata(dtype=np.float32).T)

    t1, gm, wm = load("t1"), load("gm"), load("wm")
    brain = np.clip((gm + wm) / max(float(gm.max()), 1e-6), 0, 1)   # probabilities stored ×255
    mask = brain > 0.5
    # Bright white matter at 0.9, not 1: headroom for the contrast and brightness jitter.
    t1 = 0.9 * np.clip(t1 / np.percentile(t1[mask], 99.5), 0, 1)
    support = ((t1 > 0) | mask).astype(np.float32)
    # Crop to the head (the templates are skull-stripped: zero outside); the cube is centred on
    # the brain's bounding box and may overhang the crop (map_coordinates reads zeros there).
    where = np.argwhere(support > 0)
    low, high = where.min(0), where.max(0) + 1
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    inside = np.argwhere(mask)
    centre = (inside.min(0) + inside.max(0)) / 2.0 - low
    side = _CUBE_MARGIN * float((inside.max(0) - inside.min(0) + 1).max())
    step = side / size
    sigma = 0.5 * step

    def smooth(volume: np.ndarray) -> np.ndarray:
        return gaussian_filter(volume[crop].astype(np.float32), sigma, mode="constant", truncate=3.0)

    return {"t1": smooth(t1), "brain": smooth(brain), "support": smooth(support),
            "origin": centre - side / 2.0 + 0.5 * step, "step": step}


# ----------------------------------------------------------------------------- one volume

def _parse_id(id_: str) -> tuple[int, int]:
    pool, _, index = str(id_).partition("/")
    if pool not in _POOL_CODE or not index.isdigit():
        raise UserError(f"bad brain3d id {id_!r} (expected 'train/<i>' or 'test/<i>'); re-run train.py")
    return _POOL_CODE[pool], int(index)


def _volume(seed: int, id_: str, label: int, size: int) -> np.ndarray:
    """One uint8 size³ volume."""
    volume, _ = _render(seed, id_, label, size)
    return np.round(volume * 255).astype(np.uint8)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation by angles (radians) about the D, H and W axes, in that order."""
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[a, a] = turn[b, b] = math.cos(angle)
        turn[a, b], turn[b, a] = -math.sin(angle), math.sin(angle)
        out = turn @ out
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, peak: float) -> np.ndarray:
    """Three smooth displacement components (3×shape), each scaled to a largest |value| of peak."""
    field = gaussian_filter(rng.standard_normal((3, *shape), dtype=np.float32), (0, sigma, sigma, sigma),
                            mode="wrap", truncate=3.0)
    field *= peak / (np.abs(field).reshape(3, -1).max(1) + 1e-12)[:, None, None, None]
    return field


def _render(seed: int, id_: str, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One volume as float32 size³ in [0, 1], and its lesion mask (all zero for label 0)."""
    pool, index = _parse_id(id_)
    tpl = _templates(str(_template_dir()), size)
    rng = np.random.default_rng([seed, pool, index, _ANATOMY])
    # Pose: output voxel p -> template cube voxel R^T (p + elastic(p) - c - shift) / scale + c.
    rotation = _rotation(np.deg2rad(rng.uniform(-10, 10, 3)))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-3, 3, 3)
    elastic = _smooth_field(rng, (size,) * 3, size / 8, 1.5)
    centre = (size - 1) / 2.0
    grid = np.indices((size,) * 3, dtype=np.float32) + elastic
    grid -= (centre + shift).astype(np.float32)[:, None, None, None]
    matrix = (rotation.T / scale * tpl["step"]).astype(np.float32)
    offset = np.asarray(tpl["origin"] + centre * tpl["step"], dtype=np.float32)
    coords = (matrix @ grid.reshape(3, -1)) + offset[:, None]

    def sample(key: str) -> np.ndarray:
        return map_coordinates(tpl[key], coords, order=1, mode="constant", cval=0.0).reshape((size,) * 3)

    t1, brain, support = sample("t1"), sample("brain"), np.clip(sample("support"), 0, 1)
    # Intensity jitter (brightness only inside the head, so the background stays black).
    gamma, contrast, brightness = rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    volume = np.clip(contrast * np.clip(t1, 0, 1) ** gamma + brightness * support, 0, 1).astype(np.float32)
    lesions = np.zeros_like(volume)
    if label == 1:
        volume, lesions = _add_lesions(volume, brain, np.random.default_rng([seed, pool, index, _LESIONS]))
    noise_rng = np.random.default_rng([seed, pool, index, _NOISE])
    sigma = noise_rng.uniform(0.01, 0.02)
    volume += sigma * support * noise_rng.standard_normal(volume.shape, dtype=np.float32)
    return np.clip(volume, 0, 1), lesions


def _add_lesions(volume: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = volume.shape[0]
    volume = volume.copy()
    inside = brain > 0.5
    depth = distance_transform_edt(inside)              # voxels to the brain's edge
    brain_soft = np.clip(2 * brain, 0, 1)
    union = np.zeros_like(volume)
    for k in range(int(rng.integers(1, 4))):
        r = rng.uniform(size / 10, size / 6)
        axes = rng.uniform(0.6, 1.0, 3) * r
        q, upper = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(upper))                  # a uniformly random orientation
        # Centre: deep enough in the brain that the (roughened) lesion stays inside it.
        need = 1.3 * axes.max() + 1
        allowed = depth > need
        if k == 0:                                       # the first lesion shows on the centre slice
            allowed[: size // 2] = False
            allowed[size // 2 + 1:] = False
        candidates = np.argwhere(allowed)
        if len(candidates) == 0:                         # never at 16³ and above; a safe fallback
            if k == 0:
                j = np.unravel_index(np.argmax(depth[size // 2]), depth.shape[1:])
                candidates = np.array([[size // 2, *j]])
            else:
                candidates = np.array([np.unravel_index(np.argmax(depth), depth.shape)])
        at = candidates[rng.integers(len(candidates))].astype(np.float64)
        at[1:] += rng.uniform(-0.5, 0.5, 2)
        if k > 0:
            at[0] += rng.uniform(-0.5, 0.5)
        half = int(math.ceil(1.5 * axes.max() + 2))
        low = np.maximum(np.floor(at).astype(int) - half, 0)
        high = np.minimum(np.floor(at).astype(int) + half + 1, size)
        box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        shape = tuple(int(hi - lo) for lo, hi in zip(low, high))
        local = np.indices(shape, dtype=np.float64) + low[:, None, None, None] - at[:, None, None, None]
        local += _smooth_field(rng, shape, max(1.0, r / 2), 0.3 * r)   # irregular edges
        rotated = np.einsum("ji,j...->i...", q, local)
        rho = np.sqrt(sum((rotated[i] / axes[i]) ** 2 for i in range(3)))
        mask = np.clip((1 - rho) * axes.mean() + 0.5, 0, 1)            # about one voxel of soft edge
        mask = gaussian_filter(mask, 0.6, mode="constant")
        mask[mask < 1e-3] = 0
        mask *= brain_soft[box]
        if mask.sum() == 0:
            continue
        texture = gaussian_filter(rng.standard_normal(shape), 1.0)
        texture *= rng.uniform(0.03, 0.07) / (texture.std() + 1e-12)
        tissue = float((volume[box] * mask).sum() / mask.sum())
        delta = rng.uniform(0.35, 0.55) * rng.choice([-1.0, 1.0])
        if not 0.05 <= tissue + delta <= 0.95:           # no room on that side: the other sign
            delta = -delta
        target = np.clip(tissue + delta + texture, 0, 1)
        alpha = rng.uniform(0.75, 0.95) * mask
        volume[box] = volume[box] * (1 - alpha) + alpha * target
        union[box] = np.maximum(union[box], mask)
    return volume, union.astype(np.float32)
