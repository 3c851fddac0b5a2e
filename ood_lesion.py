"""OOD lesion detection (docs/PROTOCOL.md §11; the TMI paper's gen_ood_lesion.py / test_ood.py):
can the HFC mixtures tell an image with synthetic lesions from a clean one?

For the run's test images (``--limit``, seeded), ``lesions.add_lesions`` pastes 1–6 lesions of each
radius in ``--radii`` (pixels at 256 px, scaled to the image size). Each image, clean or lesioned,
gets three out-of-distribution scores (higher = more unusual):

- ``mixture``: the HFC term of the last layer the mixtures keep, under the class whose mixture
  explains it best (the smallest term over classes; gmm_M<y>/ from get_GMM.py);
- ``max_softmax``: minus the largest softmax probability (Hendrycks & Gimpel);
- ``maha``: the Mahalanobis score of Lee et al. at the penultimate features: the smallest
  distance to a class mean under one shared (Ledoit-Wolf) covariance of the training features.

AUROC of clean vs. lesioned per radius and score, with a 95 % bootstrap interval over images.

    python ood_lesion.py --dataset APTOS -y 8

Writes ``runs_<DATASET>/<run>/ood/``: ``ood.json``, ``ood.md``, ``ood.png`` (AUROC against radius,
and example lesioned images), and one piece per radius (its lesioned images' scores), reused when
asked again with the same settings of the same model and mixtures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import datasets
import detectors
import evaluation
import features
import gmm
import lesions
import metrics
import plots
import runs
import saver
import utils

STAGE = "ood"
SCORES = ("mixture", "max_softmax", "maha")


@dataclass
class Config(cli.RunConfig):
    num_component: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "mixture components M: uses gmm_M<y>/ from get_GMM.py", short="-y",
                                  check=cli.at_least(1))
    radii: str = cli.flag(",".join(str(r) for r in lesions.RADII_256), "lesion radii in pixels at 256 px",
                          check=cli.number_list(lambda v: v > 0, "at least one positive radius"))
    limit: int = cli.flag(200, "test images used (seeded choice; 0 = all)", check=cli.non_negative)
    batch_size: int = cli.flag(32, "batch size", short="-b", check=cli.at_least(1))

    def radius_values(self) -> list[float]:
        return cli.numbers(self.radii)


class Piece(runs.Piece):
    stage = STAGE


class OODScores:
    """The three scores of a feature set: the mixture term, max-softmax and Lee et al.'s Mahalanobis."""

    def __init__(self, mixtures, train: features.FeatureSet, penultimate: int, num_classes: int):
        self.mixtures, self.layer, self.penultimate = mixtures, mixtures.layers[-1], penultimate
        self.means, self.precision = detectors.tied_gaussian(train.pooled[penultimate], train.labels, num_classes)

    def __call__(self, feats: features.FeatureSet) -> dict[str, np.ndarray]:
        pooled = feats.pooled[self.layer]
        term = np.min([self.mixtures[(self.layer, c)].chosen_term(pooled) for c in self.mixtures.classes], axis=0)
        logits = torch.from_numpy(feats.logits)
        return {"mixture": term, "max_softmax": -torch.softmax(logits, 1).amax(1).numpy().astype(np.float64),
                "maha": detectors.half_mahalanobis(feats.pooled[self.penultimate], self.means, self.precision).min(1)}


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def run(config: Config) -> dict:
    started = time.perf_counter()
    if datasets.get(config.dataset).volumetric:
        # The lesion generator paints 2D ellipses into pictures; brain3d's class 1 already holds
        # 3D lesions from its own generator.
        raise utils.UserError(f"ood_lesion.py pastes 2D lesions into images; {config.dataset} holds volumes "
                              "(its class 1 already carries 3D lesions)")
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, _ = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    mixtures = evaluation.load_fresh_mixtures(run_, config.num_component)
    inputs = {"checkpoint": run_.checkpoint, "split": run_.split,
              "mixtures": run_.mixtures_dir(config.num_component) / runs.MIXTURES}
    out = run_.dir / STAGE

    train = features.part_features(run_, model, "train", device, config.batch_size)
    test = features.part_features(run_, model, "test", device, config.batch_size)
    chosen = features.seeded_subset(len(test), config.limit, config.seed)
    clean = test.subset(chosen)
    scorer = OODScores(mixtures, train, model.head_input_index, model.num_classes)
    clean_scores = scorer(clean)
    n = len(chosen)

    by_radius, examples = {}, {}
    for radius in config.radius_values():
        piece = Piece(out / f"radius{radius:g}", {"seed": config.seed, "images": [int(i) for i in chosen],
                                                   "radius_256": radius, "num_component": config.num_component}, inputs)
        if piece.done():
            result = piece.result()
            examples[radius] = utils.load_npz(piece.folder / "examples.npz", "example lesioned images")["images"]
        else:
            lesioned, counts = lesions.add_lesions(clean.images, radius, config.seed)
            scores = scorer(features.extract(model, lesioned, device, config.batch_size, desc=f"radius {radius:g}"))
            result = {"radius_256": radius, "radius_px": radius * clean.images.shape[-1] / lesions.REFERENCE_SIZE,
                      "mean_lesions": float(counts.mean())}
            for name in SCORES:
                result[name] = {
                    "auroc": metrics.roc_auc(clean_scores[name], scores[name]),
                    "auroc_ci": metrics.bootstrap_interval(clean_scores[name], scores[name], "auc",
                                                           benign_images=np.arange(n), adv_images=np.arange(n))}
            examples[radius] = (lesioned[:4].numpy() * 255).round().astype(np.uint8)

            def write(folder, scores=scores, example=examples[radius]):
                utils.save_npz(folder / "scores.npz", **scores)
                utils.save_npz(folder / "examples.npz", images=example)
                return [folder / "scores.npz", folder / "examples.npz"]
            result = piece.write(result, write)
        by_radius[f"{radius:g}"] = result

    result = {"dataset": run_.dataset, "arch": config.arch, "n_images": n, "num_component": config.num_component,
              "mixture_layer": model.layer_names[scorer.layer], "maha_layer": model.layer_names[scorer.penultimate],
              "radii_256": config.radius_values(), "by_radius": by_radius,
              "seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    utils.atomic_write_bytes(out / "ood.md", text.encode())
    plots.ood_figure(out / "ood.png", result, (clean.images[:4].numpy() * 255).round().astype(np.uint8), examples)
    result["record"] = runs.record(STAGE, config.settings(), inputs, [out / "ood.md", out / "ood.png"], folder=out)
    utils.write_json(out / "ood.json", result)
    print(text)
    print(f"OOD lesions: {result['seconds']:.0f} s -> {out / 'ood.json'}")
    return result


def markdown(result: dict) -> str:
    title = (f"**{result['dataset']} / {result['arch']}: clean vs. lesioned test images ({result['n_images']} "
             "each), AUROC [95% CI]**")
    lines = [title, "", "| radius at 256 px (px here) | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES)]
    for key, row in result["by_radius"].items():
        cells = [f"{row[s]['auroc']:.3f} [{row[s]['auroc_ci'][0]:.3f}, {row[s]['auroc_ci'][1]:.3f}]" for s in SCORES]
        lines.append(f"| {key} ({row['radius_px']:g}) | " + " | ".join(cells) + " |")
    lines += ["", (f"mixture: the HFC term at {result['mixture_layer']} (M = {result['num_component']}), smallest over "
                  f"classes; maha: Lee et al.'s score at {result['maha_layer']}; max_softmax: minus the top "
                  "probability."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    utils.run_cli(main)
