"""Data sets (APTOS, CXR, synthetic), the seeded train/val/test split, and the decode cache.

docs/PROTOCOL.md §3. ``prepare_split`` decides which images go into which part and
``write_split`` saves that decision as ``split.json`` in the run directory; every later stage
calls ``load_part(run_dir, part)`` and so sees exactly the same images at the same size.
Decoding and resizing happen once: the resized uint8 images are cached in ``.cache/`` (or
``$HFC_CACHE_DIR``), keyed by data set, resolved root and size.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from utils import UserError, canonical_dataset, load_npz, read_json, save_npz, to_float_images, write_json

SPLIT_FILE = "split.json"
PARTS = ("train", "val", "test")
DEFAULT_IMAGE_SIZE = {"synthetic": 64, "APTOS": 128, "CXR": 128}
# Cap on training images per class when --max-train-per-class is not given (None: no cap).
# CXR has 5216 training images (1341 NORMAL, 3875 PNEUMONIA); 500 per class, balanced, keeps a
# ResNet-50 epoch at 128 px near a minute on one CPU core, so 12 epochs fit in 15 minutes.
DEFAULT_MAX_TRAIN_PER_CLASS = {"synthetic": None, "APTOS": None, "CXR": 500}
VAL_FRACTION = 0.15          # validation carved from the training pool (seeded, stratified)
APTOS_TEST_FRACTION = 0.2    # APTOS has no labelled test set: seeded, stratified 80/20
SYNTHETIC_TRAIN = 1000
SYNTHETIC_TEST = 250

APTOS_LAYOUT = "<root>/train.csv (columns id_code,diagnosis) and <root>/train_images/<id_code>.png"
CXR_CLASSES = ("NORMAL", "PNEUMONIA")
CXR_LAYOUT = "<root>/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Flip axes used by training-only augmentation (dims of an N×3×H×W batch).
FLIP_DIMS = {"synthetic": (2, 3), "APTOS": (2, 3), "CXR": (3,)}


def cache_dir_default() -> Path:
    return Path(os.environ.get("HFC_CACHE_DIR") or ".cache")


def default_data_root(dataset: str) -> Path:
    return Path("datasets") / canonical_dataset(dataset)


def class_names(dataset: str, num_classes: int = 2) -> list[str]:
    dataset = canonical_dataset(dataset)
    if dataset == "APTOS":
        if num_classes == 5:
            return ["grade 0 (no DR)", "grade 1 (mild)", "grade 2 (moderate)", "grade 3 (severe)",
                    "grade 4 (proliferative)"]
        return ["no DR", "DR"]
    if dataset == "CXR":
        return list(CXR_CLASSES)
    return ["healthy", "lesions"]


def _check_num_classes(dataset: str, num_classes: int) -> None:
    allowed = (2, 5) if dataset == "APTOS" else (2,)
    if num_classes not in allowed:
        raise UserError(f"--num-classes {num_classes} is not available for {dataset}; "
                        f"choose {' or '.join(map(str, allowed))}")


# ----------------------------------------------------------------------------- catalogs
# A catalog lists what a data set offers before the split: a training pool and a test pool,
# each as (ids, labels, strata); strata are what the split stratifies on (APTOS: the grade).

def _aptos_catalog(root: Path, num_classes: int):
    if not root.is_dir():
        raise UserError(f"APTOS data root {root} not found; expected the Kaggle layout {APTOS_LAYOUT} (see --data-root)")
    csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise UserError(f"missing {csv_path}; expected the Kaggle APTOS layout {APTOS_LAYOUT}")
    image_dir = root / "train_images"
    if not image_dir.is_dir():
        raise UserError(f"missing image folder {image_dir}; expected the Kaggle APTOS layout {APTOS_LAYOUT}")
    ids, grades = [], []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"id_code", "diagnosis"} <= set(reader.fieldnames):
            raise UserError(f"{csv_path}: expected columns id_code,diagnosis, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            grade = (row["diagnosis"] or "").strip()
            if grade not in {"0", "1", "2", "3", "4"}:
                raise UserError(f"{csv_path} line {line}: diagnosis {grade!r} is not a grade 0-4")
            rel = f"train_images/{row['id_code'].strip()}.png"
            if not (root / rel).is_file():
                raise UserError(f"{csv_path} line {line}: image {root / rel} not found")
            ids.append(rel)
            grades.append(int(grade))
    if not ids:
        raise UserError(f"{csv_path} lists no images")
    grades = np.array(grades, dtype=np.int64)
    labels = grades if num_classes == 5 else (grades > 0).astype(np.int64)
    return np.array(ids), labels, grades


def _cxr_folder(root: Path, part: str, required: bool = True):
    folder = root / part
    if not folder.is_dir():
        if not required:
            return [], []
        raise UserError(f"missing folder {folder}; expected the Kaggle chest X-ray layout {CXR_LAYOUT}")
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith((".", "__")) and sub.name not in CXR_CLASSES:
            raise UserError(f"unknown label folder {sub}; expected only {' and '.join(CXR_CLASSES)} ({CXR_LAYOUT})")
    ids, labels = [], []
    for label, name in enumerate(CXR_CLASSES):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise UserError(f"missing class folder {class_dir}; expected the Kaggle chest X-ray layout {CXR_LAYOUT}")
        files = sorted(p.name for p in class_dir.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {class_dir}")
        ids += [f"{part}/{name}/{f}" for f in files]
        labels += [label] * len(files)
    return ids, labels


def _cxr_catalog(root: Path):
    if not root.is_dir():
        raise UserError(f"CXR data root {root} not found; expected the Kaggle layout {CXR_LAYOUT} (see --data-root)")
    train_ids, train_labels = _cxr_folder(root, "train")
    # The official val/ folder (16 images) is too small to select on; it joins the training
    # pool from which the validation split is carved.
    val_ids, val_labels = _cxr_folder(root, "val", required=False)
    test_ids, test_labels = _cxr_folder(root, "test")
    pool_labels = np.array(train_labels + val_labels, dtype=np.int64)
    test_labels = np.array(test_labels, dtype=np.int64)
    return (np.array(train_ids + val_ids), pool_labels, pool_labels), (np.array(test_ids), test_labels, test_labels)


def _synthetic_pool(part: str, n: int, seed: int):
    if n < 2:
        raise UserError(f"the synthetic {part} set needs at least 2 images (got {n})")
    # Balanced classes: exactly half of each pool (rounded down) has lesions.
    labels = (np.random.default_rng([seed, _POOL_CODE[part], 7]).permutation(n) < n // 2).astype(np.int64)
    return np.array([f"{part}/{i}" for i in range(n)]), labels, labels


# ----------------------------------------------------------------------------- splits

def _stratified_mask(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick round(fraction * count) members of every stratum (at least one when it has two)."""
    picked = np.zeros(len(strata), dtype=bool)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        picked[rng.permutation(members)[:k]] = True
    return picked


