"""One targeted L∞ attack engine for every attack, base or adaptive (docs/PROTOCOL.md §§2 and 5).

Every attack minimises ``classification_loss(logits, target) + lam * extra(logits, features,
targets)`` with signed steps ``x <- clip_[0,1](Π_ε(x - α·sign(g)))``. The methods differ only in
pluggable parts: the classification loss (cross-entropy, or the CW margin), a random start
(PGD), momentum (MI), input diversity (DI) and gradient smoothing (TI). HFC and the competing
adaptive attacks plug in through ``extra``, so "base" and "base + extra" differ by the loss only.

The classification loss is an option of every method (``loss="ce"`` or ``"cw"``; CW defaults to
"cw", the others to "ce"). The clamped CW margin max(max_{j≠t} z_j - z_t, -κ) has zero gradient
once a sample is classified as its target with a lead above κ: beyond that point an ``extra``
term alone drives the step, and as soon as the term pulls the sample back within κ of the
boundary the margin's gradient returns. Cross-entropy instead keeps a gradient at every margin
and competes with the term everywhere. ``loss="cw"`` with κ > 0 thus makes any base method
plus a term success-preserving, as long as one step moves the margin by less than κ (with κ = 0
the margin's pull returns only at the boundary, so a last iterate may miss by one step, which
``keep_successful`` covers).

Names: ``<ATTACK>_Linf_<k>`` means ε = k/256 (k may be fractional); ``Noise_Linf_<k>`` is the
benign noisy set (uniform noise in [-ε, ε], clipped). Default schedule (the paper's base
attacks): T = 10 steps of α = ε/5; FGSM is one step of α = ε.

Randomness (PGD start, DI draws, noise) comes from one ``torch.Generator`` on the CPU seeded
with ``seed`` and consumed batch by batch, so a run is reproducible for a given seed and batch
size and does not depend on the device the model runs on.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import network
from utils import UserError

DEFAULT_STEPS = 10
DEFAULT_STEP_FRACTION = 0.2  # α = ε/5
MI_DECAY = 1.0  # Dong et al.; the HFC code uses 0.5 (pass decay=0.5 / --decay 0.5)
DI_PROB = 0.5
DI_RESIZE_RATE = 0.9
TI_KERNEL = 7
TI_NSIG = 3.0
CW_KAPPA = 0.0

ALIASES = {"BIM": "I_FGSM"}
METHODS = ("FGSM", "I_FGSM", "PGD", "MI_FGSM", "DI_FGSM", "TI_FGSM", "CW", "Noise")
LOSSES = ("ce", "cw", "none")  # "none": no classification goal, the extra term alone (the stress test)
OPTION_NAMES = ("loss", "decay", "kappa", "di_prob", "resize_rate", "ti_kernel", "random_start", "keep_successful",
                "term_after_hit",
                "stop_when_all_hit", "orthogonal")
# Orthogonal PGD (Bryniarski et al., ICLR 2022): which images take a detector step.
# "success": those already classified as their target (as Bryniarski et al.'s released attack,
# github.com/v-wangg/OrthogonalPGD);
# "flagged": those whose detector score is above the detector's threshold.
ORTHOGONAL_RULES = ("success", "flagged")
VALID_FORMS = ("<ATTACK>_Linf_<k> with ATTACK one of FGSM, I_FGSM (alias BIM), PGD, MI_FGSM, "
               "DI_FGSM, TI_FGSM, CW, or Noise_Linf_<k>; k > 0 is the L∞ budget in units of 1/256 "
               "(e.g. I_FGSM_Linf_1, PGD_Linf_0.5, Noise_Linf_2)")
_NAME_RE = re.compile(r"^(?P<method>.+?)_Linf_(?P<budget>[^_]+)$", re.IGNORECASE)

Extra = Callable[[torch.Tensor, list, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """A parsed attack name: the method and the L∞ budget in units of 1/256."""

    method: str
    eps_256: float

    @property
    def eps(self) -> float:
        """The budget in [0, 1] pixel units."""
        return self.eps_256 / 256.0

    @property
    def name(self) -> str:
        """The canonical name (alias resolved), used as the AE set's folder name."""
        return f"{self.method}_Linf_{self.eps_256:g}"


