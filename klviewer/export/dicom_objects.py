"""DICOM objects for one case, built with highdicom on the source images' own grid.

- Parametric Map: one float32 frame per analysed slice, the KL (nats) of the patch covering each
  pixel, with a Real World Value Mapping in nats (UCUM `{nat}`), referencing each source
  instance; it overlays the source series in a PACS.
- Segmentation: binary, one segment "KL above the flag threshold", the same patches the app
  outlines.
- Secondary Capture: per slice, the source image with the overlay and a colour bar burned in,
  for viewers that show neither of the above.

Source datasets are read with pydicom and checked against the analysis record before use;
`DicomSkip` says why a case gets no DICOM objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from klviewer import __version__
from klviewer.errors import KlviewerInputError
from klviewer.export.geometry import patient_orientation
from klviewer.io.dicom import read_bounded_dataset
from klviewer.results.reader import SliceEntry

NATS = Code("{nat}", "UCUM", "nat")
LOCAL_SCHEME = "99KLVIEWER"
OUT_OF_DISTRIBUTION = Code("KLOOD", LOCAL_SCHEME, "Patch with KL above the flag threshold")
SERIES_NUMBERS = {"pm": 9001, "seg": 9002, "sc": 9003}
"""Series numbers of the derived series (the same in every case; the UIDs tell them apart)."""

_EQUIPMENT = {
    "manufacturer": "klviewer",
    "manufacturer_model_name": "klviewer KLIP",
    "software_versions": __version__,
    "device_serial_number": f"klviewer-{__version__}",
}


class DicomSkip(Exception):
    """The case cannot get DICOM objects; the message says why."""


_NOT_DICOM = {
    "array": "the source is an array image (.npy/.npz): there is no DICOM series to reference",
    "sinogram": "the source is a sinogram: there is no DICOM image series to reference",
}


def load_sources(slices: Sequence[SliceEntry], *, pixels: bool) -> list[Dataset]:
    """The source dataset of every slice, checked to be the single-frame instance the analysis used."""
    datasets = []
    for entry in slices:
        kind = entry.source_kind
        if kind != "dicom":
            raise DicomSkip(_NOT_DICOM.get(str(kind), "the results do not record a DICOM source for this case "
                                                       "(made by an older klviewer?)"))
        if not entry.source_file:
            raise DicomSkip(f"slice {entry.slice_index}: no source file recorded")
        path = Path(entry.source_file)
        if not path.is_file():
            raise DicomSkip(f"source file {path} not found (moved, or a relative path from another working folder)")
        try:
            ds = read_bounded_dataset(path)
        except KlviewerInputError as exc:
            raise DicomSkip(f"cannot read source file: {exc}") from exc
        if not pixels and "PixelData" in ds:
            del ds.PixelData
        if str(ds.get("NumberOfFrames", 1) or 1).strip() not in ("1", "1.0"):
            raise DicomSkip(f"{path} is a multi-frame image; the results do not record which frame was analysed")
        if entry.sop_instance_uid and ds.get("SOPInstanceUID") != entry.sop_instance_uid:
            raise DicomSkip(f"{path} now holds instance {ds.get('SOPInstanceUID')}, not the analysed {entry.sop_instance_uid}")
        datasets.append(ds)
    if len({ds.get("SeriesInstanceUID") for ds in datasets}) > 1:
        raise DicomSkip("the case's slices come from more than one series")
    if len({(ds.get("Rows"), ds.get("Columns")) for ds in datasets}) > 1:
        raise DicomSkip("the case's source slices differ in size")
    return datasets


def derive_frame_of_reference(datasets: Sequence[Dataset]) -> str | None:
    """Give sources without a FrameOfReferenceUID one, derived from their SeriesInstanceUID (the same
    series always gets the same UID), and say so; None when they all have one.

    The Parametric Map and Segmentation IODs require a Frame of Reference. A series without one
    (old or secondary-capture-like CT) still has its slices' positions and orientation, so the maps
    can be placed on it; the derived UID ties the derived objects together, not to other series.
    Only the in-memory copies are changed, never the source files.
    """
    missing = [ds for ds in datasets if not ds.get("FrameOfReferenceUID")]
    if not missing:
        return None
    seed = str(datasets[0].get("SeriesInstanceUID", "") or datasets[0].get("SOPInstanceUID", ""))
    uid = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"klviewer frame of reference {seed}").int)
    for ds in missing:
        ds.FrameOfReferenceUID = uid
        if "PositionReferenceIndicator" not in ds:
            ds.PositionReferenceIndicator = ""
    return ("the source series has no Frame of Reference UID: the Parametric Map and Segmentation use one "
            "derived from its SeriesInstanceUID (the same in every export of this series)")


def add_laterality(obj: Dataset, source: Dataset) -> None:
    """General Series' Laterality is Type 2C: present (the source's value, or empty when unknown) on
    the objects whose IODs ask for it (Parametric Map, Secondary Capture; not Segmentation)."""
    if "Laterality" not in obj:
        obj.Laterality = str(source.get("Laterality", "") or "")


def carry_deidentification(obj: Dataset, source: Dataset) -> None:
    """A source marked PatientIdentityRemoved YES passes the mark on; the Patient module then needs
    the method (Type 1C), which highdicom does not copy: the source's, or a statement that it is unknown."""
    if str(obj.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    if "DeidentificationMethod" not in obj and "DeidentificationMethodCodeSequence" not in obj:
        obj.DeidentificationMethod = str(source.get("DeidentificationMethod", "") or
                                         "by the source's sender; method not recorded")[:64]
        if "DeidentificationMethodCodeSequence" in source:
            obj.DeidentificationMethodCodeSequence = source.DeidentificationMethodCodeSequence


def source_hu(ds: Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float32)


def source_window(ds: Dataset) -> tuple[float, float] | None:
    """The source's own (center, width), when it has a usable one."""
    try:
        center = ds.WindowCenter
        width = ds.WindowWidth
        center = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
        width = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return (center, width) if np.isfinite(center) and np.isfinite(width) and width > 0 else None


def parametric_map(sources: Sequence[Dataset], kl_maps: np.ndarray, *, levels: tuple[float, float],
                   description: str) -> hd.pm.ParametricMap:
    """`kl_maps` is (n, Rows, Columns) float32 KL in nats, frame i on `sources[i]`."""
    values = np.asarray(kl_maps, np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="KL_NATS", lut_explanation="KL divergence of the covering patch (nats)", unit=NATS,
        value_range=(float(values.min()), float(values.max())), slope=1.0, intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=list(sources), pixel_array=values, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["pm"], sop_instance_uid=generate_uid(), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        # LINEAR_EXACT: a KL window may be narrower than 1 nat, which the default LINEAR function forbids.
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(levels[0] + levels[1]) / 2,
                                                         window_width=levels[1] - levels[0],
                                                         voi_lut_function="LINEAR_EXACT")],
        content_label="KL_MAP", content_description=description[:64], series_description="klviewer KL map (nats)",
        **_EQUIPMENT,
    )
    add_laterality(pm, sources[0])
    carry_deidentification(pm, sources[0])
    return pm


