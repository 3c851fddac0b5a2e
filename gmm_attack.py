"""The HFC attack: a base attack plus the hierarchical feature constraint, scored by the detectors.

For the evaluation part A_eval of the protocol's set A (the base attack's images, docs/PROTOCOL.md
§6), run the same engine as the base attack with the HFC term of the target class's
mixtures added (docs/PROTOCOL.md §7; CW keeps its margin loss), save the HFC AEs (checked like
every AE set), and print the paper's table: per detector AUC and TNR@90 for the base AEs and for
the HFC AEs of the same images, and both success rates. λ is the paper's 1 by default; with
``--lamda auto`` it is chosen on A_fit images only (never on the evaluation images): the largest
value of ``--lamda-grid`` (refined by one geometric midpoint) whose attack succeeds on as many of
them as the bar asks, the smaller of ``--min-success`` and the base attack's own success there.

    python gmm_attack.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1 -y 2 --lamda auto

Writes ``runs_<DATASET>/<arch>/<ATTACK>/hfc_<key>/`` (``hfc.results_key``: ``M<y>_lam<λ or auto>``,
plus the settings given that differ from the defaults): adv.npz, summary.json, results.json (with
the stage's record: its settings, how λ was chosen, and what it was made from) and
results.md. It refuses, naming the stage to run again, when the detectors or the mixtures were
made from an older model or AE set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import aesets
import attacks
import cli
import evaluation
import exemplar
import gmm
import hfc
import report
import runs
import saver
import typical_set
import utils

DEFAULT_TERM = "paper"
TYPICAL_TERM = "typical"  # typical_set.TypicalSetTerm in its normalised form, τ from the validation images
EXEMPLAR_TERM = "exemplar"  # exemplar.ExemplarTerm: the nearest correctly classified training image of the target
EXEMPLAR_HINGED_TERM = "exemplar-hinged"  # the same, each layer hinged at the median clean image's level
EXEMPLAR_TERMS = {EXEMPLAR_TERM: None, EXEMPLAR_HINGED_TERM: 1.0}  # form → the hinge's floor
TERM_CHOICES = (*hfc.TERMS, TYPICAL_TERM, *EXEMPLAR_TERMS)
OWN_SCALE_TERMS = (TYPICAL_TERM, *EXEMPLAR_TERMS)  # forms that measure their own scales on the validation images
DEFAULT_CLASS_LOSS = "base"
DEFAULT_KAPPA = 0.0
# --images → the protocol's name of that part of A. A_fit is where a setting may be chosen: the
# detectors were fitted on its base AEs, but never on its HFC AEs, and A_eval stays untouched.
IMAGE_PARTS = {"eval": "A_eval", "fit": "A_fit"}


def lamda_value(text: str) -> str | None:
    """The domain of ``--lamda``: a non-negative number or "auto"."""
    if text.lower() == "auto":
        return None
    try:
        return None if float(text) >= 0 else f"must be non-negative or 'auto', got {text}"
    except ValueError:
        return f"must be a number or 'auto', got {text!r}"


# The domain of ``--lamda-grid``: a comma list of positive numbers.
grid_value = cli.number_list(lambda v: v > 0, "at least one positive λ")


@dataclass
class TermAttackConfig(cli.RunConfig):
    """The flags shared by every script that attacks A with a weighted term (this one, compare.py,
    arms_race.py): the base attack that defines A, the benign noisy set, M, and the A_fit-only λ
    rule (``hfc.choose_lambda``). A subclass re-declares ``lamda`` for its own default and help;
    the field keeps its place."""
    attack: str = cli.flag("I_FGSM_Linf_1", "base attack: its AE set defines A, its detectors score the result")
    noise: str = cli.flag("Noise_Linf_2", "benign noisy set")
    num_component: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "mixture components M: uses gmm_M<y>/ from get_GMM.py",
                                  short="-y", check=cli.at_least(1))
    lamda: str = cli.flag("auto", "weight λ of the term, or 'auto' to choose it on A_fit", check=lamda_value)
    lamda_grid: str = cli.flag(",".join(f"{v:g}" for v in hfc.DEFAULT_LAMBDA_GRID),
                               "candidates for --lamda auto, tried from the largest", check=grid_value)
    min_success: float = cli.flag(hfc.DEFAULT_MIN_SUCCESS, "success on A_fit that --lamda auto requires",
                                  check=cli.in_range(0, 1))
    tune_images: int = cli.flag(16, "A_fit images attacked per λ candidate with --lamda auto", check=cli.at_least(1))

    def __post_init__(self):
        super().__post_init__()
        if lamda_value(self.lamda) is None:  # "1", "1.0" and "1e0" are one λ
            self.lamda = hfc.lamda_text(self.lamda)

    def lamda_candidates(self) -> list[float]:
        """The grid of --lamda auto, as floats in the order given."""
        return cli.numbers(self.lamda_grid)

    def lamda_search(self) -> dict:
        """The λ flags as keyword arguments: for composing a config, and for a record's settings."""
        return dict(lamda=self.lamda, lamda_grid=self.lamda_grid, min_success=self.min_success,
                    tune_images=self.tune_images)