def parse_attack(name: str) -> AttackSpec:
    """``I_FGSM_Linf_1`` -> AttackSpec("I_FGSM", 1.0); UserError listing the valid forms otherwise."""
    match = _NAME_RE.match(name.strip())
    if not match:
        raise UserError(f"unknown attack {name!r}; expected {VALID_FORMS}")
    method = match["method"].upper()
    method = ALIASES.get(method, "Noise" if method == "NOISE" else method)
    if method not in METHODS:
        raise UserError(f"unknown attack {match['method']!r} in {name!r}; expected {VALID_FORMS}")
    try:
        budget = float(match["budget"])
    except ValueError:
        budget = float("nan")
    if not (math.isfinite(budget) and budget > 0):
        raise UserError(f"attack {name!r} needs a positive finite budget k; expected {VALID_FORMS}")
    return AttackSpec(method, budget)


# --------------------------------------------------------------------------- the methods
# Each method is the engine with some defaults switched; its docstring names the paper, the
# budget/defaults, and how it differs from torchattacks (the parity tests match these settings).
_BASE = dict(steps=DEFAULT_STEPS, step_fraction=DEFAULT_STEP_FRACTION, loss="ce", kappa=CW_KAPPA,
             random_start=False, decay=None, di_prob=0.0, resize_rate=DI_RESIZE_RATE, ti_kernel=0,
             keep_successful=False, stop_when_all_hit=False, orthogonal=None, term_after_hit=False)


def _fgsm() -> dict:
    """FGSM (Goodfellow et al., ICLR 2015): one signed step of α = ε on the targeted CE.
    Same as torchattacks' FGSM in targeted mode (which ascends the negated CE)."""
    return dict(steps=1, step_fraction=1.0)


def _i_fgsm() -> dict:
    """I_FGSM / BIM (Kurakin et al., ICLR-W 2017): T = 10 signed steps of α = ε/5 on the CE,
    each followed by the projection onto the ε-ball and [0, 1]. Same as torchattacks'
    BIM(eps, alpha=eps/5, steps=10) in targeted mode (not its 8/255, 2/255 defaults)."""
    return {}


def _pgd() -> dict:
    """PGD (Madry et al., ICLR 2018): I_FGSM from a uniform random start in [-ε, ε], clipped
    to [0, 1]. Same as torchattacks' PGD(random_start=True); our start comes from ``seed``."""
    return dict(random_start=True)


def _mi_fgsm() -> dict:
    """MI_FGSM (Dong et al., CVPR 2018): g_t = ĝ_t + μ·g_{t-1} with ĝ the per-sample
    L1-normalised gradient (divided by its mean absolute value: the L1 norm up to a constant,
    so every sign is unchanged), step α·sign(g_t). μ = 1.0 as in Dong et al. and torchattacks'
    MIFGSM; the HFC code uses μ = 0.5 (``decay=0.5``, ``--decay 0.5``)."""
    return dict(decay=MI_DECAY)


def _di_fgsm() -> dict:
    """DI_FGSM (Xie et al., CVPR 2019): I_FGSM with the gradient taken through input
    diversity: with p = 0.5 the batch is resized (bilinear) to a random size in [0.9·W, W) and
    zero-padded back to W at a random offset (one draw per batch, as in the reference code).
    torchattacks' DIFGSM draws the same way but always runs its momentum code; with its
    default decay 0.0 that is sign-equivalent to this."""
    return dict(di_prob=DI_PROB)


def _ti_fgsm() -> dict:
    """TI_FGSM (Dong et al., CVPR 2019): I_FGSM with the gradient smoothed per channel by a
    7×7 Gaussian kernel (Dong et al.'s kernel, nsig = 3) before the sign. torchattacks' TIFGSM
    defaults to a 15×15 kernel plus input diversity (p = 0.5): ours equals
    TIFGSM(len_kernel=7, nsig=3, diversity_prob=0.0, decay=0.0)."""
    return dict(ti_kernel=TI_KERNEL)


def _cw() -> dict:
    """CW (Carlini & Wagner, S&P 2017) loss in the L∞ engine: minimise the margin
    max(max_{j≠t} z_j - z_t, -κ), κ = 0, with the I_FGSM schedule; the margin stays when an
    ``extra`` term is added. torchattacks' CW is the L2 optimisation attack, so no parity."""
    return dict(loss="cw")


