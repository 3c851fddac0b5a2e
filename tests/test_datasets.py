"""Loaders on tiny Kaggle-layout fixtures, broken layouts, splits, the cache, the synthetic set."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import synthetic
import train
import utils
from utils import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- fixtures

def _fundus_png(path: Path, seed: int) -> None:
    """A bright disc off-centre on a wide black canvas (the crop must find it)."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((60, 90, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:60, :90]
    disc = (yy - 30) ** 2 + (xx - 40) ** 2 < 20 ** 2
    canvas[disc] = rng.integers(120, 220, 3)
    Image.fromarray(canvas).save(path)


def make_aptos(root: Path, grades=(0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 0, 0, 2, 1)) -> Path:
    (root / "train_images").mkdir(parents=True)
    rows = ["id_code,diagnosis"]
    for i, grade in enumerate(grades):
        rows.append(f"img{i:03d},{grade}")
        _fundus_png(root / "train_images" / f"img{i:03d}.png", i)
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def make_cxr(root: Path, with_val: bool, counts=None) -> Path:
    counts = counts or {"train": (6, 10), "test": (3, 4), "val": (2, 2)}
    for part, (n_normal, n_pneu) in counts.items():
        if part == "val" and not with_val:
            continue
        for name, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneu)):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                gray = np.full((40, 50), min(250, 60 + 3 * i + (80 if name == "PNEUMONIA" else 0)), dtype=np.uint8)
                Image.fromarray(gray).convert("RGB").save(folder / f"{name.lower()}{i}.jpeg")
    (root / "train" / "NORMAL" / ".DS_Store").write_text("")  # ignored, as on a Mac download
    return root


# ----------------------------------------------------------------------------- APTOS

def test_aptos_binary_split_and_crop(tmp_path):
    root = make_aptos(tmp_path / "aptos")
    split = datasets.prepare_split("aptos", root, image_size=32, seed=3)
    assert split["dataset"] == "APTOS" and split["num_classes"] == 2 and split["class_names"] == ["no DR", "DR"]
    assert split["data_root"] == str(root) and split["image_size"] == 32
    all_ids = split["train"]["ids"] + split["val"]["ids"] + split["test"]["ids"]
    assert sorted(all_ids) == sorted(f"train_images/img{i:03d}.png" for i in range(20))
    grade_of = {f"train_images/img{i:03d}.png": g for i, g in enumerate(
        (0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 0, 0, 2, 1))}
    # Stratified per grade: every grade is in test (20 %, at least one each) and in train.
    test_grades = [grade_of[i] for i in split["test"]["ids"]]
    assert sorted(set(test_grades)) == [0, 1, 2, 3, 4] and len(test_grades) == 6
    assert {grade_of[i] for i in split["train"]["ids"]} == {0, 1, 2, 3, 4}
    assert len(split["val"]["ids"]) >= 2              # carved from train, never from test
    for part in datasets.PARTS:
        assert split[part]["labels"] == [int(grade_of[i] > 0) for i in split[part]["ids"]]
    arrays = datasets.load_arrays(split, cache_dir=tmp_path / "cache", progress=False)
    images, labels = arrays["test"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    # Cropped to the fundus's bounding box: the disc now touches all four borders.
    for image in arrays["train"][0]:
        assert image[16, 1].max() > 60 and image[16, -2].max() > 60 and image[1, 16].max() > 60
        assert image[0, 0].max() < 40               # the corners outside the disc stay dark


def test_aptos_five_classes(tmp_path):
    root = make_aptos(tmp_path / "aptos")
    split = datasets.prepare_split("APTOS", root, image_size=32, num_classes=5)
    assert split["num_classes"] == 5 and len(split["class_names"]) == 5
    labels = split["train"]["labels"] + split["val"]["labels"] + split["test"]["labels"]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4]


def test_fundus_box():
    image = np.zeros((50, 80, 3), dtype=np.uint8)
    image[10:40, 20:55] = 100
    assert datasets.fundus_box(image) == (10, 40, 20, 55)
    assert datasets.fundus_box(np.zeros((5, 6, 3), np.uint8)) == (0, 5, 0, 6)


# ----------------------------------------------------------------------------- CXR

@pytest.mark.parametrize("with_val", [False, True])
def test_cxr_official_split_with_and_without_val(tmp_path, with_val):
    root = make_cxr(tmp_path / "cxr", with_val)
    split = datasets.prepare_split("cxr", root, image_size=24, seed=0)
    assert split["dataset"] == "CXR" and split["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert sorted(split["test"]["ids"]) == sorted(
        [f"test/NORMAL/normal{i}.jpeg" for i in range(3)] + [f"test/PNEUMONIA/pneumonia{i}.jpeg" for i in range(4)])
    pool = split["train"]["ids"] + split["val"]["ids"]
    assert len(pool) == 16 + (4 if with_val else 0)   # the official val/ joins the training pool
    assert all(i.startswith(("train/", "val/")) for i in pool)
    for part in datasets.PARTS:
        assert split[part]["labels"] == [int("/PNEUMONIA/" in i) for i in split[part]["ids"]]
    images, labels = datasets.load_arrays(split, ("test",), cache_dir=tmp_path / "c", progress=False)["test"]
    assert images.shape == (7, 24, 24, 3)
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    # Brightness encodes the class in the fixture: the loader kept labels and pixels together.
    assert images[labels == 1].mean() > images[labels == 0].mean() + 40


