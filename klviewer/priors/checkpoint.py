"""Prior checkpoints: a folder holding ``config.json`` and ``model.safetensors`` (weights only).

Nothing here unpickles: weights are read with safetensors, and the config is plain JSON, so a
checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import struct
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from klviewer.errors import KlviewerInputError, brief, shorten
from klviewer.io.input_files import check_path, link_problem, not_regular_reason, open_input, read_input_bytes
from klviewer.io.json_input import checked_integer, parse_json
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text
from klviewer.priors.base import Prior, PriorConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_PRIOR = "abdomen-phantom-256"
MAX_CONFIG_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 8 << 30
MAX_HEADER_BYTES = 64 << 20
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def resources_dir() -> Path:
    """Shipped resources: ``$KLVIEWER_RESOURCES`` if set, else the package data ``klviewer/resources``.

    The package data is a plain folder in a checkout, an installed wheel and the desktop bundle
    alike, so its files are read by path (a zipped install is not supported).
    """
    env = os.environ.get("KLVIEWER_RESOURCES")
    return Path(env) if env else Path(str(importlib.resources.files("klviewer") / "resources"))


def priors_dir() -> Path:
    return resources_dir() / "priors"


def installed_prior_reason(prior_path: Path) -> str | None:
    """Why results must not be written into this prior folder, or None: a shipped prior inside an installed
    package (site-packages, or the desktop bundle) is replaced by the next install, and is often read-only.
    A source checkout's shipped prior is the project's own, and may be recalibrated in place."""
    try:
        inside = Path(prior_path).resolve().is_relative_to(priors_dir().resolve())
    except OSError:
        return None
    installed = getattr(sys, "frozen", False) or bool({"site-packages", "dist-packages"} & set(priors_dir().resolve().parts))
    if not (inside and installed):
        return None
    return ("is the shipped prior of an installed klviewer, which the next install replaces; copy the folder "
            f"(cp -r '{prior_path}' ~/my-prior) and give the copy (--prior ~/my-prior), or use --dry-run")


def list_priors() -> list[str]:
    """Names of the shipped priors (folders under resources/priors with a config.json)."""
    root = priors_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def prior_class(architecture: str) -> type[Prior]:
    # Imported here so that diffusers (optional) is only needed for diffusers priors.
    if architecture == "edm-unet":
        from klviewer.priors.unet import EDMUNetPrior
        return EDMUNetPrior
    if architecture == "gaussian":
        from klviewer.priors.gaussian import GaussianPrior
        return GaussianPrior
    if architecture == "gmm":
        from klviewer.priors.gaussian import GaussianMixturePrior
        return GaussianMixturePrior
    if architecture == "diffusers-unet2d":
        from klviewer.priors.diffusers_import import DiffusersPrior
        return DiffusersPrior
    raise KlviewerInputError(None, f"unknown prior architecture {architecture!r}")


def save_prior(prior: Prior, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``prior`` into ``folder`` (created if needed; other files in it are left alone).

    Each file is written atomically. The weights go first and the config last, because a
    folder is only a prior once its config.json exists.
    """
    folder = Path(folder)
    targets = [folder / WEIGHTS_FILE, folder / CONFIG_FILE]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OutputExistsError(target)
    blob = state_bytes(prior.state_dict(), {"format": "klviewer.prior", "architecture": prior.config.architecture})
    atomic_write(targets[0], lambda f: f.write(blob), overwrite=overwrite)
    atomic_write_text(targets[1], prior.config.to_json(), overwrite=overwrite)
    return folder


def resolve_prior_path(name_or_path: str | Path) -> Path:
    """A path to a folder, or the bare name of a shipped prior."""
    path = check_path(name_or_path)
    if path.is_dir():
        return path
    is_bare_name = isinstance(name_or_path, str) and os.sep not in name_or_path and "/" not in name_or_path
    if is_bare_name and (priors_dir() / name_or_path).is_dir():
        return priors_dir() / name_or_path
    if path.exists():
        raise KlviewerInputError(path, "a prior is a folder holding config.json and model.safetensors, not a file")
    raise KlviewerInputError(path, "no such prior folder, and not the name of a shipped prior; " + _prior_hint())


def _prior_hint() -> str:
    """What to do when a prior is not found: the shipped names, or why there are none."""
    known = list_priors()
    if known:
        return f"shipped: {', '.join(known)}; or give the path of a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
    return (f"no shipped priors were found in {priors_dir()}. Reinstall klviewer (`pip install --force-reinstall "
            f"klviewer`), point KLVIEWER_RESOURCES at a folder holding priors/NAME/{CONFIG_FILE}, or give the path "
            f"of a prior folder (`--prior PATH`)")


def prior_file(folder: Path, name: str) -> Path:
    """A file of a prior folder; refused when it is a link out of the folder or not a regular file."""
    path = folder / name
    if not (path.exists() or path.is_symlink()):
        raise KlviewerInputError(path, f"missing: a prior folder needs {name}")
    problem = link_problem(path, folder) or not_regular_reason(path)
    if problem is not None:
        raise KlviewerInputError(path, problem)
    return path


def read_prior_config(folder: Path) -> PriorConfig:
    config_path = prior_file(folder, CONFIG_FILE)
    return PriorConfig.from_json(read_input_bytes(config_path, MAX_CONFIG_BYTES, "prior config"), source=config_path)


