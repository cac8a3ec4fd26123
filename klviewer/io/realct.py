"""Real CT for development, tests and benchmarks: where it lives, what each source holds.

Nothing here downloads. `make data` fetches the packages (pip download, apt-get download) and
calls `python -m klviewer.io.realct unpack-pycerr | install-invesalius` to lay the CT out under
`data_dir()` (git-ignored; `KLVIEWER_DATA_DIR` overrides). The pydicom and pydicom-data slices
come with the dev install. docs/real_ct_data.md describes every source with numbers.

`available_cases` lists what is present, one case per scan, each with the patient it belongs to,
so a benchmark can split by patient; `load_case` opens one as a Series, with the tumour mask
from its RTSTRUCT when it has one. The pycerr data is CC BY-NC 3.0: tests and benchmarks only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.io.loader import open_paths
from klviewer.io.rtstruct import read_rtstruct, roi_masks
from klviewer.io.study import Series

DATA_DIR_ENV = "KLVIEWER_DATA_DIR"
PYCERR = "pycerr"
INVESALIUS = "invesalius"
PYDICOM = "pydicom"
MAKE_TARGETS = {PYCERR: "make data-pycerr", INVESALIUS: "make data-invesalius"}
NOTICE = "NOTICE.md"

# The pycerr wheel's radiomics phantom: 4 patients, CT images + one RTSTRUCT each.
PYCERR_PATIENT_IMAGES = {"pat_1": 60, "pat_2": 41, "pat_3": 46, "pat_4": 56}
_PYCERR_MEMBER = re.compile(
    r"cerr/datasets/(?:radiomics_phantom_dicom/(?P<dicom>(?:pat_[1-4]/DCM_(?:IMG|RS)_\d{5}\.dcm)|README_LICENSE\.txt)"
    r"|sample_ct/dosimetric_model_test_data/(?P<nifti>scan\.nii))"
)
MAX_MEMBER_BYTES = 64 << 20
INVESALIUS_DOC = Path("usr/share/doc/invesalius-examples")

# pydicom's and pydicom-data's real CT slices: file name -> anatomy (693_J2KR is 693_UNCR again).
PYDICOM_SLICES = {
    "693_UNCR.dcm": "head",
    "eCT_Supplemental.dcm": "head",
    "explicit_VR-UN.dcm": "abdomen",
    "bad_sequence.dcm": "neck",
    "CT_small.dcm": "neck",
    "J2K_pixelrep_mismatch.dcm": "head",
}


@dataclass(frozen=True)
class RealCtCase:
    """One real CT scan that can be opened; `patient_id` is the key to split train/test by."""

    case_id: str
    source: str
    patient_id: str
    paths: tuple[Path, ...]
    anatomy: str
    licence: str
    rtstruct: Path | None = None


@dataclass
class RealCtVolume:
    case: RealCtCase
    series: Series
    tumour: np.ndarray | None
    """Boolean (n_slices, H, W) on the series' grid: the union of the RTSTRUCT's GTVs; None without one."""


def data_dir() -> Path:
    """Where `make data` puts real CT: $KLVIEWER_DATA_DIR, else data/realct in the source checkout."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "data" / "realct"


def available_cases(root: Path | None = None) -> list[RealCtCase]:
    """Every real CT scan present: pydicom(-data) slices, then pycerr, then InVesalius."""
    root = data_dir() if root is None else root
    return _pydicom_cases() + _pycerr_cases(root / PYCERR) + _invesalius_cases(root / INVESALIUS)


def missing_sources(root: Path | None = None) -> dict[str, str]:
    """Sources not fetched yet -> the make target that fetches them."""
    present = {case.source.split("-")[0] for case in available_cases(root)}
    return {source: target for source, target in MAKE_TARGETS.items() if source not in present}