def prepare_split(dataset: str, data_root: str | Path | None = None, image_size: int | None = None,
                  num_classes: int = 2, seed: int = 0, val_fraction: float = VAL_FRACTION,
                  max_train_per_class: int | None = None, synthetic_train: int = SYNTHETIC_TRAIN,
                  synthetic_test: int = SYNTHETIC_TEST) -> dict[str, Any]:
    """Decide the train/val/test parts (ids and labels); the result is what split.json holds.

    Validation is carved (seeded, stratified) from the training pool, never from test. With
    ``max_train_per_class`` the training pool is first reduced per class (seeded) so that at
    most that many images per class remain for training after the validation carve.
    """
    dataset = canonical_dataset(dataset)
    _check_num_classes(dataset, num_classes)
    image_size = int(image_size or DEFAULT_IMAGE_SIZE[dataset])
    if image_size < 16:
        raise UserError(f"--image-size {image_size} is too small (at least 16)")
    if not 0 < val_fraction < 1:
        raise UserError(f"validation fraction {val_fraction} must lie in (0, 1)")
    rng = np.random.default_rng([seed, 101])
    if dataset == "synthetic":
        root = None
        pool = _synthetic_pool("train", synthetic_train, seed)
        test = _synthetic_pool("test", synthetic_test, seed)
    else:
        root = str(data_root if data_root is not None else default_data_root(dataset))
        if dataset == "APTOS":
            ids, labels, grades = _aptos_catalog(Path(root), num_classes)
            in_test = _stratified_mask(grades, APTOS_TEST_FRACTION, rng)
            pool = ids[~in_test], labels[~in_test], grades[~in_test]
            test = ids[in_test], labels[in_test], grades[in_test]
        else:
            pool, test = _cxr_catalog(Path(root))
    ids, labels, strata = pool
    if max_train_per_class:
        keep_per_class = math.ceil(max_train_per_class / (1 - val_fraction))
        keep = np.zeros(len(ids), dtype=bool)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            keep[rng.permutation(members)[:keep_per_class]] = True
        ids, labels, strata = ids[keep], labels[keep], strata[keep]
    in_val = _stratified_mask(strata, val_fraction, rng)
    in_train = ~in_val
    if max_train_per_class:  # rounding in the carve may leave one image too many per class
        for label in np.unique(labels):
            members = np.flatnonzero(in_train & (labels == label))
            in_train[rng.permutation(members)[max_train_per_class:]] = False
    parts = {"train": (ids[in_train], labels[in_train]), "val": (ids[in_val], labels[in_val]),
             "test": (test[0], test[1])}
    split: dict[str, Any] = {
        "dataset": dataset, "data_root": root, "image_size": image_size, "num_classes": num_classes,
        "class_names": class_names(dataset, num_classes), "seed": seed, "val_fraction": val_fraction,
        "max_train_per_class": max_train_per_class,
    }
    if dataset == "synthetic":
        split["synthetic"] = {"train": synthetic_train, "test": synthetic_test, "generator": SYNTHETIC_VERSION}
    for part, (part_ids, part_labels) in parts.items():
        split[part] = {"ids": [str(i) for i in part_ids], "labels": [int(y) for y in part_labels]}
    return split