def _noise() -> dict:
    """Noise_Linf_k: the benign noisy set, clean + uniform noise in [-ε, ε] from ``seed``,
    clipped to [0, 1] (a real noise set; the HFC code's was a copy of the clean set)."""
    return dict(steps=0)


METHOD_DEFAULTS = {"FGSM": _fgsm, "I_FGSM": _i_fgsm, "PGD": _pgd, "MI_FGSM": _mi_fgsm,
                   "DI_FGSM": _di_fgsm, "TI_FGSM": _ti_fgsm, "CW": _cw, "Noise": _noise}


@dataclass(frozen=True)
class _Config:
    steps: int
    alpha: float
    loss: str  # "ce" or "cw"
    kappa: float
    random_start: bool
    decay: float | None  # None: no momentum
    di_prob: float
    resize_rate: float
    ti_kernel: int  # 0: off
    keep_successful: bool  # an image whose last iterate misses keeps its latest hit
    stop_when_all_hit: bool  # with keep_successful, success only: an image leaves at its first hit, a batch stops when all have
    orthogonal: str | None  # None: off; else orthogonal PGD on ``extra`` (a detector score), one of ORTHOGONAL_RULES
    term_after_hit: bool  # ``extra`` acts on an image only once an iterate of it has been classified as its target


def _resolve(spec: AttackSpec, steps: int | None, step_size: float | None, options: dict) -> _Config:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown attack option(s) {unknown}; expected some of {list(OPTION_NAMES)}")
    settings = {**_BASE, **METHOD_DEFAULTS[spec.method](), **options}
    fraction = settings.pop("step_fraction")
    settings["steps"] = int(settings["steps"] if steps is None else steps)
    settings["alpha"] = float(spec.eps * fraction if step_size is None else step_size)
    config = _Config(**settings)
    if config.steps < 0 or config.alpha < 0 or spec.eps_256 < 0:
        raise ValueError(f"steps, step_size and eps must be >= 0, got {config.steps}, {config.alpha}, {spec.eps}")
    if not 0.0 <= config.di_prob <= 1.0 or not 0.0 < config.resize_rate < 1.0:
        raise ValueError(f"di_prob must be in [0, 1] and resize_rate in (0, 1), got {config.di_prob}, {config.resize_rate}")
    if config.ti_kernel < 0 or (config.ti_kernel and config.ti_kernel % 2 == 0):
        raise ValueError(f"ti_kernel must be 0 (off) or an odd size, got {config.ti_kernel}")
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.stop_when_all_hit and not config.keep_successful:
        raise ValueError("stop_when_all_hit needs keep_successful (without it a later step can still miss)")
    if config.kappa < 0 or (config.decay is not None and config.decay < 0):
        raise ValueError(f"kappa and decay must be >= 0, got {config.kappa}, {config.decay}")
    if config.orthogonal is not None and config.orthogonal not in ORTHOGONAL_RULES:
        raise ValueError(f"orthogonal must be None (off) or one of {', '.join(ORTHOGONAL_RULES)}, "
                         f"got {config.orthogonal!r}")
    return config


def resolve_settings(spec: AttackSpec, steps: int | None = None, step_size: float | None = None,
                     options: dict | None = None) -> dict:
    """The engine settings ``run_attack`` would use (for summaries); ValueError if invalid."""
    return asdict(_resolve(spec, steps, step_size, options or {}))