def load_case(case: RealCtCase) -> RealCtVolume:
    """Open a case as one Series, with its tumour mask when it has an RTSTRUCT."""
    catalog = open_paths(list(case.paths))
    series_list = catalog.all_series()
    if case.rtstruct is None:
        if len(series_list) != 1:
            raise KlviewerInputError(case.paths[0], f"case {case.case_id} holds {len(series_list)} series; expected one")
        return RealCtVolume(case, series_list[0], None)
    tumours = [roi for roi in read_rtstruct(case.rtstruct) if "GTV" in roi.name.upper() or roi.interpreted_type.upper() == "GTV"]
    if not tumours:
        raise KlviewerInputError(case.rtstruct, f"case {case.case_id}: the structure set holds no GTV")
    series = next((s for s in series_list if s.uid == tumours[0].referenced_series_uid), None)
    if series is None:
        raise KlviewerInputError(case.rtstruct, f"case {case.case_id}: the series the structure set references is not there")
    return RealCtVolume(case, series, np.logical_or.reduce([roi_masks(roi, series) for roi in tumours]))


def _pydicom_cases() -> list[RealCtCase]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    cases = []
    for name, anatomy in PYDICOM_SLICES.items():
        found = get_testdata_file(name, download=False)
        if found is None:
            continue
        path = Path(str(found))
        patient = str(dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", "") or path.stem)
        source = "pydicom-data" if "data_store" in path.parts else PYDICOM
        cases.append(RealCtCase(f"{source}/{path.stem}", source, f"{PYDICOM}:{patient}", (path,), anatomy,
                                "as distributed with pydicom / pydicom-data (MIT; see their notices)"))
    return cases


def _pycerr_cases(folder: Path) -> list[RealCtCase]:
    licence = "CC BY-NC 3.0 (Radiomics Digital Phantom, CancerData): tests and benchmarks only"
    cases = []
    for patient in PYCERR_PATIENT_IMAGES:
        structure_sets = sorted((folder / patient).glob("DCM_RS_*.dcm"))
        if len(structure_sets) == 1:
            cases.append(RealCtCase(f"{PYCERR}/{patient}", PYCERR, f"{PYCERR}:{patient}", (folder / patient,), "chest",
                                    licence, structure_sets[0]))
    scan = folder / "sample_ct" / "scan.nii"
    if scan.is_file():
        cases.append(RealCtCase(f"{PYCERR}/sample_ct", f"{PYCERR}-nifti", f"{PYCERR}:sample_ct", (scan,), "chest",
                                "as pycerr (GPL-3 package; the scan's own licence is not stated): tests and benchmarks only"))
    return cases


def _invesalius_cases(folder: Path) -> list[RealCtCase]:
    project = folder / "Cranium.inv3"
    if not project.is_file():
        return []
    return [RealCtCase(f"{INVESALIUS}/Cranium", INVESALIUS, f"{INVESALIUS}:cranium", (project,), "head", "GPL-2 (Debian invesalius-examples)")]


# --- laying the data out (called by `make data-*`) ---------------------------------------------


def unpack_pycerr(wheel: Path, root: Path) -> Path:
    """Copy the CT (and nothing else) out of a pycerr wheel into root/pycerr; returns that folder."""
    target = root / PYCERR
    partial = _fresh(root / f".{PYCERR}-partial")
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            match = _PYCERR_MEMBER.fullmatch(info.filename)
            if match is None:
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise KlviewerInputError(wheel, f"member {info.filename} is {info.file_size} bytes; not the pycerr data expected")
            relative = match["dicom"] or f"sample_ct/{match['nifti']}"
            destination = partial / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(info))
    for patient, images in PYCERR_PATIENT_IMAGES.items():
        found = (len(list((partial / patient).glob("DCM_IMG_*.dcm"))), len(list((partial / patient).glob("DCM_RS_*.dcm"))))
        if found != (images, 1):
            raise KlviewerInputError(wheel, f"{patient}: found {found[0]} images and {found[1]} structure sets; expected {images} and 1")
    (partial / NOTICE).write_text(_pycerr_notice(wheel), encoding="utf-8")
    return _replace(partial, target)


