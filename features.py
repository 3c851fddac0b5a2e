"""One forward pass over an image set: logits and every pooled hierarchical feature.

KD, LID, MAHA, SVM and the ensembles work on these cached features, BU re-runs only the head
on the cached feature at ``model.head_input_index``; MAHA's input pre-processing (gradients)
and the DNN detector (feature maps) need the images, which the FeatureSet keeps. The maps of
the DNN layers can be kept from the same pass (``keep_maps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

import datasets
import network
import runs
from utils import UserError, batches, load_npz, replacing_dir, save_npz, write_json


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of ``limit`` of ``n`` items drawn with ``seed`` (all n when limit is 0/None or ≥ n):
    the training images whose statistics the detectors keep (extract_features.py ``--train-limit``)."""
    if not limit or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))

DEFAULT_BATCH_SIZE = 32
MIN_HELDOUT_PER_CLASS = 2  # fewer validation images of a class: measured on its training images


@dataclass
class FeatureSet:
    """Cached outputs for N images (all on the CPU).

    ``images``: float32 N×3×H×W in [0, 1]; ``logits``: float32 N×K; ``pooled``: one float32
    N×C_l array per hierarchical layer; ``labels``: int64 N (true labels) or None;
    ``maps``: {layer index: float32 N×C×h×w tensor} for the layers asked for in ``keep_maps``.
    """

    images: torch.Tensor
    logits: np.ndarray
    pooled: list[np.ndarray]
    labels: np.ndarray | None = None
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def subset(self, positions) -> "FeatureSet":
        """The samples at ``positions`` (an index array or a boolean mask), in that order."""
        positions = np.asarray(positions)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        torch_positions = torch.from_numpy(positions.astype(np.int64))
        return FeatureSet(
            images=self.images[torch_positions],
            logits=self.logits[positions],
            pooled=[layer[positions] for layer in self.pooled],
            labels=None if self.labels is None else self.labels[positions],
            maps={index: m[torch_positions] for index, m in self.maps.items()})

    @staticmethod
    def concat(sets: Sequence["FeatureSet"]) -> "FeatureSet":
        """Stack feature sets in order (maps kept only for layers every set has)."""
        if not sets:
            raise ValueError("nothing to concatenate")
        labels = None if any(s.labels is None for s in sets) else np.concatenate([s.labels for s in sets])
        common_maps = set.intersection(*(set(s.maps) for s in sets))
        return FeatureSet(
            images=torch.cat([s.images for s in sets]),
            logits=np.concatenate([s.logits for s in sets]),
            pooled=[np.concatenate([s.pooled[i] for s in sets]) for i in range(len(sets[0].pooled))],
            labels=labels,
            maps={index: torch.cat([s.maps[index] for s in sets]) for index in sorted(common_maps)})


