"""The HFC attack as a library (docs/PROTOCOL.md §7): the step schedule, the attack (the engine
with the term), the choice of λ on A_fit, and the results folder's key. Scoring lives in
``evaluation.py``; the mixtures in ``gmm.py``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import attacks
import cli
import gmm
from utils import UserError

# The HFC code's fixed step α in units of 1/256 (docs/PROTOCOL.md §7), keyed by (data set, arch).
PAPER_STEP_256 = {("APTOS", "resnet50"): 0.025, ("APTOS", "vgg16"): 0.1, ("APTOS", "vgg16_bn"): 0.1,
                  ("CXR", "resnet50"): 0.01, ("CXR", "vgg16"): 0.04, ("CXR", "vgg16_bn"): 0.04}
# Elsewhere (the synthetic set, the small CPU archs): ε/10 per step, i.e. T = 20.
# The term's forms: the paper's (Σ over layers of ‖(f − μ_k*) L_k*‖²/C), the normalised one
# (each layer divided by its held-out clean median, averaged over layers; see HFCTerm), and the
# hinged one: normalised, and a layer stops pulling once it scores like the median clean image
# (max(term − 1, 0)), since features pulled further are *more* typical than clean ones, which
# MAHA's combination of layers flags.
TERMS = {"paper": {"normalise": False, "reduce": "sum"}, "normalised": {"normalise": True, "reduce": "mean"},
         "hinged": {"normalise": True, "reduce": "mean", "floor": 1.0}}
# The classification loss the HFC attack minimises with the term: the base method's own (CE, or
# CW's margin for CW), or the margin clamped at κ for any method.
CLASS_LOSSES = ("base", "margin")
FALLBACK_STEP_FRACTION = 0.1
DEFAULT_LAMBDA_GRID = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_MIN_SUCCESS = 0.95
# The first chunk of a λ trial, in images; each next chunk is as large as all before it (1, 1, 2,
# 4, ...). The trial stops once its verdict is certain (choose_lambda), so a λ that fails is
# usually settled by its first image or two, and one that passes runs in few, large batches.
TRIAL_CHUNK = 1


# The layer sets of ``--hfc-layers`` besides a comma list of tap names: every layer with a
# mixture (the paper's), the mixtures' layers in the network's deepest stage, or the deepest one.
LAYER_CHOICES = ("all", "last-stage", "last")


def resolve_term_layers(spec: str, model, mixture_layers: Sequence[int]) -> list[int]:
    """``--hfc-layers`` -> sorted indices of the taps the term constrains, all of them mixture layers.

    ``last-stage``: the mixture layers after the second-to-last stage end (``model.stage_end_layers``),
    i.e. inside the deepest stage; ``last``: the deepest mixture layer; otherwise tap names."""
    fitted = sorted(mixture_layers)
    if spec == "all":
        return fitted
    if spec == "last":
        return fitted[-1:]
    if spec == "last-stage":
        ends = list(getattr(model, "stage_end_layers", []))
        start = ends[-2] if len(ends) >= 2 else -1
        chosen = [i for i in fitted if i > start]
        if not chosen:
            raise UserError(f"--hfc-layers last-stage: no mixture layer lies in the deepest stage (after "
                            f"{model.layer_names[start]}); fit them with a larger get_GMM.py --max-channels")
        return chosen
    names = [part.strip() for part in spec.split(",") if part.strip()]
    index = {name: i for i, name in enumerate(model.layer_names)}
    unknown = [n for n in names if n not in index]
    if unknown or not names:
        raise UserError(f"--hfc-layers {spec!r}: expected {', '.join(LAYER_CHOICES)} or a comma list of tap "
                        f"names; unknown: {', '.join(unknown) or '(none given)'}")
    missing = [n for n in names if index[n] not in fitted]
    if missing:
        raise UserError(f"--hfc-layers: no mixtures for {', '.join(missing)}; fitted: "
                        + ", ".join(model.layer_names[i] for i in fitted))
    return sorted({index[n] for n in names})


def needs_scales(term: str) -> bool:
    """Whether the term form ``term`` (a key of TERMS) divides by the mixtures' held-out scales."""
    return TERMS[term]["normalise"]