def install_invesalius(extracted: Path, root: Path) -> Path:
    """Copy Cranium.inv3 and the package's copyright out of an extracted invesalius-examples .deb."""
    from klviewer.io.inv3 import read_inv3

    doc = extracted / INVESALIUS_DOC
    project = doc / "examples" / "Cranium.inv3"
    read_inv3(project)  # refuse to install what the reader cannot open
    partial = _fresh(root / f".{INVESALIUS}-partial")
    shutil.copyfile(project, partial / project.name)
    shutil.copyfile(doc / "copyright", partial / "copyright")
    with gzip.open(doc / "changelog.Debian.gz", "rt", encoding="utf-8") as changelog:
        version = changelog.readline().strip()
    (partial / NOTICE).write_text(
        "# InVesalius example: Cranium.inv3\n\n"
        f"From the Debian package invesalius-examples ({version}), fetched by `make data-invesalius`.\n"
        "Licence: GPL-2 (see `copyright`). A 108-slice head CT; never commit it to this repository.\n"
        f"sha256 of Cranium.inv3: {_sha256(project)}\n",
        encoding="utf-8",
    )
    return _replace(partial, root / INVESALIUS)


def _pycerr_notice(wheel: Path) -> str:
    return (
        "# pycerr CT data (radiomics phantom: 4 lung-cancer patients; sample_ct: 3 chest slices)\n\n"
        f"Unpacked from {wheel.name} (sha256 {_sha256(wheel)}), fetched by `make data-pycerr` with\n"
        "`pip download --no-deps`; the pycerr package itself is not installed.\n\n"
        "Licence of the radiomics phantom: Creative Commons Attribution-NonCommercial 3.0 Unported\n"
        "(see README_LICENSE.txt, from the wheel, for the attribution and citations). klviewer uses it\n"
        "only in tests and benchmarks, never ships it, and never commits it to the repository.\n"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _replace(partial: Path, target: Path) -> Path:
    """Move a completed folder into place; an older copy goes only when it is one of ours."""
    if target.exists():
        if not (target / NOTICE).is_file():
            raise KlviewerInputError(target, f"exists and was not written by klviewer (no {NOTICE}); not replaced")
        shutil.rmtree(target)
    partial.rename(target)
    return target


def describe(volume: RealCtVolume) -> dict[str, object]:
    """The numbers docs/real_ct_data.md reports for one case."""
    series = volume.series
    hu = series.volume()
    entry: dict[str, object] = {
        "case": volume.case.case_id,
        "patient": volume.case.patient_id,
        "anatomy": volume.case.anatomy,
        "slices": series.n_slices,
        "size": list(series.image_shape),
        "pixel_spacing_mm": series.pixel_spacing_mm,
        "slice_thickness_mm": series.slice_thickness_mm,
        "hu_range": [float(hu.min()), float(hu.max())],
    }
    if volume.tumour is not None:
        from klviewer.io.rtstruct import mask_volume_ml

        per_slice = volume.tumour.any(axis=(1, 2))
        entry["tumour_ml"] = round(mask_volume_ml(volume.tumour, series), 2)
        entry["tumour_slices"] = int(per_slice.sum())
        entry["tumour_free_slices"] = int((~per_slice).sum())
        entry["tumour_hu_median"] = float(np.median(hu[volume.tumour]))
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klviewer.io.realct", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help=f"data folder (default ${DATA_DIR_ENV} or data/realct)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("unpack-pycerr", help="unpack the CT of a downloaded pycerr wheel").add_argument("wheel", type=Path)
    sub.add_parser("install-invesalius", help="copy Cranium.inv3 out of an extracted .deb").add_argument("extracted", type=Path)
    sub.add_parser("list", help="list the real CT present, with numbers")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")  # hashed UIDs in bad_sequence.dcm
    root = data_dir() if args.root is None else args.root
    try:
        if args.command == "unpack-pycerr":
            print(f"pycerr CT in {unpack_pycerr(args.wheel, root)}")
        elif args.command == "install-invesalius":
            print(f"InVesalius head CT in {install_invesalius(args.extracted, root)}")
        else:
            for case in available_cases(root):
                print(describe(load_case(case)))
            for source, target in missing_sources(root).items():
                print(f"{source}: not fetched; run `{target}`")
    except KlviewerInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
