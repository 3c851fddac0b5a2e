"""Train a classifier (ResNet / VGG) on APTOS, CXR or the embedded synthetic fundus set.

    python train.py -a resnet50 --dataset synthetic
    python train.py -a resnet50 --dataset APTOS --data-root ../shared/data/aptos2019 --image-size 128

Writes runs_<DATASET>/<name>/{split.json, checkpoint.pt, train_summary.json}. The checkpoint
holds the weights that did best on the validation split (carved from train; test is only
evaluated once, at the end). Adam (weight decay 1e-4), learning rate halved on a plateau of the
validation loss, random flips during training only (PROTOCOL section 4).
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from tqdm import tqdm

import datasets
import saver
import utils
from network import ARCHS, build_model

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="network (default: %(default)s)")
    p.add_argument("-n", "--name", default=None, help="run name (default: the arch)")
    p.add_argument("--dataset", default="synthetic", help="APTOS, CXR or synthetic, case-insensitive (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="data folder (default: ./datasets/<DATASET>)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size (default: 64 for synthetic, 128 otherwise; the paper used 256)")
    p.add_argument("--num-classes", type=int, default=2, help="2, or 5 for APTOS grading (default: %(default)s)")
    p.add_argument("--max-train-per-class", type=int, default=None,
                   help=f"cap on training images per class (default: "
                        f"{datasets.get('CXR').max_train_per_class} for CXR, none otherwise; 0 = no cap)")
    p.add_argument("--synthetic-train", type=int, default=datasets.SYNTHETIC_TRAIN,
                   help="synthetic training-pool size; validation is carved from it (default: %(default)s)")
    p.add_argument("--synthetic-test", type=int, default=datasets.SYNTHETIC_TEST, help="synthetic test-set size (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="batch size (default: 64 on a GPU, 16 on a CPU, where more steps per epoch pay off)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default per data set: {', '.join(f'{n} {d.epochs}' for n, d in datasets.REGISTRY.items())})")
    p.add_argument("--pretrained", default=None, metavar="PATH|imagenet",
                   help="start from ImageNet weights (a local torchvision state dict, or 'imagenet' to download)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the synthetic images and training (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default: up to 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice, the usable cores; use 1 when other jobs share the CPU)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's checkpoint (its split, weights, optimizer and epoch)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    dataset = utils.canonical_dataset(args.dataset)
    run = utils.run_dir(dataset, args.arch, args.name)
    device = utils.prepare_runtime(args.device, args.seed, args.threads)
    epochs = args.epochs if args.epochs is not None else datasets.get(dataset).epochs
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    if args.batch_size < 2:
        raise utils.UserError("--batch-size must be at least 2 (BatchNorm needs two images)")
    cap = args.max_train_per_class if args.max_train_per_class is not None \
        else datasets.get(dataset).max_train_per_class

    resume_state = saver.read_checkpoint(run / saver.CHECKPOINT_NAME) if args.resume else None
    if resume_state is not None:
        split = datasets.read_split(run)
        if split["dataset"] != dataset or resume_state["meta"]["arch"] != args.arch:
            raise utils.UserError(f"--resume: {run} holds a {resume_state['meta']['arch']} run on "
                                  f"{split['dataset']}, not {args.arch} on {dataset}")
    else:
        split = datasets.prepare_split(dataset, args.data_root, args.image_size, args.num_classes, args.seed,
                                       max_train_per_class=cap or None, synthetic_train=args.synthetic_train,
                                       synthetic_test=args.synthetic_test)
        # A fresh run: drop an older run's results so that they never sit beside the new split.
        for stale in (run / saver.CHECKPOINT_NAME, run / "train_summary.json"):
            stale.unlink(missing_ok=True)
        datasets.write_split(run, split)
    counts = datasets.describe_split(split)
    print(f"{dataset} at {split['image_size']}px, run {run}: " +
          "; ".join(f"{part} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                    for part, c in counts.items()))

    arrays = datasets.load_arrays(split, cache_dir=None, workers=args.workers)
    # Kept as uint8 N×3×H×W tensors (a quarter of float32's memory); scaled per batch.
    data = {part: (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(labels))
            for part, (images, labels) in arrays.items()}

    # channels_last: oneDNN's convolutions run markedly faster in this layout on a CPU.
    model = build_model(args.arch, split["num_classes"], args.pretrained).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    meta = {"dataset": dataset, "image_size": split["image_size"], "class_names": split["class_names"],
            "data_root": split["data_root"], "seed": args.seed, "split": split}
    history, first_epoch, best = [], 1, None
    if resume_state is not None:
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        history = list(resume_state["history"])
        first_epoch = int(resume_state["epoch"]) + 1
        best = {"epoch": int(resume_state["epoch"]), "val_acc": float(resume_state["val_acc"]),
                "val_loss": float(resume_state["val_loss"]), "state": copy.deepcopy(model.state_dict())}
        print(f"resuming after epoch {first_epoch - 1} (best so far)")

    flip_dims = datasets.get(dataset).flip_dims
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(first_epoch, epochs + 1):
        tic = time.time()
        train_loss = _train_epoch(model, optimizer, *data["train"], args.batch_size, flip_dims, generator, device,
                                  desc=f"epoch {epoch}/{epochs}")
        val_loss, val_acc, _ = _evaluate(model, *data["val"], args.batch_size, device)
        scheduler.step(val_loss)
        improved = best is None or (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"])
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - tic, 2)}
        history.append(record)
        if improved:
            best = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                    "state": copy.deepcopy(model.state_dict())}
            saver.save_checkpoint(run / saver.CHECKPOINT_NAME, model, meta, extra={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "val_acc": val_acc, "val_loss": val_loss, "history": history})
        tqdm.write(f"epoch {epoch:3d}/{epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                   f"val acc {val_acc:.4f}  {record['seconds']:.1f} s" + ("  *" if improved else ""))
    if best is None:
        raise utils.UserError(f"no epoch was run (--epochs {epochs}); nothing to evaluate")

    model.load_state_dict(best["state"])
    test_loss, test_acc, probs = _evaluate(model, *data["test"], args.batch_size, device)
    test_labels = data["test"][1].numpy()
    summary = {
        "dataset": dataset, "arch": args.arch, "run_dir": str(run), "image_size": split["image_size"],
        "num_classes": split["num_classes"], "class_names": split["class_names"], "counts": counts,
        "best_epoch": best["epoch"], "val_acc": best["val_acc"], "val_loss": best["val_loss"],
        "test_acc": test_acc, "test_loss": test_loss, "test_auc": _auc(test_labels, probs),
        "settings": {**vars(args), "epochs": epochs, "max_train_per_class": cap or None, "device": str(device),
                     "threads": torch.get_num_threads()},
        "history": history, "seconds": round(time.time() - started, 1),
    }
    if split["num_classes"] > 2:
        summary["test_kappa"] = float(cohen_kappa_score(test_labels, probs.argmax(1), weights="quadratic"))
    utils.write_json(run / "train_summary.json", summary)
    print(f"best epoch {best['epoch']} (val acc {best['val_acc']:.4f}); test acc {test_acc:.4f}, "
          f"test AUC {summary['test_auc']:.4f}" +
          (f", quadratic kappa {summary['test_kappa']:.4f}" if "test_kappa" in summary else "") +
          f"; {summary['seconds']:.0f} s; wrote {run / saver.CHECKPOINT_NAME}")
    return summary


def _batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


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
