"""The per-slice analysis pipeline: a prior loaded once with its calibration, and one generator over
the planned slices (measurement -> posterior run -> KL map, z-scores and verdict).

`klviewer analyze`, `batch`, `calibrate`, `evaluate`, `compare` and the app's worker all analyse
slices through `analyze_slices` (or `analyze_prepared` for one prepared slice), so every caller
gets the same numbers for the same settings.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.inference.calibration import PriorCalibration
from klviewer.inference.escalation import Escalation, EscalationRule, escalation_rule
from klviewer.inference.healthy_reference import ZCalibration
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.measurements import (
    MeasuredSlice,
    MeasurementSet,
    PreparedSlice,
    ct_measurement_model,
    mu_to_hu_image,
    prepare_slice,
)
from klviewer.inference.plan import PlannedSeries, SeriesPlan
from klviewer.inference.prior_fit import is_mismatch, judge, prior_fit_score
from klviewer.inference.result import SliceResult
from klviewer.inference.sampler import PosteriorRun, merge_runs, posterior_sample_slices
from klviewer.inference.scoring import score_slice
from klviewer.inference.settings import AnalysisSettings
from klviewer.priors.base import Prior
from klviewer.priors.checkpoint import load_prior, prior_fingerprint, resolve_prior_path

T = TypeVar("T")


@dataclass
class LoadedPrior:
    """A prior loaded once, with its calibration and what every results folder records about it."""

    path: Path
    prior: Prior
    device: torch.device
    calibration: PriorCalibration
    fingerprint: str

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def load(cls, prior: str | Path, device: str | torch.device = "auto") -> LoadedPrior:
        """Load a shipped prior (by name) or a prior folder onto `device` ("auto" picks CUDA when present)."""
        resolved = resolve_device(device) if isinstance(device, str) else device
        path = resolve_prior_path(prior)
        return cls.of(path, load_prior(path, device=resolved), resolved)

    @classmethod
    def of(cls, path: Path, prior: Prior, device: torch.device) -> LoadedPrior:
        """A prior network already loaded from `path` onto `device`, with its folder's calibration read now."""
        return cls(path, prior, device, PriorCalibration.read(path), prior_fingerprint(path))


CHAINS_PER_BATCH = {"cpu": 4, "cuda": 16}
"""Posterior chains per forward pass when slices are batched. CPU: the cheapest `pigdm` step per image
(87 ms at batch 4 against 120 ms at batch 1, benchmarks/results/batch_throughput.md). CUDA: not
measured yet; an out-of-memory error halves it."""


