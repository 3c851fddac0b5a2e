"""The synthetic 3D brain set: pools, shapes, determinism, local lesions, the cache, errors."""
from __future__ import annotations

import numpy as np
import pytest

import brain3d
from brain3d import brain3d_pool, brain3d_slices, brain3d_volumes, check_size
from utils import UserError


def test_pools_are_balanced_and_deterministic():
    for part, n in (("train", 11), ("test", 6)):
        ids, labels, strata = brain3d_pool(part, n, seed=3)
        assert list(ids) == [f"{part}/{i}" for i in range(n)]
        assert labels.dtype == np.int64 and labels.sum() == n // 2 and set(labels) <= {0, 1}
        assert np.array_equal(strata, labels)
        again = brain3d_pool(part, n, seed=3)
        assert np.array_equal(again[0], ids) and np.array_equal(again[1], labels)
    assert not all(np.array_equal(brain3d_pool("train", 40, s)[1], brain3d_pool("train", 40, 0)[1]) for s in (1, 2))
    with pytest.raises(UserError):
        brain3d_pool("train", 1, seed=0)


def test_shapes_dtypes_and_slices(tmp_path):
    ids, labels = ["train/0", "train/1", "test/2"], [0, 1, 1]
    volumes = brain3d_volumes(ids, labels, seed=0, size=16, progress=False, cache_dir=tmp_path)
    assert volumes.shape == (3, 16, 16, 16, 1) and volumes.dtype == np.uint8
    slices = brain3d_slices(ids, labels, seed=0, size=16, progress=False, cache_dir=tmp_path)
    assert slices.shape == (3, 16, 16, 3) and slices.dtype == np.uint8
    assert np.array_equal(slices, np.repeat(volumes[:, 8], 3, axis=-1))
    assert list(tmp_path.iterdir()) == [tmp_path / f"brain3d_v{brain3d.BRAIN3D_VERSION}_s0_16.npz"]


def test_deterministic_across_caches_and_seed_dependent(tmp_path):
    ids, labels = ["train/0", "train/1", "test/0"], [0, 1, 0]
    first = brain3d_volumes(ids, labels, seed=4, size=16, progress=False, cache_dir=tmp_path / "a")
    again = brain3d_volumes(ids, labels, seed=4, size=16, progress=False, cache_dir=tmp_path / "b")
    assert np.array_equal(first, again)
    other_seed = brain3d_volumes(ids, labels, seed=5, size=16, progress=False, cache_dir=tmp_path / "a")
    assert all(not np.array_equal(a, b) for a, b in zip(first, other_seed))
    # train/0 and test/0 share an index but not a pool: different subjects.
    assert not np.array_equal(first[0], first[2])


def test_brain_in_the_middle_black_corners(tmp_path):
    volumes = brain3d_volumes([f"train/{i}" for i in range(4)], [0, 1, 0, 1], seed=0, size=16,
                              progress=False, cache_dir=tmp_path)[..., 0]
    corners = volumes[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
    assert corners.max() < 10
    assert volumes[:, 7:9, 7:9, 7:9].mean() > 40
    assert (volumes > 40).mean() > 0.2          # the brain fills a good part of the cube


def test_lesions_are_local_and_on_the_centre_slice(tmp_path):
    size = 24
    for index in (5, 6):
        id_ = f"train/{index}"
        healthy = brain3d_volumes([id_], [0], seed=1, size=size, progress=False, cache_dir=tmp_path)[0, ..., 0]
        sick = brain3d_volumes([id_], [1], seed=1, size=size, progress=False, cache_dir=tmp_path)[0, ..., 0]
        changed = healthy != sick
        assert 0 < changed.mean() < 0.15
        assert changed[size // 2].any()
        assert np.abs(sick[size // 2].astype(int) - healthy[size // 2]).max() > 30
        # In float, before rounding: identical wherever the lesion mask is zero.
        v0, mask0 = brain3d._render(1, id_, 0, size)
        v1, mask1 = brain3d._render(1, id_, 1, size)
        assert not mask0.any() and mask1.any()
        assert np.array_equal(v0[mask1 == 0], v1[mask1 == 0])
        assert not changed[mask1 == 0].any()
        assert np.array_equal(np.round(v1 * 255).astype(np.uint8), sick)


def test_cache_reused_and_extended(tmp_path, monkeypatch):
    ids, labels = ["train/0", "train/1"], [0, 1]
    first = brain3d_volumes(ids, labels, seed=2, size=16, progress=False, cache_dir=tmp_path)

    def refuse(*args):
        raise AssertionError("the cache should have been used")

    real = brain3d._volume
    monkeypatch.setattr(brain3d, "_volume", refuse)
    assert np.array_equal(brain3d_volumes(ids, labels, seed=2, size=16, progress=False, cache_dir=tmp_path), first)
    assert np.array_equal(brain3d_slices(ids, labels, seed=2, size=16, progress=False, cache_dir=tmp_path)[..., 0],
                          first[:, 8, ..., 0])
    made = []
    monkeypatch.setattr(brain3d, "_volume", lambda *args: made.append(args[1]) or real(*args))
    more = brain3d_volumes(ids + ["test/3"], labels + [0], seed=2, size=16, progress=False, cache_dir=tmp_path)
    assert made == ["test/3"]
    assert np.array_equal(more[:2], first)
    monkeypatch.setattr(brain3d, "_volume", refuse)
    assert np.array_equal(brain3d_volumes(["test/3"], [0], seed=2, size=16, progress=False, cache_dir=tmp_path),
                          more[2:])


def test_damaged_cache_is_regenerated(tmp_path):
    ids, labels = ["test/1"], [1]
    first = brain3d_volumes(ids, labels, seed=0, size=16, progress=False, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not an npz")
    assert np.array_equal(brain3d_volumes(ids, labels, seed=0, size=16, progress=False, cache_dir=tmp_path), first)
    assert np.array_equal(brain3d_volumes(ids, labels, seed=0, size=16, progress=False, cache_dir=tmp_path), first)


def test_size_limits(tmp_path):
    with pytest.raises(UserError, match="too small for brain3d"):
        check_size(8)
    with pytest.raises(UserError, match="too small for brain3d"):
        brain3d_volumes(["train/0"], [0], seed=0, size=8, progress=False, cache_dir=tmp_path)
    with pytest.raises(UserError, match="too large"):
        check_size(129)
    check_size(16)
    check_size(128)
    assert not list(tmp_path.iterdir())


def test_missing_templates_or_nilearn(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(brain3d, "_template_dir", lambda: empty)
    with pytest.raises(UserError) as err:
        brain3d_volumes(["train/0"], [0], seed=0, size=16, progress=False, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" in message
    assert "pip install -r requirements.txt" in message and "\n" not in message
    monkeypatch.undo()
    monkeypatch.setattr(brain3d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="nilearn.*pip install -r requirements.txt"):
        brain3d_slices(["train/0"], [0], seed=0, size=16, progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_bad_ids(tmp_path):
    with pytest.raises(UserError, match="bad brain3d id"):
        brain3d_volumes(["val/0"], [0], seed=0, size=16, progress=False, cache_dir=tmp_path)