def read_weights_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, every declared size checked
    against the file's own size before anything is allocated by it."""
    with open_input(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise KlviewerInputError(path, "not a readable safetensors file (truncated or corrupt?): shorter than its 8-byte header size")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise KlviewerInputError(path, f"not a readable safetensors file (truncated or corrupt?): its header "
                                           f"declares {length} bytes, the file holds {size} in all")
        raw = handle.read(length)
    try:
        header = parse_json(raw, path, "its header")
    except KlviewerInputError as exc:
        raise KlviewerInputError(path, f"not a readable safetensors file (truncated or corrupt?): {exc.problem}") from exc
    data_bytes = size - 8 - length
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"safetensors header entry {brief(name)}"
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPE_BYTES:
            raise KlviewerInputError(path, f"{where} has no known dtype (found {brief(entry)})")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and isinstance(offsets, list) and len(offsets) == 2):
            raise KlviewerInputError(path, f"{where} needs a shape and two data_offsets (found {brief(entry)})")
        dims = tuple(checked_integer(n, path, f"{where} shape", lo=0) for n in shape)
        begin, end = (checked_integer(n, path, f"{where} data_offsets", lo=0) for n in offsets)
        if not begin <= end <= data_bytes:
            raise KlviewerInputError(path, f"{where} lies at bytes {begin}..{end} of data, but the file holds "
                                           f"{data_bytes} (truncated or corrupt?)")
        if end - begin != math.prod(dims) * DTYPE_BYTES[entry["dtype"]]:
            raise KlviewerInputError(path, f"{where} declares shape {brief(list(dims))} of {entry['dtype']} but "
                                           f"{end - begin} bytes of data (truncated or corrupt?)")
        shapes[name] = (entry["dtype"], dims)
    return shapes


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated, corrupt or lying file is an input error naming it."""
    if not (path.exists() or path.is_symlink()):
        raise KlviewerInputError(path, "missing: a prior folder needs model.safetensors")
    read_weights_header(path)
    try:
        return load_safetensors_bytes(read_input_bytes(path, MAX_WEIGHTS_BYTES, "weights file"))
    except MemoryError as exc:
        raise KlviewerInputError(path, "weights do not fit in memory") from exc
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise KlviewerInputError(path, f"not a readable safetensors file (truncated or corrupt?): {shorten(str(exc), 300)}") from exc


def check_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse weights that do not fit the architecture the config describes, saying how."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (expected {v})" for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(brief(i)[1:-1] for i in items[:5])}{more}")
    if problems:
        raise KlviewerInputError(path, "weights do not match the architecture in config.json "
                                       "(" + "; ".join(problems) + ")")


def check_state_dict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that do not fit `module`, saying how."""
    check_state_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                       {k: tuple(v.shape) for k, v in tensors.items()}, path)


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or infinite weights would make every score NaN; refuse them naming the tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KlviewerInputError(path, f"tensor {brief(name)} holds NaN or infinite values")


CPU_MEMORY_FORMAT = torch.channels_last
"""The order of a loaded prior's 4-D weights on the CPU. oneDNN's convolutions run the float32 `pigdm` step
1.2x faster in channels-last order, and a float32 series 1.24x faster, its numbers moving by rounding only
(benchmarks/results/series_throughput_channels_last.md); bfloat16 runs are no faster and no slower. Saved
weights stay contiguous (`state_bytes`)."""


def load_prior(name_or_path: str | Path, device: str | torch.device = "cpu") -> Prior:
    """Load a prior folder (or a shipped prior by name), in eval mode with gradients off for its
    parameters (gradients with respect to the input still work; call ``requires_grad_(True)`` to
    fine-tune). On the CPU its 4-D weights are kept in `CPU_MEMORY_FORMAT`."""
    folder = resolve_prior_path(name_or_path)
    config = read_prior_config(folder)
    weights_path = prior_file(folder, WEIGHTS_FILE)
    declared = {name: shape for name, (_, shape) in read_weights_header(weights_path).items()}
    cls = prior_class(config.architecture)
    try:
        check_state_shapes(cls.state_shapes(config), declared, weights_path)
        tensors = read_weights(weights_path)
        check_finite(tensors, weights_path)
        prior = cls.from_config(config)
    except KlviewerInputError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise KlviewerInputError(folder / CONFIG_FILE, f"cannot build a {config.architecture} prior from its "
                                                       f"'arch' settings ({type(exc).__name__}: {shorten(str(exc), 300)})") from exc
    check_state_dict(prior, tensors, weights_path)
    try:
        prior.load_state_dict(tensors, strict=True)
    except KlviewerInputError as exc:  # e.g. a covariance that is not symmetric: the weights file is at fault
        raise KlviewerInputError(exc.path or weights_path, exc.problem) from exc
    prior.eval().requires_grad_(False)
    prior = prior.to(device)
    return prior.to(memory_format=CPU_MEMORY_FORMAT) if torch.device(device).type == "cpu" else prior


def state_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (moved to the CPU) as safetensors bytes."""
    return save_safetensors_bytes({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                                  metadata=metadata)


def prior_fingerprint(prior_path: Path) -> str:
    """SHA-256 of the prior's weights file: what reports and calibrations record as its identity."""
    digest = hashlib.sha256()
    with open(Path(prior_path) / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
