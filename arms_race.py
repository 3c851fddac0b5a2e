"""The arms race (docs/PROTOCOL.md §10): does hiding in feature space survive a defender who adapts?

Attackers (every one on the A_eval images of the base attack's set A, at HFC's schedule and with
its latest-successful-iterate rule; the same on A_fit images where a defender re-fits on them):

- ``base``: the stored base AEs;
- ``HFC``: gmm_attack.py's results folder when its record has these settings (else computed here
  by the same functions), and HFC AEs of A_fit at the same λ;
- ``typical_set_HFC``: the attacker's reply to the typicality detector: the typical-set term
  (``typical_set.TypicalSetTerm``: per layer (ℓ_l − τ_l)², τ_l the median log-likelihood of the
  run's validation images of the target class under the attacker's mixtures; ``--with-hfc`` keeps
  the HFC term beside it), on A_eval and A_fit.

Defenders:

- ``fixed``: the seven detectors as extract_features.py fitted them on A_fit's base AEs;
- ``typicality``: those seven plus ``detectors.TYP`` (two-sided typicality: its own mixtures on a
  seeded half of the training images, medians on the other half, fitted on A_fit's benign samples
  vs. base AEs only -- it never sees an HFC AE);
- ``refit``: the seven and TYP fitted again on A_fit's benign samples vs. the AEs of A_fit of the
  attacker they face (never on A_eval).

λ of each attacker is ``--lamda`` or, with ``auto`` (the default), chosen on A_fit images only by
``hfc.choose_lambda``; the A_fit AEs use the λ of the A_eval ones. Every round is scored by
``evaluation.score_table`` (the one scoring path).

    python arms_race.py --dataset synthetic -a resnet50 --attack I_FGSM_Linf_6 -y 8

Writes ``runs_<DATASET>/<arch>/<ATTACK>/arms_race/``: ``arms_race.json`` (``rounds``: one entry
per (attacker, defender) with success, mean AUC and each detector's AUC and TNR@90),
``arms_race.md``, ``arms_race.png``, and one folder per finished piece (the AEs of each attacker on
A_eval and A_fit, the fitted TYP, each re-fitted defender, each scored round), each with its
``piece.json`` record: a piece whose record has the same settings and current inputs is reused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

import aesets
import attacks
import cli
import datasets
import detectors
import evaluation
import features
import gmm
import gmm_attack
import hfc
import metrics
import plots
import report
import runs
import saver
import typical_set
import utils

TS = "typical_set_HFC"
ATTACKERS = ("base", "HFC", TS)
ROUNDS = (("base", "fixed"), ("base", "typicality"), ("HFC", "fixed"), ("HFC", "typicality"), ("HFC", "refit"),
          (TS, "fixed"), (TS, "typicality"), (TS, "refit"))
SEVEN = tuple(detectors.DETECTORS)
NAMES = SEVEN + ("TYP",)
DEFENDERS = {"fixed": "the seven detectors fitted on A_fit's base AEs (extract_features.py)",
             "typicality": "the fixed seven + TYP (two-sided typicality, fitted on A_fit's base AEs only)",
             "refit": "the seven + TYP fitted again on A_fit's AEs of the attacker they face"}
FOLDER = "arms_race"
RESULT_FILE = "arms_race.json"
PIECE_FILE = runs.PIECE_FILE
REPORTS_FILE = "reports.json"
REPLICATES_FILE = "auc_replicates.npz"
STAGE = "arms_race"


@dataclass
class Config(gmm_attack.TermAttackConfig):
    lamda: str = cli.flag("auto", "λ of the HFC and typical-set terms, or 'auto': each its own, chosen on A_fit "
                                  "by HFC's rule", check=gmm_attack.lamda_value)
    step_size: float | None = cli.flag(None, "step α in units of 1/256 (default: HFC's, hfc.hfc_schedule)",
                                       check=cli.positive)
    steps: int | None = cli.flag(None, "number of steps T (default: 2ε/α)", check=cli.at_least(1))
    term: str = cli.flag(gmm_attack.DEFAULT_TERM, "form of the HFC term (as gmm_attack.py's): paper (the sum over "
                                                  "layers of ‖(f − μ)L‖²/C) or normalised (each layer divided by "
                                                  "get_GMM.py's held-out clean median, averaged over layers)",
                         choices=tuple(hfc.TERMS))
    ts_term: str = cli.flag("normalised", "form of the typical-set term: normalised (each layer's (ℓ − τ)² divided "
                                          "by its median over the validation images of the target class, averaged "
                                          "over layers) or paper (the raw (ℓ − τ)² summed over layers: log-"
                                          "likelihoods of hundreds of dimensions differ by 1e4-1e5, which no λ of "
                                          "the grid balances against the classification loss)",
                            choices=tuple(hfc.TERMS))
    class_loss: str = cli.flag(gmm_attack.DEFAULT_CLASS_LOSS, "classification loss beside the terms: base (the "
                               "method's own) or margin (clamped at κ)", choices=hfc.CLASS_LOSSES)
    kappa: float | None = cli.flag(None, f"the margin's κ (default: {gmm_attack.DEFAULT_KAPPA} for --class-loss "
                                         "margin; CW's own otherwise)", check=cli.non_negative)
    with_hfc: bool = cli.flag(False, "the typical-set attack keeps the HFC term beside the typical-set term")
    typ_components: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "mixture components of TYP's own mixtures (fitted on "
                                                               "a seeded half of the training images)",
                                   check=cli.at_least(1))
    limit: int | None = cli.flag(None, "attack only the first N images of A_eval", check=cli.at_least(2))
    fit_limit: int | None = cli.flag(None, "attack (for the re-fitted defenders) only the first N images of A_fit",
                                     check=cli.at_least(2))
    batch_size: int = cli.flag(32, "attack and feature batch size", short="-b", check=cli.at_least(1))

    def kappa_value(self) -> float | None:
        return gmm_attack.DEFAULT_KAPPA if self.kappa is None and self.class_loss == "margin" else self.kappa

    def hfc_config(self) -> gmm_attack.Config:
        """gmm_attack.py's config for the HFC attacker on A_eval: its results folder is reused when its record
        matches."""
        return gmm_attack.Config(
            arch=self.arch, name=self.name, dataset=self.dataset, seed=self.seed, device=self.device,
            threads=self.threads, attack=self.attack, noise=self.noise, num_component=self.num_component,
            **self.lamda_search(), step_size=self.step_size, steps=self.steps, term=self.term,
            class_loss=self.class_loss, kappa=self.kappa, limit=self.limit, batch_size=self.batch_size)

    def typ_params(self) -> dict[str, Any]:
        return detectors.TYP(num_components=self.typ_components, seed=self.seed).get_params()


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


# --------------------------------------------------------------------------- pieces
class Piece(runs.Piece):
    """One resumable unit under ``arms_race/`` (``runs.Piece`` with this stage's name)."""
    stage = STAGE

    @property
    def name(self) -> str:
        return self.folder.relative_to(self.folder.parents[1]).as_posix() if self.folder.parent.name == "scores" \
            else self.folder.name


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PIECE_FILE)