def gaussian_kernel(size: int = TI_KERNEL, nsig: float = TI_NSIG) -> torch.Tensor:
    """The TI kernel: a normalised 2-D Gaussian sampled on linspace(-nsig, nsig, size)."""
    grid = np.linspace(-nsig, nsig, size)
    pdf = np.exp(-grid ** 2 / 2.0) / np.sqrt(2.0 * np.pi)
    kernel = np.outer(pdf, pdf)
    return torch.from_numpy((kernel / kernel.sum()).astype(np.float32))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str = "ce",
                        kappa: float = CW_KAPPA) -> torch.Tensor:
    """Batch-averaged targeted loss to minimise: CE, or the CW margin max(max_{j≠t} z_j - z_t, -κ).

    The margin's gradient is exactly zero for a sample whose margin is below -κ (classified as its
    target with a logit lead above κ): such a sample contributes nothing to the step."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "none":
        return logits.new_zeros(())
    if loss == "ce":
        return F.cross_entropy(logits, targets)
    return target_margin(logits, targets).clamp(min=-kappa).mean()


def target_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample, max_{j≠t} z_j − z_t: negative once the sample is classified as its target."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    return logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1) - target_logit


def orthogonal_part(grad: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0), ``grad`` less its projection onto ``direction``: g − (⟨g, d⟩/⟨d, d⟩)·d,
    orthogonal to d (the dot products in float64); unchanged where d is zero."""
    g, d = grad.flatten(1).double(), direction.flatten(1).double()
    coefficient = (g * d).sum(1) / (d * d).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return (g - coefficient[:, None] * d).to(grad.dtype).view_as(grad)


def orthogonal_gradient(class_grad: torch.Tensor, score_grad: torch.Tensor, detector_step: torch.Tensor
                        ) -> torch.Tensor:
    """Orthogonal PGD's gradient (Bryniarski et al., ICLR 2022), per sample: where
    ``detector_step`` the detector score's gradient orthogonal to the classification loss's (a
    step that lowers the score without, to first order, changing the classification loss);
    elsewhere the classification loss's gradient orthogonal to the score's."""
    where = detector_step.view(-1, *([1] * (class_grad.dim() - 1)))
    return torch.where(where, orthogonal_part(score_grad, class_grad), orthogonal_part(class_grad, score_grad))


