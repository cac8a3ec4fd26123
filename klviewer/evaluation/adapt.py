"""`klviewer adapt`: a site prior from studies the user vouches for as healthy.

1. **Split by patient** (PatientID, else StudyInstanceUID), never by slice: adjacent slices of one
   patient are near-duplicates, so a split by slice would make the calibration look better than it
   is. With one patient only, each series is cut into contiguous slabs with a gap of at least
   `SLAB_GAP` slices between the training and the held-out slab.
2. **Fine-tune a copy of the base prior** on the training slices, put on the prior's physical grid
   (`klviewer.physics.grid`) exactly as the analysis puts them, with augmentation that suits CT:
   left-right flips, small rotations and scales, small HU offsets of the tissue. The loss is EDM's
   denoising loss; the training step, EMA and resume state are `klviewer.priors.finetune`'s.
3. **Calibrate on the held-out slices** for each requested analysis setting: the nats threshold,
   the healthy reference and its z threshold, and the prior-fit threshold (`evaluation.calibrate`).
4. **Report** in OUT/adaptation/: held-out denoising error per sigma against the base prior, the
   calibration's false-positive rates, the held-out prior-fit scores, the loss curve and samples.

The result is an ordinary prior folder. The base prior and the inputs are never written; a
cancelled or crashed run resumes from OUT/resume/ (training state, the split, the training
images and every held-out analysis already made).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.evaluation.calibrate import MIN_REFERENCE_SLICES, Calibration, calibrate_prior
from klviewer.inference.measurements import source_spacing, target_spacing
from klviewer.inference.plan import SeriesPlan, plan_open_series
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.loader import open_images
from klviewer.io.safe_write import atomic_write, atomic_write_text, check_output_folder
from klviewer.io.study import Catalog, Series
from klviewer.physics.grid import AIR_HU, GridTransform
from klviewer.priors.adapters import ADAPTER_MODES, count_parameters
from klviewer.priors.checkpoint import (
    CONFIG_FILE,
    load_prior,
    prior_fingerprint,
    read_weights,
    resolve_prior_path,
    save_prior,
    state_bytes,
)
from klviewer.priors.finetune import (
    RESUME_STATE,
    FineTuneDiverged,
    FineTuner,
    FineTuneSettings,
    check_outside_base,
    draw_sigmas,
    edm_weight,
)
from klviewer.priors.report import denoising_mse
from klviewer.priors.resume_state import read_resume_state, refuse_earlier_run
from klviewer.priors.train import write_loss_csv
from klviewer.priors.unet import EDMUNetPrior

SLAB_GAP = 5
"""Slices left out between the training and the held-out slab of one patient's series."""
MIN_TRAIN_SLICES = 8
MIN_HELD_OUT_SLICES = MIN_REFERENCE_SLICES
HELD_OUT_FRACTION = 0.3
RESUME_DIR = "resume"
REPORT_DIR = "adaptation"
DATA_FILE = "data.safetensors"
SPLIT_FILE = "split.json"
CALIBRATION_CACHE = "calibration"
DEFAULT_LR = {"full": 1e-4, "norm-bias": 3e-3, "lora": 1e-3}
"""Adam learning rates per mode, as the alignment benchmark found them (benchmarks/results/align_benchmark.md)."""
PLACEHOLDER_PATIENTS = {"", "(arrays)", "(sinograms)", "anonymous", "unknown"}
"""Patient IDs that name no patient: the study identifies it instead."""
AUGMENT = {"rotation_deg": 5.0, "scale": 0.05, "hu_offset": 10.0, "flip": True}
TISSUE_HU = -500.0
# Settings that must not change when a run is resumed (steps may grow, to train longer).
FIXED_ON_RESUME = ("base_sha256", "split", "mode", "lr", "batch", "lora_rank", "seed", "ema", "held_out",
                   "augment", "p_mean", "p_std")


class AdaptError(KlviewerError):
    """Adaptation could not start, or its resume state does not fit the request."""


class AdaptCancelled(KlviewerError):
    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step
        super().__init__(f"adaptation cancelled at step {step}; continue with --resume (output {out})")


