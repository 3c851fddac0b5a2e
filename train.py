"""Train a classifier (ResNet / VGG) on APTOS, CXR, an Imagenette pair or the embedded synthetic fundus set.

    python train.py -a resnet50 --dataset synthetic
    python train.py -a resnet50 --dataset APTOS --data-root ../shared/data/aptos2019 --image-size 128

Writes runs_<DATASET>/<name>/{split.json, checkpoint.pt, train_summary.json}. The checkpoint
holds the weights that did best on the validation split (carved from train; test is only
evaluated once, at the end). Adam (weight decay 1e-4), learning rate halved on a plateau of the
validation loss, random flips during training only (docs/PROTOCOL.md §4).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from tqdm import tqdm

import cli
import datasets
import runs
import saver
import utils
from network import build_model

LR_SCHEDULES = ("plateau", "cosine")


@dataclass
class Config(cli.RunConfig):
    data_root: str | None = cli.flag(None, "data folder (default: ./datasets/<DATASET>)")
    image_size: int | None = cli.flag(None, "square input size, or a volume's side (default: 64 for synthetic, 32 "
                                            "for brain3d/brain2d, 128 otherwise; the paper used 256)",
                                      check=cli.at_least(datasets.MIN_IMAGE_SIZE))
    num_classes: int = cli.flag(2, "2, or 5 for APTOS grading", choices=(2, 5))
    max_train_per_class: int | None = cli.flag(
        None, f"cap on training images per class (default: {datasets.get('CXR').max_train_per_class} for CXR, "
              "none otherwise; 0 = no cap)", check=cli.non_negative)
    synthetic_train: int | None = cli.flag(None, "a generated set's training-pool size; validation is carved from "
                                           f"it (default: synthetic {datasets.SYNTHETIC_TRAIN}, brain3d/brain2d "
                                           f"{datasets.BRAIN3D_TRAIN})", check=cli.at_least(2))
    synthetic_test: int | None = cli.flag(None, "a generated set's test-set size (default: synthetic "
                                          f"{datasets.SYNTHETIC_TEST}, brain3d/brain2d {datasets.BRAIN3D_TEST})",
                                          check=cli.at_least(2))
    imagenette_pair: str = cli.flag(datasets.IMAGENETTE_PAIR, "imagenette: the two classes (wnids) of the binary "
                                    "task, class 0 first (default: tench vs parachute)")
    batch_size: int | None = cli.flag(None, "batch size (default: the data set's, 16 for synthetic; else 64 on a "
                                            "GPU, 16 on a CPU, where more steps per epoch pay off)", short="-b", check=cli.at_least(2))
    lr: float = cli.flag(3e-4, "Adam learning rate", check=cli.positive)
    weight_decay: float = cli.flag(1e-4, "Adam weight decay", check=cli.non_negative)
    lr_schedule: str | None = cli.flag(None, "plateau (halve the rate after 2 epochs without a lower validation "
                                             "loss) or cosine (decay to 0 over the epochs) (default per data set: "
                                       + ", ".join(f"{n} {d.lr_schedule}" for n, d in datasets.REGISTRY.items()) + ")",
                                       choices=LR_SCHEDULES)
    epochs: int | None = cli.flag(None, "epochs (default per data set: "
                                  + ", ".join(f"{n} {d.epochs}" for n, d in datasets.REGISTRY.items()) + ")", check=cli.at_least(1))
    pretrained: str | None = cli.flag(None, "start from ImageNet weights (a local torchvision state dict, or "
                                            "'imagenet' to download)", metavar="PATH|imagenet")
    workers: int | None = cli.flag(None, "image-decoding threads (default: up to 4)", check=cli.at_least(1))
    resume: bool = cli.flag(False, "continue from the run's checkpoint (its split, weights, optimizer and epoch)")

    def __post_init__(self):
        super().__post_init__()
        # The pool sizes are resolved here, so that the recorded settings name them: a generated
        # set's own defaults; for a set read from files (where they are unused) the values every
        # earlier record holds, so that those runs stay up to date.
        try:
            pools = datasets.get(self.dataset).pool_sizes
        except utils.UserError:
            pools = None  # an unknown data set is reported by the run
        pools = pools or (datasets.SYNTHETIC_TRAIN, datasets.SYNTHETIC_TEST)
        if self.synthetic_train is None:
            self.synthetic_train = pools[0]
        if self.synthetic_test is None:
            self.synthetic_test = pools[1]


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def run(config: Config) -> dict:
    """Train and evaluate; returns the summary written to ``train_summary.json``.

    Every input is validated (data layout, images, flags) before the run folder is touched, and
    a previous model, its split and its summary stay as they are until the new run has a best
    checkpoint of its own: a run that fails early loses nothing."""
    started = time.time()
    info = datasets.get(config.dataset)
    dataset = info.name
    datasets.check_arch_fits(info, config.arch)
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    epochs = config.epochs if config.epochs is not None else info.epochs
    batch_size = config.batch_size or info.batch_size or (64 if device.type == "cuda" else 16)
    cap = config.max_train_per_class if config.max_train_per_class is not None else info.max_train_per_class

    resume_state = saver.read_checkpoint(run_.checkpoint, hint=run_.hint("train")) if config.resume else None
    if resume_state is not None:
        split = datasets.read_split(run_.dir)
        if split["dataset"] != dataset or resume_state["meta"]["arch"] != config.arch:
            raise utils.UserError(f"--resume: {run_.dir} holds a {resume_state['meta']['arch']} run on "
                                  f"{split['dataset']}, not {config.arch} on {dataset}")
    else:
        split = datasets.prepare_split(dataset, config.data_root, config.image_size, config.num_classes, config.seed,
                                       max_train_per_class=cap or None, synthetic_train=config.synthetic_train,
                                       synthetic_test=config.synthetic_test, imagenette_pair=config.imagenette_pair)
    counts = datasets.describe_split(split)
    print(f"{dataset} at {split['image_size']}px, run {run_.dir}: " +
          "; ".join(f"{part} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                    for part, c in counts.items()))

    arrays = datasets.load_arrays(split, cache_dir=None, workers=config.workers)
    # Kept as uint8 N×C×H×W (or N×C×D×H×W) tensors (a quarter of float32's memory); scaled per batch.
    data = {part: (torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1))), torch.from_numpy(labels))
            for part, (images, labels) in arrays.items()}

    model = build_model(config.arch, split["num_classes"], config.pretrained)
    # channels_last: oneDNN's 2D convolutions run markedly faster in this layout on a CPU (its 3D
    # convolutions run slower in channels_last_3d: 0.072 against 0.040 s per volume and step).
    model = model.to(device, memory_format=_memory_format(model.spatial_dims + 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = config.lr_schedule or info.lr_schedule
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    meta = {"dataset": dataset, "image_size": split["image_size"], "class_names": split["class_names"],
            "data_root": split["data_root"], "seed": config.seed, "split": split}
    history, first_epoch, best = [], 1, None
    if resume_state is not None:
        if resume_state.get("lr_schedule", "plateau") != lr_schedule:
            raise utils.UserError(f"--resume: {run_.dir} was trained with --lr-schedule "
                                  f"{resume_state.get('lr_schedule', 'plateau')}, not {lr_schedule}")
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if lr_schedule == "cosine":
            scheduler.T_max = epochs  # the decay ends at the (possibly new) last epoch
        history = list(resume_state["history"])
        first_epoch = int(resume_state["epoch"]) + 1
        best = {"epoch": int(resume_state["epoch"]), "val_acc": float(resume_state["val_acc"]),
                "val_loss": float(resume_state["val_loss"]), "state": copy.deepcopy(model.state_dict())}
        print(f"resuming after epoch {first_epoch - 1} (best so far)")
    replaced = resume_state is not None  # a fresh run replaces the old model at its first best epoch

    flip_dims = info.flip_dims
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(first_epoch, epochs + 1):
        tic = time.time()
        train_loss = _train_epoch(model, optimizer, *data["train"], batch_size, flip_dims, generator, device,
                                  desc=f"epoch {epoch}/{epochs}")
        val_loss, val_acc, _ = _evaluate(model, *data["val"], batch_size, device)
        if lr_schedule == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        improved = best is None or (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"])
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - tic, 2)}
        history.append(record)
        if improved:
            best = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                    "state": copy.deepcopy(model.state_dict())}
            if not replaced:
                # The new run's first best checkpoint replaces the old model: its summary goes
                # (it described the old model), the new split and checkpoint take its place.
                run_.train_summary.unlink(missing_ok=True)
                datasets.write_split(run_.dir, split)
                replaced = True
            saver.save_checkpoint(run_.checkpoint, model, meta, extra={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "lr_schedule": lr_schedule,
                "epoch": epoch,
                "val_acc": val_acc, "val_loss": val_loss, "history": history})
        tqdm.write(f"epoch {epoch:3d}/{epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                   f"val acc {val_acc:.4f}  {record['seconds']:.1f} s" + ("  *" if improved else ""))
    if best is None:
        raise utils.UserError(f"no epoch was run (--epochs {epochs}); nothing to evaluate")

    model.load_state_dict(best["state"])
    test_loss, test_acc, probs = _evaluate(model, *data["test"], batch_size, device)
    test_labels = data["test"][1].numpy()
    resolved = {**config.settings(), "epochs": epochs, "batch_size": batch_size, "lr_schedule": lr_schedule,
                "max_train_per_class": cap or None, "image_size": split["image_size"],
                "data_root": split["data_root"]}
    summary = {
        "dataset": dataset, "arch": config.arch, "run_dir": str(run_.dir), "image_size": split["image_size"],
        "num_classes": split["num_classes"], "class_names": split["class_names"], "counts": counts,
        "best_epoch": best["epoch"], "val_acc": best["val_acc"], "val_loss": best["val_loss"],
        "test_acc": test_acc, "test_loss": test_loss, "test_auc": _auc(test_labels, probs),
        "settings": {**resolved, "device": str(device), "threads": torch.get_num_threads()},
        "history": history, "seconds": round(time.time() - started, 1),
        "record": runs.record("train", config.settings(), {}, [run_.checkpoint, run_.split], folder=run_.dir),
    }
    if split["num_classes"] > 2:
        summary["test_kappa"] = float(cohen_kappa_score(test_labels, probs.argmax(1), weights="quadratic"))
    utils.write_json(run_.train_summary, summary)
    print(f"best epoch {best['epoch']} (val acc {best['val_acc']:.4f}); test acc {test_acc:.4f}, "
          f"test AUC {summary['test_auc']:.4f}" +
          (f", quadratic kappa {summary['test_kappa']:.4f}" if "test_kappa" in summary else "") +
          f"; {summary['seconds']:.0f} s; wrote {run_.checkpoint}")
    return summary


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.contiguous_format


def _batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=_memory_format(x.dim()))


def _train_epoch(model, optimizer, images, labels, batch_size, flip_dims, generator, device, desc) -> float:
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total, seen = 0.0, 0
    bar = tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch")
    for start in bar:
        index = order[start:start + batch_size]
        if len(index) < 2 and seen:  # BatchNorm cannot train on a single image
            continue
        x, y = _batch(images[index], device), labels[index].to(device)
        for dim in flip_dims:
            flip = torch.rand(len(x), generator=generator) < 0.5
            x[flip] = x[flip].flip(dim)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1)


@torch.no_grad()
def _evaluate(model, images, labels, batch_size, device) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and class probabilities (N×C) in eval mode."""
    model.eval()
    if len(labels) == 0:
        return float("nan"), float("nan"), np.zeros((0, model.num_classes))
    logits = torch.cat([model(_batch(images[s], device)).cpu() for s in utils.batches(len(labels), 2 * batch_size)])
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc, torch.softmax(logits, 1).numpy()


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", labels=np.arange(probs.shape[1])))


if __name__ == "__main__":
    utils.run_cli(main)
