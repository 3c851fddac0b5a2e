"""Data sets (APTOS, CXR, imagenette, synthetic, brain3d/brain2d), the seeded train/val/test split, and the decode cache.

docs/PROTOCOL.md §3. ``REGISTRY`` holds everything that differs between data sets, one
``DatasetInfo`` each (defaults, flips, classes, layout, how to list and to load the images);
``get(name)`` finds one, case-insensitively. ``prepare_split`` decides which images go into
which part and ``write_split`` saves that decision as ``split.json`` in the run directory; every
later stage calls ``load_part(run_dir, part)`` and so sees exactly the same images at the same
size. Decoding and resizing happen once: the resized uint8 images are cached in ``.cache/`` (or
``$HFC_CACHE_DIR``), keyed by data set, resolved root and size.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import network
from brain3d import BRAIN3D_TEST, BRAIN3D_TRAIN, BRAIN3D_VERSION, brain3d_pool, brain3d_slices, brain3d_volumes
from synthetic import SYNTHETIC_TEST, SYNTHETIC_TRAIN, SYNTHETIC_VERSION, synthetic_images, synthetic_pool
from utils import UserError, cache_dir_default, load_npz, read_json, save_npz, to_float_images, write_json

SPLIT_FILE = "split.json"
PARTS = ("train", "val", "test")
VAL_FRACTION = 0.15          # validation carved from the training pool (seeded, stratified)
APTOS_TEST_FRACTION = 0.2    # APTOS has no labelled test set: seeded, stratified 80/20
MIN_IMAGE_SIZE = 16          # the smallest --image-size (a volume's side) the networks still reduce to 1

APTOS_LAYOUT = "<root>/train.csv (columns id_code,diagnosis) and <root>/train_images/<id_code>.png"
CXR_CLASSES = ("NORMAL", "PNEUMONIA")
CXR_LAYOUT = "<root>/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg"
IMAGENETTE_LAYOUT = "<root>/{train,val}/<wnid>/*.JPEG (torchvision ImageFolder)"
# The natural-image control of the stress test (docs/PROTOCOL.md §11): a binary pair of Imagenette
# classes, trained like the medical sets. Tench and parachute differ at a glance, so a ResNet-50
# trained from scratch on 200 images per class can learn the pair.
IMAGENETTE_NAMES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                    "n03888257": "parachute"}
IMAGENETTE_PAIR = "n01440764,n03888257"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class Listing(NamedTuple):
    """What a data set offers before the split: a training pool and a test pool, each as
    (ids, labels, strata) arrays (strata: what the split stratifies on, e.g. the APTOS grade),
    and extra fields for split.json."""
    pool: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]
    record: dict[str, Any] | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """One data set: its defaults and the functions that list and load it (see ``REGISTRY``).

    ``list_split(root, *, num_classes, seed, rng, synthetic_train, synthetic_test) -> Listing``:
    root is None for a generated set; rng is the split's generator (a catalog may draw from it,
    before the validation carve). Images come either from files, ``decode(path, size) -> uint8
    H×W×3`` (cached), or, for a generated set, ``render(ids, labels, seed, size) -> uint8
    N×size×size×3`` (a volumetric set: N×size×size×size×1, channel last like the images).
    """
    name: str                                   # canonical spelling: runs_<name>/, split.json
    image_size: int                             # default --image-size
    epochs: int                                 # default train.py --epochs
    flip_dims: tuple[int, ...]                  # training-only random flips (dims of N×C×H×W or N×C×D×H×W)
    max_train_per_class: int | None             # default --max-train-per-class (None: no cap)
    classes: dict[int, tuple[str, ...]]         # --num-classes allowed -> class names
    list_split: Callable[..., Listing]
    main_attack: str = "I_FGSM_Linf_1"          # reproduce.py's default base attack (the paper's ε = 1/256)
    lr_schedule: str = "plateau"                # default train.py --lr-schedule
    batch_size: int | None = None               # default train.py -b (None: 64 on a GPU, 16 on a CPU)
    natural: bool = False                       # natural photographs (the stress test's control), not medical
    volumetric: bool = False                    # 1-channel volumes N×1×D×H×W (a 3D arch), not 3-channel images
    pool_sizes: tuple[int, int] | None = None   # a generated set's default training- and test-pool sizes
    layout: str | None = None                   # "the ... layout <root>/...", for errors (None: generated)
    decode: Callable[[Path, int], np.ndarray] | None = None
    render: Callable[[list[str], np.ndarray, int, int], np.ndarray] | None = None

    @property
    def generated(self) -> bool:
        """True for a set rendered in memory (no data root, no cache)."""
        return self.render is not None


def get(name: str) -> DatasetInfo:
    """The registry entry of a data set, by case-insensitive name (UserError naming the known ones)."""
    for known, info in REGISTRY.items():
        if str(name).lower() == known.lower():
            return info
    raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(REGISTRY)} (case-insensitive)")


def default_data_root(dataset: str) -> Path:
    return Path("datasets") / get(dataset).name


def class_names(dataset: str, num_classes: int = 2) -> list[str]:
    info = get(dataset)
    _check_num_classes(info, num_classes)
    return list(info.classes[num_classes])


def _check_num_classes(info: DatasetInfo, num_classes: int) -> None:
    if num_classes not in info.classes:
        raise UserError(f"--num-classes {num_classes} is not available for {info.name}; "
                        f"choose {' or '.join(map(str, info.classes))}")


# ----------------------------------------------------------------------------- catalogs
# Each data set's ``list_split`` (see REGISTRY) returns a Listing: what it offers before the split.

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


def _list_aptos(root: Path, *, num_classes: int, rng: np.random.Generator, **_) -> Listing:
    ids, labels, grades = _aptos_catalog(root, num_classes)
    in_test = _stratified_mask(grades, APTOS_TEST_FRACTION, rng)
    return Listing((ids[~in_test], labels[~in_test], grades[~in_test]), (ids[in_test], labels[in_test], grades[in_test]))


def _list_cxr(root: Path, **_) -> Listing:
    return Listing(*_cxr_catalog(root))


def imagenette_classes(pair: str) -> list[str]:
    """The two wnids of ``--imagenette-pair`` ("wnid,wnid"), checked against the ten classes."""
    wnids = [w.strip() for w in str(pair).split(",") if w.strip()]
    if len(wnids) != 2 or len(set(wnids)) != 2 or not set(wnids) <= set(IMAGENETTE_NAMES):
        raise UserError(f"--imagenette-pair {pair!r}: expected two different wnids out of "
                        + ", ".join(f"{w} ({n})" for w, n in IMAGENETTE_NAMES.items()))
    return wnids


def _imagenette_folder(root: Path, part: str, wnids: list[str]):
    ids, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = root / part / wnid
        if not folder.is_dir():
            raise UserError(f"missing class folder {folder}; expected the Imagenette layout {IMAGENETTE_LAYOUT}")
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        ids += [f"{part}/{wnid}/{f}" for f in files]
        labels += [label] * len(files)
    labels = np.array(labels, dtype=np.int64)
    return np.array(ids), labels, labels


def _list_imagenette(root: Path, *, imagenette_pair: str = IMAGENETTE_PAIR, **_) -> Listing:
    wnids = imagenette_classes(imagenette_pair)
    if not root.is_dir():
        raise UserError(f"imagenette data root {root} not found; expected the layout {IMAGENETTE_LAYOUT} (see --data-root)")
    # Imagenette's val/ has labels and is never trained on: it is the test part.
    return Listing(_imagenette_folder(root, "train", wnids), _imagenette_folder(root, "val", wnids),
                   {"imagenette_pair": ",".join(wnids), "class_names": [IMAGENETTE_NAMES[w] for w in wnids]})


def _list_brain(root: None, *, seed: int, synthetic_train: int, synthetic_test: int, **_) -> Listing:
    # brain3d and brain2d list the same subjects: brain2d's images are brain3d's centre slices.
    return Listing(brain3d_pool("train", synthetic_train, seed), brain3d_pool("test", synthetic_test, seed),
                   {"generated": {"train": synthetic_train, "test": synthetic_test, "generator": f"brain3d v{BRAIN3D_VERSION}"}})


def _list_synthetic(root: None, *, seed: int, synthetic_train: int, synthetic_test: int, **_) -> Listing:
    return Listing(synthetic_pool("train", synthetic_train, seed), synthetic_pool("test", synthetic_test, seed),
                   {"synthetic": {"train": synthetic_train, "test": synthetic_test, "generator": SYNTHETIC_VERSION}})


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
                  max_train_per_class: int | None = None, synthetic_train: int | None = None,
                  synthetic_test: int | None = None, imagenette_pair: str = IMAGENETTE_PAIR) -> dict[str, Any]:
    """Decide the train/val/test parts (ids and labels); the result is what split.json holds.

    Validation is carved (seeded, stratified) from the training pool, never from test. With
    ``max_train_per_class`` the training pool is first reduced per class (seeded) so that at
    most that many images per class remain for training after the validation carve.
    ``synthetic_train``/``synthetic_test``: a generated set's pool sizes (default: its own).
    """
    info = get(dataset)
    _check_num_classes(info, num_classes)
    image_size = int(image_size or info.image_size)
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {image_size} is too small (at least {MIN_IMAGE_SIZE})")
    if info.pool_sizes:
        synthetic_train = synthetic_train or info.pool_sizes[0]
        synthetic_test = synthetic_test or info.pool_sizes[1]
    if not 0 < val_fraction < 1:
        raise UserError(f"validation fraction {val_fraction} must lie in (0, 1)")
    rng = np.random.default_rng([seed, 101])
    root = None if info.generated else str(data_root if data_root is not None else default_data_root(info.name))
    listing = info.list_split(None if root is None else Path(root), num_classes=num_classes, seed=seed, rng=rng,
                              synthetic_train=synthetic_train, synthetic_test=synthetic_test,
                              imagenette_pair=imagenette_pair)
    ids, labels, strata = listing.pool
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
             "test": listing.test[:2]}
    split: dict[str, Any] = {
        "dataset": info.name, "data_root": root, "image_size": image_size, "num_classes": num_classes,
        "class_names": list(info.classes[num_classes]), "seed": seed, "val_fraction": val_fraction,
        "max_train_per_class": max_train_per_class, **(listing.record or {}),  # may name the classes
    }
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
    if not isinstance(split, dict):
        raise UserError(f"{Path(run_dir) / SPLIT_FILE} is not a data split; re-run train.py")
    for key in ("dataset", "image_size", "num_classes", "class_names", *PARTS):
        if key not in split:
            raise UserError(f"{Path(run_dir) / SPLIT_FILE} lacks {key!r}; re-run train.py")
    return split


def check_arch_fits(info: DatasetInfo, arch: str) -> None:
    """A 3D arch for a volumetric set, a 2D one otherwise (UserError naming the archs that fit)."""
    if info.volumetric == network.is_volumetric(arch):
        return
    fitting = [a for a in network.ARCHS if network.is_volumetric(a) == info.volumetric]
    what = "1-channel volumes" if info.volumetric else "images"
    raise UserError(f"-a {arch} does not read {what}, which {info.name} holds; choose one of {', '.join(fitting)}")


def describe_split(split: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Images per class in each part, e.g. {"train": {"no DR": 270, "DR": 275}, ...}."""
    names = split["class_names"]
    return {part: {names[c]: int(np.sum(np.array(split[part]["labels"]) == c)) for c in range(len(names))}
            for part in PARTS}


