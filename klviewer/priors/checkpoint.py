"""Prior checkpoints: a folder holding ``config.json`` and ``model.safetensors`` (weights only).

Nothing here unpickles: weights are read with safetensors, and the config is plain JSON, so a
checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from klviewer.errors import KlviewerInputError
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text
from klviewer.priors.base import Prior, PriorConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_PRIOR = "abdomen-phantom-256"


def resources_dir() -> Path:
    """Shipped resources: ``$KLVIEWER_RESOURCES`` if set, else the package data ``klviewer/resources``.

    The package data is a plain folder in a checkout, an installed wheel and the desktop bundle
    alike, so its files are read by path (a zipped install is not supported).
    """
    env = os.environ.get("KLVIEWER_RESOURCES")
    return Path(env) if env else Path(str(importlib.resources.files("klviewer") / "resources"))


def priors_dir() -> Path:
    return resources_dir() / "priors"


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
    path = Path(name_or_path)
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


def read_prior_config(folder: Path) -> PriorConfig:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise KlviewerInputError(config_path, "missing: a prior folder needs config.json")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KlviewerInputError(config_path, f"cannot be read ({exc})") from exc
    return PriorConfig.from_json(text, source=config_path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file is an input error naming it."""
    if not path.is_file():
        raise KlviewerInputError(path, "missing: a prior folder needs model.safetensors")
    try:
        return load_safetensors_bytes(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise KlviewerInputError(path, f"not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def check_state_dict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that do not fit the architecture the config describes, saying how."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise KlviewerInputError(path, "weights do not match the architecture in config.json "
                                       "(" + "; ".join(problems) + ")")


def load_prior(name_or_path: str | Path, device: str | torch.device = "cpu") -> Prior:
    """Load a prior folder (or a shipped prior by name), in eval mode with gradients off for its
    parameters (gradients with respect to the input still work; call ``requires_grad_(True)`` to
    fine-tune)."""
    folder = resolve_prior_path(name_or_path)
    config = read_prior_config(folder)
    weights_path = folder / WEIGHTS_FILE
    tensors = read_weights(weights_path)
    try:
        prior = prior_class(config.architecture).from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise KlviewerInputError(folder / CONFIG_FILE, f"cannot build a {config.architecture} prior from its "
                                                       f"'arch' settings ({exc})") from exc
    check_state_dict(prior, tensors, weights_path)
    prior.load_state_dict(tensors, strict=True)
    prior.eval().requires_grad_(False)
    return prior.to(device)


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