def auto_slice_batch(settings: AnalysisSettings, device: torch.device) -> int:
    """How many slices share a batch when the caller does not say: CHAINS_PER_BATCH over the samples per slice."""
    return max(1, CHAINS_PER_BATCH.get(device.type, 1) // settings.samples)


def can_share_batch(a: PreparedSlice, b: PreparedSlice) -> bool:
    """Whether two slices' chains can share forward passes: one measurement each, with the same geometry and water attenuation."""
    qa, qb = a.acquisition, b.acquisition
    return (qa.y.shape[0] == qb.y.shape[0] == 1 and qa.mu_water_per_mm == qb.mu_water_per_mm
            and qa.operator.same_geometry(qb.operator))


def batch_groups(items: Iterable[tuple[T, PreparedSlice]], size: int) -> Iterator[list[tuple[T, PreparedSlice]]]:
    """The items in order, in groups of up to `size` consecutive slices that `can_share_batch`."""
    if size < 1:
        raise KlviewerInputError(None, f"slice batch must be at least 1, got {size}")
    group: list[tuple[T, PreparedSlice]] = []
    for item in items:
        if group and (len(group) == size or not can_share_batch(group[0][1], item[1])):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def analyze_prepared(
    prepared: PreparedSlice,
    prior: Prior,
    settings: AnalysisSettings,
    *,
    prior_name: str,
    flag_threshold: float | None,
    z_calibration: ZCalibration | None = None,
    prior_fit_threshold: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SliceResult:
    """Sample the posterior of one prepared slice and cut its maps; `z_calibration` (the prior's healthy
    reference for these settings) adds the KL z-score map, `prior_fit_threshold` the prior-fit verdict."""
    return analyze_prepared_batch([prepared], prior, settings, prior_name=prior_name, flag_threshold=flag_threshold,
                                  z_calibration=z_calibration, prior_fit_threshold=prior_fit_threshold,
                                  progress=progress, cancel=cancel)[0]


def analyze_prepared_batch(
    prepared: Sequence[PreparedSlice],
    prior: Prior,
    settings: AnalysisSettings,
    *,
    prior_name: str,
    flag_threshold: float | None,
    z_calibration: ZCalibration | None = None,
    prior_fit_threshold: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[SliceResult]:
    """`analyze_prepared` for slices that `can_share_batch`: their posterior chains share every forward
    pass, and each result differs from the slice's run alone by rounding only. Each result's seconds
    are its share of the sampling plus its own maps. (Two stages run through `analyze_slices`, which
    pools the escalated slices of several batches.)"""
    return _stage1(prepared, prior, settings, prior_name, flag_threshold, z_calibration, prior_fit_threshold,
                   None, progress, cancel)[0]


@dataclass
class _Escalating:
    """A slice that stage 1 escalates, waiting for its added chains."""

    index: int
    """Its place among the slices it was sampled with."""
    prepared: PreparedSlice
    model: MeasurementModel
    run: PosteriorRun
    stage1: SliceResult


def _stage1(prepared: Sequence[PreparedSlice], prior: Prior, settings: AnalysisSettings, prior_name: str,
            flag_threshold: float | None, z_calibration: ZCalibration | None, prior_fit_threshold: float | None,
            escalation: EscalationRule | None, progress: Callable[[int, int], None] | None,
            cancel: threading.Event | None) -> tuple[list[SliceResult], list[_Escalating]]:
    """Sample the slices together; every result, and with `escalation` the slices it escalates (their results
    are stage 1's until `_add_chains` replaces them)."""
    start = time.perf_counter()
    models = [ct_measurement_model(p.acquisition, prior) for p in prepared]
    seeds = [p.slice_seed for p in prepared]
    runs = posterior_sample_slices(prior, models, settings.sampler(seeds[0]), seeds,
                                   device=prepared[0].acquisition.device, progress=progress, cancel=cancel)
    sampling = (time.perf_counter() - start) / len(prepared)
    if escalation is not None:  # one prior-fit threshold for the run: the summary's, stage 2's
        z_calibration, prior_fit_threshold = escalation.stage1_z, escalation.stage2_prior_fit
    results = [_slice_result(p, model, run, prior, settings, prior_name, flag_threshold, z_calibration,
                             prior_fit_threshold, sampling) for p, model, run in zip(prepared, models, runs)]
    if escalation is None:
        return results, []
    waiting = []
    for i, result in enumerate(results):
        if escalation.escalates(result):
            waiting.append(_Escalating(i, prepared[i], models[i], runs[i], result))
        else:
            result.notes.append(escalation.stayed_note(result))
            result.stage = escalation.stage(escalated=False)
    return results, waiting


def _add_chains(waiting: Sequence[_Escalating], prior: Prior, escalation: EscalationRule, prior_name: str,
                max_batch: int, progress: Callable[[int, int], None] | None,
                cancel: threading.Event | None) -> list[SliceResult]:
    """Stage 2 of slices that `can_share_batch`: the rest of their chains, at most `max_batch` per forward pass,
    merged with their stage-1 runs, and each slice's result under stage 2's settings and thresholds."""
    stage1, stage2 = escalation.stage1, escalation.stage2
    seeds = [w.prepared.slice_seed for w in waiting]
    more_settings = dataclasses.replace(stage2.sampler(seeds[0]), samples=escalation.added_chains,
                                        first_sample=stage1.samples, max_batch=max_batch)
    start = time.perf_counter()
    more = posterior_sample_slices(prior, [w.model for w in waiting], more_settings, seeds,
                                   device=waiting[0].prepared.acquisition.device, progress=progress, cancel=cancel)
    added = (time.perf_counter() - start) / len(waiting)
    finals = []
    for w, run in zip(waiting, more):
        final = _slice_result(w.prepared, w.model, merge_runs(w.run, run), prior, stage2, prior_name,
                              escalation.stage2_nats, escalation.stage2_z, escalation.stage2_prior_fit,
                              w.stage1.seconds + added)
        final.notes.append(escalation.escalated_note(w.stage1.z_score))
        final.stage = escalation.stage(escalated=True)
        finals.append(final)
    return finals


def _slice_result(prepared: PreparedSlice, model: MeasurementModel, run: PosteriorRun, prior: Prior,
                  settings: AnalysisSettings, prior_name: str, flag_threshold: float | None,
                  z_calibration: ZCalibration | None, prior_fit_threshold: float | None,
                  sampling_seconds: float) -> SliceResult:
    """A slice's maps, scores and verdict from its posterior run."""
    start = time.perf_counter()
    acq = prepared.acquisition
    mean = torch.from_numpy(run.mean)[None, None].to(acq.device)
    residual = model.adjoint(model.residual(mean) / model.variance).abs().squeeze().cpu().numpy().astype(np.float32)
    fbp = acq.operator.fbp(acq.y, filter="shepp-logan")
    recon_hu = np.asarray(prior.x_to_hu(run.mean), np.float32)
    scored = score_slice(run.energy, recon_hu, settings.patch, settings.sigma_window, nats_threshold=flag_threshold,
                         z_calibration=z_calibration, forced_nats=settings.flag_threshold)
    fit_score = prior_fit_score(run.energy, recon_hu, settings.sigma_window)
    prior_fit = None if prior_fit_threshold is None else judge(fit_score, prior_fit_threshold)
    return SliceResult(
        recon_hu=recon_hu,
        posterior_std_hu=np.asarray(run.std * abs(prior.config.hu_scale), np.float32),
        fbp_hu=mu_to_hu_image(fbp, acq.mu_water_per_mm),
        residual_backprojection=residual,
        energy=run.energy,
        kl_map=scored.kl_map,
        score=scored.score,
        total_kl=scored.kl_map.total,
        total_kl_all_sigma=run.energy.total(),
        flagged=scored.flagged and not is_mismatch(prior_fit),
        flag_threshold=scored.nats_threshold,
        pixel_spacing_mm=prepared.pixel_spacing_mm,
        settings=settings,
        prior_name=prior_name,
        seconds=sampling_seconds + time.perf_counter() - start,
        original_hu=prepared.original_hu,
        notes=prepared.notes + run.notes,
        z_map=scored.z_map,
        z_threshold=scored.z_threshold,
        grid_transform=prepared.grid,
        geometry_warnings=list(prepared.geometry_warnings),
        prior_fit_score=fit_score,
        prior_fit=prior_fit,
    )


@dataclass
class AnalyzedSlice:
    planned: PlannedSeries
    index: int
    result: SliceResult


def _analyze_each(items: Iterable[tuple[T, PreparedSlice]], n: int, loaded: LoadedPrior, settings: AnalysisSettings,
                  slice_batch: int | None, progress: Callable[[int, int], None] | None,
                  cancel: threading.Event | None, escalation: Escalation | None) -> Iterator[tuple[T, SliceResult]]:
    """Analyse the items in order, up to `slice_batch` (None: `auto_slice_batch`) consecutive slices that
    can share a batch at a time, and yield each result, in order, as soon as it and those before it are done.

    Two stages: the escalated slices of several stage-1 batches are pooled until their added chains fill a
    forward pass of stage 1's size (or the geometry changes, or the items end), so stage 2 does not run
    half-empty passes; the results behind a pooled slice wait for it. Progress counts stage 1's steps for
    every slice, and adds the escalated slices' steps as they become known."""
    rule = None if escalation is None else escalation_rule(loaded.calibration, settings, escalation)
    size = auto_slice_batch(settings, loaded.device) if slice_batch is None else slice_batch
    nats_threshold = loaded.calibration.nats_threshold(settings)
    z_calibration = loaded.calibration.z_calibration(settings)
    fit_threshold = loaded.calibration.prior_fit_threshold(settings)
    chains_per_pass = settings.samples * size
    total = settings.step_count * n
    done = 0
    ordered: list[list] = []
    """[key, result] in input order; a pooled slice's result is replaced once its chains are added."""
    pool: list[tuple[int, _Escalating]] = []
    """Escalated slices waiting for stage 2, with their place in `ordered`."""

    def report(steps: int, _total: int) -> None:
        if progress is not None:
            progress(done + steps, total)

    def add_pooled_chains() -> None:
        nonlocal done, total
        assert rule is not None
        added = rule.added_steps * len(pool)
        total += added
        finals = _add_chains([w for _, w in pool], loaded.prior, rule, loaded.name, chains_per_pass, report, cancel)
        for (place, _), final in zip(pool, finals):
            ordered[place][1] = final
        done += added
        pool.clear()

    yielded = 0
    for group in batch_groups(items, size):
        if pool and not can_share_batch(pool[0][1].prepared, group[0][1]):
            add_pooled_chains()
        results, waiting = _stage1([p for _, p in group], loaded.prior, settings, loaded.name, nats_threshold,
                                   z_calibration, fit_threshold, rule, report, cancel)
        done += settings.step_count * len(group)
        pool.extend((len(ordered) + w.index, w) for w in waiting)
        ordered.extend([key, result] for (key, _), result in zip(group, results))
        if rule is not None and len(pool) * rule.added_chains >= chains_per_pass:
            add_pooled_chains()
        first_pooled = min((place for place, _ in pool), default=len(ordered))
        while yielded < first_pooled:
            yield ordered[yielded][0], ordered[yielded][1]
            ordered[yielded] = [None, None]  # yielded: nothing keeps it here
            yielded += 1
    if pool:
        add_pooled_chains()
    for key, result in ordered[yielded:]:
        yield key, result


def analyze_slices(
    plan: SeriesPlan,
    loaded: LoadedPrior,
    settings: AnalysisSettings,
    *,
    slice_batch: int | None = None,
    escalation: Escalation | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[AnalyzedSlice]:
    """Measure and analyse every planned slice in order, and yield each result as soon as it is done.

    Thresholds and the healthy reference come from the prior's calibration for `settings`.
    Up to `slice_batch` consecutive slices of one geometry share each forward pass (None: as many
    as fill CHAINS_PER_BATCH on the device); their results come together. `progress(done, total)`
    counts sampler steps over the whole plan; setting `cancel` stops the run within one step
    (AnalysisCancelled). `escalation` runs two stages (`klviewer.inference.escalation`): `settings`
    are stage 1's, and its thresholds must be calibrated for both stages.
    """
    prepared = (((planned, index), prepare_slice(planned.series, index, loaded.prior, settings, loaded.device))
                for planned in plan.series for index in planned.indices)
    for (planned, index), result in _analyze_each(prepared, plan.n_slices, loaded, settings, slice_batch, progress, cancel,
                                                      escalation):
        yield AnalyzedSlice(planned, index, result)


def analyze_measurements(
    measurements: MeasurementSet,
    loaded: LoadedPrior,
    settings: AnalysisSettings,
    *,
    slice_batch: int | None = None,
    escalation: Escalation | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[MeasuredSlice, SliceResult]]:
    """As `analyze_slices`, for measurements already prepared (several priors on the same measurements)."""
    items = ((m, m.prepared) for m in measurements.slices)
    yield from _analyze_each(items, len(measurements), loaded, settings, slice_batch, progress, cancel, escalation)