def model_device(model: torch.nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def as_image_tensor(images) -> torch.Tensor:
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    return tensor.detach().to("cpu", torch.float32).contiguous()


@torch.no_grad()
def extract(model, images, device: torch.device | str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            progress: bool = True, labels=None, keep_maps: Sequence[int] = (),
            desc: str = "features") -> FeatureSet:
    """One forward pass (eval mode) over ``images``: logits, pooled features, chosen maps."""
    images = as_image_tensor(images)
    device = torch.device(device) if device is not None else model_device(model)
    model.eval()  # features are always those of the deployed (eval-mode) network
    n = len(images)
    if n == 0:  # an empty set (e.g. no successful AE): shapes from a dummy image, zero rows
        probe = extract(model, torch.zeros(1, *images.shape[1:]), device, 1, False, None, keep_maps, desc)
        return probe.subset(np.zeros(0, np.int64)) if labels is None else FeatureSet(
            images, probe.logits[:0], [p[:0] for p in probe.pooled], np.zeros(0, np.int64),
            {i: m[:0] for i, m in probe.maps.items()})
    logits_all: np.ndarray | None = None
    pooled_all: list[np.ndarray] = []
    maps_all: dict[int, torch.Tensor] = {}
    for part in tqdm(list(batches(n, batch_size)), desc=desc, disable=not progress, leave=False):
        logits, maps = model.forward_maps(images[part].to(device))
        if logits_all is None:
            logits_all = np.empty((n, logits.shape[1]), np.float32)
            pooled_all = [np.empty((n, m.shape[1]), np.float32) for m in maps]
            maps_all = {i: torch.empty((n, *maps[i].shape[1:]), dtype=torch.float32) for i in keep_maps}
        logits_all[part] = logits.float().cpu().numpy()
        for layer, feature_map in enumerate(maps):
            pooled_all[layer][part] = network.pooled(feature_map).float().cpu().numpy()
        for index in keep_maps:
            maps_all[index][part] = maps[index].float().cpu()
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
    return FeatureSet(images=images, logits=logits_all, pooled=pooled_all, labels=labels, maps=maps_all)


def benign_set(model, clean, noisy, device: torch.device | str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, keep_maps: Sequence[int] = (), progress: bool = True,
               desc: str = "") -> FeatureSet:
    """The protocol's benign set for some images of A: the clean, then the noisy versions, each
    extracted on its own, in the given order."""
    run = lambda images, what: extract(model, as_image_tensor(images), device, batch_size, progress,  # noqa: E731
                                       keep_maps=keep_maps, desc=f"{desc}{what} features")
    return FeatureSet.concat([run(clean, "clean"), run(noisy, "noise")])


def adv_set(model, adv, success, device: torch.device | str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            keep_maps: Sequence[int] = (), progress: bool = True, desc: str = "") -> FeatureSet:
    """The protocol's adversarial set: the AEs where ``success``, in the given order."""
    success = torch.from_numpy(np.asarray(success, dtype=bool))
    return extract(model, as_image_tensor(adv)[success], device, batch_size, progress, keep_maps=keep_maps,
                   desc=f"{desc}AE features")


def benign_and_adv(model, clean, noisy, adv, success, device: torch.device | str | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, keep_maps: Sequence[int] = (), progress: bool = True,
                   desc: str = "") -> tuple[FeatureSet, FeatureSet]:
    """The protocol's two sets for some images of A (docs/PROTOCOL.md §6): ``benign_set`` and
    ``adv_set``. Call it with the same arrays and batch size and the features (hence every
    detector score) are bit-identical."""
    return (benign_set(model, clean, noisy, device, batch_size, keep_maps, progress, desc),
            adv_set(model, adv, success, device, batch_size, keep_maps, progress, desc))


def part_features(run_, model, part: str, device: torch.device | str | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> FeatureSet:
    """The features of every image of one split part (``train``, ``val``, ``test``) of a run, made
    once per model and cached in ``runs_<DATASET>/<run>/features/<part>.npz`` with a provenance
    record (the checkpoint and split it was made from): the stages that read a part's features
    (get_GMM.py, stress_test.py, ood_lesion.py, the sweeps) share one forward pass. A cache whose
    checkpoint or split changed since is made again."""
    folder = run_.dir / "features" / part
    summary = folder / runs.SUMMARY
    inputs = {"checkpoint": run_.checkpoint, "split": run_.split}
    images, labels = datasets.load_part(run_.dir, part)
    if runs.is_done(summary, {"part": part}, inputs):
        cached = load_npz(folder / "features.npz", f"cached {part} features")
        n_layers = sum(1 for key in cached if key.startswith("pooled_"))
        if len(cached["logits"]) == len(images):
            return FeatureSet(images=images, logits=cached["logits"], labels=cached["labels"],
                              pooled=[cached[f"pooled_{i}"] for i in range(n_layers)])
    feats = extract(model, images, device, batch_size, progress, labels=labels.numpy(), desc=f"{part} features")
    try:
        with replacing_dir(folder) as staging:
            save_npz(staging / "features.npz", logits=feats.logits, labels=feats.labels,
                     **{f"pooled_{i}": layer for i, layer in enumerate(feats.pooled)})
            write_json(staging / runs.SUMMARY, {
                "part": part, "images": len(feats), "layers": len(feats.pooled),
                "record": runs.record("features", {"part": part}, inputs, [staging / "features.npz"],
                                      folder=staging)})
    except OSError as err:  # a cache that cannot be written (full disk, a concurrent writer) is only slower
        print(f"note: features of {part} not cached ({err})")
    return feats


def heldout_pooled(val_pooled: Sequence[np.ndarray], val_labels: np.ndarray, num_classes: int,
                   train: Callable[[], FeatureSet]) -> tuple[list[np.ndarray], np.ndarray]:
    """The held-out clean features of a run, by class: its validation images, except that a class
    with fewer than ``MIN_HELDOUT_PER_CLASS`` of them is measured on its training images instead
    (get_GMM.py's term scales, the typical-set term's τ). ``train`` gives the training features, and
    is called only when a class is short."""
    val_labels = np.asarray(val_labels, np.int64)
    short = np.flatnonzero(np.bincount(val_labels, minlength=num_classes) < MIN_HELDOUT_PER_CLASS)
    if not len(short):
        return list(val_pooled), val_labels
    train_set = train()
    keep, extra = ~np.isin(val_labels, short), np.isin(train_set.labels, short)
    pooled = [np.concatenate([p[keep], t[extra]]) for p, t in zip(val_pooled, train_set.pooled)]
    return pooled, np.concatenate([val_labels[keep], train_set.labels[extra]])


def per_class_median(values: np.ndarray, labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """classes × columns: the median of the rows of ``values`` (N × columns) of each class, for
    the held-out statistics the typical-set and exemplar terms are normalised by. Every class needs
    at least one row; ``what`` names the statistic in the one-line error."""
    labels = np.asarray(labels, np.int64)
    missing = [c for c in range(num_classes) if not np.any(labels == c)]
    if missing:
        raise UserError(f"no held-out clean image of class(es) {missing} to measure {what} on")
    return np.stack([np.median(values[labels == c], axis=0) for c in range(num_classes)])