def segmentation(sources: Sequence[Dataset], masks: np.ndarray, *, threshold: float, patch: int,
                 prior_sha256: str, rule: str = "nats") -> hd.seg.Segmentation:
    """`masks` is (n, Rows, Columns) bool: pixels in a patch above `threshold` by the flag rule,
    "nats" (the patch's KL) or "z" (its KL z-score against the prior's healthy reference)."""
    parameter = "flag_threshold_nats" if rule == "nats" else "flag_threshold_kl_z"
    algorithm = hd.AlgorithmIdentificationSequence(
        name="klviewer KLIP", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={parameter: f"{threshold:.6g}", "patch_px": str(patch), "prior_sha256": prior_sha256[:64]},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="KL above threshold",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=OUT_OF_DISTRIBUTION, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=np.asarray(masks, bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["seg"], sop_instance_uid=generate_uid(),
        instance_number=1, content_label="KL_FLAGGED",
        content_description=(f"patches with KL above {threshold:.4g} nats" if rule == "nats"
                             else f"patches with KL z-score above {threshold:.4g}")[:64],
        series_description="klviewer patches above the KL flag threshold",
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(LOCAL_SCHEME, name="klviewer local codes")],
        **_EQUIPMENT,
    )
    carry_deidentification(seg, sources[0])
    return seg


def secondary_capture(source: Dataset, rgb: np.ndarray, *, series_uid: str, instance_number: int) -> hd.sc.SCImage:
    """The rendered overlay (uint8 RGB, burned-in colour bar and caption) in the source's patient and study."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb, np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sc"], sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=_EQUIPMENT["manufacturer"],
        patient_orientation=patient_orientation(_floats(source.get("ImageOrientationPatient"))),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian, series_description="klviewer KL overlay",
    )
    sc.BurnedInAnnotation = "YES"
    sc.SourceImageSequence = [_reference(source)]
    add_laterality(sc, source)
    carry_deidentification(sc, source)
    return sc


def unambiguous_names(ds: Dataset) -> Dataset:
    """`ds` (an in-memory copy of a source, never written back) with its one-component person names
    ending in a caret: the same name in DICOM (trailing separators may be left out, PS3.5 6.2.1.2), and
    highdicom no longer warns on stderr, for every object it makes, that "ANONYMOUS" may be malformed."""
    for keyword in ("PatientName", "ReferringPhysicianName"):
        value = str(ds.get(keyword, "") or "")
        if value and "^" not in value:
            setattr(ds, keyword, value + "^")
    return ds


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _floats(value: object) -> list[float] | None:
    try:
        return [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
