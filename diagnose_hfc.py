"""Why the paper's HFC term can stop the attack: how large it is, and how it pulls against the
classification loss, layer by layer (docs/PROTOCOL.md §7).

For the first ``--limit`` images of A_eval (the protocol's evaluation part of the base attack's
set A, docs/PROTOCOL.md §6; A_fit with ``--images fit``, to look at a setting chosen there) it measures, per kept mixture layer l, with the paper's per-layer term
``term_l = (1/C)‖(f_l − μ_k*) L_k*‖²`` (``hfc.HFCTerm.layer_values``):

1. the median term of the clean images under their own class's mixture (``clean_own``) and under
   the target class's (``clean_target``), of the base AEs (``base_target``) and, with ``--hfc``,
   of that folder's HFC AEs (``hfc_target``) under the target class's mixture, beside the
   held-out scale the mixtures carry (``heldout_scale``: get_GMM.py's median term of validation
   images of the target class);
2. the gradient geometry at the clean image, the base AE and (with ``--hfc``) the HFC AE: with
   g_cls = ∇_x of the classification loss the HFC attack minimises (``--class-loss``, as in
   gmm_attack.py) and g_l = ∇_x term_l, the medians over images of cos(g_l, g_cls) and
   ‖g_l‖/‖g_cls‖, and the same for the whole term (the paper's sum over layers and the
   normalised mean of each layer over its held-out scale). Both are minimised, so cos < 0 means
   that lowering the term raises the classification loss: a layer *blocks* at λ (``--lamda``)
   when its median cosine is negative and λ·‖g_l‖ > ‖g_cls‖ (median ratio); ``lamda_no_block``
   is the largest λ at which no layer blocks (min over negative-cosine layers of 1/ratio);
3. per layer, the median over images of the mean squared per-channel z-score of the pooled
   feature to the class's training mean (``z2``: the clean images to their own class, the base and
   HFC AEs to the target class; each channel in units of its own training standard deviation,
   floored as ``get_GMM.py --reg-scale channel`` floors it). It is what a detector that z-scores
   each channel (the SVM) sees, and what the term does not see when the mixtures' scalar
   regulariser swamps the low-variance channels: AEs the term calls typical can stay far out here;
   and the same rows' median mean Euclidean distance to the 10 nearest training features of the
   class (``knn``): the kernel density's view, in the features' own units, where the
   high-variance channels dominate.

    python diagnose_hfc.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1 -y 8 --hfc hfc_M8_lamauto

Writes ``runs_<DATASET>/<arch>/<ATTACK>/diagnosis_M<y>/`` (``diagnosis_M<y>_imgfit/`` for A_fit): diagnosis.json (every layer, the
summary and the stage's record), diagnosis.md (per stage and per layer tables) and
diagnosis.png (the per-layer medians, log scale; the per-layer cosines at the base AE).
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import aesets
import attacks
import cli
import detectors
import evaluation
import features
import gmm
import hfc
import runs
import saver
import utils

DEFAULT_KAPPA = 0.0  # the margin's κ for --class-loss margin, as gmm_attack.py
POINTS = ("clean", "base", "hfc")  # where on the attack path the gradients are taken
TERM_ROWS = ("clean_own", "clean_target", "base_target", "hfc_target", "heldout_scale")
DISTANCE_ROWS = ("clean_own", "base_target", "hfc_target")  # z2 and knn: which images, under which class's training features
KNN_NEIGHBOURS = 10  # knn: mean Euclidean distance to this many nearest training features of the class
PARTS = {"eval": "A_eval", "fit": "A_fit"}
FORMS = ("paper", "normalised")
JSON_FILE, MD_FILE, PNG_FILE = "diagnosis.json", "diagnosis.md", "diagnosis.png"


@dataclass
class Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "base attack whose AE set defines A (and gives the base AEs)")
    num_component: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "mixture components M: uses gmm_M<y>/ from get_GMM.py",
                                  short="-y", check=cli.at_least(1))
    hfc_set: str | None = cli.flag(None, "HFC results folder under the attack's folder whose AEs are diagnosed too "
                                         "(e.g. hfc_M8_lamauto; default: none)", cli_name="hfc")
    images: str = cli.flag("eval", "the part of A diagnosed: eval (A_eval, the protocol's) or fit (A_fit, whose "
                           "first images gmm_attack.py --images fit --limit N attacks)", choices=tuple(PARTS))
    limit: int = cli.flag(32, "diagnose the first N images of the part", check=cli.at_least(1))
    class_loss: str = cli.flag("base", "classification loss whose gradient the term's is compared with: base "
                               "(the method's own: CE, or CW's margin) or margin (max_j≠t z_j − z_t clamped at −κ)",
                               choices=hfc.CLASS_LOSSES)
    kappa: float | None = cli.flag(None, f"the margin's κ (default: {DEFAULT_KAPPA} for --class-loss margin; "
                                         "CW's own otherwise)", check=cli.non_negative)
    lamda: float = cli.flag(1.0, "λ at which the blocking layers are reported (1 = the paper's)", check=cli.positive)
    batch_size: int = cli.flag(16, "images per forward pass (its graph is kept for one backward per layer)",
                               short="-b", check=cli.at_least(1))

    def kappa_value(self) -> float | None:
        return DEFAULT_KAPPA if self.kappa is None and self.class_loss == "margin" else self.kappa

    def out_dir(self, run: runs.Run) -> Path:
        suffix = "" if self.images == "eval" else f"_img{self.images}"
        return run.ae_dir(attacks.parse_attack(self.attack).name) / f"diagnosis_M{self.num_component}{suffix}"


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


# ----------------------------------------------------------------------------------- the measurement

@dataclass
class Geometry:
    """Per image (B) and layer (L) at one point: the paper-form terms, the gradient cosines and
    norm ratios against the classification loss, and the whole term's, in float64 on the CPU.
    ``grads`` (only with ``keep_grads``): the flattened B×D gradients g_cls, the paper term's
    and the normalised term's, as the totals built from the per-layer gradients."""

    values: np.ndarray  # B×L
    cosine: np.ndarray  # B×L, NaN where a gradient is zero
    ratio: np.ndarray  # B×L, ‖g_l‖/‖g_cls‖ (inf where g_cls = 0)
    term_cosine: dict[str, np.ndarray]  # form -> B
    term_ratio: dict[str, np.ndarray]  # form -> B
    class_grad_norm: np.ndarray  # B
    grads: dict[str, torch.Tensor] | None = None