class _Stage:
    """The model, the protocol's sets, the fixed detectors and the attacker's mixtures, all checked
    before anything is written; the lazily made features that only some pieces need."""

    def __init__(self, config: Config):
        self.config = config
        self.spec = attacks.parse_attack(config.attack)
        if self.spec.method == "Noise":
            raise utils.UserError(f"--attack must be an attack, not the noise set {self.spec.name}")
        self.noise = evaluation.parse_noise(config.noise).name
        self.engine_loss = hfc.engine_loss(self.spec, config.class_loss, config.kappa_value())
        self.run = runs.Run.of(config)
        self.device = utils.prepare_runtime(config.device, config.seed, config.threads)
        self.model, _ = saver.load_model(self.run.checkpoint, self.device, arch=config.arch,
                                         hint=self.run.hint("train"))
        datasets.read_split(self.run.dir)  # train and val parts: TYP's mixtures, the typical log-likelihood
        self.sets = evaluation.load_protocol_sets(self.run, self.spec.name, self.noise)
        self.detectors_dir = self.run.detectors_dir(self.spec.name)
        self.fixed = evaluation.load_fresh_detectors(self.run, self.spec.name, names=list(SEVEN))
        fixed_settings = (runs.read_record(self.detectors_dir / runs.SUMMARY) or {}).get("settings", {})
        self.train_limit = int(fixed_settings.get("train_limit", 1000) or 0)
        self.train_seed = int(fixed_settings.get("seed", config.seed))
        self.mixtures = evaluation.load_fresh_mixtures(self.run, config.num_component,
                                                       need_scales=hfc.needs_scales(config.term))
        self.step_256, self.steps = hfc.hfc_schedule(self.run.dataset, config.arch, self.spec.eps_256,
                                                     config.step_size, config.steps)
        self.eval_pos = self.sets["eval"][:config.limit] if config.limit else self.sets["eval"]
        self.fit_pos = self.sets["fit"][:config.fit_limit] if config.fit_limit else self.sets["fit"]
        for part, positions in (("A_eval", self.eval_pos), ("A_fit", self.fit_pos)):
            if len(positions) < 2:
                raise utils.UserError(f"{part} holds {len(positions)} images; attack more images with gen_base_adv.py")
        self.tune_pos = self.sets["fit"][:config.tune_images]
        self.attack_kwargs = dict(step_size_256=self.step_256, steps=self.steps, seed=config.seed,
                                  batch_size=config.batch_size, device=self.device, keep_successful=True,
                                  **self.engine_loss)
        self.keep_maps = list(self.fixed["DNN"].layers_)
        self.out = self.run.ae_dir(self.spec.name) / FOLDER
        self.used: dict[str, Path] = {}  # the piece files (and reused results) this run's rounds come from
        self._cache: dict[str, Any] = {}

    def use(self, piece: Piece) -> Piece:
        self.used[piece.name] = piece.file
        return piece

    # -- settings and inputs
    def common(self, piece: str) -> dict[str, Any]:
        config = self.config
        return {"piece": piece, "dataset": self.run.dataset, "arch": config.arch, "attack": self.spec.name,
                "noise": self.noise, "seed": config.seed}

    def engine(self) -> dict[str, Any]:
        return {"step_size_256": self.step_256, "steps": self.steps, "batch_size": self.config.batch_size,
                "class_loss": self.config.class_loss, "kappa": self.config.kappa_value(), "keep_successful": True,
                "num_component": self.config.num_component, "term": self.config.term}

    def base_inputs(self) -> dict[str, Path]:
        return {"checkpoint": self.run.checkpoint, "split": self.run.split,
                "attack_set": self.run.ae_dir(self.spec.name) / aesets.AE_FILE,
                "noise_set": self.run.ae_dir(self.noise) / aesets.AE_FILE}

    def attacker_inputs(self) -> dict[str, Path]:
        return {**self.base_inputs(), "mixtures": self.run.mixtures_dir(self.config.num_component) / runs.MIXTURES}

    # -- lazily made features
    def _lazy(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def train_features(self) -> features.FeatureSet:
        """Every training image (TYP halves them); the fixed detectors' subset is ``detector_train``."""
        return self._lazy("train", lambda: features.part_features(self.run, self.model, "train", self.device,
                                                                  self.config.batch_size))

    def detector_train(self) -> features.FeatureSet:
        """The training images whose statistics the fixed detectors use: extract_features.py's seeded subset
        (``extract_features.training_features``: ``--train-limit`` images chosen with its ``--seed``)."""
        train = self.train_features()
        return train.subset(features.seeded_subset(len(train), self.train_limit, self.train_seed))

    def val_features(self) -> tuple[list[np.ndarray], np.ndarray]:
        def make():
            feats = features.part_features(self.run, self.model, "val", self.device, self.config.batch_size)
            return feats.pooled, feats.labels
        return self._lazy("val", make)

    def fit_benign(self) -> features.FeatureSet:
        base = self.sets["base"]
        return self._lazy("fit_benign", lambda: features.benign_set(
            self.model, base["clean"][self.fit_pos], self.sets["noisy"][self.fit_pos], self.device,
            self.config.batch_size, self.keep_maps, desc="A_fit "))

    # -- the attackers
    def hfc_term(self) -> hfc.HFCTerm:
        return self._lazy("hfc_term", lambda: hfc.HFCTerm(self.mixtures, device=self.device,
                                                          **hfc.TERMS[self.config.term]))

    def ts_term(self) -> typical_set.TypicalSetTerm:
        def make():
            term = typical_set.TypicalSetTerm(self.mixtures, normalise=self.config.ts_term == "normalised",
                                              hfc_term=self.hfc_term() if self.config.with_hfc else None,
                                              device=self.device)
            term.fit_targets(*features.heldout_pooled(*self.val_features(), term.num_classes,
                                                      self.train_features))
            return term
        return self._lazy("ts_term", make)

    def term(self, attacker: str):
        return self.hfc_term() if attacker == "HFC" else self.ts_term()

    def hfc_folder(self) -> Path | None:
        """gmm_attack.py's results folder for the same settings, when it is up to date and holds these images."""
        hfc_config = self.config.hfc_config()
        folder = hfc_config.results_dir(self.run)
        made_from = gmm_attack.stage_inputs(self.run, self.spec.name, self.spec.name, self.noise,
                                            self.config.num_component)
        if not runs.is_done(folder / runs.RESULTS, hfc_config.settings(), made_from):
            return None
        index = utils.load_npz(folder / aesets.AE_FILE, "HFC AE set")["index"]
        return folder if np.array_equal(index, self.sets["base"]["index"][self.eval_pos]) else None

    def eval_piece(self, attacker: str) -> Piece:
        config = self.config
        settings = {**self.common(f"{attacker}_eval"), **self.engine(), **config.lamda_search(),
                    "limit": config.limit}
        if attacker == TS:
            settings.update(with_hfc=config.with_hfc, ts_term=config.ts_term)
        return Piece(self.out / f"{attacker}_eval", settings, self.attacker_inputs())

    def fit_piece(self, attacker: str, lam: float) -> Piece:
        settings = {**self.common(f"{attacker}_fit"), **self.engine(), "lamda_value": lam,
                    "fit_limit": self.config.fit_limit}
        if attacker == TS:
            settings.update(with_hfc=self.config.with_hfc, ts_term=self.config.ts_term)
        return Piece(self.out / f"{attacker}_fit", settings, self.attacker_inputs())

    def _attack(self, attacker: str, lam: float, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        base = self.sets["base"]
        started = time.perf_counter()
        adv, success = hfc.hfc_attack(self.model, self.term(attacker), torch.from_numpy(base["clean"][positions]),
                                      base["targets"][positions], self.spec, lam=lam, **self.attack_kwargs)
        return adv.numpy(), success.numpy(), time.perf_counter() - started

    def _ae_writer(self, attacker: str, part: str, positions: np.ndarray, adv: np.ndarray, success: np.ndarray,
                   lam: float) -> Callable[[Path], list[Path]]:
        base = self.sets["base"]

        def write(staging: Path) -> list[Path]:
            meta = {"attack": self.spec.name, "attacker": attacker, "dataset": self.run.dataset,
                    "arch": self.config.arch, "lamda": lam, "step_size_256": self.step_256, "steps": self.steps,
                    "seed": self.config.seed, "images_of": part}
            aesets.save_ae_set(staging, clean=base["clean"][positions], adv=adv, labels=base["labels"][positions],
                               targets=base["targets"][positions], success=success, index=base["index"][positions],
                               eps=self.spec.eps, meta=meta)
            return [staging / aesets.AE_FILE, staging / aesets.SUMMARY_FILE]
        return write

    def attacker_eval(self, attacker: str) -> tuple[dict[str, Any], Path]:
        """(info, the A_eval AE folder) of an attacker, computed or reused."""
        if attacker == "base":
            base = self.sets["base"]
            success = base["success"][self.eval_pos].astype(bool)
            return ({"source": str(self.run.ae_dir(self.spec.name)), "lamda": 0.0,
                     "success_eval": float(success.mean())}, self.run.ae_dir(self.spec.name))
        folder = self.hfc_folder() if attacker == "HFC" else None
        if folder is not None:
            self.used["HFC_eval (gmm_attack.py)"] = folder / runs.RESULTS
            tqdm.write(f"== HFC_eval: reusing {folder} (made with these settings)")
            results = utils.read_json(folder / runs.RESULTS, "HFC results")
            info = {"source": str(folder), "lamda": float(results["lamda"]), "lamda_rule": results.get("lamda_rule"),
                    "lamda_trials": results.get("lamda_trials", []),
                    "seconds_per_image": results["seconds"]["attack_per_image"],
                    "success_eval": float(results["success"]["hfc"])}
            return info, folder
        piece = self.use(self.eval_piece(attacker))
        if piece.done():
            tqdm.write(f"== {piece.folder.name}: up to date, reused")
            return piece.result(), piece.folder
        tqdm.write(f"== {piece.folder.name}: attacking A_eval")
        config, base = self.config, self.sets["base"]
        term = self.term(attacker)
        trials, rule, tune_seconds = [], "given", 0.0
        if config.lamda == "auto":
            started = time.perf_counter()
            grid = config.lamda_candidates()
            tqdm.write(f"{attacker}: choosing λ on {len(self.tune_pos)} A_fit images (grid {grid}, "
                       f"success ≥ {config.min_success:.0%})")
            lam, trials, rule = hfc.choose_lambda(self.model, term, torch.from_numpy(base["clean"][self.tune_pos]),
                                                  base["targets"][self.tune_pos], self.spec, grid=grid,
                                                  min_success=config.min_success, **self.attack_kwargs)
            tune_seconds = time.perf_counter() - started
        else:
            lam = float(config.lamda)
        adv, success, seconds = self._attack(attacker, lam, self.eval_pos)
        info = {"source": "computed", "lamda": float(lam), "lamda_rule": rule, "lamda_trials": trials,
                "tune_seconds": tune_seconds, "seconds_per_image": seconds / len(self.eval_pos),
                "success_eval": float(success.mean()),
                "layers": [self.model.layer_names[i] for i in term.layers]}
        if attacker == TS:
            tau = term.tau.double().cpu().numpy()
            info.update(form=term.describe(), with_hfc=config.with_hfc,
                        typical_log_likelihood=float(tau[base["targets"][self.eval_pos]].mean()))
        return piece.write(info, self._ae_writer(attacker, "A_eval", self.eval_pos, adv, success, lam)), piece.folder

    def attacker_fit(self, attacker: str, lam: float) -> tuple[dict[str, Any], Path]:
        """(info, the A_fit AE folder) of an attacker at the λ of its A_eval AEs."""
        piece = self.use(self.fit_piece(attacker, lam))
        if piece.done():
            tqdm.write(f"== {piece.folder.name}: up to date, reused")
            return piece.result(), piece.folder
        tqdm.write(f"== {piece.folder.name}: attacking A_fit (λ = {lam:.3g})")
        adv, success, seconds = self._attack(attacker, lam, self.fit_pos)
        info = {"lamda": lam, "success_fit": float(success.mean()), "n_success_fit": int(success.sum()),
                "seconds_per_image": seconds / len(self.fit_pos)}
        return piece.write(info, self._ae_writer(attacker, "A_fit", self.fit_pos, adv, success, lam)), piece.folder

    # -- the defenders
    def typ_piece(self) -> Piece:
        settings = {**self.common("TYP"), "typ": self.config.typ_params(), "fit_limit": self.config.fit_limit}
        return Piece(self.out / "TYP", settings, self.base_inputs())

    def refit_piece(self, attacker: str, fit_folder: Path) -> Piece:
        settings = {**self.common(f"refit_{attacker}"), "typ": self.config.typ_params(),
                    "fit_limit": self.config.fit_limit}
        inputs = {**self.base_inputs(), "detectors": self.detectors_dir / runs.SUMMARY,
                  "fit_aes": fit_folder / aesets.AE_FILE}
        return Piece(self.out / f"refit_{attacker}", settings, inputs)

    def _fit_adv(self, adv: np.ndarray, success: np.ndarray, what: str) -> features.FeatureSet:
        return features.adv_set(self.model, adv, success, self.device, self.config.batch_size, self.keep_maps,
                                desc=f"A_fit {what} ")

    def typicality(self) -> tuple[detectors.TYP, Path]:
        """TYP fitted on A_fit's benign samples vs. its base AEs (never HFC AEs)."""
        piece = self.use(self.typ_piece())
        if piece.done():
            tqdm.write("== TYP: up to date, reused")
        else:
            tqdm.write("== TYP: fitting the typicality detector on A_fit's base AEs")
            base = self.sets["base"]
            adv = self._fit_adv(base["adv"][self.fit_pos], base["success"][self.fit_pos], "base")
            typ = detectors.TYP(**self.config.typ_params()).fit(self.model, self.train_features(), self.fit_benign(),
                                                                 adv)

            def write(staging: Path) -> list[Path]:
                typ.save(staging / "TYP")
                return _files(staging)
            piece.write({"layers": [typ.layer_names_[i] for i in typ.layers_], "fit_seconds": typ.fit_seconds_,
                         "n_adv": len(adv)}, write)
        return detectors.TYP.load(piece.folder / "TYP", hint="run arms_race.py again"), piece.file

    def refit(self, attacker: str, fit_folder: Path) -> tuple[dict[str, detectors.Detector], Path]:
        """The seven and TYP fitted on A_fit's benign samples vs. the attacker's successful A_fit AEs."""
        piece = self.use(self.refit_piece(attacker, fit_folder))
        if piece.done():
            tqdm.write(f"== refit_{attacker}: up to date, reused")
        else:
            tqdm.write(f"== refit_{attacker}: fitting every detector on A_fit's {attacker} AEs")
            ae = aesets.load_ae_set(fit_folder, hint="run arms_race.py again")
            adv = self._fit_adv(ae["adv"], ae["success"], attacker)
            train = self.detector_train()
            refitted: dict[str, detectors.Detector] = {}
            for name, fixed in tqdm(self.fixed.items(), desc=f"refit on {attacker}", leave=False):
                refitted[name] = type(fixed)(**fixed.get_params()).fit(self.model, train, self.fit_benign(), adv)
            typ = detectors.TYP(**self.config.typ_params()).fit(self.model, self.train_features(), self.fit_benign(),
                                                                 adv)

            def write(staging: Path) -> list[Path]:
                detectors.save_detectors(staging / "detectors", refitted)
                typ.save(staging / "TYP")
                return _files(staging)
            piece.write({"n_adv": len(adv), "fit_seconds": {name: d.fit_seconds_ for name, d in
                                                            {**refitted, "TYP": typ}.items()}}, write)
        hint = "run arms_race.py again"
        loaded = detectors.load_detectors(piece.folder / "detectors", names=list(SEVEN), hint=hint)
        loaded["TYP"] = detectors.TYP.load(piece.folder / "TYP", hint=hint)
        return loaded, piece.file

    # -- scoring
    def scores(self, defender_set: str, attacker: str, ae_folder: Path, made_from: Path,
               fitted: Callable[[], dict[str, detectors.Detector]]) -> dict[str, Any]:
        """Score one attacker's A_eval AEs with one set of detectors (``evaluation.score_table``), or
        reuse. The result carries each detector's AUC and TNR@90 with their intervals, and (not
        written to the JSON) ``replicates``: each detector's AUC per bootstrap resample, the same
        draws in every piece, so a round that merges pieces averages them resample by resample."""
        settings = {**self.common(f"scores_{defender_set}_{attacker}"), "limit": self.config.limit,
                    "bootstrap": evaluation.bootstrap_settings()}
        inputs = {**self.base_inputs(), "detectors": made_from,
                  "aes": ae_folder / aesets.AE_FILE}
        if defender_set == "fixed":
            inputs["mixtures"] = self.run.mixtures_dir(self.config.num_component) / runs.MIXTURES
        piece = self.use(Piece(self.out / "scores" / f"{defender_set}__{attacker}", settings, inputs))
        if piece.done():
            return {**piece.result(), "replicates": _load_replicates(piece.folder)}
        tqdm.write(f"== scores: {defender_set} detectors on {attacker} AEs")
        base = self.sets["base"]
        ae = aesets.load_ae_set(ae_folder, hint="run arms_race.py again")
        rows = aesets.rows_of(ae, base["index"][self.eval_pos], f"the {attacker} AEs in {ae_folder}",
                              "run arms_race.py again")
        adv, success = ae["adv"][rows], ae["success"][rows].astype(bool)
        result: dict[str, Any] = {"success": float(success.mean()), "n_success": int(success.sum()), "detectors": None}
        reports, replicates = None, {}
        if success.any():
            scored = evaluation.score_table(self.model, fitted(), base["clean"][self.eval_pos],
                                            self.sets["noisy"][self.eval_pos], {attacker: (adv, success)},
                                            device=self.device, batch_size=self.config.batch_size)
            reports = {name: per_row[attacker] for name, per_row in scored.table.items()}
            replicates = scored.auc_replicates[attacker]
            result["detectors"] = {name: {key: r[key] for key in ("auc", "tnr90", "auc_ci", "tnr90_ci")}
                                   for name, r in reports.items()}
            if defender_set == "fixed":
                loglik = evaluation.mixture_log_likelihood(self.model, self.mixtures, {attacker: (adv, success)},
                                                           base["targets"][self.eval_pos], self.device,
                                                           extracted=scored.features)
                result["mixture_log_likelihood"] = loglik[attacker]

        def write(staging: Path) -> list[Path]:
            utils.write_json(staging / REPORTS_FILE, {"attacker": attacker, "defender_set": defender_set,
                                                      "reports": reports})
            utils.save_npz(staging / REPLICATES_FILE, **{name.replace("+", "_"): values
                                                         for name, values in replicates.items()})
            return [staging / REPORTS_FILE, staging / REPLICATES_FILE]
        return {**piece.write(result, write), "replicates": replicates}


def _load_replicates(folder: Path) -> dict[str, np.ndarray]:
    """A scores piece's per-resample AUCs, by detector name."""
    saved = utils.load_npz(folder / REPLICATES_FILE, "bootstrap replicates", hint="run arms_race.py again")
    return {name: saved[name.replace("+", "_")] for name in NAMES if name.replace("+", "_") in saved}


def _round(attacker: str, defender: str, success: float, parts: list[dict[str, Any]],
           note: str | None = None) -> dict[str, Any]:
    """One round: the defender's detectors (the merged scores of ``parts``; None for a detector the
    defender does not have), their mean AUC with its bootstrap interval (the detectors' AUCs
    averaged per resample; every part was scored on the same images with the same draws), and the
    best AUC."""
    merged: dict[str, Any] = {}
    replicates: dict[str, np.ndarray] = {}
    for part in parts:
        merged.update(part.get("detectors") or {})
        replicates.update(part.get("replicates") or {})
    per = {name: merged.get(name) for name in NAMES}
    present = [name for name, m in per.items() if m is not None]
    aucs = [per[name]["auc"] for name in present]
    interval = None
    if present and all(name in replicates for name in present):
        interval = metrics.percentile_interval(np.mean([replicates[name] for name in present], axis=0))
    out = {"attacker": attacker, "defender": defender, "success": success,
           "mean_auc": float(np.mean(aucs)) if aucs else None, "mean_auc_ci": interval,
           "max_auc": float(np.max(aucs)) if aucs else None, "detectors": per}
    if note:
        out["note"] = note
    return out


def run(config: Config) -> dict:
    """Play every round (computing or reusing each piece), then write arms_race.json, .md and .png."""
    stage = _Stage(config)
    steps = tqdm(total=11, desc="arms race", unit="piece")
    infos: dict[str, dict[str, Any]] = {}
    eval_folders: dict[str, Path] = {}
    fit_folders: dict[str, Path] = {}
    for attacker in ATTACKERS:
        infos[attacker], eval_folders[attacker] = stage.attacker_eval(attacker)
        steps.update(1)
        if attacker != "base":
            fit_info, fit_folders[attacker] = stage.attacker_fit(attacker, infos[attacker]["lamda"])
            infos[attacker].update(success_fit=fit_info["success_fit"], n_success_fit=fit_info["n_success_fit"])
            steps.update(1)
    typ, typ_file = stage.typicality()
    steps.update(1)
    refitted: dict[str, tuple[dict[str, detectors.Detector], Path] | None] = {}
    for attacker in ("HFC", TS):
        enough = infos[attacker]["n_success_fit"] >= 2
        refitted[attacker] = stage.refit(attacker, fit_folders[attacker]) if enough else None
        steps.update(1)

    fixed_made_from = stage.detectors_dir / runs.SUMMARY
    scored: dict[tuple[str, str], dict[str, Any]] = {}
    for attacker in ATTACKERS:
        folder = eval_folders[attacker]
        scored[("fixed", attacker)] = stage.scores("fixed", attacker, folder, fixed_made_from, lambda: stage.fixed)
        scored[("TYP", attacker)] = stage.scores("TYP", attacker, folder, typ_file, lambda: {"TYP": typ})
        infos[attacker]["mixture_log_likelihood"] = scored[("fixed", attacker)].get("mixture_log_likelihood")
        if refitted.get(attacker) is not None:
            fitted, made_from = refitted[attacker]
            scored[("refit", attacker)] = stage.scores(f"refit_{attacker}", attacker, folder, made_from,
                                                       lambda fitted=fitted: fitted)
        steps.update(1)
    steps.close()

    rounds = []
    for attacker, defender in ROUNDS:
        success = scored[("fixed", attacker)]["success"]
        if defender == "fixed":
            rounds.append(_round(attacker, defender, success, [scored[("fixed", attacker)]]))
        elif defender == "typicality":
            rounds.append(_round(attacker, defender, success, [scored[("fixed", attacker)], scored[("TYP", attacker)]]))
        elif ("refit", attacker) in scored:
            rounds.append(_round(attacker, defender, success, [scored[("refit", attacker)]]))
        else:
            rounds.append(_round(attacker, defender, success, [],
                                 note=f"fewer than 2 successful {attacker} AEs on A_fit: nothing to re-fit on"))
    result = {"dataset": stage.run.dataset, "arch": config.arch, "attack": stage.spec.name,
              "epsilon_256": stage.spec.eps_256, "step_size_256": stage.step_256, "steps": stage.steps,
              "n_eval": len(stage.eval_pos), "n_fit": len(stage.fit_pos), "term": config.term, "ts_term": config.ts_term,
              "class_loss": config.class_loss, "kappa": config.kappa_value(), "lamda": config.lamda,
              "attackers": infos, "defenders": DEFENDERS,
              "typ": {"settings": config.typ_params(), "layers": [typ.layer_names_[i] for i in typ.layers_]},
              "rounds": rounds}
    out = stage.out
    utils.atomic_write_bytes(out / "arms_race.md", format_rounds(result, "md").encode())
    figure(out / "arms_race.png", result)
    made_from = {"checkpoint": stage.run.checkpoint, "detectors": fixed_made_from, **stage.used}
    result["record"] = runs.record(STAGE, config.settings(), made_from, [out / "arms_race.md", out / "arms_race.png"],
                                   folder=out)
    utils.write_json(out / RESULT_FILE, result)
    print(format_rounds(result, "text"))
    print(f"-> {out}")
    return result


# --------------------------------------------------------------------------- table and figure
def format_rounds(result: dict[str, Any], fmt: str = "md") -> str:
    """One line per round: attacker, defender, success, mean AUC, each detector's AUC (TNR@90)."""
    number = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    lines = [["attacker", "defender", "success", "mean AUC", *NAMES]]
    for r in result["rounds"]:
        cells = [number(m["auc"]) + f" ({m['tnr90']:.2f})" if m else "-" for m in r["detectors"].values()]
        lines.append([r["attacker"], r["defender"], number(r["success"]),
                      report.cell(r["mean_auc"], r.get("mean_auc_ci")), *cells])
    lam = {a: info.get("lamda") for a, info in result["attackers"].items() if a != "base"}
    title = (f"{result['dataset']} / {result['arch']} / {result['attack']}: the arms race (eps = "
             f"{result['epsilon_256']:g}/256, alpha = {result['step_size_256']:g}/256, T = {result['steps']}, "
             f"HFC term {result['term']}, typical-set term {result['ts_term']}, λ " + ", ".join(f"{a} {v:.3g}" for a, v in lam.items())
             + f"; n_eval = {result['n_eval']}, n_fit = {result['n_fit']}; AUC (TNR@90) on A_eval)")
    return report.render(title, lines, fmt)


def figure(path: Path, result: dict[str, Any]) -> None:
    """Each round's mean detection AUC (bars) and the TYP detector's AUC (markers), with the success."""
    plt = plots.plt
    rounds = result["rounds"]
    x = np.arange(len(rounds))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(rounds)), 4.2))
    mean = [r["mean_auc"] if r["mean_auc"] is not None else np.nan for r in rounds]
    colours = {"fixed": "tab:grey", "typicality": "tab:blue", "refit": "tab:green"}
    interval = np.array([r.get("mean_auc_ci") or [np.nan, np.nan] for r in rounds], dtype=float)
    ax.bar(x, mean, 0.6, color=[colours[r["defender"]] for r in rounds])
    ax.errorbar(x, mean, yerr=np.abs(interval.T - np.asarray(mean)), fmt="none", ecolor="black", capsize=3, lw=1)
    typ = [(r["detectors"]["TYP"] or {}).get("auc", np.nan) for r in rounds]
    ax.scatter(x, typ, marker="D", c="crimson", zorder=3, label="TYP AUC")
    for i, r in enumerate(rounds):
        if r["success"] is not None:
            ax.text(i, 1.02, f"succ {r['success']:.2f}", ha="center", fontsize=7)
    for defender, colour in colours.items():
        ax.bar([np.nan], [np.nan], color=colour, label=f"mean AUC, {defender}")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    labels = [r["attacker"].replace("typical_set_", "typical-set\n") + "\n" + r["defender"] for r in rounds]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("detection AUC on A_eval")
    ax.set_title(f"{result['dataset']} / {result['arch']} / {result['attack']}: the arms race", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plots.save_figure(fig, path)


if __name__ == "__main__":
    utils.run_cli(main)
