"""Hostile-input fuzzing of klviewer's public entry points, each input in its own child process.

    python benchmarks/fuzz.py -n 10000 --seed 17 --jobs 2 --out benchmarks/results/fuzz.md

Six input kinds are built once from small valid seeds (`build_corpus`), then mutated: DICOM files
(bytes and tags), HU arrays with sidecars, sinograms with sidecars, prior folders (config.json and
model.safetensors), a prior's calibration.json, and analyze results folders. The mutations are
the hostile cases that matter for a reader: flipped and cut bytes, runs of zero bytes, lying
sizes in npy, zip and safetensors headers, hostile JSON (deep nesting, 1e999, 2**70, NaN, NUL
characters, wrong types, 50,000-character strings), non-finite arrays, and files replaced by
FIFOs, link loops and links out of the input folder.

Each input runs through the `klviewer` command (`analyze` or `info` for images, `analyze` with
the mutated prior or calibration, `export` for results folders) in a child forked from a warm
parent, under RLIMIT_AS (the parent's address space plus a memory budget) and a wall-clock limit.
Outcomes:
- accepted: exit code 0 (and every score written is finite);
- clean error: exit code 1 or 2, the refusal printed as `klviewer: error: ...`;
- crash: an exception escaped, the process died on a signal, or an accepted run wrote a
  non-finite score;
- hang: still running at the time limit (killed);
- out of memory: MemoryError escaped, or the process died of the memory limit;
- wrote into input: a file of the input folder appeared, changed or vanished.

The children never read from the network: the parent sets HF_HUB_OFFLINE before importing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Callable

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

KINDS = ("dicom", "arrays", "sinograms", "priors", "calibration", "results")
KIND_LABELS = {"dicom": "DICOM", "arrays": "arrays (.npy/.npz + sidecar)", "sinograms": "sinograms + sidecar",
               "priors": "prior folders", "calibration": "calibration.json", "results": "results folders (export)"}
KIND_WEIGHTS = (0.30, 0.17, 0.17, 0.12, 0.10, 0.14)
OUTCOMES = ("accepted", "clean error", "crash", "hang", "out of memory", "wrote into input")
ANALYZE = ["--steps", "2", "--views", "8", "--samples", "1", "--patch", "8", "--seed", "0", "--device", "cpu",
           "--slices", "mid", "--quiet"]
PRIOR_SIZE = 32
EXIT_CRASH, EXIT_OOM = 70, 71


# --- the seed corpus --------------------------------------------------------------------------


def build_corpus(root: Path) -> None:
    """Small valid inputs of every kind under `root` (run in a child, so the parent never starts
    torch's thread pools before forking)."""
    import numpy as np
    import torch
    from pydicom.data import get_testdata_file

    from klviewer.inference.settings import AnalysisSettings
    from klviewer.io.dicom_write import write_ct_series
    from klviewer.phantoms import make_phantom
    from klviewer.priors import EDMUNetPrior, PriorConfig, save_prior
    from klviewer.priors.gaussian import GaussianMixturePrior, GaussianPrior
    from klviewer.results.analyze import run_analysis

    torch.set_num_threads(1)
    torch.manual_seed(0)
    priors = root / "priors"
    unet = EDMUNetPrior(PriorConfig(name="fuzz-unet", architecture="edm-unet", image_size=(PRIOR_SIZE, PRIOR_SIZE),
                                    pixel_spacing_mm=400 / PRIOR_SIZE,
                                    arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4}))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_prior(unet, priors / "unet")
    d = PRIOR_SIZE * PRIOR_SIZE
    a = torch.randn(d, 8, dtype=torch.float64) * 0.05
    save_prior(GaussianPrior(torch.zeros(d), a @ a.T + 0.01 * torch.eye(d), (1, PRIOR_SIZE, PRIOR_SIZE)),
               priors / "gaussian")
    small = 16
    save_prior(GaussianMixturePrior(torch.ones(2), torch.zeros(2, small * small),
                                    torch.eye(small * small).expand(2, -1, -1).clone() * 0.1, (1, small, small)),
               priors / "gmm")

    hu = np.stack([make_phantom("lesion", 48, seed=k).hu for k in range(3)])
    dicom = root / "dicom"
    write_ct_series(hu, dicom / "series", pixel_spacing_mm=8.0, slice_thickness_mm=5.0, patient_id="FZ-1",
                    patient_name="Fuzz^Case", study_description="fuzz", series_description="abdomen")
    for name in ("CT_small.dcm", "693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm"):
        (dicom / name.removesuffix(".dcm")).mkdir(parents=True)
        shutil.copy(get_testdata_file(name), dicom / name.removesuffix(".dcm") / name)

    arrays = root / "arrays"
    (arrays / "npy").mkdir(parents=True)
    np.save(arrays / "npy" / "stack.npy", hu[:2].astype(np.float32))
    (arrays / "npy" / "stack.json").write_text(json.dumps({"pixel_spacing_mm": 8.0, "description": "fuzz stack",
                                                           "shape": [2, 48, 48], "units": "HU", "window": [40, 400]}))
    (arrays / "npz").mkdir()
    np.savez(arrays / "npz" / "image.npz", hu=hu[0].astype(np.int16), meta=np.array(json.dumps({"pixel_spacing_mm": 8.0})))

    sinograms = root / "sinograms"
    (sinograms / "npy").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(sinograms / "npy" / "scan.npy", rng.random((8, 48)).astype(np.float32))
    (sinograms / "npy" / "scan.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 8},
        "detector": {"count": 48, "spacing_mm": 8.0}, "data": {"kind": "line_integrals"},
        "grid": {"size": [32, 32], "pixel_spacing_mm": 12.5}, "description": "fuzz sinogram"}))
    (sinograms / "raw").mkdir()
    counts = rng.integers(100, 5000, size=(8, 48)).astype("<u2")
    counts.tofile(sinograms / "raw" / "c.raw")
    (sinograms / "raw" / "c.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "rad", "values": [0.3 * k for k in range(8)]},
        "detector": {"count": 48, "spacing_mm": 8.0},
        "data": {"kind": "counts", "i0": 5000, "file": "c.raw", "dtype": "uint16", "shape": [8, 48]},
        "grid": {"size": [32, 32], "pixel_spacing_mm": [12.5, 12.5]}}))

    settings = AnalysisSettings(steps=2, views=8, samples=1, patch=8, seed=0, device="cpu")
    results = root / "results"
    run_analysis([dicom / "series", arrays / "npy" / "stack.npy"], results / "run", settings, prior=priors / "unet",
                 slices="mid")
    calibrated = root / "calibration"
    shutil.copytree(priors / "unet", calibrated / "prior")
    _write_calibration(calibrated / "prior", settings, np)