def _cosine_ratio(g: torch.Tensor, g_cls: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    g, g_cls = g.double(), g_cls.double()
    norm, norm_cls = g.norm(dim=1), g_cls.norm(dim=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = ((g * g_cls).sum(1) / (norm * norm_cls)).numpy()
        ratio = (norm / norm_cls).numpy()
    return np.clip(cosine, -1.0, 1.0), ratio


def scale_table(mixtures: gmm.Mixtures, layers: list[int]) -> torch.Tensor:
    """classes × layers held-out scales (``Mixtures.scales``), as ``HFCTerm(normalise=True)`` uses them."""
    return torch.tensor([[mixtures.scales[(layer, c)] for layer in layers] for c in mixtures.classes],
                        dtype=torch.float64)


def geometry(model, term: hfc.HFCTerm, x: torch.Tensor, targets: torch.Tensor, *, loss: str, kappa: float,
             scales: torch.Tensor, keep_grads: bool = False) -> Geometry:
    """The per-layer term and gradient geometry of the images ``x`` (B×3×H×W) toward ``targets``.

    One forward pass to the pooled features with the input requiring gradients, then
    ``torch.autograd.grad`` of the classification loss and of each layer's term (summed over the
    images: each image's gradient is its own, as the model runs in eval mode), keeping the graph
    until the last layer. ``term`` must be the paper form (``normalise=False``); the whole term's
    gradients are the sums of the per-layer ones: the paper's Σ_l g_l and the normalised
    (1/L)·Σ_l g_l / scale(l, target) (``scales``: ``scale_table``)."""
    if term.normalise:
        raise ValueError("geometry needs the paper-form term (normalise=False): it normalises itself")
    device = next(model.parameters()).device
    x = x.detach().to(device, torch.float32).clone().requires_grad_(True)
    targets = targets.to(device, torch.long)
    logits, features = model.forward_features(x, layers=term.layers)
    values = term.layer_values(features, targets)  # B×L, paper form
    class_loss = attacks.classification_loss(logits, targets, loss, kappa) * len(x)  # the sum over images
    (g_cls,) = torch.autograd.grad(class_loss, x, retain_graph=True)
    g_cls = g_cls.flatten(1).cpu()
    n_layers = values.shape[1]
    per_scale = scales.index_select(0, targets.cpu())  # B×L
    cosine = np.empty((len(x), n_layers))
    ratio = np.empty((len(x), n_layers))
    totals = {form: torch.zeros(g_cls.shape, dtype=torch.float64) for form in FORMS}
    for j in range(n_layers):
        (g,) = torch.autograd.grad(values[:, j].sum(), x, retain_graph=j < n_layers - 1)
        g = g.flatten(1).cpu()
        cosine[:, j], ratio[:, j] = _cosine_ratio(g, g_cls)
        totals["paper"] += g.double()
        totals["normalised"] += g.double() / per_scale[:, j:j + 1]
    totals["normalised"] /= n_layers
    term_cosine, term_ratio = {}, {}
    for form in FORMS:
        term_cosine[form], term_ratio[form] = _cosine_ratio(totals[form], g_cls)
    grads = {"class": g_cls, **totals} if keep_grads else None
    return Geometry(values=values.detach().double().cpu().numpy(), cosine=cosine, ratio=ratio,
                    term_cosine=term_cosine, term_ratio=term_ratio,
                    class_grad_norm=g_cls.double().norm(dim=1).numpy(), grads=grads)


@torch.no_grad()
def term_values(model, term: hfc.HFCTerm, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """B×L paper-form terms of ``x`` under the mixtures of ``classes`` (no gradient)."""
    device = next(model.parameters()).device
    _, features = model.forward_features(x.to(device, torch.float32), layers=term.layers)
    return term.layer_values(features, classes.to(device, torch.long)).double().cpu().numpy()


def measure(model, term: hfc.HFCTerm, scales: torch.Tensor, images: dict[str, np.ndarray], labels: np.ndarray,
            targets: np.ndarray, *, loss: str, kappa: float, batch_size: int, progress: bool = True
            ) -> dict[str, Any]:
    """Per image: the terms of every row of ``TERM_ROWS`` but the held-out one (N×L) and the
    geometry of every point in ``images`` ({point: N×3×H×W}, "clean" first), stacked over batches."""
    n = len(labels)
    labels_t, targets_t = torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    parts: dict[str, list] = {}
    modes = [module.training for module in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for parameter in model.parameters():  # only ∇_x is needed: no weight gradients are kept
        parameter.requires_grad_(False)
    try:
        total = len(range(0, n, batch_size)) * len(images)
        with tqdm(total=total, desc="diagnosis", unit="pass", disable=not progress, leave=False) as bar:
            for part in utils.batches(n, batch_size):
                for point, x in images.items():
                    geo = geometry(model, term, torch.from_numpy(x[part]), targets_t[part], loss=loss, kappa=kappa,
                                   scales=scales)
                    parts.setdefault(point, []).append(geo)
                    bar.update(1)
                parts.setdefault("clean_own", []).append(
                    term_values(model, term, torch.from_numpy(images["clean"][part]), labels_t[part]))
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    out: dict[str, Any] = {"clean_own": np.concatenate(parts.pop("clean_own"))}
    for point, geos in parts.items():
        out[point] = Geometry(
            values=np.concatenate([g.values for g in geos]), cosine=np.concatenate([g.cosine for g in geos]),
            ratio=np.concatenate([g.ratio for g in geos]),
            term_cosine={f: np.concatenate([g.term_cosine[f] for g in geos]) for f in FORMS},
            term_ratio={f: np.concatenate([g.term_ratio[f] for g in geos]) for f in FORMS},
            class_grad_norm=np.concatenate([g.class_grad_norm for g in geos]))
    return out


def budget_reach(model, clean: np.ndarray, targets: np.ndarray, eps: float, batch_size: int) -> dict[str, Any]:
    """The budget's first-order reach at the clean images (``attacks.first_order_reach``): the
    medians of the targeted margin m, of ε‖∇_x m‖₁ and of their ratio, the ratio's 10 % quantile,
    and how many images the budget cannot take to their target to first order (ratio < 1). A
    ratio well above 1 is room beyond the boundary for the term to spend on hiding."""
    margins, reach = [], []
    for part in utils.batches(len(targets), batch_size):
        m, r = attacks.first_order_reach(model, torch.from_numpy(clean[part]), targets[part], eps)
        margins.append(m)
        reach.append(r)
    margins, reach = np.concatenate(margins), np.concatenate(reach)
    ratio = reach / np.maximum(margins, np.finfo(np.float64).tiny)
    return {"margin_median": float(np.median(margins)), "reach_median": float(np.median(reach)),
            "ratio_median": float(np.median(ratio)), "ratio_q10": float(np.quantile(ratio, 0.1)),
            "below_one": int((ratio < 1).sum())}


def channel_statistics(train_pooled: list[np.ndarray], train_labels: np.ndarray, layers: list[int],
                       classes: list[int]) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Per (layer, class): the training mean of each channel and its standard deviation in the
    units of ``get_GMM.py --reg-scale channel`` (``gmm.channel_std``)."""
    stats = {}
    for layer in layers:
        for cls in classes:
            X = np.asarray(train_pooled[layer][train_labels == cls], dtype=np.float64)
            stats[(layer, cls)] = X.mean(axis=0), gmm.channel_std(X)
    return stats


def standardised_distance(pooled: list[np.ndarray], classes: np.ndarray, layers: list[int],
                          stats: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """N×L: per image and layer, mean over channels of ((f − mean_c) / std_c)² under the
    statistics of the image's class in ``classes``."""
    out = np.empty((len(classes), len(layers)))
    for j, layer in enumerate(layers):
        features = np.asarray(pooled[layer], dtype=np.float64)
        for i, cls in enumerate(classes):
            mean, std = stats[(layer, int(cls))]
            out[i, j] = np.mean(np.square((features[i] - mean) / std))
    return out


def nearest_distance(pooled: list[np.ndarray], classes: np.ndarray, layers: list[int], train_pooled: list[np.ndarray],
                     train_labels: np.ndarray, k: int = KNN_NEIGHBOURS) -> np.ndarray:
    """N×L: per image and layer, the mean Euclidean distance to the ``k`` nearest training features
    of the image's class in ``classes`` (``detectors.squared_distances``, as KD's kernel): the view of
    the kernel density, which weighs every channel in the features' own units, so the high-variance
    channels dominate."""
    out = np.empty((len(classes), len(layers)))
    for j, layer in enumerate(layers):
        for cls in np.unique(classes):
            reference = train_pooled[layer][train_labels == cls]
            rows = np.flatnonzero(classes == cls)
            nearest = np.sort(np.sqrt(detectors.squared_distances(pooled[layer][rows], reference)),
                              axis=1)[:, :min(k, len(reference))]
            out[rows, j] = nearest.mean(1)
    return out


# ----------------------------------------------------------------------------------- the summary

def _median(values: np.ndarray) -> np.ndarray:
    """Median over images (axis 0) ignoring NaN (a zero gradient has no cosine); NaN when all are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column
        return np.nanmedian(np.asarray(values, dtype=np.float64), axis=0)


def _num(value: float) -> float | None:
    """A JSON-safe number: None for NaN and ±inf (a zero classification gradient)."""
    value = float(value)
    return value if np.isfinite(value) else None


def blocking(cosine: np.ndarray, ratio: np.ndarray, lamda: float) -> tuple[np.ndarray, float | None]:
    """Per layer (medians over images) whether it blocks at λ (cos < 0 and λ·ratio > 1), and the
    largest λ at which none blocks: min over negative-cosine layers of 1/ratio (None: no limit)."""
    negative = np.nan_to_num(cosine, nan=0.0) < 0
    blocks = negative & (lamda * ratio > 1)
    with np.errstate(divide="ignore"):
        limits = 1.0 / ratio[negative & ~np.isnan(ratio)]
    return blocks, (_num(limits.min()) if len(limits) else None)


def stage_of(model, layers: list[int]) -> list[str]:
    """Each layer's stage: its name's prefix (ResNet's ``layerK``) or, when every layer shares one
    prefix (VGG), ``stageK`` counted by ``model.stage_end_layers``."""
    prefixes = [model.layer_names[l].split(".")[0] for l in layers]
    if len(set(prefixes)) > 1:
        return prefixes
    return [f"stage{1 + sum(end < l for end in model.stage_end_layers)}" for l in layers]


def summarise(model, mixtures: gmm.Mixtures, term: hfc.HFCTerm, measured: dict[str, Any], targets: np.ndarray,
              lamda: float, z2: dict[str, np.ndarray] | None = None,
              knn: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The per-layer medians, cosines, ratios and blocking flags, and the summary over layers;
    ``z2`` ({row of DISTANCE_ROWS: N×L}, ``standardised_distance``) adds each layer's median z², and
    ``knn`` (the same rows, ``nearest_distance``) its median distance to the nearest training features."""
    layers = term.layers
    points = [p for p in POINTS if p in measured]
    heldout = np.array([[mixtures.scales[(layer, int(t))] for layer in layers] for t in targets])
    per_image = {"clean_own": measured["clean_own"], "clean_target": measured["clean"].values,
                 "base_target": measured["base"].values, "heldout_scale": heldout}
    if "hfc" in measured:
        per_image["hfc_target"] = measured["hfc"].values
    medians = {row: _median(per_image[row]) for row in TERM_ROWS if row in per_image}
    cosines = {p: _median(measured[p].cosine) for p in points}
    ratios = {p: _median(measured[p].ratio) for p in points}
    flags, limits, fractions = {}, {}, {}
    for p in points:
        flags[p], limits[p] = blocking(cosines[p], ratios[p], lamda)
        per = measured[p]
        fractions[p] = ((per.cosine < 0) & (lamda * per.ratio > 1)).mean(0)
    stages = stage_of(model, layers)
    z2_medians = {row: _median(values) for row, values in (z2 or {}).items()}
    knn_medians = {row: _median(values) for row, values in (knn or {}).items()}
    rows = []
    for j, layer in enumerate(layers):
        rows.append({
            "layer": layer, "name": model.layer_names[layer], "stage": stages[j], "channels": mixtures.channels(layer),
            "median_term": {row: (_num(medians[row][j]) if row in medians else None) for row in TERM_ROWS},
            "cosine": {p: _num(cosines[p][j]) for p in points}, "ratio": {p: _num(ratios[p][j]) for p in points},
            "blocks": {p: bool(flags[p][j]) for p in points},
            "block_fraction": {p: float(fractions[p][j]) for p in points},
            "z2": {row: _num(z2_medians[row][j]) for row in DISTANCE_ROWS if row in z2_medians},
            "knn": {row: _num(knn_medians[row][j]) for row in DISTANCE_ROWS if row in knn_medians}})
    whole = {form: {"cosine": {p: _num(_median(measured[p].term_cosine[form])) for p in points},
                    "ratio": {p: _num(_median(measured[p].term_ratio[form])) for p in points}} for form in FORMS}
    summary = {
        "sum_median_term": {row: (_num(medians[row].sum()) if row in medians else None) for row in TERM_ROWS},
        "blocking_layers": {p: [model.layer_names[layer] for layer, b in zip(layers, flags[p]) if b] for p in points},
        "lamda_no_block": limits,
        "term_cosine": {form: whole[form]["cosine"] for form in FORMS},
        "term_ratio": {form: whole[form]["ratio"] for form in FORMS},
        "zero_class_gradient": {p: int((measured[p].class_grad_norm == 0).sum()) for p in points}}
    return {"points": points, "layers": rows, "term": whole, "summary": summary}


def _g(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _reach_lines(reach: dict[str, Any] | None, n_images: int) -> list[str]:
    if reach is None:
        return []
    return [(f"The budget's first-order reach at the clean images, ε‖∇m‖₁ / m (m: the targeted margin): median "
            f"{reach['ratio_median']:.3g}, 10 % quantile {reach['ratio_q10']:.3g} (median m {reach['margin_median']:.3g}, "
            f"median ε‖∇m‖₁ {reach['reach_median']:.3g}); {reach['below_one']} of {n_images} images below 1."), ""]


def format_markdown(diagnosis: dict[str, Any]) -> str:
    """The summary, a table per stage (terms summed over its layers, blocking layers counted) and
    a table per layer."""
    points, summary, layers = diagnosis["points"], diagnosis["summary"], diagnosis["layers"]
    rows = [r for r in TERM_ROWS if summary["sum_median_term"][r] is not None]
    lam = diagnosis["lamda"]
    out = [f"**HFC diagnosis: {diagnosis['dataset']} / {diagnosis['arch']} / {diagnosis['attack']}, "
           f"M = {diagnosis['num_component']}, {diagnosis['n_images']} images of {diagnosis.get('images_of', 'A_eval')}, class loss "
           f"{diagnosis['class_loss']} ({diagnosis['loss']}), λ = {lam:g}"
           + (f", HFC set {diagnosis['hfc_set']}" if diagnosis["hfc_set"] else "") + "**", "",
           *_reach_lines(diagnosis.get("reach"), diagnosis["n_images"]),
           ("Per-layer term (1/C)‖(f − μ_k*)L_k*‖², medians over images; cos and ratio: medians of cos(g_l, g_cls) "
           "and ‖g_l‖/‖g_cls‖. A layer blocks at λ when cos < 0 and λ·ratio > 1."), ""]
    out += [("| point | term cos (paper) | term ratio (paper) | term cos (normalised) | term ratio (normalised) "
            "| blocking layers at λ | λ without blocking |"), "|---|---|---|---|---|---|---|"]
    for p in points:
        out.append(f"| {p} | {_g(summary['term_cosine']['paper'][p])} | {_g(summary['term_ratio']['paper'][p])} | "
                   f"{_g(summary['term_cosine']['normalised'][p])} | {_g(summary['term_ratio']['normalised'][p])} | "
                   f"{len(summary['blocking_layers'][p])}/{len(layers)} | {_g(summary['lamda_no_block'][p])} |")
    out += ["", "Per stage (terms: sums of the layers' medians; blocking: layers of the stage that block):", "",
            "| stage | layers | " + " | ".join(rows) + " | " + " | ".join(f"blocking ({p})" for p in points) + " |",
            "|" + "---|" * (2 + len(rows) + len(points))]
    for stage in dict.fromkeys(r["stage"] for r in layers):
        group = [r for r in layers if r["stage"] == stage]
        sums = [_g(sum(r["median_term"][row] for r in group if r["median_term"][row] is not None)) for row in rows]
        blocks = [f"{sum(r['blocks'][p] for r in group)}" for p in points]
        out.append(f"| {stage} | {len(group)} | " + " | ".join(sums) + " | " + " | ".join(blocks) + " |")
    out.append(f"| all | {len(layers)} | " + " | ".join(_g(summary["sum_median_term"][r]) for r in rows) + " | "
               + " | ".join(str(len(summary["blocking_layers"][p])) for p in points) + " |")
    z2_rows = [row for row in DISTANCE_ROWS if layers and row in layers[0].get("z2", {})]
    knn_rows = [row for row in DISTANCE_ROWS if layers and row in layers[0].get("knn", {})]
    out += ["", ("Per layer (z² …: median mean squared per-channel z-score to the class's training mean; knn …: "
                 f"median mean Euclidean distance to the {KNN_NEIGHBOURS} nearest training features of the class):"),
            "",
            "| layer | C | " + " | ".join(rows) + " | " + " | ".join(f"z² {row}" for row in z2_rows)
            + (" | " if z2_rows else "") + " | ".join(f"knn {row}" for row in knn_rows)
            + (" | " if knn_rows else "") + " | ".join(f"cos {p}" for p in points) + " | "
            + " | ".join(f"ratio {p}" for p in points) + " | blocks |",
            "|" + "---|" * (3 + len(rows) + len(z2_rows) + len(knn_rows) + 2 * len(points))]
    for r in layers:
        blocks = ",".join(p for p in points if r["blocks"][p]) or "-"
        out.append(f"| {r['name']} | {r['channels']} | " + " | ".join(_g(r["median_term"][row]) for row in rows)
                   + " | " + " | ".join(_g(r["z2"][row]) for row in z2_rows) + (" | " if z2_rows else "")
                   + " | ".join(_g(r["knn"][row]) for row in knn_rows) + (" | " if knn_rows else "")
                   + " | ".join(_g(r["cosine"][p]) for p in points) + " | "
                   + " | ".join(_g(r["ratio"][p]) for p in points) + f" | {blocks} |")
    return "\n".join(out) + "\n"


def plot(diagnosis: dict[str, Any]) -> bytes:
    """Two panels as PNG bytes: the per-layer medians (log scale) and the per-layer cosines at the base AE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = diagnosis["layers"]
    x = np.arange(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.22 * len(layers) + 2), 7), sharex=True)
    styles = {"clean_own": ("tab:green", "o"), "clean_target": ("tab:blue", "s"), "base_target": ("black", "x"),
              "hfc_target": ("crimson", "^"), "heldout_scale": ("grey", "")}
    for row, (color, marker) in styles.items():
        values = [r["median_term"][row] for r in layers]
        if all(v is None for v in values):
            continue
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        top.plot(x, values, color=color, marker=marker, ms=4, lw=1, ls="--" if row == "heldout_scale" else "-",
                 label=row.replace("_", " "))
    top.set_yscale("log")
    top.set_ylabel("median term (1/C)‖(f − μ)L‖²")
    top.set_title(f"{diagnosis['dataset']} / {diagnosis['arch']} / {diagnosis['attack']}: the paper's HFC term "
                  f"per layer (M = {diagnosis['num_component']}, {diagnosis['n_images']} images)")
    top.legend(fontsize=8)
    cosine = np.array([np.nan if r["cosine"]["base"] is None else r["cosine"]["base"] for r in layers])
    colors = ["crimson" if r["blocks"]["base"] else "tab:blue" for r in layers]
    bottom.bar(x, cosine, color=colors, label="base AE")
    for point, marker in (("clean", "o"), ("hfc", "^")):
        if point in diagnosis["points"]:
            values = [np.nan if r["cosine"][point] is None else r["cosine"][point] for r in layers]
            bottom.plot(x, values, ls="none", marker=marker, ms=4, mfc="none", color="black",
                        label=f"{point} image" if point == "clean" else "HFC AE")
    bottom.legend(fontsize=8)
    bottom.axhline(0.0, color="grey", lw=1)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("median cos(g_l, g_cls)")
    bottom.set_title(f"bars: at the base AE, red where the layer blocks at λ = {diagnosis['lamda']:g} "
                     "(cos < 0 and λ‖g_l‖ > ‖g_cls‖)", fontsize=9)
    bottom.set_xticks(x, [r["name"] for r in layers], rotation=90, fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- the stage

def _hfc_folder(config: Config, run_: runs.Run, attack: str) -> Path:
    """The ``--hfc`` results folder, checked: it exists, was made with these mixtures, and is fresh."""
    name = config.hfc_set.strip()
    name = name if name.startswith("hfc_") else f"hfc_{name}"
    make = run_.hint("hfc", f"--attack {attack} -y {config.num_component}")
    if Path(name).name != name or name in (".", ".."):
        raise utils.UserError(f"--hfc names a results folder under {run_.ae_dir(attack)} (e.g. hfc_M8_lamauto), "
                              f"not a path: {config.hfc_set!r}")
    folder = run_.ae_dir(attack) / name
    if not (folder / runs.RESULTS).is_file():
        present = sorted(p.name for p in run_.ae_dir(attack).glob("hfc_*") if p.is_dir())
        raise utils.UserError(f"no HFC results folder {folder} (present: {', '.join(present) or 'none'}); {make}")
    made_with = utils.read_json(folder / runs.RESULTS, "HFC results", make).get("num_component")
    if made_with != config.num_component:
        raise utils.UserError(f"the HFC set {folder} was made with M = {made_with} mixtures, not "
                              f"-y {config.num_component}; pass -y {made_with}")
    runs.require_fresh(folder / runs.RESULTS, {"checkpoint": run_.checkpoint,
                                                "attack_set": run_.ae_dir(attack) / aesets.AE_FILE,
                                                "mixtures": run_.mixtures_dir(config.num_component) / runs.MIXTURES},
                       "the HFC set", run_.hint("hfc", f"--attack {attack} -y {config.num_component}", when="again"))
    return folder


def run(config: Config) -> dict:
    """Measure the term and its gradient geometry on the first images of A_eval (or A_fit); returns
    diagnosis.json."""
    spec = attacks.parse_attack(config.attack)
    if spec.method == "Noise":
        raise utils.UserError(f"--attack must be an attack, not the noise set {spec.name}")
    options = hfc.engine_loss(spec, config.class_loss, config.kappa_value())
    engine = attacks.resolve_settings(spec, options=options)
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, _ = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    # Every input is found and checked before anything is computed or written.
    attack_dir = run_.ae_dir(spec.name)
    base = aesets.load_ae_set(attack_dir, hint=run_.hint("attack", f"--attack {spec.name}"))
    runs.require_fresh(attack_dir / aesets.SUMMARY_FILE, {"checkpoint": run_.checkpoint}, f"AE set {spec.name}",
                       run_.hint("attack", f"--attack {spec.name}", when="again"))
    mixtures = evaluation.load_fresh_mixtures(run_, config.num_component, need_scales=True)
    part = PARTS[config.images]
    eval_pos = dict(zip(("fit", "eval"), evaluation.fit_eval_split(len(base["index"]))))[config.images]
    eval_pos = eval_pos[:config.limit]
    if len(eval_pos) < 1:
        raise utils.UserError(f"{part} of {attack_dir} is empty; attack more images with gen_base_adv.py")
    inputs = {"checkpoint": run_.checkpoint, "attack_set": attack_dir / aesets.AE_FILE,
              "mixtures": run_.mixtures_dir(config.num_component) / runs.MIXTURES}
    images = {"clean": base["clean"][eval_pos], "base": base["adv"][eval_pos]}
    success = {"base": float(base["success"][eval_pos].mean())}
    hfc_info, hfc_name = None, None
    if config.hfc_set:
        folder = _hfc_folder(config, run_, spec.name)
        hfc_set = aesets.load_ae_set(folder, hint=run_.hint("hfc", f"--attack {spec.name} -y {config.num_component}"))
        position = {int(i): p for p, i in enumerate(hfc_set["index"])}
        held = [position.get(int(i)) for i in base["index"][eval_pos]]
        if None in held:  # gmm_attack.py --limit N attacks the first N images of the part
            have = held.index(None)
            remedy = (f"pass --limit {have}" if have else
                      run_.hint("hfc", f"--attack {spec.name} -y {config.num_component}", when="again"))
            raise utils.UserError(f"the HFC set {folder} holds {have} of the first {len(held)} images of {part}; "
                                  f"{remedy}")
        images["hfc"] = hfc_set["adv"][held]
        success["hfc"] = float(hfc_set["success"][held].mean())
        results = utils.read_json(folder / runs.RESULTS, "HFC results")
        hfc_info = {key: results.get(key) for key in ("lamda", "term", "class_loss", "kappa", "steps",
                                                      "step_size_256", "keep_successful")}
        inputs["hfc_set"] = folder / aesets.AE_FILE
        hfc_name = folder.name

    term = hfc.HFCTerm(mixtures, device=device)  # the paper's form: per-layer values, no normalisation
    labels, targets = base["labels"][eval_pos], base["targets"][eval_pos]
    started = time.perf_counter()
    measured = measure(model, term, scale_table(mixtures, term.layers), images, labels, targets,
                       loss=engine["loss"], kappa=engine["kappa"], batch_size=config.batch_size)
    reach = budget_reach(model, images["clean"], targets, spec.eps, config.batch_size)
    train = features.part_features(run_, model, "train", device, config.batch_size)
    stats = channel_statistics(train.pooled, train.labels, term.layers, mixtures.classes)
    z2, knn = {}, {}
    for row, point, classes in (("clean_own", "clean", labels), ("base_target", "base", targets),
                                ("hfc_target", "hfc", targets)):
        if point in images:
            pooled = features.extract(model, torch.from_numpy(images[point]), device, config.batch_size,
                                      progress=False).pooled
            z2[row] = standardised_distance(pooled, classes, term.layers, stats)
            knn[row] = nearest_distance(pooled, classes, term.layers, train.pooled, train.labels)
    seconds = time.perf_counter() - started
    diagnosis = {
        "dataset": run_.dataset, "arch": config.arch, "attack": spec.name, "epsilon_256": spec.eps_256,
        "num_component": config.num_component, "hfc_set": hfc_name, "hfc": hfc_info,
        "images_of": part, "n_images": len(eval_pos), "index": base["index"][eval_pos].tolist(),
        "class_loss": config.class_loss, "loss": engine["loss"],
        "kappa": engine["kappa"] if engine["loss"] == "cw" else None, "lamda": config.lamda,
        "success": success, "n_layers": len(term.layers), "reach": reach,
        **summarise(model, mixtures, term, measured, targets, config.lamda, z2, knn), "seconds": round(seconds, 2)}

    out = config.out_dir(run_)
    with utils.replacing_dir(out) as staging:
        utils.atomic_write_bytes(staging / MD_FILE, format_markdown(diagnosis).encode())
        utils.atomic_write_bytes(staging / PNG_FILE, plot(diagnosis))
        diagnosis["record"] = runs.record("diagnosis", config.settings(), inputs,
                                          [staging / MD_FILE, staging / PNG_FILE], folder=staging)
        utils.write_json(staging / JSON_FILE, diagnosis)
    summary = diagnosis["summary"]
    print(f"HFC diagnosis of {len(eval_pos)} {part} images, {len(term.layers)} layers, M = {config.num_component}, "
          f"class loss {config.class_loss} ({engine['loss']}), {seconds:.0f} s")
    print(f"  budget's first-order reach at the clean images: ε‖∇m‖₁ / margin median {reach['ratio_median']:.3g} "
          f"(10 % quantile {reach['ratio_q10']:.3g}; margin {reach['margin_median']:.3g}); "
          f"{reach['below_one']} of {len(eval_pos)} below 1")
    print("  sum over layers of the median term: " + ", ".join(
        f"{row} {_g(value)}" for row, value in summary["sum_median_term"].items() if value is not None))
    for p in diagnosis["points"]:
        blocking_layers = summary["blocking_layers"][p]
        print(f"  at {p}: term cos {_g(summary['term_cosine']['paper'][p])} (paper), "
              f"{_g(summary['term_cosine']['normalised'][p])} (normalised); {len(blocking_layers)} layers block at "
              f"λ = {config.lamda:g}; " + ("no layer has a negative cosine" if summary["lamda_no_block"][p] is None
                                            else f"none blocks for λ ≤ {_g(summary['lamda_no_block'][p])}"))
    last = diagnosis["layers"][-1]
    print(f"  {last['name']}: median term " + ", ".join(
        f"{row} {_g(last['median_term'][row])}" for row in ("clean_own", "base_target", "hfc_target")
        if last["median_term"][row] is not None) + "; median per-channel z² " + ", ".join(
        f"{row} {_g(value)}" for row, value in last["z2"].items()) + f"; median distance to the {KNN_NEIGHBOURS} "
        "nearest training features " + ", ".join(f"{row} {_g(value)}" for row, value in last["knn"].items()))
    print(f"  -> {out}")
    return diagnosis


if __name__ == "__main__":
    utils.run_cli(main)