@dataclass
class AdaptConfig:
    base: str | Path
    """The prior to adapt (shipped name or folder). It is read, never written."""
    inputs: list[str | Path]
    """Studies the user vouches for as healthy (anything `klviewer analyze` reads); they are only recorded
    when `adapt_prior` is given the loaded series."""
    out: Path
    mode: str = "full"
    steps: int = 300
    lr: float | None = None
    """None: DEFAULT_LR for the mode."""
    batch: int = 4
    lora_rank: int = 4
    ema: float = 0.99
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    held_out: float = HELD_OUT_FRACTION
    """Fraction of the slices (whole patients, or one slab) kept for calibration."""
    settings: list[AnalysisSettings] = field(default_factory=lambda: [AnalysisSettings()])
    """Analysis settings the adapted prior is calibrated for."""
    fpr: float = 0.05
    augment: bool = True
    checkpoint_every: int = 50
    name: str | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.inputs = list(self.inputs)
        problems = []
        if self.mode not in ADAPTER_MODES:
            problems.append(f"mode must be one of {ADAPTER_MODES}, got {self.mode!r}")
        for key in ("steps", "batch", "lora_rank", "checkpoint_every"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema < 1:
            problems.append(f"ema must be in [0, 1), got {self.ema}")
        if not 0 < self.held_out < 1:
            problems.append(f"held_out must be a fraction in (0, 1), got {self.held_out}")
        if not self.settings:
            problems.append("give at least one analysis setting to calibrate")
        if problems:
            raise AdaptError("invalid adaptation settings: " + "; ".join(problems))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class AdaptProgress:
    stage: str
    """"train", then "calibrate" (held-out analyses), then "report"."""
    step: int
    steps: int
    loss: float = float("nan")


@dataclass(eq=False)
class SlicePick:
    patient: str
    series: Series
    index: int

    @property
    def key(self) -> str:
        return f"{self.series.uid}#{self.index}"


@dataclass
class PatientSplit:
    train: list[SlicePick]
    held_out: list[SlicePick]
    method: str
    """"patients" (whole patients held out) or "slabs" (one patient: contiguous slabs with a gap)."""
    gap: int = 0

    def describe(self) -> dict[str, Any]:
        def patients(picks: list[SlicePick]) -> list[str]:
            return sorted({p.patient for p in picks})
        return {"method": self.method, "gap_slices": self.gap, "train_slices": len(self.train),
                "held_out_slices": len(self.held_out), "train_patients": patients(self.train),
                "held_out_patients": patients(self.held_out),
                "train": [p.key for p in self.train], "held_out": [p.key for p in self.held_out]}


def patient_key(patient_id: str, study_uid: str) -> str:
    """PatientID, else StudyInstanceUID."""
    return patient_id if patient_id.strip().lower() not in PLACEHOLDER_PATIENTS else f"study:{study_uid}"


def patient_series(catalog: Catalog) -> list[tuple[str, Series]]:
    """Every analysable image series with the patient it belongs to (sinograms have no image to train on)."""
    return [(patient_key(p.patient_id, st.uid), se) for p in catalog.patients for st in p.studies for se in st.series
            if se.analysis_refusal() is None and se.slices]


def split_by_patient(series: Sequence[tuple[str, Series]], held_out: float = HELD_OUT_FRACTION,
                     seed: int = 0) -> PatientSplit:
    """Hold out whole patients (a seeded choice, until about `held_out` of the slices are held out); with one
    patient, the last part of each series is held out after a gap of SLAB_GAP slices."""
    by_patient: dict[str, list[SlicePick]] = {}
    for patient, s in series:
        by_patient.setdefault(patient, []).extend(SlicePick(patient, s, i) for i in range(s.n_slices))
    total = sum(len(v) for v in by_patient.values())
    if len(by_patient) >= 2:
        order = sorted(by_patient)
        np.random.default_rng(seed).shuffle(order)
        held_patients: list[str] = []
        for patient in order[:-1]:  # at least one patient trains
            n_held = sum(len(by_patient[p]) for p in held_patients)
            if held_patients and n_held + len(by_patient[patient]) / 2 > held_out * total:
                break
            held_patients.append(patient)
        train = [p for patient in order if patient not in held_patients for p in by_patient[patient]]
        held = [p for patient in held_patients for p in by_patient[patient]]
        split = PatientSplit(train, held, "patients")
    else:
        patient = next(iter(by_patient))
        train, held = [], []
        for _, s in series:
            n = s.n_slices
            n_held = max(MIN_HELD_OUT_SLICES, round(held_out * n))
            if n < n_held + SLAB_GAP + 1:  # too short to cut: it trains
                train.extend(SlicePick(patient, s, i) for i in range(n))
                continue
            train.extend(SlicePick(patient, s, i) for i in range(n - n_held - SLAB_GAP))
            held.extend(SlicePick(patient, s, i) for i in range(n - n_held, n))
        split = PatientSplit(train, held, "slabs", SLAB_GAP)
    if len(split.train) < MIN_TRAIN_SLICES or len(split.held_out) < MIN_HELD_OUT_SLICES:
        raise AdaptError(
            f"{total} slice(s) of {len(by_patient)} patient(s) split into {len(split.train)} for training and "
            f"{len(split.held_out)} held out (by {split.method}); adaptation needs at least {MIN_TRAIN_SLICES} for "
            f"training and {MIN_HELD_OUT_SLICES} held out" + (f", with {SLAB_GAP} slices between them for one patient"
                                                             if split.method == "slabs" else ""))
    return split


def training_images(picks: Sequence[SlicePick], prior: EDMUNetPrior) -> torch.Tensor:
    """(N, 1, H, W) slices on the prior's physical grid in prior units, as the analysis puts them there."""
    images = []
    for pick in picks:
        hu = np.maximum(np.asarray(pick.series.slices[pick.index].hu, np.float32), AIR_HU)
        notes: list[str] = []
        pixel, assumed = source_spacing(pick.series, hu.shape, prior, notes)
        spacing = target_spacing(prior, max(n * s for n, s in zip(hu.shape, pixel)), notes)
        grid = GridTransform.centred(hu.shape, pixel, prior.config.image_size, (spacing, spacing), assumed)
        on_grid = hu if grid.is_identity() else grid.resample_to_target(hu)
        images.append(prior.hu_to_x(torch.from_numpy(on_grid.astype(np.float32))))
    return torch.stack(images)[:, None].float()


def augment(x: torch.Tensor, gen: torch.Generator, air: float, tissue: float, hu_scale: float,
            settings: dict[str, Any] = AUGMENT) -> torch.Tensor:
    """Random left-right flips, rotations, scales and tissue HU offsets of a (B, 1, H, W) batch in prior units.

    Rotations and scales resample with bilinear interpolation and bring in air from outside.
    """
    b = x.shape[0]
    angle = torch.deg2rad((torch.rand(b, generator=gen) * 2 - 1) * settings["rotation_deg"])
    zoom = 1 + (torch.rand(b, generator=gen) * 2 - 1) * settings["scale"]
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if settings["flip"] else torch.ones(b)
    offset = (torch.rand(b, generator=gen) * 2 - 1) * settings["hu_offset"] / hu_scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(b)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(b)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    return moved + offset.to(x)[:, None, None, None] * (moved > tissue)


class _Adapter(FineTuner):
    """Fine-tuning on the site's healthy slices with EDM's denoising loss."""

    def __init__(self, cfg: AdaptConfig, base: EDMUNetPrior, images: torch.Tensor, device: torch.device,
                 sigma_law: tuple[float, float]) -> None:
        super().__init__(base, FineTuneSettings(mode=cfg.mode, lora_rank=cfg.lora_rank, lr=cfg.learning_rate,
                                                ema=cfg.ema, seed=cfg.seed), device)
        self.cfg, self.images = cfg, images
        self.p_mean, self.p_std = sigma_law
        c = base.config
        self.air = float(base.hu_to_x(torch.tensor(AIR_HU)))
        self.tissue = float(base.hu_to_x(torch.tensor(TISSUE_HU)))
        self.hu_scale = abs(c.hu_scale)

    def loss(self) -> torch.Tensor:
        cfg = self.cfg
        picks = torch.randint(self.images.shape[0], (cfg.batch,), generator=self.gen)
        clean = self.images[picks]
        if cfg.augment:
            clean = augment(clean, self.gen, self.air, self.tissue, self.hu_scale)
        sigma = draw_sigmas(self.gen, cfg.batch, self.p_mean, self.p_std)
        noise = torch.randn(clean.shape, generator=self.gen) * sigma[:, None, None, None]
        clean, sigma, noise = clean.to(self.device), sigma.to(self.device), noise.to(self.device)
        denoised = self.model.denoise(clean + noise, sigma)
        weight = edm_weight(sigma, self.model.config.sigma_data)
        return (weight[:, None, None, None] * (denoised - clean) ** 2).mean()


@dataclass
class AdaptResult:
    out: Path
    split: PatientSplit
    calibrations: list[Calibration]
    report: dict[str, Any]


def _fixed(cfg: AdaptConfig, fingerprint: str, split: PatientSplit, sigma_law: tuple[float, float]) -> dict[str, Any]:
    return json.loads(json.dumps({
        "base_sha256": fingerprint, "split": split.describe(), "mode": cfg.mode, "lr": cfg.learning_rate,
        "batch": cfg.batch, "lora_rank": cfg.lora_rank, "seed": cfg.seed, "ema": cfg.ema, "held_out": cfg.held_out,
        "augment": AUGMENT if cfg.augment else None, "p_mean": sigma_law[0], "p_std": sigma_law[1],
    }))


def _resume_state(cfg: AdaptConfig, fixed: dict[str, Any]) -> dict[str, Any] | None:
    """The training state to continue from; None to start at step 0."""
    folder = cfg.out / RESUME_DIR
    if not cfg.resume:
        refuse_earlier_run(cfg.out, RESUME_DIR, "an adaptation", AdaptError)
        return None
    state_path = folder / RESUME_STATE
    if not state_path.is_file():
        if not (folder / SPLIT_FILE).is_file():
            raise KlviewerInputError(state_path, "missing: nothing to resume (run without resume first)")
        return None
    return read_resume_state(state_path, fixed, cfg.steps, AdaptError)[0].doc


def _check_paths(cfg: AdaptConfig, base_folder: Path, sources: Sequence[str | Path]) -> None:
    check_outside_base(cfg.out, base_folder, "adapted")
    check_output_folder(cfg.out, sources)


def _training_data(cfg: AdaptConfig, split: PatientSplit, base: EDMUNetPrior, fixed: dict[str, Any]) -> torch.Tensor:
    """The training slices on the prior's grid, made once and kept under resume/ so a resumed run trains on them."""
    folder = cfg.out / RESUME_DIR
    data_path, split_path = folder / DATA_FILE, folder / SPLIT_FILE
    if cfg.resume and data_path.is_file() and split_path.is_file():
        saved = json.loads(split_path.read_text(encoding="utf-8"))
        if saved.get("settings") != fixed:
            raise AdaptError(f"{split_path}: was made for other inputs or settings; choose another output folder")
        return read_weights(data_path)["images"]
    images = training_images(split.train, base)
    atomic_write(data_path, lambda f: f.write(state_bytes({"images": images})), overwrite=True)
    atomic_write_text(split_path, json.dumps({"settings": fixed}, indent=1) + "\n", overwrite=True)
    return images


def adapt_prior(cfg: AdaptConfig, progress: Callable[[AdaptProgress], None] | None = None,
                cancel: threading.Event | None = None,
                series: Sequence[tuple[str, Series]] | None = None) -> AdaptResult:
    """Adapt `cfg.base` to the healthy studies and calibrate it; returns the new prior folder and its report.

    `series` gives the studies' image series with their patient keys when they are loaded already
    (the app); else `cfg.inputs` is opened.
    """
    device = resolve_device(cfg.device)
    base_folder = resolve_prior_path(cfg.base)
    series = list(series) if series is not None else patient_series(open_images(cfg.inputs))
    sources = [str(s.files[0].resolve()) for _, s in series if s.files]
    _check_paths(cfg, base_folder, cfg.inputs or sources)
    if not series:
        raise KlviewerInputError(None, "no image series to adapt on among the inputs (sinograms have no images to "
                                       "train on)")
    split = split_by_patient(series, cfg.held_out, cfg.seed)
    base = load_prior(base_folder, device=device)
    if not isinstance(base, EDMUNetPrior):
        raise KlviewerInputError(base_folder / CONFIG_FILE, f"adaptation needs an edm-unet prior, this one is "
                                                            f"{base.config.architecture!r}")
    fingerprint = prior_fingerprint(base_folder)
    sigma_law = (float(base.config.training.get("p_mean", -1.5)), float(base.config.training.get("p_std", 2.0)))
    fixed = _fixed(cfg, fingerprint, split, sigma_law)
    doc = _resume_state(cfg, fixed)
    images = _training_data(cfg, split, base, fixed)
    adapter = _Adapter(cfg, base, images, device, sigma_law)
    if doc is not None:
        adapter.load_resume(cfg.out / RESUME_DIR, doc)
    adapter.commands.append(cfg.command)
    started = time.perf_counter() - adapter.elapsed_s
    while adapter.step < cfg.steps:
        if cancel is not None and cancel.is_set():
            adapter.save_resume(cfg.out / RESUME_DIR, fixed)
            raise AdaptCancelled(cfg.out, adapter.step)
        try:
            loss = adapter.train_step(adapter.loss)
        except FineTuneDiverged as exc:
            raise AdaptError(f"adaptation diverged at step {exc.step + 1} (loss {exc.loss}); lower the learning "
                             f"rate (now {cfg.learning_rate:g})") from None
        adapter.elapsed_s = time.perf_counter() - started
        if progress is not None:
            progress(AdaptProgress("train", adapter.step, cfg.steps, loss))
        if adapter.step % cfg.checkpoint_every == 0 or adapter.step == cfg.steps:
            adapter.save_resume(cfg.out / RESUME_DIR, fixed)
    _save_prior(cfg, adapter, base, base_folder, fingerprint, split, device)
    calibrations = _calibrate(cfg, split, progress, cancel)
    report = _write_report(cfg, adapter, base, split, calibrations, device)
    return AdaptResult(cfg.out, split, calibrations, report)


def _save_prior(cfg: AdaptConfig, adapter: _Adapter, base: EDMUNetPrior, base_folder: Path, fingerprint: str,
                split: PatientSplit, device: torch.device) -> None:
    config = dataclasses.replace(base.config, name=cfg.name or cfg.out.name, arch=dict(base.config.arch),
                                 klviewer_version=__version__)
    config.training = {
        "kind": "site-adaptation",
        "base_prior": {"name": base.config.name, "path": str(base_folder), "sha256": fingerprint},
        "data": {"inputs": [str(p) for p in cfg.inputs], "split": split.describe(), "augment": AUGMENT if cfg.augment
                 else None},
        "mode": cfg.mode, "lora_rank": cfg.lora_rank if cfg.mode == "lora" else None,
        "trainable_parameters": count_parameters(adapter.params), "steps": adapter.step, "lr": cfg.learning_rate,
        "batch": cfg.batch, "ema": cfg.ema, "seed": cfg.seed, "p_mean": adapter.p_mean, "p_std": adapter.p_std,
        "final_loss": adapter.mean_recent_loss(), "seconds": round(adapter.elapsed_s, 1), "device": str(device),
        "command": cfg.command, "commands": adapter.commands, "torch_version": torch.__version__,
        "klviewer_version": __version__, "base_training": base.config.training,
    }
    final = EDMUNetPrior(config)
    final.load_state_dict({k: v.to("cpu") for k, v in adapter.final_weights().items()})
    save_prior(final, cfg.out, overwrite=True)
    write_loss_csv(cfg.out / REPORT_DIR / "loss.csv", adapter.losses, adapter.lr_at)


def held_out_plan(split: PatientSplit) -> SeriesPlan:
    picks: dict[str, tuple[Series, list[int]]] = {}
    for pick in split.held_out:
        picks.setdefault(pick.series.uid, (pick.series, []))[1].append(pick.index)
    return plan_open_series(list(picks.values()))


def _calibrate(cfg: AdaptConfig, split: PatientSplit, progress: Callable[[AdaptProgress], None] | None,
               cancel: threading.Event | None) -> list[Calibration]:
    """Calibrate the adapted prior on the held-out slices, for every requested setting (analyses are cached)."""
    plan = held_out_plan(split)
    calibrations = []
    total = len(split.held_out) * len(cfg.settings)
    for k, settings in enumerate(cfg.settings):
        def report(done: int, _total: int, base: int = k * len(split.held_out)) -> None:
            if progress is not None:
                progress(AdaptProgress("calibrate", base + done, total))

        try:
            calibrations.append(calibrate_prior(
                cfg.out, dataclasses.replace(settings, device=cfg.device), fpr=cfg.fpr, seed=cfg.seed, healthy=plan,
                cache=cfg.out / RESUME_DIR / CALIBRATION_CACHE, overwrite=True, progress=report, cancel=cancel,
                command=cfg.command or "klviewer adapt"))
        except AnalysisCancelled:
            raise AdaptCancelled(cfg.out, cfg.steps) from None
    return calibrations


def _write_report(cfg: AdaptConfig, adapter: _Adapter, base: EDMUNetPrior, split: PatientSplit,
                  calibrations: list[Calibration], device: torch.device) -> dict[str, Any]:
    from klviewer.evaluation.adapt_report import write_adaptation_report

    adapted = load_prior(cfg.out, device=device)
    held = training_images(split.held_out, base)
    rows = {"base": denoising_mse(base, held, seed=cfg.seed), "adapted": denoising_mse(adapted, held, seed=cfg.seed)}
    return write_adaptation_report(cfg.out / REPORT_DIR, cfg, split, rows, calibrations, adapter.losses, held, base,
                                   adapted)