def test_cap_on_training_images_per_class(tmp_path):
    root = make_cxr(tmp_path / "cxr", False, counts={"train": (30, 50), "test": (2, 2)})
    split = datasets.prepare_split("CXR", root, image_size=16, max_train_per_class=10)
    train = np.array(split["train"]["labels"])
    assert np.sum(train == 0) == 10 and np.sum(train == 1) == 10
    assert len(split["val"]["ids"]) >= 2 and not set(split["val"]["ids"]) & set(split["train"]["ids"])


# ----------------------------------------------------------------------------- broken layouts

def _break_aptos(root: Path, how: str) -> tuple[Path, str]:
    make_aptos(root)
    if how == "missing root":
        return root / "nope", "train.csv"
    if how == "missing csv":
        (root / "train.csv").unlink()
        return root, "train.csv"
    if how == "missing image folder":
        for f in (root / "train_images").iterdir():
            f.unlink()
        (root / "train_images").rmdir()
        return root, "train_images"
    if how == "bad header":
        (root / "train.csv").write_text("image,level\nimg000,0\n")
        return root, "id_code,diagnosis"
    if how == "unknown label":
        (root / "train.csv").write_text("id_code,diagnosis\nimg000,0\nimg001,7\n")
        return root, "line 3"
    if how == "missing image":
        (root / "train_images" / "img004.png").unlink()
        return root, "img004.png"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing root", "missing csv", "missing image folder", "bad header",
                                 "unknown label", "missing image"])
def test_broken_aptos_layouts(tmp_path, how):
    root, expected = _break_aptos(tmp_path / "aptos", how)
    with pytest.raises(UserError) as err:
        datasets.prepare_split("APTOS", root, image_size=16)
    message = str(err.value)
    assert expected in message and "\n" not in message


def _break_cxr(root: Path, how: str) -> tuple[Path, str]:
    make_cxr(root, with_val=False)
    if how == "missing root":
        return root / "nope", "{NORMAL,PNEUMONIA}"
    if how == "missing test folder":
        _rmtree(root / "test")
        return root, str(root / "test")
    if how == "missing class folder":
        _rmtree(root / "train" / "PNEUMONIA")
        return root, str(root / "train" / "PNEUMONIA")
    if how == "unknown label folder":
        (root / "train" / "COVID").mkdir()
        return root, "COVID"
    if how == "empty class folder":
        for f in (root / "test" / "NORMAL").iterdir():
            f.unlink()
        return root, str(root / "test" / "NORMAL")
    raise AssertionError(how)


def _rmtree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


@pytest.mark.parametrize("how", ["missing root", "missing test folder", "missing class folder",
                                 "unknown label folder", "empty class folder"])
def test_broken_cxr_layouts(tmp_path, how):
    root, expected = _break_cxr(tmp_path / "cxr", how)
    with pytest.raises(UserError) as err:
        datasets.prepare_split("CXR", root, image_size=16)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dataset", ["APTOS", "CXR"])
def test_unreadable_image_names_the_file(tmp_path, dataset):
    if dataset == "APTOS":
        root = make_aptos(tmp_path / "d")
        bad = root / "train_images" / "img002.png"
    else:
        root = make_cxr(tmp_path / "d", with_val=False)
        bad = root / "test" / "PNEUMONIA" / "pneumonia1.jpeg"
    bad.write_bytes(b"this is not an image")
    split = datasets.prepare_split(dataset, root, image_size=16)
    with pytest.raises(UserError) as err:
        datasets.load_arrays(split, cache_dir=tmp_path / "cache", progress=False)
    assert str(bad) in str(err.value)


def test_bad_num_classes_and_dataset(tmp_path):
    with pytest.raises(UserError, match="num-classes"):
        datasets.prepare_split("CXR", make_cxr(tmp_path / "c", False), num_classes=5)
    with pytest.raises(UserError, match="unknown dataset"):
        datasets.prepare_split("mnist")