def _write_calibration(prior: Path, settings: Any, np: Any) -> None:
    """A calibration entry for the fuzz settings, with a healthy reference (as `klviewer calibrate` writes)."""
    from klviewer.inference.calibration import calibration_key
    from klviewer.priors.checkpoint import prior_fingerprint

    key = calibration_key(settings)
    reference = {"patch": 8, "pool": 1, "sigma_window": list(key["sigma_window"]), "bin_edges": [1.0, 3.0],
                 "mean": [0.0, 0.5, 1.0], "std": [1.0, 1.0, 1.0], "n_slices": 4, "z_threshold": 3.0}
    entry = {"settings": key, "threshold": 50.0, "fpr": 0.05, "n_healthy": 4, "prior_sha256": prior_fingerprint(prior),
             "healthy_reference": reference}
    (prior / "calibration.json").write_text(json.dumps({"calibrations": [entry]}, indent=2))


# --- mutations --------------------------------------------------------------------------------

HOSTILE_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: None, lambda r: [], lambda r: {}, lambda r: "", lambda r: True, lambda r: 0, lambda r: -1,
    lambda r: 1e308, lambda r: -1e308, lambda r: 2**70, lambda r: -(2**63), lambda r: 1e-320, lambda r: 2**40,
    lambda r: "x" * 50_000, lambda r: "a\u0000b", lambda r: "../../../../etc/passwd", lambda r: "/etc/passwd",
    lambda r: "nan", lambda r: "hf-internal-testing/tiny-unet", lambda r: [1e308] * 3, lambda r: [[[[1]]]],
    lambda r: r.randint(-10, 10**6), lambda r: r.random() * 10 ** r.randint(-5, 30), lambda r: [0, 0],
    lambda r: [100000, 100000], lambda r: {"a": [None, "b"]},
]
JSON_TOKENS = (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 400, b"[" * 5000, b'"\\u0000"', b"\xff\xfe")


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            found.extend(_paths(v, (*prefix, i)))
    return found


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def mutate_json(text: bytes, rng: random.Random) -> bytes:
    """A hostile variant of a JSON document: a value replaced, a key dropped or added, or the text damaged."""
    choice = rng.random()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # an earlier mutation may have left it unparsable or deep
        doc = None
    if doc is None or choice < 0.15:
        cut = rng.randrange(len(text) + 1)
        return text[:cut] + rng.choice(JSON_TOKENS) + text[cut:] if rng.random() < 0.5 else text[:cut]
    if choice < 0.25:
        depth = rng.choice((40, 1000, 100_000))
        return (b"[" * depth + b"1" + b"]" * depth) if rng.random() < 0.3 else json.dumps(
            _set(doc, rng.choice(_paths(doc)), json.loads("[" * min(depth, 900) + "]" * min(depth, 900)))).encode()
    path = rng.choice(_paths(doc)[1:] or [()])
    if choice < 0.35 and path:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return json.dumps(doc).encode()
    if choice < 0.42 and isinstance(doc, dict):
        doc[rng.choice(("extra", "file", "arch", "shape", "unet"))] = rng.choice(HOSTILE_VALUES)(rng)
        return json.dumps(doc).encode()
    value = rng.choice(HOSTILE_VALUES)(rng)
    return json.dumps(_set(doc, path, value)).encode()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flipped, cut, flooded or spliced bytes."""
    data = bytearray(data)
    choice = rng.random()
    if not data:
        return bytes(rng.randbytes(rng.randint(1, 64)))
    if choice < 0.25:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice < 0.4:
        del data[rng.randrange(len(data)):]
    elif choice < 0.55:
        at = rng.randrange(len(data))
        data[at:at] = bytes([rng.choice((0, 0xFF))]) * rng.choice((64, 4096, 1 << 20, 8 << 20))
    elif choice < 0.75:
        at = rng.randrange(max(len(data) - 4, 1))
        data[at:at + 4] = struct.pack("<I", rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE)))
    elif choice < 0.9:
        a, b = sorted(rng.randrange(len(data)) for _ in range(2))
        data[b:b] = data[a:b]
    else:
        data += rng.randbytes(rng.randint(1, 4096))
    return bytes(data)


DICOM_TAGS: list[tuple[str, Callable[[random.Random], Any]]] = [
    ("Rows", lambda r: r.choice((0, 1, 65535, 7))), ("Columns", lambda r: r.choice((0, 65535, 3))),
    ("BitsAllocated", lambda r: r.choice((0, 1, 7, 32, 64, 65535))), ("BitsStored", lambda r: r.choice((0, 17, 64))),
    ("HighBit", lambda r: r.choice((0, 40))), ("PixelRepresentation", lambda r: r.choice((0, 1, 2))),
    ("NumberOfFrames", lambda r: r.choice(("0", "2", "99999", "-1", "abc"))),
    ("SamplesPerPixel", lambda r: r.choice((0, 3, 255))),
    ("PhotometricInterpretation", lambda r: r.choice(("RGB", "PALETTE COLOR", "", "MONOCHROME1"))),
    ("RescaleSlope", lambda r: r.choice(("1e38", "-1e38", "0", "nan", "inf", "1e300"))),
    ("RescaleIntercept", lambda r: r.choice(("1e38", "-3e38", "nan", "1e6"))),
    ("PixelSpacing", lambda r: r.choice((["0", "0"], ["-1", "1"], ["1e300", "1e300"], ["nan", "1"], ["1"]))),
    ("SliceThickness", lambda r: r.choice(("0", "-5", "1e300", "nan"))),
    ("ImagePositionPatient", lambda r: r.choice((["nan", "0", "0"], ["1e308", "0", "0"], ["0"]))),
    ("ImageOrientationPatient", lambda r: r.choice((["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6))),
    ("WindowCenter", lambda r: r.choice(("nan", "1e300", ""))), ("WindowWidth", lambda r: r.choice(("0", "-1", "inf"))),
    ("SOPClassUID", lambda r: r.choice(("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30", "", "1.2"))),
    ("SeriesInstanceUID", lambda r: r.choice(("", "1" * 64, "x"))), ("FrameOfReferenceUID", lambda r: ""),
    ("PatientName", lambda r: r.choice(("A" * 10_000, "a\x00b", "=?utf-8?"))), ("PatientID", lambda r: "../" * 20),
    ("InstanceNumber", lambda r: r.choice(("99999999999999", "-1", "x"))),
    ("SpecificCharacterSet", lambda r: r.choice(("ISO 2022 IR 87", "bogus", "ISO_IR 192"))),
]


def mutate_dicom_tags(path: Path, rng: random.Random) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        for _ in range(rng.randint(1, 3)):
            keyword, value = rng.choice(DICOM_TAGS)
            if rng.random() < 0.15 and keyword in ds:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value(rng))
        if rng.random() < 0.2 and "PixelData" in ds:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // rng.choice((2, 7, 1000))]
        ds.save_as(path)
    except Exception:  # noqa: BLE001 - a mutation that pydicom cannot write becomes a byte mutation
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))


def mutate_npy(path: Path, rng: random.Random) -> None:
    """Lie in the npy header (shape, dtype), or fill the data with non-finite or huge values."""
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1 if b"\n" in data[:4096] else 128
    header = data[:header_end].decode("latin1")
    choice = rng.random()
    if choice < 0.4:
        shape = rng.choice(("(1073741824, 1073741824)", "(2, 100000, 100000)", "(0,)", "(99999999999999999999,)",
                            "(2, 48, 48, 48)", "(-1, 48)"))
        header = re.sub(r"\(.*?\)", shape, header, count=1)
    elif choice < 0.55:
        header = re.sub(r"'descr': '[^']*'", rng.choice(("'descr': '|O'", "'descr': '<c16'", "'descr': '|V8'",
                                                            "'descr': '<U10'")), header)
    else:
        import numpy as np

        array = np.load(path, allow_pickle=False)
        value = rng.choice((np.nan, np.inf, 1.7e38, -1e30, 1e6))
        array = array.astype(np.float32)
        array.flat[rng.randrange(array.size)] = value
        buffer = io.BytesIO()
        np.save(buffer, array)
        path.write_bytes(buffer.getvalue())
        return
    padded = header.rstrip("\n").ljust(header_end - 1) + "\n"
    path.write_bytes(padded.encode("latin1")[:header_end] + data[header_end:] if len(padded) == header_end
                     else padded.encode("latin1") + data[header_end:])


def mutate_npz(path: Path, rng: random.Random) -> None:
    """Rewrite one member of the npz with a mutated npy, or damage the zip itself."""
    import zipfile

    if rng.random() < 0.3:
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))
        return
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = rng.choice(sorted(members))
    with tempfile.TemporaryDirectory() as tmp:
        member = Path(tmp) / "m.npy"
        member.write_bytes(members[name])
        if name == "metadata.npy" and rng.random() < 0.7:
            import numpy as np

            text = str(np.load(member, allow_pickle=False))
            buffer = io.BytesIO()
            np.save(buffer, np.array(mutate_json(text.encode(), rng).decode("utf-8", "replace")))
            members[name] = buffer.getvalue()
        else:
            mutate_npy(member, rng)
            members[name] = member.read_bytes()
    with zipfile.ZipFile(path, "w") as archive:
        for member_name, blob in members.items():
            archive.writestr(member_name, blob)


def mutate_safetensors(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    choice = rng.random()
    if choice < 0.25:
        path.write_bytes(struct.pack("<Q", rng.choice((2**63, length * 1000, 1 << 40, 0))) + data[8:])
    elif choice < 0.7:
        header = mutate_json(data[8:8 + length], rng)
        path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])
    elif choice < 0.85:
        blob = bytearray(data)
        for _ in range(rng.randint(1, 8)):  # NaN / inf / huge float32 patterns in the data
            at = 8 + length + 4 * rng.randrange(max((len(data) - 8 - length) // 4, 1))
            blob[at:at + 4] = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f"))
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(mutate_bytes(data, rng))


def mutate_filesystem(folder: Path, target: Path, rng: random.Random, outside: Path) -> None:
    """Replace `target` by a FIFO, a link loop, a link out of the folder, or a zero-byte flood."""
    choice = rng.random()
    target.unlink(missing_ok=True)
    if choice < 0.3:
        os.mkfifo(target)
    elif choice < 0.5:
        os.symlink(target.name, target)
    elif choice < 0.75:
        os.symlink(rng.choice((outside, Path("/etc/passwd"), Path("/dev/zero"), Path("/proc/self/environ"))), target)
    else:
        with open(target, "wb") as handle:
            handle.write(b"\x00" * 128 + b"DICM")
            handle.write(b"\x00" * rng.choice((1 << 20, 16 << 20)))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def mutate_case(case: Path, rng: random.Random, outside: Path) -> None:
    """Apply one to three mutations to the copy of a seed input in `case`."""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        files = _files(case)
        if not files:
            return
        if rng.random() < 0.08:
            mutate_filesystem(case, rng.choice(files), rng, outside)
            continue
        target = rng.choice(files)
        try:
            _mutate_file(target, rng)
        except Exception:  # noqa: BLE001 - a structured mutation that does not apply falls back to bytes
            _mutate_file_bytes(target, rng)


def _mutate_file(target: Path, rng: random.Random) -> None:
    suffix = target.suffix.lower()
    if suffix == ".json" or target.name == "summary.csv":
        target.write_bytes(mutate_json(target.read_bytes(), rng))
    elif suffix == ".dcm":
        (mutate_dicom_tags if rng.random() < 0.6 else _mutate_file_bytes)(target, rng)
    elif suffix == ".npy":
        (mutate_npy if rng.random() < 0.7 else _mutate_file_bytes)(target, rng)
    elif suffix == ".npz":
        mutate_npz(target, rng)
    elif suffix == ".safetensors":
        mutate_safetensors(target, rng)
    else:
        _mutate_file_bytes(target, rng)


def _mutate_file_bytes(path: Path, rng: random.Random) -> None:
    path.write_bytes(mutate_bytes(path.read_bytes(), rng))


# --- one input --------------------------------------------------------------------------------


@dataclass
class Case:
    number: int
    kind: str
    folder: Path
    """The mutated input folder (the child may write only into `out`)."""
    argv: list[str]
    out: Path


def make_case(number: int, kind: str, corpus: Path, work: Path, rng: random.Random) -> Case:
    """A mutated copy of one seed of `kind`, and the command that feeds it to klviewer."""
    case = work / f"case{number:05d}"
    inputs = case / "input"
    out = case / "out"
    outside = case / "outside.txt"
    case.mkdir(parents=True)
    outside.write_text("a file outside the input folder\n")
    prior = str(corpus / "priors" / "unet")
    if kind == "dicom":
        seed = rng.choice(sorted((corpus / "dicom").iterdir()))
        shutil.copytree(seed, inputs)
        mutate_case(inputs, rng, outside)
        command = ["info", str(inputs)] if rng.random() < 0.3 else ["analyze", str(inputs), "--out", str(out),
                                                                    "--prior", prior, *ANALYZE]
    elif kind in ("arrays", "sinograms"):
        seed = rng.choice(sorted((corpus / kind).iterdir()))
        shutil.copytree(seed, inputs)
        mutate_case(inputs, rng, outside)
        command = ["info", str(inputs)] if rng.random() < 0.2 else ["analyze", str(inputs), "--out", str(out),
                                                                    "--prior", prior, *ANALYZE]
    elif kind == "priors":
        seed = rng.choice(sorted((corpus / "priors").iterdir()))
        shutil.copytree(seed, inputs)
        mutate_case(inputs, rng, outside)
        image = corpus / "arrays" / "npy" / "stack.npy"
        if seed.name == "gmm":
            image = corpus / "fuzz-gmm-image.npy"
        command = ["analyze", str(image), "--out", str(out), "--prior", str(inputs), *ANALYZE]
    elif kind == "calibration":
        shutil.copytree(corpus / "calibration" / "prior", inputs)
        target = inputs / "calibration.json"
        for _ in range(rng.choice((1, 1, 2))):
            if rng.random() < 0.08:
                mutate_filesystem(inputs, target, rng, outside)
                break
            try:
                target.write_bytes(mutate_json(target.read_bytes(), rng))
            except Exception:  # noqa: BLE001 - a structured mutation that does not apply falls back to bytes
                _mutate_file_bytes(target, rng)
        command = ["analyze", str(corpus / "arrays" / "npy" / "stack.npy"), "--out", str(out), "--prior",
                   str(inputs), *ANALYZE]
    else:
        shutil.copytree(corpus / "results" / "run", inputs, symlinks=True)
        mutate_case(inputs, rng, outside)
        formats = rng.choice(("csv", "dicom,csv", "png,csv", "pdf", "dicom", "dicom,png,pdf,csv"))
        command = ["export", str(inputs), "--out", str(out), "--all", "--formats", formats, "--quiet"]
        if rng.random() < 0.4:
            command.append("--deidentify")
        if rng.random() < 0.3:
            command += ["--flag-threshold", "1"]
    return Case(number, kind, inputs, command, out)


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime) of everything under `folder`, links not followed."""
    state: dict[str, tuple[int, int, int]] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            state[os.path.relpath(path, folder)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return state


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/klviewer/" in f.filename] or frames
    where = f"{Path(mine[-1].filename).name}:{mine[-1].lineno} {mine[-1].name}" if mine else "?"
    return f"{type(exc).__name__} at {where}"


def _nonfinite_output(out: Path) -> str | None:
    """A non-finite number in a written summary (accepted runs must write finite scores only)."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    found: list[str] = []

    def constant(name: str) -> float:
        found.append(name)
        return 0.0

    try:
        json.loads(path.read_text(encoding="utf-8", errors="replace"), parse_constant=constant)
    except ValueError:
        return "unreadable summary written"
    return f"non-finite number written ({found[0]})" if found else None


def run_child(case: Case, report: int, memory_bytes: int, cpu_seconds: int) -> None:
    """In the forked child: limits, then the klviewer command; the outcome goes to the `report` pipe."""
    import warnings

    import torch

    from klviewer.cli import main

    torch.set_num_threads(1)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    warnings.simplefilter("ignore")
    code, detail = EXIT_CRASH, ""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            rc = main(case.argv)
        code = {0: 0, 1: 1, 2: 2}.get(rc, EXIT_CRASH)
        detail = sink.getvalue()[-300:].strip().replace("\n", " | ")
        if code == 0:
            garbage = _nonfinite_output(case.out)
            if garbage:
                code, detail = EXIT_CRASH, garbage
    except MemoryError as exc:
        code, detail = EXIT_OOM, _signature(exc)
    except SystemExit as exc:
        code = 2 if exc.code == 2 else EXIT_CRASH
        detail = f"SystemExit({exc.code})"
    except BaseException as exc:  # noqa: BLE001 - every escaping exception is the finding
        code, detail = EXIT_CRASH, f"{_signature(exc)}: {str(exc)[:160]}"
    os.write(report, json.dumps({"code": code, "detail": detail}).encode()[:4000])
    os._exit(code)


@dataclass
class Outcome:
    case: Case
    outcome: str
    detail: str
    seconds: float


@dataclass
class Running:
    case: Case
    pid: int
    read_fd: int
    started: float
    before: dict[str, tuple[int, int, int]]


def _classify(status: int, message: dict[str, Any] | None) -> tuple[str, str]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "hang", "CPU time limit"
        return "crash", f"killed by signal {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status)
    detail = (message or {}).get("detail", "")
    if code == 0:
        return "accepted", detail
    if code in (1, 2):
        return "clean error", detail
    if code == EXIT_OOM:
        return "out of memory", detail
    return "crash", detail or f"exit code {code}"


def run_cases(cases: Iterable[Case], *, jobs: int, timeout: float, memory_budget: int,
              progress: Callable[[Outcome], None] | None = None, deadline: float | None = None) -> list[Outcome]:
    """Run every case in a forked child, at most `jobs` at a time, and classify what happened.
    Cases are made as they are needed, so only the running ones take disk space. After `deadline`
    (time.monotonic()), no new case starts."""
    from klviewer import cli  # noqa: F401 - imported before forking, so each child starts warm

    memory = _address_space() + memory_budget
    pending = iter(cases)
    running: list[Running] = []
    outcomes: list[Outcome] = []
    exhausted = False
    while not exhausted or running:
        while not exhausted and len(running) < jobs:
            case = None if deadline is not None and time.monotonic() > deadline else next(pending, None)
            if case is None:
                exhausted = True
                break
            before = snapshot(case.folder)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                os.setsid()
                run_child(case, write_fd, memory, int(timeout) + 1)
            os.close(write_fd)
            running.append(Running(case, pid, read_fd, time.monotonic(), before))
        time.sleep(0.005)
        for job in list(running):
            done, status = os.waitpid(job.pid, os.WNOHANG)
            elapsed = time.monotonic() - job.started
            if not done and elapsed < timeout:
                continue
            if not done:
                os.killpg(job.pid, signal.SIGKILL)
                os.waitpid(job.pid, 0)
                outcome, detail = "hang", f"still running after {timeout:g} s"
            else:
                outcome, detail = _classify(status, _read_message(job.read_fd))
            os.close(job.read_fd)
            changed = _changes(job.before, snapshot(job.case.folder))
            if changed:
                outcome, detail = "wrote into input", changed
            running.remove(job)
            result = Outcome(job.case, outcome, detail, elapsed)
            outcomes.append(result)
            if progress is not None:
                progress(result)
            if outcome not in ("crash", "hang", "out of memory", "wrote into input"):
                shutil.rmtree(job.case.folder.parent, ignore_errors=True)
    return outcomes


def _read_message(fd: int) -> dict[str, Any] | None:
    os.set_blocking(fd, False)
    try:
        raw = os.read(fd, 8192)
    except BlockingIOError:
        return None
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _changes(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]) -> str | None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    if not (added or removed or changed):
        return None
    return f"added {added[:3]}, removed {removed[:3]}, changed {changed[:3]}"


def _address_space() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the run and its table --------------------------------------------------------------------


def prepare(corpus: Path) -> None:
    """Build the seed corpus in a separate process (torch compute must not run in the forking parent)."""
    script = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import fuzz; fuzz.build_corpus(__import__('pathlib').Path({str(corpus)!r}))"
    subprocess.run([sys.executable, "-c", script], check=True)
    import numpy as np

    np.save(corpus / "fuzz-gmm-image.npy", np.zeros((16, 16), np.float32))


def warm_imports() -> None:
    """Everything the children use, imported once in the parent so each fork starts warm."""
    import warnings

    warnings.simplefilter("ignore")
    import highdicom  # noqa: F401
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.backends.backend_pdf  # noqa: F401
    import torch

    import klviewer.cli  # noqa: F401
    import klviewer.export.exporter  # noqa: F401
    import klviewer.results.analyze  # noqa: F401

    torch.set_num_threads(1)
    with contextlib.suppress(ImportError):
        import diffusers  # noqa: F401


def fuzz(n: int, seed: int, work: Path, *, jobs: int = 1, timeout: float = 20.0, memory_budget: int = 4 << 30,
         progress: Callable[[Outcome], None] | None = None, max_minutes: float | None = None) -> list[Outcome]:
    """Build the corpus under `work`, then run `n` mutated inputs drawn with `seed` (the first ones
    of them, when `max_minutes` pass first)."""
    corpus = work / "corpus"
    if not corpus.is_dir():
        prepare(corpus)
    warm_imports()
    rng = random.Random(seed)
    kinds = rng.choices(KINDS, weights=KIND_WEIGHTS, k=n)
    seeds = [rng.getrandbits(64) for _ in kinds]
    cases = (make_case(i, kind, corpus, work / "cases", random.Random(seed)) for i, (kind, seed) in enumerate(zip(kinds, seeds)))
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    return run_cases(cases, jobs=jobs, timeout=timeout, memory_budget=memory_budget, progress=progress, deadline=deadline)


def table(outcomes: list[Outcome]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        counts[o.case.kind][o.outcome] += 1
        counts["all"][o.outcome] += 1
    lines = ["| input kind | tried | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for kind in (*KINDS, "all"):
        c = counts[kind]
        label = f"**{kind}**" if kind == "all" else KIND_LABELS[kind]
        lines.append(f"| {label} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def failures(outcomes: list[Outcome]) -> list[str]:
    bad = [o for o in outcomes if o.outcome not in ("accepted", "clean error")]
    seen: dict[tuple[str, str], int] = Counter()
    for o in bad:
        seen[(o.outcome, re.sub(r"case\d+", "case*", o.detail)[:200])] += 1
    return [f"- {outcome} x{count} ({kind_of(bad, outcome, detail)}): {detail}" for (outcome, detail), count in seen.items()]


def kind_of(bad: list[Outcome], outcome: str, detail: str) -> str:
    return ", ".join(sorted({o.case.kind for o in bad if o.outcome == outcome and re.sub(r"case\d+", "case*", o.detail)[:200] == detail}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per input")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="memory per input, above the warm parent's")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", type=Path, help="write the results table (markdown) here")
    parser.add_argument("--max-minutes", type=float, help="start no new input after this long; the table says how many ran")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="klviewer-fuzz-"))
    started, load = time.time(), os.getloadavg()
    counts: Counter = Counter()

    def progress(o: Outcome) -> None:
        counts[o.outcome] += 1
        if o.outcome not in ("accepted", "clean error"):
            print(f"case {o.case.number} {o.case.kind}: {o.outcome}: {o.detail}  [{' '.join(o.case.argv)}]", flush=True)
        done = sum(counts.values())
        if done % 250 == 0:
            print(f"{done}/{args.n} {dict(counts)} {time.time() - started:.0f} s", flush=True)

    try:
        outcomes = fuzz(args.n, args.seed, work, jobs=args.jobs, timeout=args.timeout,
                        memory_budget=int(args.memory_gib * (1 << 30)), progress=progress, max_minutes=args.max_minutes)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - started
    cut = (f" **Stopped by --max-minutes {args.max_minutes:g}: {len(outcomes)} of the {args.n} inputs drawn ran**"
           " (the first ones, in order)." if len(outcomes) < args.n else "")
    report = "\n".join([
        "# Fuzzing klviewer's entry points with hostile input", "",
        f"Command: `python benchmarks/fuzz.py -n {args.n} --seed {args.seed} --jobs {args.jobs} --timeout {args.timeout:g} "
        f"--memory-gib {args.memory_gib:g}" + (f" --max-minutes {args.max_minutes:g}" if args.max_minutes else "")
        + f"` (`make fuzz`), {len(outcomes)} inputs in {seconds / 60:.1f} min; "
        f"load average at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores).{cut}", "",
        "Each input ran in its own forked child under RLIMIT_AS (the warm parent's address space plus the memory "
        "budget) and a wall-clock limit; see the docstring of `benchmarks/fuzz.py` for the mutations and outcomes.", "",
        table(outcomes), "", "Failures (outcome x count (kinds): signature):", "",
        *(failures(outcomes) or ["- none"]), "",
    ])
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0 if not failures(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