@dataclass
class Config(TermAttackConfig):
    lamda: str = cli.flag("1", "weight λ of the HFC term, or 'auto' to choose it on A_fit (1 = the paper's)",
                          check=lamda_value)
    detector: str | None = cli.flag(None, "attack whose fitted detectors score the result (default: --attack)")
    step_size: float | None = cli.flag(None, "step α in units of 1/256 (default: the paper's per data set and arch, "
                                             "APTOS/ResNet-50 0.025, CXR/ResNet-50 0.01, ...; elsewhere ε/10)",
                                       check=cli.positive)
    steps: int | None = cli.flag(None, "number of steps T (default: 2ε/α)", check=cli.at_least(1))
    last_iterate: bool = cli.flag(False, "return every image's last iterate, as the base attacks do (default: an "
                                         "image whose last iterate misses the target keeps its latest iterate "
                                         "that hit it)")
    term_after_hit: bool = cli.flag(False, "the term acts on an image only once one of its iterates has reached "
                                           "the target: until then it follows the λ = 0 attack's path, so its "
                                           "success is at least the λ = 0 control's (with the default latest "
                                           "successful iterate)")
    lamda_fallback: str = cli.flag("", "per-image λ fallback: a comma list of factors in [0, 1), decreasing (e.g. "
                                   "0.3,0.1,0.03,0.01,0); an image the attack at λ never takes to its target is "
                                   "attacked again from its clean image at λ times each factor in turn, until it "
                                   "is (default: none, the paper's one λ for every image)",
                                   check=hfc.lamda_fallback_problem)
    term: str = cli.flag(DEFAULT_TERM, "form of the HFC term: paper (the sum over layers of ‖(f − μ)L‖²/C), "
                                       "normalised (each layer divided by its held-out clean median from "
                                       "get_GMM.py, averaged over layers), hinged (normalised, each layer "
                                       "max(term − 1, 0): no pull once as typical as the median clean image) or "
                                       "typical (two-sided: each layer's mixture log-likelihood pulled to that of "
                                       "the median held-out clean image of the target class, normalised, "
                                       "averaged over layers; typical_set.py) or exemplar (every layer pulled "
                                       "towards one real training image of the target class, the nearest over "
                                       "all layers, normalised, averaged over every hierarchical layer, "
                                       "wide ones included; exemplar.py) or exemplar-hinged (the same, each "
                                       "layer max(term − 1, 0))",
                         choices=TERM_CHOICES)
    class_loss: str = cli.flag(DEFAULT_CLASS_LOSS, "classification loss beside the term: base (the method's own: "
                               "CE, or CW's margin) or margin (max_j≠t z_j − z_t clamped at −κ: once the target "
                               "leads by κ only the term acts)", choices=hfc.CLASS_LOSSES)
    exemplars: str = cli.flag("train", "with --term exemplar(-hinged), the images its goals are drawn from: train (the "
                              "correctly classified training images) or val (the validation images, held out "
                              "from the model and the detectors: as typical as a test image)",
                              choices=exemplar.BANKS)
    kappa: float | None = cli.flag(None, f"the margin's κ (default: {DEFAULT_KAPPA} for --class-loss margin; "
                                         "CW's own otherwise)", check=cli.non_negative)
    hfc_layers: str = cli.flag("all", "the layers the term constrains (paper, normalised and hinged forms): all (every "
                               "layer with a mixture, the paper's), last-stage (those in the network's deepest "
                               "stage), last (the deepest one) or a comma list of tap names")
    images: str = cli.flag("eval", "the part of A attacked and scored: eval (A_eval, the protocol's) or fit (A_fit, "
                           "the detectors' own fitting images: for choosing a setting without looking at A_eval; "
                           "its AUCs flatter the detectors)", choices=IMAGE_PARTS)
    limit: int | None = cli.flag(None, "attack only the first N images of the part attacked", check=cli.at_least(2))
    batch_size: int = cli.flag(32, "attack batch size", short="-b", check=cli.at_least(1))

    def results_dir(self, run: runs.Run) -> Path:
        """``<ATTACK>/hfc_<key>``: M and λ as asked, plus every key setting that differs from its default."""
        variant = {short: str(getattr(self, name)).replace(",", "+") if name in LIST_FIELDS else getattr(self, name)
                   for name, short in VARIANT_FIELDS.items() if getattr(self, name) != getattr(Config, name)}
        if self.detector == self.attack:
            variant.pop("det", None)
        return run.hfc_dir(attacks.parse_attack(self.attack).name,
                           hfc.results_key(self.num_component, self.lamda, variant))

    def kappa_value(self) -> float | None:
        return DEFAULT_KAPPA if self.kappa is None and self.class_loss == "margin" else self.kappa