def test_registry_is_the_one_source():
    assert {"APTOS", "CXR", "synthetic"} <= set(datasets.REGISTRY)
    for name, info in datasets.REGISTRY.items():
        assert info.name == name
        assert datasets.get(name.lower()) is info and datasets.get(name.upper()) is info
        assert datasets.get(name.swapcase()).name == name
        assert 2 in info.classes and all(len(names) == n for n, names in info.classes.items())
        assert info.generated == (info.layout is None) and (info.decode is None) == info.generated
    # The defaults as they stood before the registry.
    assert {n: (d.image_size, d.epochs, d.flip_dims, d.max_train_per_class)
            for n, d in datasets.REGISTRY.items() if n in ("APTOS", "CXR", "synthetic")} == {
        "APTOS": (128, 20, (2, 3), None), "CXR": (128, 12, (3,), 500), "synthetic": (64, 8, (2, 3), None)}
    with pytest.raises(UserError) as err:
        datasets.get("mnist")
    assert str(err.value) == (f"unknown dataset 'mnist'; expected one of {', '.join(datasets.REGISTRY)} "
                              "(case-insensitive)") and "\n" not in str(err.value)
    assert not any(hasattr(module, old) for module, old in (
        (datasets, "DEFAULT_IMAGE_SIZE"), (datasets, "DEFAULT_MAX_TRAIN_PER_CLASS"), (datasets, "FLIP_DIMS"),
        (train, "DEFAULT_EPOCHS"), (utils, "DATASET_NAMES"), (utils, "canonical_dataset")))
    assert datasets.class_names("aptos", 5)[4] == "grade 4 (proliferative)"
    assert datasets.default_data_root("cxr") == Path("datasets") / "CXR"


# ----------------------------------------------------------------------------- cache

