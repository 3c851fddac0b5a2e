"""Data sets (APTOS, CXR, synthetic), the seeded train/val/test split, and the decode cache.

PROTOCOL section 3. ``prepare_split`` decides which images go into which part and
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
from tqdm import tqdm

from synthetic import SYNTHETIC_TEST, SYNTHETIC_TRAIN, SYNTHETIC_VERSION, synthetic_images, synthetic_pool
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
        pool = synthetic_pool("train", synthetic_train, seed)
        test = synthetic_pool("test", synthetic_test, seed)
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