# ----------------------------------------------------------------------------- images

def load_arrays(split: dict[str, Any], parts=PARTS, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (uint8 N×H×W×3) and labels (int64) of the given parts of a split."""
    info = get(split["dataset"])
    size = int(split["image_size"])
    out = {}
    if info.generated:
        for part in parts:
            ids = split[part]["ids"]
            labels = np.array(split[part]["labels"], dtype=np.int64)
            out[part] = (info.render(ids, labels, int(split["seed"]), size), labels)
        return out
    root = Path(split["data_root"])
    wanted = [i for part in parts for i in split[part]["ids"]]
    images = _cached_images(info, root, size, wanted, cache_dir, workers, progress)
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


def _cached_images(info: DatasetInfo, root: Path, size: int, ids: list[str], cache_dir, workers,
                   progress) -> dict[str, np.ndarray]:
    """id -> uint8 H×W×3; decodes only what the cache lacks, then stores the union."""
    dataset = info.name
    if not root.is_dir():
        raise UserError(f"{dataset} data root {root} not found; expected {info.layout}")
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
        decode = info.decode
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


def _decode_rgb(path: Path, size: int) -> np.ndarray:
    rgb = _open_image(path, size).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_cxr(path: Path, size: int) -> np.ndarray:
    gray = _open_image(path, size).convert("L").resize((size, size), Image.Resampling.BICUBIC)
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- the registry
# The one place that says which data sets exist. A new data set is one entry here plus its
# list_split and decode (or render) functions.

REGISTRY: dict[str, DatasetInfo] = {
    "APTOS": DatasetInfo(
        name="APTOS", image_size=128, epochs=20, flip_dims=(2, 3), max_train_per_class=None,
        classes={2: ("no DR", "DR"),
                 5: ("grade 0 (no DR)", "grade 1 (mild)", "grade 2 (moderate)", "grade 3 (severe)",
                     "grade 4 (proliferative)")},
        list_split=_list_aptos, layout=f"the Kaggle layout {APTOS_LAYOUT}", decode=_decode_aptos),
    # CXR has 5216 training images (1341 NORMAL, 3875 PNEUMONIA); 500 per class, balanced, keeps
    # a ResNet-50 epoch at 128 px near a minute on one CPU core, so 12 epochs fit in 15 minutes.
    "CXR": DatasetInfo(
        name="CXR", image_size=128, epochs=12, flip_dims=(3,), max_train_per_class=500,
        classes={2: CXR_CLASSES}, list_split=_list_cxr, layout=f"the Kaggle layout {CXR_LAYOUT}", decode=_decode_cxr),
    # Natural photographs, for the stress test's medical-vs-natural comparison (docs/PROTOCOL.md §11).
    "imagenette": DatasetInfo(
        name="imagenette", image_size=128, epochs=20, flip_dims=(3,), max_train_per_class=None,
        classes={2: tuple(IMAGENETTE_NAMES[w] for w in IMAGENETTE_PAIR.split(","))}, list_split=_list_imagenette,
        layout=f"the layout {IMAGENETTE_LAYOUT}", decode=_decode_rgb, natural=True),
    "synthetic": DatasetInfo(
        name="synthetic", image_size=64, epochs=8, flip_dims=(2, 3), max_train_per_class=None,
        # At ε = 1/256 the 64 px synthetic model's base AEs are hard to detect (mean AUC ~0.75):
        # the main job shows the phenomenon at ε = 6/256, where they are (docs/PROTOCOL.md §3).
        main_attack="I_FGSM_Linf_6",
        # Eight epochs are too few for the plateau rule to act: the checkpoint then depends on
        # which epoch happened to score best (seed 1: epoch 5, base AEs detected by only four of
        # the seven detectors). A cosine decay to 0 ends every seed on a converged model.
        lr_schedule="cosine",
        # The eight-epoch schedule was measured at batch 16 (54 steps an epoch); a GPU's batch 64
        # would make it a quarter of the steps. The one GPU run, at batch 64, gave base AEs that
        # only two detectors of seven caught with AUC >= 0.9 (five or six on the CPU runs).
        batch_size=16,
        classes={2: ("healthy", "lesions")}, list_split=_list_synthetic, render=synthetic_images,
        pool_sizes=(SYNTHETIC_TRAIN, SYNTHETIC_TEST)),
    # The 3D testbed (docs/PROTOCOL.md §11): MNI152 brains, warped per subject, with synthetic
    # lesions in class 1 (brain3d.py); no download. brain2d is the same subjects' centre axial
    # slices, the 2D side of the 2D-vs-3D comparison.
    "brain3d": DatasetInfo(
        name="brain3d", image_size=32, epochs=20, flip_dims=(4,), max_train_per_class=None,
        # At ε = 1/256 the 32³ model's base AEs succeed on 69 % of A and no detector catches them
        # (AUC 0.40-0.64); at ε = 4/256 every one succeeds and five of seven detectors reach AUC
        # >= 0.9 (README, 3D). The main job runs there, as the synthetic set's runs at 6/256.
        main_attack="I_FGSM_Linf_4",
        classes={2: ("no lesion", "lesion")}, list_split=_list_brain, render=brain3d_volumes, lr_schedule="cosine",
        batch_size=16, volumetric=True, pool_sizes=(BRAIN3D_TRAIN, BRAIN3D_TEST)),
    "brain2d": DatasetInfo(
        name="brain2d", image_size=32, epochs=20, flip_dims=(3,), max_train_per_class=None,
        main_attack="I_FGSM_Linf_4",
        classes={2: ("no lesion", "lesion")}, list_split=_list_brain, render=brain3d_slices, lr_schedule="cosine",
        batch_size=16, pool_sizes=(BRAIN3D_TRAIN, BRAIN3D_TEST)),
}