def test_cache_decodes_once_and_is_keyed_by_size(tmp_path, monkeypatch):
    root = make_aptos(tmp_path / "aptos")
    cache = tmp_path / "cache"
    split = datasets.prepare_split("APTOS", root, image_size=32)
    first = datasets.load_arrays(split, cache_dir=cache, progress=False)
    assert len(list(cache.glob("APTOS_32px_*.npz"))) == 1

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setitem(datasets.REGISTRY, "APTOS", dataclasses.replace(datasets.get("APTOS"), decode=no_decoding))
    second = datasets.load_arrays(split, cache_dir=cache, progress=False)
    for part in datasets.PARTS:
        assert np.array_equal(first[part][0], second[part][0])
    with pytest.raises(AssertionError, match="decoded"):   # another size is another cache entry
        datasets.load_arrays(datasets.prepare_split("APTOS", root, image_size=24), cache_dir=cache, progress=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HFC_CACHE_DIR", str(tmp_path / "envcache"))
    assert datasets.cache_dir_default() == tmp_path / "envcache"
    monkeypatch.delenv("HFC_CACHE_DIR")
    assert datasets.cache_dir_default() == Path(".cache")


# ----------------------------------------------------------------------------- determinism, synthetic

def test_same_seed_same_split_other_seed_other_split(tmp_path):
    root = make_aptos(tmp_path / "aptos")
    a = datasets.prepare_split("APTOS", root, image_size=16, seed=1)
    b = datasets.prepare_split("APTOS", root, image_size=16, seed=1)
    c = datasets.prepare_split("APTOS", root, image_size=16, seed=2)
    assert a == b
    assert any(a[p]["ids"] != c[p]["ids"] for p in datasets.PARTS)


def test_synthetic_is_deterministic_balanced_and_fundus_like():
    split = datasets.prepare_split("synthetic", image_size=48, seed=5, synthetic_train=40, synthetic_test=20)
    assert split["data_root"] is None and split["image_size"] == 48
    assert len(split["train"]["ids"]) + len(split["val"]["ids"]) == 40 and len(split["test"]["ids"]) == 20
    assert sum(split["test"]["labels"]) == 10
    first = datasets.load_arrays(split, progress=False)
    again = datasets.load_arrays(datasets.prepare_split("synthetic", image_size=48, seed=5, synthetic_train=40,
                                                        synthetic_test=20), progress=False)
    other = datasets.load_arrays(datasets.prepare_split("synthetic", image_size=48, seed=6, synthetic_train=40,
                                                        synthetic_test=20), progress=False)
    images, labels = first["test"]
    assert images.shape == (20, 48, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again["test"][0])
    assert not np.array_equal(images, other["test"][0])
    assert images[:, :2, :2].max() == 0                              # black outside the round retina
    centre = images[:, 16:32, 16:32].astype(float)
    assert (centre[..., 0].mean(axis=(1, 2)) > centre[..., 2].mean(axis=(1, 2)) + 30).all()  # reddish fundus
    assert len({img.tobytes() for img in images}) == 20               # every image differs


def test_synthetic_lesions_mark_class_one():
    ids = [f"test/{i}" for i in range(12)]
    healthy = datasets.synthetic_images(ids, np.zeros(12, np.int64), 0, 64).astype(float)
    sick = datasets.synthetic_images(ids, np.ones(12, np.int64), 0, 64).astype(float)
    # Same image apart from the lesions: they change a small, non-empty part of each image.
    changed = (np.abs(sick - healthy).max(axis=3) > 40).mean(axis=(1, 2))
    assert (changed > 0).all() and (changed < 0.1).all()
    # The image for one id does not depend on which other ids share its batch.
    alone = datasets.synthetic_images(ids[5:6], np.ones(1, np.int64), 0, 64).astype(float)
    assert np.array_equal(alone[0], sick[5])


def test_synthetic_images_are_pinned():
    """The renderer's output, bit for bit (checksums taken before it moved to synthetic.py)."""
    ids = ["train/0", "train/1", "train/7", "test/0", "test/3", "test/11"]
    labels = np.array([0, 1, 1, 0, 1, 1])
    digest = lambda images: hashlib.sha256(images.tobytes()).hexdigest()  # noqa: E731
    assert digest(synthetic.synthetic_images(ids, labels, seed=0, size=32)) == \
        "da5c408e3e5e39b24cc0bd1e36ea8d7e0d7b52617d46e10f1ebdab963e5a630d"
    assert digest(synthetic.synthetic_images(ids[:4], labels[:4], seed=7, size=48)) == \
        "ac8f3ece8b9ca68c547bed6656464a1691b7f58fdf053a7311a9e9158c27db85"
    split = datasets.prepare_split("synthetic", image_size=32, seed=2, synthetic_train=30, synthetic_test=10)
    assert hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest() == \
        "c44c7a4082ae107c5377b00ad2c0ce62c3f7bc0ff6fe40a0a9e376a560b159cb"
    arrays = datasets.load_arrays(split, progress=False)
    assert hashlib.sha256(b"".join(arrays[p][0].tobytes() + arrays[p][1].tobytes() for p in datasets.PARTS)) \
        .hexdigest() == "c629e0f1603ce37e5459aa3e343deebc7a39e34808a48be0f11a85ca10dd162f"


def test_write_read_split_and_load_part(tmp_path):
    split = datasets.prepare_split("synthetic", image_size=32, synthetic_train=20, synthetic_test=10)
    datasets.write_split(tmp_path, split)
    assert datasets.read_split(tmp_path) == json.loads(json.dumps(split))
    images, labels = datasets.load_part(tmp_path, "val")
    assert images.dtype == torch.float32 and images.shape == (len(split["val"]["ids"]), 3, 32, 32)
    assert 0 <= images.min() and images.max() <= 1 and labels.dtype == torch.int64
    assert labels.tolist() == split["val"]["labels"]
    expected = datasets.load_arrays(split, ("val",), progress=False)["val"][0]
    assert torch.equal(images, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(UserError, match="train.py"):
        datasets.read_split(tmp_path / "missing")


# ----------------------------------------------------------------------------- the real folders

def _few(split: dict, n: int = 3) -> dict:
    return {**split, **{part: {k: v[:n] for k, v in split[part].items()} for part in datasets.PARTS}}


@pytest.mark.skipif(not (SHARED_DATA / "chest_xray").is_dir(), reason="../shared/data/chest_xray absent")
def test_real_cxr(tmp_path):
    root = SHARED_DATA / "chest_xray"
    (pool, pool_labels, _), (test, test_labels, _) = datasets._cxr_catalog(root)
    assert np.bincount(pool_labels).tolist() == [1341, 3875]
    assert np.bincount(test_labels).tolist() == [234, 390]
    split = datasets.prepare_split("CXR", root, image_size=64, max_train_per_class=200)
    assert np.bincount(split["test"]["labels"]).tolist() == [234, 390]
    assert np.bincount(split["train"]["labels"]).tolist() == [200, 200]
    arrays = datasets.load_arrays(_few(split), cache_dir=tmp_path, progress=False)
    for part in datasets.PARTS:
        assert arrays[part][0].shape == (3, 64, 64, 3)


@pytest.mark.skipif(not (SHARED_DATA / "aptos2019").is_dir(), reason="../shared/data/aptos2019 absent")
def test_real_aptos(tmp_path):
    root = SHARED_DATA / "aptos2019"
    ids, labels, grades = datasets._aptos_catalog(root, 2)
    assert len(ids) == 799 and np.bincount(labels).tolist() == [394, 405]
    assert np.bincount(grades).tolist() == [394, 81, 218, 42, 64]
    split = datasets.prepare_split("APTOS", root, image_size=64)
    assert len(split["test"]["ids"]) == 160            # stratified 80/20
    arrays = datasets.load_arrays(_few(split), cache_dir=tmp_path, progress=False)
    images = arrays["train"][0]
    assert images.shape == (3, 64, 64, 3)
    assert images[:, 32, 2].max() > 30     # cropped to the fundus: its rim reaches the border