def first_order_reach(model, images: torch.Tensor, targets, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the targeted margin m = max_{j≠t} z_j − z_t at ``images`` and the budget's
    first-order reach on it, ε·‖∇_x m‖₁: how far one linearised step inside the L∞ ball of
    radius ``eps`` can lower m. reach/m < 1 means that, to first order, the budget cannot take the
    image to its target at all (a smooth model, not masked gradients, when the gradient is not
    zero); reach/m ≫ 1 leaves room beyond the boundary, which is what an added term such as HFC's
    can spend on hiding. Both as float64 arrays, in the model's eval mode (one forward and one
    backward pass; the model's own mode is restored)."""
    device = _model_device(model)
    x = images.detach().to(device, torch.float32).clone().requires_grad_(True)
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            margins = target_margin(model(x), targets)
            (grad,) = torch.autograd.grad(margins.sum(), x)  # each image's margin depends on it alone
    finally:
        model.train(was_training)
    reach = eps * grad.flatten(1).double().abs().sum(1)
    return margins.detach().double().cpu().numpy(), reach.cpu().numpy()


def _forward_features(model, inputs: torch.Tensor, extra) -> tuple[torch.Tensor, list]:
    """Logits and the features ``extra`` reads: the un-pooled maps of every tap when it says
    ``uses_maps``, else the pooled features (only ``extra.layers`` when it has that attribute)."""
    if getattr(extra, "uses_maps", False):
        return model.forward_maps(inputs)
    tap = getattr(extra, "tap", None)
    if tap is not None:
        # A term on one tap and no classification goal (loss "none"): the network runs only that far.
        features: list = [None] * len(model.layer_names)
        features[tap] = network.pooled(model.forward_to(inputs, tap))
        return features[tap].new_zeros((len(inputs), 0)), features
    layers = getattr(extra, "layers", None)
    return model.forward_features(inputs) if layers is None else model.forward_features(inputs, layers=layers)


def _diversify(x: torch.Tensor, prob: float, resize_rate: float, gen: torch.Generator) -> torch.Tensor:
    # The draws follow the reference order (size, top, left, coin) so that the same seed gives
    # the same transform as torchattacks' DIFGSM; the resize is only computed when applied.
    height, width = x.shape[-2:]
    size = int(torch.randint(int(width * resize_rate), width, (1,), generator=gen))
    new_h = max(1, height * size // width)
    top = int(torch.randint(0, max(1, height - new_h), (1,), generator=gen))
    left = int(torch.randint(0, width - size, (1,), generator=gen))
    if not float(torch.rand(1, generator=gen)) < prob:
        return x
    resized = F.interpolate(x, size=(new_h, size), mode="bilinear", align_corners=False)
    return F.pad(resized, (left, width - size - left, top, height - new_h - top), value=0.0)


def _attack_batch(model, x0: torch.Tensor, targets: torch.Tensor, eps: float, cfg: _Config,
                  extra: Extra | None, lam: float, kernel: torch.Tensor | None,
                  gen: torch.Generator) -> torch.Tensor:
    lower = (x0 - eps).clamp_(min=0.0)
    upper = (x0 + eps).clamp_(max=1.0)
    if cfg.random_start:
        start = torch.empty(x0.shape, dtype=x0.dtype).uniform_(-eps, eps, generator=gen)
        x = (x0 + start.to(x0.device)).clamp_(0.0, 1.0)
    else:
        x = x0.clone()
    momentum = None
    reduce_dims = tuple(range(1, x0.dim()))
    latest_hit, hit_once = (x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)) \
        if cfg.keep_successful else (None, None)
    # Success only (the λ search): an image leaves the batch at its first hit, which is final with
    # keep_successful. Images are independent in eval mode and the per-image step is the sign of a
    # gradient (or a per-image normalised one), so the others' steps do not change; the random
    # draws (DI) are per batch, not per image. A term with per-image guides bound to the batch
    # positions keeps every image.
    shrink = cfg.stop_when_all_hit and not getattr(extra, "per_image", False)
    reached = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # for term_after_hit
    rows, result = (torch.arange(len(x), device=x.device), x0.clone()) if shrink else (None, None)
    for _ in range(cfg.steps):
        x.requires_grad_(True)
        inputs = _diversify(x, cfg.di_prob, cfg.resize_rate, gen) if cfg.di_prob > 0 else x
        if cfg.orthogonal is not None:
            # Orthogonal PGD: ``extra`` is a detector score; two gradients from one forward pass.
            logits, features = _forward_features(model, inputs, extra)
            scores = extra.scores(logits, features)
            (class_grad,) = torch.autograd.grad(classification_loss(logits, targets, cfg.loss, cfg.kappa), x,
                                                retain_graph=True)
            (score_grad,) = torch.autograd.grad(scores.sum(), x)
            with torch.no_grad():
                detector_step = (logits.argmax(dim=1) == targets if cfg.orthogonal == "success"
                                 else scores > extra.threshold)
            grad = orthogonal_gradient(class_grad, score_grad, detector_step)
        else:
            if extra is None:
                logits = model(inputs)
                loss = classification_loss(logits, targets, cfg.loss, cfg.kappa)
            else:
                # An extra term that names its layers (HFCTerm.layers) gets only those pooled.
                logits, features = _forward_features(model, inputs, extra)
                loss = classification_loss(logits, targets, cfg.loss, cfg.kappa)
                if cfg.term_after_hit:
                    # Until an image first reaches its target the term is held constant for it
                    # (its inputs detached), so its path is the λ = 0 attack's up to that hit.
                    with torch.no_grad():
                        reached |= logits.argmax(dim=1) == targets
                    logits_t, features = _detached_unless(reached, logits, features)
                    loss = loss + lam * extra(logits_t, features, targets)
                else:
                    loss = loss + lam * extra(logits, features, targets)
            (grad,) = torch.autograd.grad(loss, x)
        x = x.detach()
        if cfg.keep_successful:
            # The step's own logits are those of x (eval mode), unless input diversity changed x.
            _record_hits(model, x, logits.detach() if cfg.di_prob == 0 else None, targets, latest_hit, hit_once)
            if cfg.stop_when_all_hit and bool(hit_once.all()):
                # Success is final once every image has hit (keep_successful), so a caller that
                # needs only the success rate (the λ search) can skip the remaining steps.
                break
            if shrink and bool(hit_once.any()):
                result[rows[hit_once]] = latest_hit[hit_once]
                keep = ~hit_once
                rows, x, grad, lower, upper, targets, reached = (rows[keep], x[keep], grad[keep], lower[keep],
                                                                 upper[keep], targets[keep], reached[keep])
                latest_hit, hit_once = latest_hit[keep], hit_once[keep]
                momentum = None if momentum is None else momentum[keep]
        if kernel is not None:
            grad = F.conv2d(grad, kernel, padding=kernel.shape[-1] // 2, groups=grad.shape[1])
        if cfg.decay is not None:
            scale = grad.abs().mean(dim=reduce_dims, keepdim=True).clamp_min_(torch.finfo(grad.dtype).tiny)
            grad = grad / scale
            if momentum is not None:
                grad = grad + momentum * cfg.decay
            momentum = grad
        # x - α·sign(g), then the ε-ball and [0, 1] in one clamp (lower/upper hold both).
        x.sub_(torch.sign(grad).mul_(cfg.alpha)).clamp_(min=lower, max=upper)
    if cfg.keep_successful:
        with torch.no_grad():
            fall_back = hit_once & (model(x).argmax(dim=1) != targets)
        x[fall_back] = latest_hit[fall_back]
    if shrink:
        result[rows] = x
        return result
    return x


def _detached_unless(keep: torch.Tensor, logits: torch.Tensor, features: list) -> tuple[torch.Tensor, list]:
    """``logits`` and every feature tensor with the rows outside ``keep`` detached: the same
    values, but no gradient flows through those rows (None entries stay None)."""
    def gate(t):
        if t is None:
            return None
        mask = keep.view(-1, *([1] * (t.dim() - 1)))
        return torch.where(mask, t, t.detach())
    return gate(logits), [gate(f) for f in features]


@torch.no_grad()
def _record_hits(model, x, logits, targets, latest_hit, hit_once) -> None:
    """Copy into ``latest_hit`` the rows of ``x`` classified as their target; mark them in ``hit_once``."""
    if logits is None:
        logits = model(x)
    hit = logits.argmax(dim=1) == targets
    latest_hit[hit] = x[hit]
    hit_once |= hit


def _model_device(model) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def run_attack(model, images: torch.Tensor, targets, spec: AttackSpec, *, extra: Extra | None = None,
               lam: float = 1.0, steps: int | None = None, step_size: float | None = None, seed: int = 0,
               batch_size: int = 32, device: torch.device | str | None = None, progress: bool = True,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack ``images`` (float N×C×H×W in [0, 1]) towards ``targets``; returns (adv on CPU, success).

    ``spec`` comes from ``parse_attack``; ``steps`` and ``step_size`` (pixel units, like
    ``spec.eps``) override the method's schedule. ``extra(logits, features, targets)`` is an
    optional batch-averaged scalar added with weight ``lam``; the pooled hierarchical features
    (``model.forward_features``) are computed only when it is given (only the layers listed in
    ``extra.layers`` if it has that attribute; the others are None). Method options override
    the method's defaults: ``loss`` ("ce" or "cw": the classification loss, for any method;
    "cw" for CW, "ce" otherwise; "none": no classification goal, ``extra`` alone), ``decay`` (momentum; default 1.0 for MI_FGSM, off otherwise),
    ``kappa`` (the CW margin's κ, 0; used whenever ``loss="cw"``), ``di_prob`` (0.5 for DI_FGSM,
    0 otherwise), ``resize_rate`` (0.9), ``ti_kernel`` (7 for TI_FGSM, 0 = off), ``random_start`` (True for PGD), ``keep_successful``
    (False: the last iterate is returned, as in the reference attacks; True: an image whose last
    iterate misses its target gets the latest iterate that hit it, if any), ``stop_when_all_hit``
    (False; with keep_successful, for a caller that needs only the success vector: an image leaves
    its batch at its first hit, returning that iterate, and a batch stops once all its images have
    hit; the success vector is the full run's, the images are not), ``term_after_hit`` (False;
    True: ``extra`` contributes no gradient to an image until one of its iterates has been
    classified as its target, so each image follows the λ = 0 path up to its first hit and the
    success is at least that attack's), ``orthogonal`` (None: off; orthogonal
    PGD, Bryniarski et al., ICLR 2022, against one detector, below). An ``extra`` with
    ``uses_maps = True`` gets the un-pooled maps of every tap (``model.forward_maps``) instead of
    the pooled features; one with ``tap = i`` (and ``loss="none"``) gets only tap i, pooled, with
    the network run only that far (``model.forward_to``).

    Orthogonal PGD (``orthogonal="success"`` or ``"flagged"``): ``extra`` is then a detector score,
    with ``extra.scores(logits, features)`` -> (B,) per-image scores (higher = more adversarial,
    differentiable) and, for "flagged", ``extra.threshold`` (a sample is flagged when its score
    is strictly above it); ``lam`` is not used. At each step, per image, either the detector
    score's gradient projected orthogonally to the classification loss's gradient (a *detector
    step*: it lowers the score without, to first order, undoing the attack) or the
    classification loss's gradient projected orthogonally to the score's gradient (a *classifier
    step*: it moves towards the target without, to first order, raising the score)
    (``orthogonal_gradient``). Who takes a detector step: with "success" (as the authors'
    released attack) the images the current iterate already classifies as their target;
    with "flagged" the images whose current score is above ``extra.threshold``. The step is the
    engine's, on that gradient: x − α·sign(g), then the ε-ball and [0, 1]; ``keep_successful``
    and the other options act as for every method (the TI kernel and momentum, if on, act on
    the projected gradient). The model must be
    on ``device`` (default: the model's device); it runs in eval mode with its parameters'
    ``requires_grad`` off, and both are restored afterwards. success[i]: the model predicts
    targets[i] for adv[i].
    """
    cfg = _resolve(spec, steps, step_size, options)
    if getattr(extra, "tap", None) is not None and (cfg.loss != "none" or cfg.keep_successful):
        raise ValueError("an extra term on one tap (extra.tap) runs without logits: it needs loss='none' "
                         "and keep_successful=False")
    if cfg.loss == "none" and extra is None:
        raise ValueError("loss='none' needs an extra term to follow")
    if cfg.term_after_hit and (cfg.loss == "none" or cfg.orthogonal is not None):
        raise ValueError("term_after_hit gates an extra term added to a classification loss: not with loss='none' "
                         "or orthogonal PGD")
    if cfg.orthogonal is not None:
        if not callable(getattr(extra, "scores", None)):
            raise ValueError("orthogonal PGD needs extra = a detector score with a scores(logits, features) method")
        threshold = getattr(extra, "threshold", None)
        if cfg.orthogonal == "flagged" and (threshold is None or not math.isfinite(float(threshold))):
            raise ValueError('orthogonal="flagged" needs the detector score\'s threshold (extra.threshold)')
    device = _model_device(model) if device is None else torch.device(device)
    images = torch.as_tensor(images)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    if images.dim() not in (4, 5) or len(targets) != len(images):
        raise ValueError(f"expected images N×C×H×W (or volumes N×C×D×H×W) and N targets, got "
                         f"{tuple(images.shape)} and {len(targets)}")
    if images.dim() == 5 and (cfg.di_prob > 0 or cfg.ti_kernel):
        # Input diversity resizes a 2D picture and TI smooths the gradient with a 2D kernel; the
        # papers define neither for volumes.
        raise UserError("DI_FGSM and TI_FGSM transform 2D images; they are not defined for volumes: "
                        "choose FGSM, I_FGSM, PGD, MI_FGSM or CW")
    if len(images) and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise ValueError("images must lie in [0, 1]")
    gen = torch.Generator().manual_seed(int(seed))
    kernel = None
    if cfg.ti_kernel:
        kernel = gaussian_kernel(cfg.ti_kernel).expand(images.shape[1], 1, -1, -1).contiguous().to(device)

    adv = torch.empty(images.shape, dtype=torch.float32)
    success = torch.empty(len(images), dtype=torch.bool)
    modes = [module.training for module in model.modules()]
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with tqdm(total=len(images), desc=spec.name, unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, len(images), batch_size):
                part = slice(start, start + batch_size)
                x0 = images[part].to(device=device, dtype=torch.float32)
                t = targets[part].to(device)
                if spec.method == "Noise":
                    noise = torch.empty(x0.shape).uniform_(-spec.eps, spec.eps, generator=gen)
                    x = (x0 + noise.to(device)).clamp_(0.0, 1.0)
                else:
                    x = _attack_batch(model, x0, t, spec.eps, cfg, extra, lam, kernel, gen)
                with torch.no_grad():
                    success[part] = (model(x).argmax(dim=1) == t).cpu()
                adv[part] = x.cpu()
                bar.update(len(x0))
    finally:
        for parameter, flag in zip(model.parameters(), grad_flags):
            parameter.requires_grad_(flag)
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    return adv, success