def write_split(run_dir: str | Path, split: dict[str, Any]) -> Path:
    path = Path(run_dir) / SPLIT_FILE
    write_json(path, split)
    return path


def read_split(run_dir: str | Path) -> dict[str, Any]:
    """The split.json of a run directory (UserError naming train.py when it is missing)."""
    split = read_json(Path(run_dir) / SPLIT_FILE, "data split", "run train.py first")
    for key in ("dataset", "image_size", "num_classes", "class_names", *PARTS):
        if key not in split:
            raise UserError(f"{Path(run_dir) / SPLIT_FILE} lacks {key!r}; re-run train.py")
    return split


def describe_split(split: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Images per class in each part, e.g. {"train": {"no DR": 270, "DR": 275}, ...}."""
    names = split["class_names"]
    return {part: {names[c]: int(np.sum(np.array(split[part]["labels"]) == c)) for c in range(len(names))}
            for part in PARTS}


# ----------------------------------------------------------------------------- images

def load_arrays(split: dict[str, Any], parts=PARTS, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (uint8 N×H×W×3) and labels (int64) of the given parts of a split."""
    dataset = canonical_dataset(split["dataset"])
    size = int(split["image_size"])
    out = {}
    if dataset == "synthetic":
        for part in parts:
            ids = split[part]["ids"]
            labels = np.array(split[part]["labels"], dtype=np.int64)
            out[part] = (synthetic_images(ids, labels, int(split["seed"]), size), labels)
        return out
    root = Path(split["data_root"])
    wanted = [i for part in parts for i in split[part]["ids"]]
    images = _cached_images(dataset, root, size, wanted, cache_dir, workers, progress)
    for part in parts:
        ids = split[part]["ids"]
        out[part] = (np.stack([images[i] for i in ids]) if ids else np.zeros((0, size, size, 3), np.uint8),
                     np.array(split[part]["labels"], dtype=np.int64))
    return out


def load_part(run_dir: str | Path, part: str, cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly the images of one part of a run's saved split, at its size.

    Returns (float32 N×3×H×W in [0, 1], int64 labels).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    split = read_split(run_dir)
    images, labels = load_arrays(split, (part,), cache_dir)[part]
    return to_float_images(images), torch.from_numpy(labels)


def _cache_file(dataset: str, root: Path, size: int, cache_dir: str | Path | None) -> Path:
    key = hashlib.sha1(f"{dataset}|{root.resolve()}|{size}".encode()).hexdigest()[:12]
    return Path(cache_dir or cache_dir_default()) / f"{dataset}_{size}px_{key}.npz"


def _cached_images(dataset: str, root: Path, size: int, ids: list[str], cache_dir, workers, progress) -> dict[str, np.ndarray]:
    """id -> uint8 H×W×3; decodes only what the cache lacks, then stores the union."""
    if not root.is_dir():
        layout = APTOS_LAYOUT if dataset == "APTOS" else CXR_LAYOUT
        raise UserError(f"{dataset} data root {root} not found; expected the Kaggle layout {layout}")
    path = _cache_file(dataset, root, size, cache_dir)
    cached: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            arrays = load_npz(path, "image cache")
            cached = dict(zip(arrays["ids"].tolist(), arrays["images"]))
        except (UserError, KeyError):
            cached = {}  # a damaged cache is rebuilt
    missing = sorted(set(ids) - set(cached))
    if missing:
        decode = _decode_aptos if dataset == "APTOS" else _decode_cxr
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(tqdm(pool.map(lambda i: decode(root / i, size), missing), total=len(missing),
                                desc=f"decoding {dataset} at {size}px", unit="img", disable=not progress))
        cached.update(zip(missing, decoded))
        all_ids = sorted(cached)
        save_npz(path, ids=np.array(all_ids), images=np.stack([cached[i] for i in all_ids]))
    return cached


def _open_image(path: Path, size: int) -> Image.Image:
    try:
        image = Image.open(path)
        if image.format == "JPEG":
            image.draft("RGB", (2 * size, 2 * size))  # decode big JPEGs at a reduced scale
        image.load()
        return image
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def fundus_box(rgb: np.ndarray, threshold: int = 15) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the non-black pixels; the whole image if none."""
    bright = rgb.max(axis=2) > threshold
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    if len(rows) < 2 or len(cols) < 2:
        return 0, rgb.shape[0], 0, rgb.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _decode_aptos(path: Path, size: int) -> np.ndarray:
    rgb = np.asarray(_open_image(path, size).convert("RGB"))
    top, bottom, left, right = fundus_box(rgb)
    crop = Image.fromarray(rgb[top:bottom, left:right])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _decode_cxr(path: Path, size: int) -> np.ndarray:
    gray = _open_image(path, size).convert("L").resize((size, size), Image.Resampling.BICUBIC)
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- synthetic fundus

SYNTHETIC_VERSION = 2
_POOL_CODE = {"train": 1, "test": 2}
_MA_COLOUR = np.array([0.38, 0.04, 0.04])
_HAEM_COLOUR = np.array([0.42, 0.06, 0.05])
_EXUDATE_COLOUR = np.array([0.98, 0.88, 0.38])


def _synthetic_params(seed: int, pool: int, index: int, label: int) -> dict[str, Any]:
    """Everything random about one image, from its own generator (seed, pool, index)."""
    rng = np.random.default_rng([seed, pool, index])
    noise_seed = [seed, pool, index, 1]
    side = rng.choice([-1.0, 1.0])                     # left or right eye: side of the optic disc
    p: dict[str, Any] = {
        "centre": rng.uniform(-0.04, 0.04, 2), "radius": rng.uniform(0.86, 0.96),
        "base": np.array([rng.uniform(0.62, 0.85), rng.uniform(0.26, 0.38), rng.uniform(0.08, 0.16)]),
        "gradient": rng.uniform(0.05, 0.3) * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)]),
        "vignette": rng.uniform(0.25, 0.55), "texture": rng.uniform(0.03, 0.08), "noise": rng.uniform(0.01, 0.03),
        "disc": np.array([side * rng.uniform(0.3, 0.42), rng.uniform(-0.1, 0.1)]), "disc_r": rng.uniform(0.09, 0.13),
        "macula": np.array([-side * rng.uniform(0.12, 0.22), rng.uniform(-0.06, 0.06)]),
        "vessel_contrast": rng.uniform(0.45, 0.7), "noise_seed": noise_seed,
    }
    # Vessels: four trunks leave the disc (two arcades bending around the macula, two nasal
    # ones), each with a few thinner branches; heading angles in radians.
    toward_macula = math.pi if side > 0 else 0.0
    away = toward_macula + math.pi
    trunks = [(math.pi / 2 + rng.normal(0, 0.2), 1), (-math.pi / 2 + rng.normal(0, 0.2), -1),
              (away + 0.5 + rng.normal(0, 0.2), 0), (away - 0.5 + rng.normal(0, 0.2), 0)]
    walks = []
    for heading, arcade in trunks:
        # Arcades curve toward the macula side; nasal trunks wander.
        bend = arcade * side * rng.uniform(0.025, 0.04) if arcade else 0.0
        turn = bend + rng.normal(0, 0.05, 48)
        walks.append((p["disc"], heading + np.cumsum(turn), 0.03, 1.0))
    branches = []
    for start, angles, step, _ in walks:
        points = start + np.cumsum(step * np.stack([np.cos(angles), np.sin(angles)], 1), 0)
        for at in rng.choice(np.arange(6, 40), size=3, replace=False):
            heading = angles[at] + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
            branches.append((points[at], heading + np.cumsum(rng.normal(0, 0.08, 20)), 0.025, 0.0))
    p["vessels"] = walks + branches
    # Lesions (class 1 only): (x, y, radius, colour index 0 MA / 1 haemorrhage / 2 exudate).
    lesions = []
    if label == 1:
        severity = rng.uniform(0, 1)
        # Mild cases show a blot and a few microaneurysms; severe ones many more, with exudates.
        n_ma = rng.integers(4, 7 + int(12 * severity))
        n_haem = rng.integers(2, 4 + int(5 * severity))
        n_ex = rng.integers(0, 2 + int(4 * severity))
        for kind, count in ((0, n_ma), (1, n_haem), (2, n_ex)):
            for _ in range(count):
                xy = _lesion_site(rng, p)
                if kind == 0:
                    lesions.append((*xy, rng.uniform(0.028, 0.045), 0))
                elif kind == 1:   # a blot: two or three overlapping discs
                    r = rng.uniform(0.05, 0.09)
                    for _ in range(rng.integers(2, 4)):
                        lesions.append((*(xy + rng.normal(0, r / 2, 2)), r * rng.uniform(0.6, 1.0), 1))
                else:             # a cluster of hard exudates
                    for _ in range(rng.integers(2, 6)):
                        lesions.append((*(xy + rng.normal(0, 0.04, 2)), rng.uniform(0.022, 0.04), 2))
    p["lesions"] = np.array(lesions, dtype=np.float64).reshape(-1, 4)
    return p


def _lesion_site(rng: np.random.Generator, p: dict[str, Any]) -> np.ndarray:
    for _ in range(20):
        xy = p["centre"] + rng.uniform(-0.7, 0.7, 2) * p["radius"]
        if np.hypot(*(xy - p["centre"])) < 0.75 * p["radius"] and np.hypot(*(xy - p["disc"])) > 1.6 * p["disc_r"]:
            return xy
    return p["macula"] + rng.normal(0, 0.1, 2)


def _blend(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a colour (3,) into images N×H×W×3 with alpha N×H×W."""
    return image * (1 - alpha[..., None]) + colour * alpha[..., None]


def synthetic_images(ids: list[str], labels: np.ndarray, seed: int, size: int) -> np.ndarray:
    """Render fundus-like images (uint8 N×size×size×3) for ids "train/<i>" or "test/<i>".

    Every image depends only on (seed, pool, index, label), so the same seed always gives the
    same pictures. Rendering is vectorised over the batch.
    """
    n = len(ids)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, 256):
        chunk = slice(start, min(start + 256, n))
        params = []
        for id_, label in zip(ids[chunk], labels[chunk]):
            pool, _, index = str(id_).partition("/")
            if pool not in _POOL_CODE or not index.isdigit():
                raise UserError(f"bad synthetic image id {id_!r} in the split; re-run train.py")
            params.append(_synthetic_params(seed, _POOL_CODE[pool], int(index), int(label)))
        out[chunk] = _render(params, size)
    return out


def _render(params: list[dict[str, Any]], size: int) -> np.ndarray:
    n = len(params)
    # Texture and pixel noise come from each image's own stream too (not the batch's).
    streams = [np.random.default_rng(p["noise_seed"]) for p in params]
    white = np.stack([s.standard_normal((size, size, 4), dtype=np.float32) for s in streams])
    pixel = 2.0 / size
    axis = (np.arange(size) + 0.5) * pixel - 1.0
    x, y = axis[None, None, :], axis[None, :, None]            # x: columns, y: rows (down)

    def stack(key):
        return np.stack([p[key] for p in params])

    def dist(centres):                                          # centres N×2 -> N×H×W
        return np.hypot(x - centres[:, 0, None, None], y - centres[:, 1, None, None])

    centre, radius = stack("centre"), stack("radius")[:, None, None]
    r = dist(centre) / radius
    retina = np.clip((1 - r) / (pixel / radius) + 0.5, 0, 1)     # soft edge one pixel wide
    gradient = stack("gradient")
    light = (1 + gradient[:, 0, None, None] * x + gradient[:, 1, None, None] * y) \
        * (1 - stack("vignette")[:, None, None] * r ** 2)
    texture = gaussian_filter(white[..., 3], sigma=(0, size / 20, size / 20))
    texture *= stack("texture")[:, None, None] / (texture.std(axis=(1, 2), keepdims=True) + 1e-8)
    image = stack("base")[:, None, None, :] * (light + texture)[..., None]
    # Macula: a darker, redder patch; optic disc: a bright pale-yellow disc with a soft rim.
    macula = np.exp(-(dist(stack("macula")) / 0.14) ** 2)
    image *= 1 - 0.35 * macula[..., None]
    disc_r = stack("disc_r")[:, None, None]
    disc = np.clip((disc_r - dist(stack("disc"))) / (0.4 * disc_r) + 0.5, 0, 1)
    image = _blend(image, 0.85 * disc, np.array([0.98, 0.86, 0.6]))
    image = _vessels(image, params, size, retina)
    # Lesions: per kind, the union (max) of soft-edged discs, then one blend per kind.
    for kind, colour in enumerate((_MA_COLOUR, _HAEM_COLOUR, _EXUDATE_COLOUR)):
        mine = [p["lesions"][p["lesions"][:, 3] == kind] for p in params]
        most = max(len(m) for m in mine)
        if most == 0:
            continue
        alpha = np.zeros((n, size, size))
        for k in range(most):
            lesion = np.array([m[k] if k < len(m) else (9.0, 9.0, 0.01, kind) for m in mine])
            np.maximum(alpha, np.clip((lesion[:, 2, None, None] - dist(lesion[:, :2])) / pixel + 0.5, 0, 1), out=alpha)
        image = _blend(image, 0.9 * alpha, colour)
    image += white[..., :3] * stack("noise")[:, None, None, None]
    image *= retina[..., None]
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _vessels(image: np.ndarray, params: list[dict[str, Any]], size: int, retina: np.ndarray) -> np.ndarray:
    """Darken along every vessel: points splatted on the grid, then blurred to a line."""
    n = len(params)
    half_pixel = 1.0 / size
    for trunk in (1.0, 0.0):
        acc = np.zeros(n * size * size)
        for i, p in enumerate(params):
            for start, angles, step, is_trunk in p["vessels"]:
                if is_trunk != trunk:
                    continue
                # Densify so that consecutive points are half a pixel apart.
                repeat = max(1, int(math.ceil(step / half_pixel)))
                fine_angles = np.repeat(angles, repeat)
                points = start + np.cumsum((step / repeat) * np.stack([np.cos(fine_angles), np.sin(fine_angles)], 1), 0)
                cols = (points[:, 0] + 1) / 2 * size - 0.5
                rows = (points[:, 1] + 1) / 2 * size - 0.5
                inside = (cols >= 0) & (cols < size - 1) & (rows >= 0) & (rows < size - 1)
                cols, rows = cols[inside], rows[inside]
                taper = np.linspace(1.0, 0.5, len(points))[inside]   # vessels thin out
                c0, r0 = np.floor(cols).astype(int), np.floor(rows).astype(int)
                fc, fr = cols - c0, rows - r0
                base = i * size * size
                for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                                  (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
                    np.add.at(acc, base + (r0 + dr) * size + c0 + dc, w * taper)
        sigma = max(0.5, size / 90) * (1.0 if trunk else 0.7)
        density = gaussian_filter(acc.reshape(n, size, size), sigma=(0, sigma, sigma))
        # A line of points half a pixel apart, blurred by sigma, peaks near 1 / (0.5 sqrt(2 pi) sigma).
        strength = 0.5 * math.sqrt(2 * math.pi) * sigma * 1.2
        alpha = (1 - np.exp(-density * strength)) * retina
        contrast = np.array([p["vessel_contrast"] for p in params])[:, None, None, None]
        image = image * (1 - alpha[..., None] * contrast * np.array([0.45, 0.75, 0.6]))
    return image
