"""Procedural phantoms: determinism, HU realism, ground-truth masks, parameters and the .npz format."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from klviewer.errors import KlviewerInputError
from klviewer.phantoms import (
    FOV_MM,
    Phantom,
    Tissue,
    load_phantom_npz,
    make_phantom,
    make_phantom_set,
    save_phantom_npz,
)
from klviewer.phantoms.phantom import HU_MAX, HU_MIN

KINDS = ("healthy", "lesion", "metal", "shift")


@lru_cache(maxsize=None)
def phantom(kind: str, size: int = 128, seed: int = 0, **params: object) -> Phantom:
    """Cached: the tests only read phantoms."""
    return make_phantom(kind, size=size, seed=seed, **params)


def tissue_core(p: Phantom, tissue: Tissue) -> np.ndarray:
    """Pixels of one tissue away from its edges, where partial volume does not bias the HU."""
    return ndimage.binary_erosion(p.labels == tissue)


# ---------------------------------------------------------------- determinism and format


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_phantoms(kind: str) -> None:
    a, b = make_phantom(kind, size=64, seed=3), make_phantom(kind, size=64, seed=3)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.ood_mask, b.ood_mask)
    np.testing.assert_array_equal(a.body_mask, b.body_mask)
    assert a.meta == b.meta


@pytest.mark.parametrize("kind", KINDS)
def test_different_seeds_give_different_phantoms(kind: str) -> None:
    assert not np.array_equal(phantom(kind, 64, 0).hu, phantom(kind, 64, 1).hu)


def test_anatomy_varies_with_seed() -> None:
    areas = [phantom("healthy", 64, seed).body_mask.sum() for seed in range(6)]
    livers = [(phantom("healthy", 64, seed).labels == Tissue.LIVER).sum() for seed in range(6)]
    assert max(areas) > 1.1 * min(areas)
    assert max(livers) > 1.1 * min(livers)


@pytest.mark.parametrize("kind", KINDS)
def test_hu_is_integer_valued_float32_within_the_ct_range(kind: str) -> None:
    p = phantom(kind, 64)
    assert p.hu.dtype == np.float32 and p.hu.shape == (64, 64)
    assert np.array_equal(p.hu, np.rint(p.hu))
    assert HU_MIN <= p.hu.min() and p.hu.max() <= HU_MAX
    assert p.body_mask.dtype == bool and p.ood_mask.dtype == bool
    assert p.kind == kind
    json.dumps(p.meta)


@pytest.mark.parametrize("size", [64, 256])
def test_sizes_share_the_field_of_view(size: int) -> None:
    p = phantom("healthy", size, 2)
    assert p.hu.shape == (size, size)
    assert p.pixel_spacing_mm == pytest.approx(FOV_MM / size)
    body_area_mm2 = p.body_mask.sum() * p.pixel_spacing_mm**2
    reference = phantom("healthy", 128, 2)
    assert body_area_mm2 == pytest.approx(reference.body_mask.sum() * reference.pixel_spacing_mm**2, rel=0.05)


# ---------------------------------------------------------------- healthy anatomy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_hu_bands(seed: int) -> None:
    p = phantom("healthy", 128, seed)
    bands = {
        Tissue.FAT: (-120, -80),
        Tissue.MUSCLE: (40, 60),
        Tissue.LIVER: (50, 70),
        Tissue.SPLEEN: (40, 56),
        Tissue.KIDNEY_CORTEX: (22, 42),
        Tissue.CANCELLOUS_BONE: (150, 350),
    }
    for tissue, (low, high) in bands.items():
        median = np.median(p.hu[tissue_core(p, tissue)])
        assert low <= median <= high, f"{tissue.name}: median {median} outside [{low}, {high}]"
    # Without contrast the liver is brighter than the spleen.
    assert np.median(p.hu[tissue_core(p, Tissue.LIVER)]) > np.median(p.hu[tissue_core(p, Tissue.SPLEEN)])
    outside = ndimage.binary_erosion(~p.body_mask, iterations=2)
    assert abs(np.median(p.hu[outside]) + 1000) <= 5
    assert (p.hu[p.body_mask] < -800).any(), "bowel gas should be present"
    assert p.hu[p.labels == Tissue.CORTICAL_BONE].max() > 500


def test_healthy_has_empty_ood_mask_and_sensible_body() -> None:
    p = phantom("healthy", 128, 4)
    assert not p.ood_mask.any()
    fraction = p.body_mask.mean()
    assert 0.2 < fraction < 0.7
    assert not p.body_mask[0].any() and not p.body_mask[-1].any(), "the body must fit in the field of view"


# ---------------------------------------------------------------- lesions


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_mask_lies_inside_liver_and_body(seed: int) -> None:
    p = phantom("lesion", 128, seed)
    assert p.ood_mask.any()
    assert p.body_mask[p.ood_mask].all()
    assert (p.labels[p.ood_mask] == Tissue.LIVER).all()
    lesions = p.meta["lesions"]
    assert 1 <= len(lesions) <= 3
    assert sum(lesion["area_px"] for lesion in lesions) == p.ood_mask.sum()
    for lesion in lesions:
        assert lesion["radius_mm"] >= 4.0 and abs(lesion["contrast_hu"]) >= 40
        assert p.ood_mask[tuple(lesion["center_px"])]


@pytest.mark.parametrize("contrast", [-60.0, 45.0])
def test_lesion_contrast_in_the_image_matches_the_request(contrast: float) -> None:
    p = phantom("lesion", 128, 5, n_lesions=1, radius_mm=(9.0, 11.0), contrast_hu=contrast)
    healthy = phantom("healthy", 128, 5)
    core = ndimage.binary_erosion(p.ood_mask)
    # Paired with the healthy phantom of the same seed, the difference is the lesion alone
    # (where it replaced parenchyma; over a displaced vessel it is larger).
    parenchyma = core & (healthy.labels == Tissue.LIVER)
    assert np.median(p.hu[parenchyma] - healthy.hu[parenchyma]) == pytest.approx(contrast, abs=0.1 * abs(contrast))
    # Measured the way a reader would: lesion core against the surrounding liver.
    ring = ndimage.binary_dilation(p.ood_mask, iterations=6) & ~ndimage.binary_dilation(p.ood_mask, iterations=2)
    ring &= p.labels == Tissue.LIVER
    measured = np.median(p.hu[core]) - np.median(p.hu[ring])
    assert measured == pytest.approx(contrast, abs=12.0)
    assert p.meta["lesions"][0]["type"] == ("hypodense" if contrast < 0 else "hyperdense")


def test_lesion_phantom_is_the_healthy_patient_plus_lesions() -> None:
    p, healthy = phantom("lesion", 128, 6), phantom("healthy", 128, 6)
    near = ndimage.binary_dilation(p.ood_mask, iterations=2)
    np.testing.assert_array_equal(p.hu[~near], healthy.hu[~near])
    np.testing.assert_array_equal(p.body_mask, healthy.body_mask)


def test_lesion_diameter_is_at_least_the_requested_minimum() -> None:
    p = phantom("lesion", 256, 7, n_lesions=3, radius_mm=(4.0, 6.0))
    components, count = ndimage.label(p.ood_mask)
    assert count == 3
    for lesion in p.meta["lesions"]:
        assert 4.0 <= lesion["radius_mm"] <= 6.0
        pixels = components == components[tuple(lesion["center_px"])]
        equivalent_diameter = 2 * np.sqrt(pixels.sum() / np.pi) * p.pixel_spacing_mm
        assert equivalent_diameter >= 2 * lesion["radius_mm"] - p.pixel_spacing_mm
        assert equivalent_diameter >= 6.0


def test_lesion_parameters_are_honoured() -> None:
    p = phantom("lesion", 128, 8, n_lesions=2, radius_mm=5.0, contrast_hu=-70.0)
    assert [lesion["radius_mm"] for lesion in p.meta["lesions"]] == [5.0, 5.0]
    assert [lesion["contrast_hu"] for lesion in p.meta["lesions"]] == [-70.0, -70.0]
    assert p.meta["params"] == {"n_lesions": 2, "radius_mm": 5.0, "contrast_hu": -70.0}


def test_lesion_phantom_at_64_pixels() -> None:
    p = phantom("lesion", 64, 0)
    assert p.ood_mask.any() and (p.labels[p.ood_mask] == Tissue.LIVER).all()


# ---------------------------------------------------------------- metal


@pytest.mark.parametrize("implant", ["screws", "clips"])
@pytest.mark.parametrize("seed", [0, 1])
def test_metal_is_bright_and_masked(implant: str, seed: int) -> None:
    p = phantom("metal", 128, seed, implant=implant)
    bright = p.hu > 2000
    assert bright.any()
    assert p.ood_mask[bright].all()
    assert p.body_mask[p.ood_mask].all()
    assert (p.labels == Tissue.METAL).any()
    assert p.meta["metal"]["implant"] == implant


def test_metal_mask_holds_every_pixel_the_implant_changes_by_more_than_the_threshold() -> None:
    p, healthy = phantom("metal", 128, 2, implant="screws"), phantom("healthy", 128, 2)
    threshold = p.meta["metal"]["artifact_threshold_hu"]
    change = np.abs(p.hu - healthy.hu)
    assert change[p.body_mask & ~p.ood_mask].max() <= threshold
    # Streaks reach well beyond the screws themselves.
    assert p.meta["metal"]["artifact_px"] > p.meta["metal"]["metal_px"]
    assert p.meta["metal"]["max_abs_artifact_hu"] > 300


def test_metal_threshold_parameter_changes_the_mask() -> None:
    loose = phantom("metal", 128, 3, implant="screws", artifact_threshold_hu=50.0)
    strict = phantom("metal", 128, 3, implant="screws", artifact_threshold_hu=300.0)
    assert loose.ood_mask.sum() > strict.ood_mask.sum()
    assert (strict.ood_mask <= loose.ood_mask).all()


# ---------------------------------------------------------------- shifts


def test_thorax_shift_has_lungs_and_a_whole_body_mask() -> None:
    p, healthy = phantom("shift", 128, 0), phantom("healthy", 128, 0)
    np.testing.assert_array_equal(p.ood_mask, p.body_mask)
    lung = p.body_mask & (p.hu > -950) & (p.hu < -700)
    assert lung.sum() > 0.2 * p.body_mask.sum()
    healthy_lung = healthy.body_mask & (healthy.hu > -950) & (healthy.hu < -700)
    assert healthy_lung.sum() < 0.05 * healthy.body_mask.sum()
    assert (p.labels == Tissue.HEART).any()
    assert p.meta["anatomy"]["region"] == "thorax"


def test_enhanced_shift_is_the_same_patient_with_iodine() -> None:
    p, healthy = phantom("shift", 128, 1, anatomy="enhanced"), phantom("healthy", 128, 1)
    np.testing.assert_array_equal(p.labels, healthy.labels)
    np.testing.assert_array_equal(p.ood_mask, p.body_mask)
    for tissue in (Tissue.LIVER, Tissue.KIDNEY_CORTEX):
        core = tissue_core(p, tissue)
        assert np.median(p.hu[core]) > np.median(healthy.hu[core]) + 30
    assert p.meta["contrast_phase"] == "portal-venous"


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(("kind", "params", "words"), [
    ("lesion", {"radius": 5}, "radius"),
    ("healthy", {"radius_mm": 5}, "radius_mm"),
    ("metal", {"implant": "hip"}, "implant"),
    ("lesion", {"contrast_hu": 0}, "contrast_hu"),
    ("lesion", {"radius_mm": (9, 3)}, "radius_mm"),
    ("lesion", {"n_lesions": 0}, "n_lesions"),
    ("shift", {"anatomy": "brain"}, "anatomy"),
    ("tumour", {}, "kind"),
])
def test_bad_requests_are_refused_clearly(kind: str, params: dict, words: str) -> None:
    with pytest.raises(KlviewerInputError, match=words):
        make_phantom(kind, size=64, **params)


@pytest.mark.parametrize("size", [16, 64.0, 4096])
def test_bad_sizes_are_refused(size: object) -> None:
    with pytest.raises(KlviewerInputError, match="size"):
        make_phantom("healthy", size=size)


def test_impossible_lesion_is_refused() -> None:
    with pytest.raises(KlviewerInputError, match="no room in the liver"):
        make_phantom("lesion", size=64, radius_mm=40.0)


# ---------------------------------------------------------------- sets


def test_phantom_sets_are_deterministic_and_reproducible_member_by_member() -> None:
    first = make_phantom_set("lesion", 3, size=64, seed=9)
    again = make_phantom_set("lesion", 3, size=64, seed=9)
    assert [p.seed for p in first] == [p.seed for p in again]
    assert len({p.seed for p in first}) == 3
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(make_phantom("lesion", 64, first[1].seed).hu, first[1].hu)
    assert make_phantom_set("healthy", 0, size=64) == []


def test_phantom_set_built_by_worker_processes_is_the_serial_set() -> None:
    serial = make_phantom_set("mixed", 5, size=64, seed=3)
    parallel = make_phantom_set("mixed", 5, size=64, seed=3, workers=2)
    assert [(p.kind, p.seed) for p in parallel] == [(p.kind, p.seed) for p in serial]
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.ood_mask, b.ood_mask)
    with pytest.raises(KlviewerInputError, match="workers"):
        make_phantom_set("healthy", 2, size=64, workers=0)


def test_mixed_set_mixes_kinds_independently_of_its_length() -> None:
    mixed = make_phantom_set("mixed", 12, size=64, seed=1)
    assert {p.kind for p in mixed} == set(KINDS)
    shorter = make_phantom_set("mixed", 5, size=64, seed=1)
    assert [p.kind for p in shorter] == [p.kind for p in mixed[:5]]
    assert [p.seed for p in shorter] == [p.seed for p in mixed[:5]]


# ---------------------------------------------------------------- npz files


@pytest.mark.parametrize("kind", ["lesion", "metal"])
def test_npz_round_trip_is_identical(kind: str, tmp_path: Path) -> None:
    p = phantom(kind, 64, 1)
    path = tmp_path / "case.npz"
    save_phantom_npz(p, path)
    q = load_phantom_npz(path)
    for name in ("hu", "body_mask", "ood_mask", "labels"):
        a, b = getattr(p, name), getattr(q, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert (q.kind, q.seed, q.pixel_spacing_mm, q.meta) == (p.kind, p.seed, p.pixel_spacing_mm, p.meta)
    with np.load(path, allow_pickle=False) as data:
        assert {"hu", "body_mask", "ood_mask", "meta"} <= set(data.files)


def test_npz_round_trip_without_labels(tmp_path: Path) -> None:
    p = phantom("healthy", 64, 1)
    bare = Phantom(p.hu, p.body_mask, p.ood_mask, p.kind, p.seed, p.pixel_spacing_mm, p.meta)
    save_phantom_npz(bare, tmp_path / "bare.npz")
    assert load_phantom_npz(tmp_path / "bare.npz").labels is None


def test_npz_missing_key_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    p = phantom("healthy", 64, 1)
    path = tmp_path / "partial.npz"
    np.savez(path, hu=p.hu, body_mask=p.body_mask, meta=np.array("{}"))
    with pytest.raises(KlviewerInputError, match=r"partial\.npz.*ood_mask"):
        load_phantom_npz(path)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    p = phantom("healthy", 64, 1)
    path = tmp_path / "pickled.npz"
    np.savez(path, hu=p.hu, body_mask=p.body_mask, ood_mask=p.ood_mask,
             meta=np.array([{"kind": "healthy"}], dtype=object))
    with pytest.raises(KlviewerInputError, match=r"pickled\.npz.*pickle"):
        load_phantom_npz(path)


@pytest.mark.parametrize(("content", "words"), [
    (None, "not found"),
    (b"not a zip file", "not a readable"),
])
def test_npz_unreadable_files_are_refused(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "broken.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KlviewerInputError, match=rf"broken\.npz.*{words}"):
        load_phantom_npz(path)


def test_npz_with_wrong_dtypes_or_meta_is_refused(tmp_path: Path) -> None:
    p = phantom("healthy", 64, 1)
    path = tmp_path / "odd.npz"
    header = json.dumps({"format": "klviewer.phantom", "version": 1, "kind": "healthy", "seed": 1,
                         "pixel_spacing_mm": 6.25, "meta": {}})
    np.savez(path, hu=p.hu.astype(np.int16), body_mask=p.body_mask, ood_mask=p.ood_mask, meta=np.array(header))
    with pytest.raises(KlviewerInputError, match=r"odd\.npz.*hu must be"):
        load_phantom_npz(path)
    np.savez(path, hu=p.hu, body_mask=p.body_mask, ood_mask=p.ood_mask, meta=np.array("{not json"))
    with pytest.raises(KlviewerInputError, match=r"odd\.npz.*JSON"):
        load_phantom_npz(path)