# The settings that change the HFC AEs or their scoring, by the short name they add to the folder.
VARIANT_FIELDS = {"step_size": "a", "steps": "T", "last_iterate": "last", "term_after_hit": "afterhit",
                  "lamda_fallback": "fb",
                  "detector": "det", "term": "term",
                  "class_loss": "loss", "kappa": "kappa", "exemplars": "ex", "hfc_layers": "layers",
                  "images": "img"}


LIST_FIELDS = ("hfc_layers", "lamda_fallback")  # comma lists: "+" in the folder name


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def stage_inputs(run_: runs.Run, attack: str, detector_attack: str, noise: str, num_component: int) -> dict:
    """The artifacts the HFC stage reads, by role (its record's ``inputs``)."""
    return {"checkpoint": run_.checkpoint, "attack_set": run_.ae_dir(attack) / aesets.AE_FILE,
            "noise_set": run_.ae_dir(noise) / aesets.AE_FILE,
            "detectors": run_.detectors_dir(detector_attack) / runs.SUMMARY,
            "mixtures": run_.mixtures_dir(num_component) / runs.MIXTURES}


def make_term(form: str, run_: runs.Run, model, mixtures: gmm.Mixtures, device, batch_size: int,
              exemplars: str = "train", layers: str = "all"):
    """The HFC term of ``--term``: an ``hfc.HFCTerm`` in one of its forms on the layers of
    ``--hfc-layers``, the typical-set term with τ measured on the run's validation images, or the
    exemplar term on every hierarchical layer (it needs no covariance, so no channel cap: the stage
    outputs the detectors read are kept)."""
    if form == TYPICAL_TERM:
        return typical_set.fitted_term(run_, model, mixtures, device, batch_size, normalise=True)
    if form in EXEMPLAR_TERMS:
        return exemplar.fitted_term(run_, model, model.conv_layers, device, batch_size, bank=exemplars,
                                    floor=EXEMPLAR_TERMS[form])
    return hfc.HFCTerm(mixtures, layers=hfc.resolve_term_layers(layers, model, mixtures.layers), device=device,
                       **hfc.TERMS[form])