class _ChosenQuadratic(torch.autograd.Function):
    """Per sample ‖z‖²/C with z = (f − μ_k*) L_k*, where z was already computed (without gradient)
    while scoring the components; the backward pass, ∂/∂f = (2/C)·L_k* z, reads each chosen factor
    once where it lies ("loop": one matrix-vector product per sample, the CPU's choice) or gathers
    the chosen factors and multiplies them as one batch ("gather": the GPU's choice)."""

    @staticmethod
    def forward(ctx, f, z, chol_flat, rows, strategy):
        ctx.save_for_backward(z, rows)
        ctx.chol_flat, ctx.strategy = chol_flat, strategy
        return z.square().sum(1) / z.shape[1]

    @staticmethod
    def backward(ctx, grad_out):
        z, rows = ctx.saved_tensors
        chol_flat = ctx.chol_flat
        if ctx.strategy == "gather":
            grad = torch.bmm(chol_flat.index_select(0, rows), z.unsqueeze(2)).squeeze(2)
        else:
            grad = torch.stack([torch.mv(chol_flat[r], z[i]) for i, r in enumerate(rows.tolist())])
        return grad * (grad_out * (2.0 / z.shape[1])).unsqueeze(1), None, None, None, None


class HFCTerm(nn.Module):
    """The hierarchical feature constraint (Yao et al., MICCAI 2021; docs/PROTOCOL.md §7) as an ``extra``.

    ``term(logits, features, targets)``: for each kept layer l and each sample with target t, the
    component k* of t's mixture with the highest score
    ``s_k = log_prior_k + Σ log diag(L_k) − ½‖(f − μ_k) L_k‖²`` is chosen without gradient, and
    ``term_l = (1/C)·‖(f − μ_k*) L_k*‖²``; the result is Σ_l term_l averaged over the batch.
    ``features`` is the full list of pooled hierarchical features (N×C per layer, as
    ``forward_features`` returns); ``layers`` are indices into it (default: the mixtures' layers).

    Cost: scoring must read every component's C×C factor of the target class at every step, which
    dominates. The factors are stacked per layer as classes × M × C × C (a class with fewer
    components is padded with components of score −inf); one batched product per class present
    scores all M components, split into column panels of ``panel_width`` that skip the zero lower
    triangle of the factors (about 40% less work at C = 512; on CUDA one full-width product, as
    kernel launches cost more there than flops). The term's value reuses the chosen component's
    product; its gradient reads only the chosen factor (``_ChosenQuadratic``). The buffers move to
    the features' device (dtype float32 by default) once, on the first call, or with ``.to()``.

    ``normalise``: each layer's term of a sample with target t is divided by the mixtures' held-out
    scale of (layer, t) (``term_scales``: a held-out clean image of t then scores about 1 per
    layer); the mixtures must carry scales (get_GMM.py fits them). ``reduce``: "sum" adds the
    per-layer terms, "mean" averages them over the layers. The paper's term is
    ``normalise=False, reduce="sum"`` (the default). ``floor`` (with ``normalise``): each
    normalised layer term becomes max(term − floor, 0), so a layer already as typical as a clean
    image at that quantile exerts no pull.
    """

    def __init__(self, mixtures: gmm.Mixtures, layers: Sequence[int] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 panel_width: int | None = None, backward: str | None = None,
                 normalise: bool = False, reduce: str = "sum", floor: float | None = None):
        super().__init__()
        self.layers = list(mixtures.layers if layers is None else layers)
        unknown = [l for l in self.layers if l not in mixtures.layers]
        if unknown:
            raise UserError(f"no mixtures for layers {unknown}; fitted layers: {mixtures.layers}")
        if mixtures.classes != list(range(len(mixtures.classes))):
            raise ValueError(f"mixture classes must be 0..K-1, got {mixtures.classes}")
        if backward not in (None, "loop", "gather"):
            raise ValueError(f"backward must be 'loop' or 'gather', got {backward!r}")
        if reduce not in gmm.REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(gmm.REDUCTIONS)}, got {reduce!r}")
        if normalise and not mixtures.scales:
            raise UserError("these mixtures carry no held-out term scales, which the normalised HFC term "
                            "needs; re-run get_GMM.py (it measures them on the run's validation images)")
        if floor is not None and not normalise:
            raise ValueError("floor applies to the normalised term only")
        self.normalise = bool(normalise)
        self.floor = floor
        self.reduce = reduce
        self.num_classes = len(mixtures.classes)
        self.panel_width = panel_width  # None: 64 on the CPU, full width on CUDA
        self.backward_strategy = backward  # None: "loop" on the CPU, "gather" on CUDA
        self._moved = device is not None
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype  # stack in the final dtype: half the memory
        for i, layer in enumerate(self.layers):
            means, chol, const = gmm.stacked_layer(mixtures, layer, np_dtype)
            self.register_buffer(f"means_{i}", torch.from_numpy(means).to(device))
            self.register_buffer(f"chol_{i}", torch.from_numpy(chol).to(device))
            self.register_buffer(f"const_{i}", torch.as_tensor(const, dtype=dtype, device=device))
        if self.normalise:  # classes × layers: gathered by target, one division per step
            table = [[mixtures.scales[(layer, c)] for layer in self.layers] for c in mixtures.classes]
            self.register_buffer("scales", torch.as_tensor(table, dtype=dtype, device=device))

    def _ensure_on(self, like: torch.Tensor) -> None:
        if not self._moved:
            self.to(like.device)
            self._moved = True

    def layer_terms(self, features: Sequence[torch.Tensor], targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B×n_layers terms ``(1/C)‖(f − μ_k*) L_k*‖²`` (with gradient) and the chosen k* (B×n_layers)."""
        self._ensure_on(features[self.layers[0]])
        device = self.means_0.device
        on_cuda = device.type == "cuda"
        strategy = self.backward_strategy or ("gather" if on_cuda else "loop")
        targets = targets.to(device, torch.long)
        # Index sets per target class, computed once for all layers (one host sync).
        present = torch.unique(targets).tolist()
        if len(present) == 1:
            groups = [(present[0], None)]  # the common case: no indexing at all
        else:
            groups = [(c, torch.nonzero(targets == c).squeeze(1)) for c in present]
        terms, chosen = [], []
        for i, layer in enumerate(self.layers):
            means, chol, const = getattr(self, f"means_{i}"), getattr(self, f"chol_{i}"), getattr(self, f"const_{i}")
            K, M, C, _ = chol.shape
            width = C if on_cuda and self.panel_width is None else min(C, self.panel_width or 64)
            f = features[layer].to(means.dtype)
            with torch.no_grad():
                fd = f.detach()
                if groups[0][1] is None:
                    c = groups[0][0]
                    k, z = self._choose(fd, means[c], chol[c], const[c], width)
                else:
                    k = torch.empty(len(fd), dtype=torch.long, device=device)
                    z = torch.empty_like(fd)
                    for c, idx in groups:
                        k[idx], z[idx] = self._choose(fd[idx], means[c], chol[c], const[c], width)
            rows = targets * M + k  # (class, component) -> row of the K·M stacked factors
            terms.append(_ChosenQuadratic.apply(f, z, chol.view(K * M, C, C), rows, strategy))
            chosen.append(k)
        return torch.stack(terms, 1), torch.stack(chosen, 1)

    @staticmethod
    def _choose(f, means_c, chol_c, const_c, width):
        """For the rows of ``f`` (n×C) under one class: k* (n) and z = (f − μ_k*) L_k* (n×C)."""
        M, C, _ = chol_c.shape
        n = len(f)
        diff = f.unsqueeze(0) - means_c.unsqueeze(1)  # M×n×C
        # Column panel [j, e) of (f − μ_k) L_k only involves rows < e of the upper-triangular L_k.
        panels = [torch.bmm(diff[:, :, :e], chol_c[:, :e, j:e])
                  for j, e in ((j, min(j + width, C)) for j in range(0, C, width))]
        squared = panels[0].square().sum(2)
        for panel in panels[1:]:
            squared += panel.square().sum(2)
        k = (const_c[:, None] - 0.5 * squared).argmax(0)  # M×n scores -> n
        pick = torch.arange(n, device=f.device)
        z = torch.cat([panel[k, pick] for panel in panels], 1)
        return k, z

    def layer_values(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """B×n_layers per-layer terms as the attack uses them: ``layer_terms``, divided by the
        held-out scale of (layer, target) with ``normalise``, less ``floor`` and clamped at 0."""
        terms, _ = self.layer_terms(features, targets)
        if self.normalise:
            terms = terms / self.scales.index_select(0, targets.to(self.scales.device, torch.long))
        if self.floor is not None:
            terms = (terms - self.floor).clamp_min(0.0)
        return terms

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        values = self.layer_values(features, targets)
        return (values.sum(1) if self.reduce == "sum" else values.mean(1)).mean()


def hfc_schedule(dataset: str, arch: str, eps_256: float, step_size_256: float | None = None,
                 steps: int | None = None) -> tuple[float, int]:
    """(α in units of 1/256, T): the paper's small fixed α and T = 2ε/α unless overridden."""
    if step_size_256 is None:
        step_size_256 = PAPER_STEP_256.get((dataset, arch), FALLBACK_STEP_FRACTION * eps_256)
    if step_size_256 <= 0:
        raise UserError(f"--step-size must be positive, got {step_size_256}")
    if steps is None:
        steps = max(1, int(round(2 * eps_256 / step_size_256)))
    if steps < 1:
        raise UserError(f"--steps must be positive, got {steps}")
    return float(step_size_256), int(steps)


def results_key(num_component: int, lamda: str, variant: dict | None = None) -> str:
    """The results folder's key for the settings as asked (``hfc_<key>``): ``M<y>_lam<λ or auto>``
    plus ``_<name><value>`` for each setting in ``variant`` (the ones that differ from the
    defaults; a True flag adds its name alone). It only keeps runs with other settings apart: what a
    folder holds is read from its record, never from its name."""
    key = f"M{num_component}_lam{lamda_text(lamda)}"
    for name, value in (variant or {}).items():
        key += f"_{name}" + ("" if value is True else f"{value:g}" if isinstance(value, float) else f"{value}")
    return key


def lamda_text(lamda: str | float) -> str:
    """``auto`` or the number in its shortest form."""
    return "auto" if str(lamda).lower() == "auto" else f"{float(lamda):g}"


def engine_loss(spec: attacks.AttackSpec, class_loss: str, kappa: float | None) -> dict:
    """The engine options for the classification loss: {} for the method's own, or the margin
    clamped at κ (``loss="cw"``) for ``class_loss="margin"``."""
    if class_loss not in CLASS_LOSSES:
        raise UserError(f"unknown classification loss {class_loss!r}; expected one of {', '.join(CLASS_LOSSES)}")
    if class_loss == "base":
        if kappa is not None and spec.method != "CW":  # refused rather than ignored: only a margin reads κ
            raise UserError(f"--kappa applies to CW or --class-loss margin only, not {spec.name} with its own loss")
        return {} if kappa is None else {"kappa": kappa}
    return {"loss": "cw", "kappa": attacks.CW_KAPPA if kappa is None else kappa}


def hfc_attack(model, term: HFCTerm | None, images: torch.Tensor, targets: np.ndarray,
               spec: attacks.AttackSpec, *, lam: float, step_size_256: float, steps: int, seed: int,
               batch_size: int, device, progress: bool = True, keep_successful: bool = True,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The base attack ``spec`` with the HFC ``term`` added with weight λ (λ = 0: the base method
    itself at the HFC schedule; the term is not computed).

    With ``keep_successful`` (the default) an image whose last iterate is pulled back across the
    decision boundary by the term returns its latest iterate that was classified as the target:
    the attack's output is the most hidden adversarial example it found, never a miss it had
    already passed. Images are attacked grouped by target class (and returned in the given
    order): a batch with one target reads one class's mixture parameters, which makes the term
    about half as costly."""
    targets = np.asarray(targets, dtype=np.int64)
    order = np.argsort(targets, kind="stable")
    adv, success = attacks.run_attack(model, images[torch.from_numpy(order)], targets[order], spec,
                                      extra=term if lam > 0 else None, lam=lam, steps=steps,
                                      step_size=step_size_256 / 256, seed=seed, batch_size=batch_size,
                                      device=device, progress=progress, keep_successful=keep_successful,
                                      **options)
    restore = torch.from_numpy(np.argsort(order))
    return adv[restore], success[restore]


def lamda_fallback_problem(text: str) -> str | None:
    """The domain of ``--lamda-fallback`` ("" = none): what is wrong with ``text``, or None when it
    lists numbers in [0, 1), each smaller than the one before."""
    try:
        factors = cli.numbers(text)
    except ValueError:
        return f"must be a comma list of numbers, got {text!r}"
    if any(not 0.0 <= f < 1.0 for f in factors) or any(b >= a for a, b in zip(factors, factors[1:])):
        return f"must list factors in [0, 1), each smaller than the one before, got {text!r}"
    return None


def lamda_fallback_factors(text: str) -> list[float]:
    """The factors of ``--lamda-fallback``; UserError when ``lamda_fallback_problem`` finds one."""
    problem = lamda_fallback_problem(text)
    if problem:
        raise UserError(f"--lamda-fallback {problem}")
    return cli.numbers(text)


def hfc_attack_with_fallback(model, term: HFCTerm | None, images: torch.Tensor, targets: np.ndarray,
                             spec: attacks.AttackSpec, *, lam: float, fallback: Sequence[float] = (),
                             progress: bool = True, **attack_kwargs
                             ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``hfc_attack`` at λ, then a per-image λ fallback: each image whose attack never reached its
    target is attacked again from its clean image at λ·f, for each factor f of ``fallback`` in
    turn, until it does (ending with f = 0 makes the success that of the λ = 0 attack at the same
    schedule). It is the downward half of CW's per-image search for its constant: an image the term
    keeps from its target gets the largest weight, of those tried, at which it is reached, and the
    images that hit at λ keep their AEs. Returns (adv, success, the λ each image's AE was made
    with); an image that no weight takes to its target keeps its attack at λ, with λ."""
    adv, success = hfc_attack(model, term, images, targets, spec, lam=lam, progress=progress, **attack_kwargs)
    targets = np.asarray(targets, dtype=np.int64)
    weights = np.full(len(images), float(lam))
    for factor in fallback if lam > 0 else ():
        missed = np.flatnonzero(~success.numpy())
        if len(missed) == 0:
            break
        if progress:
            print(f"λ fallback: {len(missed)} image(s) not taken to their target yet; attacking them again "
                  f"at λ = {lam * factor:g}")
        retry, hit = hfc_attack(model, term, images[torch.from_numpy(missed)], targets[missed], spec,
                                lam=lam * factor, progress=progress, **attack_kwargs)
        taken = missed[hit.numpy()]
        adv[torch.from_numpy(taken)] = retry[hit]
        success[torch.from_numpy(taken)] = True
        weights[taken] = lam * factor
    return adv, success, weights


def choose_lambda(model, term: HFCTerm, images: torch.Tensor, targets: np.ndarray, spec, *,
                  grid: Sequence[float], min_success: float, refine: bool = True,
                  chunk: int = TRIAL_CHUNK, **attack_kwargs) -> tuple[float, list[dict], str]:
    """λ chosen on the given images (a subset of A_fit: never the evaluation images).

    The rule: the largest λ of ``grid`` whose success reaches the bar, the smaller of
    ``min_success`` and the base attack's own success on these images at the same schedule
    (λ = 0): a constraint cannot make the attack succeed more often than the attack without it,
    so the bar never asks for what the base attack cannot do. With ``refine`` the geometric
    midpoint between the chosen value and the failed value above it is tried too. When no value
    reaches the bar, the one with the best success is taken (ties: the larger).

    Cost: the largest λ is tried first (one trial when it passes); otherwise the grid is bisected,
    which assumes success does not fall as λ falls. By the same assumption the base attack reaches
    ``min_success`` whenever a λ > 0 does, so the λ = 0 trial runs only when no λ of the grid
    does (and the search is repeated at the base attack's success when that is lower).

    A trial attacks the images in chunks, the first of ``chunk`` images and each next one as large
    as all before it, and stops as soon as its verdict is certain: once enough images have hit to
    reach the bar, or once so many have missed that it cannot. Images do not interact, so the
    verdict is the one the whole trial would give, up to float rounding, which depends on the
    batch's size and can flip an image that ends on the decision boundary; for the methods with
    random draws (PGD's start, DI's transforms) a chunk's draws are another sample than a whole
    batch's. A term with per-image guides bound to the batch is tried in one chunk. Within a
    chunk an image stops being attacked at its first hit (final with keep-successful). A trial's
    record gives the images it attacked, their hits and the bounds these put on its success over
    all the images (equal when it attacked them all).
    Returns λ, the trials and the rule in words."""
    n = len(images)
    if getattr(term, "per_image", False):
        chunk = n
    chunk = max(1, int(chunk))
    outcomes: dict[float, list[bool]] = {}  # per λ: the hits of the images attacked so far, in order

    def attack_next(lam: float) -> None:
        done = outcomes.setdefault(lam, [])
        if not done:
            print(f"  λ = {lam:.3g}: trial on up to {n} A_fit images")
        part = slice(len(done), min(n, len(done) + max(chunk, len(done))))
        # A trial on real images takes minutes: its progress bar shows (and clears after).
        _, success = hfc_attack(model, term, images[part], np.asarray(targets)[part], spec, lam=lam,
                                progress=True, stop_when_all_hit=True, **attack_kwargs)
        done.extend(bool(hit) for hit in success.tolist())

    def reaches(lam: float, need: int) -> bool:
        """Whether at least ``need`` of the n images hit at λ (attacking only until that is certain)."""
        while True:
            done = outcomes.get(lam, [])
            hits = sum(done)
            if hits >= need:
                return True
            if len(done) - hits > n - need:
                return False
            attack_next(lam)

    def success_of(lam: float) -> float:
        """The success over all n images (the trial completed)."""
        while len(outcomes.get(lam, [])) < n:
            attack_next(lam)
        return sum(outcomes[lam]) / n

    need_min = int(np.ceil(min_success * n - 1e-9))
    bar = {}  # "need": the hits the bar asks for, once the base attack's success has been measured

    def passes(lam: float) -> bool:
        if reaches(lam, need_min):
            return True
        return bar.get("need", need_min) < need_min and reaches(lam, bar["need"])

    def rule() -> str:
        if bar.get("need", need_min) < need_min:
            base = success_of(0.0)
            return f"largest λ of the grid with A_fit success ≥ min({min_success:g}, base {base:.3f}) = {base:.3f}"
        return f"largest λ of the grid with A_fit success ≥ {min_success:g}"

    def records() -> list[dict]:
        rows = []
        for lam, done in outcomes.items():
            hits, misses = sum(done), len(done) - sum(done)
            rows.append({"lamda": lam, "images": len(done), "hits": hits,
                         "fit_success": hits / n if len(done) == n else None,
                         "success_bounds": [hits / n, (n - misses) / n]})
            print(f"  λ = {lam:.3g}: {hits} of {len(done)} attacked images hit; success on the {n} A_fit "
                  f"images in [{hits / n:.3f}, {(n - misses) / n:.3f}]")
        return rows

    ordered = [lam for lam in sorted(set(grid), reverse=True) if lam > 0]

    def search() -> int | None:
        """The index in ``ordered`` of the largest λ that passes (largest first, then bisection)."""
        if passes(ordered[0]):
            return 0
        chosen, low, high = None, 1, len(ordered) - 1
        while low <= high:
            middle = (low + high) // 2
            if passes(ordered[middle]):
                chosen, high = middle, middle - 1
            else:
                low = middle + 1
        return chosen

    chosen = search()
    if chosen is None:
        # No λ reaches min_success. (When one does, the base attack does too, by the assumption
        # the bisection rests on, so it is not run.) The base attack's own success may set a
        # lower bar: then search again, the trials going on from where they stopped.
        bar["need"] = need_min if reaches(0.0, need_min) else round(success_of(0.0) * n)
        if bar["need"] < need_min:
            chosen = search()
    if chosen is None:
        # Rare (not even the smallest λ does as well as the base attack): the best success needs
        # every tried λ's trial completed.
        tried = [lam for lam in outcomes if lam > 0]
        best = max(tried, key=lambda lam: (success_of(lam), lam))
        # The bar: min_success when the base attack reached it (its trial stopped there), else
        # the base attack's own success (its trial already complete).
        level = min_success if bar["need"] == need_min else success_of(0.0)
        print(f"  no λ reached {level:.3f}; taking λ = {best:.3g} (the best success)")
        return best, records(), f"no λ reached {level:.3f}: the λ with the best A_fit success"
    lam = ordered[chosen]
    if refine and chosen > 0:
        middle = float(np.sqrt(lam * ordered[chosen - 1]))
        if passes(middle):
            lam = middle
    return lam, records(), rule()