def run(config: Config) -> dict:
    """Choose λ (when asked) on A_fit, attack the part of A of --images (A_eval by default) with HFC,
    score both rows; returns results.json."""
    if config.exemplars != "train" and config.term not in EXEMPLAR_TERMS:
        raise utils.UserError("--exemplars applies to --term exemplar or exemplar-hinged only")
    if config.hfc_layers != "all" and config.term not in hfc.TERMS:
        raise utils.UserError(f"--hfc-layers applies to the {', '.join(hfc.TERMS)} forms of the term, "
                              f"not {config.term}")
    spec = attacks.parse_attack(config.attack)
    if spec.method == "Noise":
        raise utils.UserError(f"--attack must be an attack, not the noise set {spec.name}")
    detector_attack = attacks.parse_attack(config.detector or config.attack).name
    noise = attacks.parse_attack(config.noise).name
    grid = config.lamda_candidates()
    lam = None if config.lamda.lower() == "auto" else float(config.lamda)
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, _ = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    sets = evaluation.load_protocol_sets(run_, spec.name, noise)
    fitted = evaluation.load_fresh_detectors(run_, detector_attack)
    mixtures = evaluation.load_fresh_mixtures(run_, config.num_component,
                                              need_scales=config.term not in OWN_SCALE_TERMS and hfc.needs_scales(config.term))
    term = make_term(config.term, run_, model, mixtures, device, config.batch_size, config.exemplars,
                     config.hfc_layers)
    term_layers = [model.layer_names[i] for i in term.layers] if isinstance(term, hfc.HFCTerm) else None
    step_256, steps = hfc.hfc_schedule(run_.dataset, config.arch, spec.eps_256, config.step_size, config.steps)
    base = sets["base"]
    part = IMAGE_PARTS[config.images]
    attacked_pos = sets[config.images][:config.limit] if config.limit else sets[config.images]
    if len(attacked_pos) < 2:
        raise utils.UserError(f"{part} holds {len(attacked_pos)} images; attack more images with gen_base_adv.py")
    attack_kwargs = dict(step_size_256=step_256, steps=steps, seed=config.seed, batch_size=config.batch_size,
                         device=device, keep_successful=not config.last_iterate,
                         term_after_hit=config.term_after_hit,
                         **hfc.engine_loss(spec, config.class_loss, config.kappa_value()))
    started, started_cpu = time.perf_counter(), time.process_time()

    trials, lamda_rule, tune = [], "given", np.zeros(0, dtype=np.int64)
    if lam is None:
        # λ is chosen on A_fit images that are not then attacked and scored (with --images fit the
        # attacked ones are A_fit's first, so the tuning images come after them).
        tune = sets["fit"][~np.isin(sets["fit"], attacked_pos)][:config.tune_images]
        if len(tune) == 0:
            raise utils.UserError(f"--lamda auto needs A_fit images that are not attacked; with --images fit "
                                  f"attack fewer than all {len(sets['fit'])} (--limit)")
        print(f"choosing λ on {len(tune)} A_fit images (grid {grid}, success ≥ {config.min_success:.0%})")
        lam, trials, lamda_rule = hfc.choose_lambda(model, term, torch.from_numpy(base["clean"][tune]),
                                                    base["targets"][tune], spec, grid=grid,
                                                    min_success=config.min_success, **attack_kwargs)
    tune_seconds, tune_cpu = time.perf_counter() - started, time.process_time() - started_cpu

    timer, timer_cpu = time.perf_counter(), time.process_time()
    clean = base["clean"][attacked_pos]
    fallback = hfc.lamda_fallback_factors(config.lamda_fallback)
    adv, success, image_lamdas = hfc.hfc_attack_with_fallback(model, term, torch.from_numpy(clean),
                                                              base["targets"][attacked_pos], spec, lam=lam,
                                                              fallback=fallback, **attack_kwargs)
    attack_seconds, attack_cpu = time.perf_counter() - timer, time.process_time() - timer_cpu
    meta = {"attack": spec.name, "hfc": True, "dataset": run_.dataset, "arch": config.arch,
            "num_component": config.num_component, "lamda": lam, "lamda_fallback": fallback,
            "step_size_256": step_256, "steps": steps,
            "keep_successful": not config.last_iterate, "term_after_hit": config.term_after_hit,
            "term": config.term, "class_loss": config.class_loss,
            "kappa": config.kappa_value(), "term_layers": term_layers, "seed": config.seed, "images_of": part}

    timer = time.perf_counter()
    rows = {"base": (base["adv"][attacked_pos], base["success"][attacked_pos]), "hfc": (adv.numpy(), success.numpy())}
    scored = evaluation.score_table(model, fitted, clean, sets["noisy"][attacked_pos], rows, device=device,
                                    batch_size=config.batch_size)
    score_seconds = time.perf_counter() - timer
    loglik = evaluation.mixture_log_likelihood(model, mixtures, rows, base["targets"][attacked_pos], device,
                                               extracted=scored.features)
    results = report.results_dict(
        dataset=run_.dataset, arch=config.arch, attack=spec.name, detector_attack=detector_attack,
        epsilon_256=spec.eps_256, n_eval=len(attacked_pos), success=scored.success, detectors=scored.table,
        **scored.summary_fields(), lamda=lam, lamda_rule=lamda_rule, lamda_trials=trials,
        lamda_tune_index=base["index"][tune].tolist(),
        lamda_fallback=fallback, lamda_per_image=image_lamdas.tolist(),
        num_component=config.num_component,
        step_size_256=step_256, steps=steps, keep_successful=not config.last_iterate,
        term_after_hit=config.term_after_hit, term=config.term,
        class_loss=config.class_loss, kappa=config.kappa_value(), term_layers=term_layers,
        mixture_log_likelihood=loglik, images_of=part,
        mixture_settings={"reg_covar_relative": mixtures.reg_covar, "reg_scale": mixtures.reg_scale,
                          "max_channels": mixtures.max_channels, "kind": mixtures.kind,
                          "covariance": mixtures.covariance},
        seconds={"choose_lamda": tune_seconds, "attack": attack_seconds,
                 "attack_per_image": attack_seconds / len(attacked_pos), "score": score_seconds},
        # The process's CPU time: on a CPU it does not grow when other jobs share the cores, so
        # the λ search's cost relative to the attack's is comparable between runs.
        cpu_seconds={"choose_lamda": tune_cpu, "attack": attack_cpu})
    markdown = report.format_table(results, "md") + "\n" + report.format_layer_table(results, "md")
    # The folder's AEs, table and record are swapped in together, once all of them exist.
    out = config.results_dir(run_)
    with utils.replacing_dir(out) as staging:
        aesets.save_ae_set(staging, clean=clean, adv=adv, labels=base["labels"][attacked_pos],
                           targets=base["targets"][attacked_pos], success=success, index=base["index"][attacked_pos],
                           eps=spec.eps, meta=meta)
        utils.atomic_write_bytes(staging / "results.md", markdown.encode())
        results["record"] = runs.record("hfc", config.settings(),
                                        stage_inputs(run_, spec.name, detector_attack, noise, config.num_component),
                                        [staging / aesets.AE_FILE, staging / "results.md"], folder=staging)
        utils.write_json(staging / runs.RESULTS, results)
    print(report.format_table(results, "text"))
    print(f"HFC ({config.term} term, {config.class_loss} loss): λ = {lam:.3g} ({lamda_rule}), "
          f"M = {config.num_component}, α = {step_256:g}/256, T = {steps}; "
          f"mean mixture log-likelihood of AE features: base {loglik['base']:.1f}, HFC {loglik['hfc']:.1f}; "
          f"attack {attack_seconds:.0f} s ({attack_seconds / len(attacked_pos):.2f} s/image)"
          + (f"; λ fallback: {int(np.sum(image_lamdas != lam))} image(s) below λ" if fallback else "")
          + (f"; choosing λ took {tune_seconds / attack_seconds:.2f}× the attack's wall time, "
             f"{tune_cpu / max(attack_cpu, 1e-9):.2f}× its CPU time" if config.lamda.lower() == "auto" else "")
          + f" -> {out}")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
