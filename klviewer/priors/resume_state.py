"""Resume checkpoints of a training loop (model, EMA, Adam state, data RNG) as safetensors + JSON.

`klviewer train`, `klviewer align` and `klviewer adapt` all resume through these functions, so a
resume folder never holds a pickle, its state.json goes through the bounded JSON reader, and the
three refuse a changed setting or an earlier run in the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.json_input import Fields, read_json
from klviewer.io.safe_write import OutputExistsError
from klviewer.priors.checkpoint import CONFIG_FILE, read_weights, state_bytes

MAX_STATE_BYTES = 256 << 20
"""Largest resume state.json read (it lists one loss per step)."""


def refuse_earlier_run(out: Path, resume_dir: str, what: str, error: type[KlviewerError]) -> None:
    """Before a fresh start in `out`: a finished prior or an earlier start there is not overwritten."""
    if (out / CONFIG_FILE).exists():
        raise OutputExistsError(out / CONFIG_FILE)
    if (out / resume_dir).exists():
        raise error(f"{out / resume_dir}: {what} was already started here; pass resume (--resume) to continue it "
                    "or choose another output folder")


def require_same_settings(path: Path, saved: dict[str, Any], fixed: dict[str, Any], error: type[KlviewerError]) -> None:
    """The settings a resumed run must keep (`fixed`) against those `path` recorded."""
    changed = [f"{k}: {saved.get(k)!r} -> {fixed[k]!r}" for k in fixed if saved.get(k) != fixed[k]]
    if changed:
        raise error(f"{path}: cannot resume with different inputs or settings ({'; '.join(changed)})")


def read_resume_state(state_path: Path, fixed: dict[str, Any], steps: int,
                      error: type[KlviewerError]) -> tuple[Fields, int]:
    """A resume state.json (bounded read) and its step, checked against the run that wants to continue it:
    the same fixed settings, and not already past `steps`."""
    state = Fields(read_json(state_path, MAX_STATE_BYTES, "resume state"), state_path, what="resume state field")
    step = state.integer("step", lo=0)
    require_same_settings(state_path, state.section("settings").doc, fixed, error)
    if step > steps:
        raise error(f"{state_path}: the run is already at step {step}, beyond steps {steps}")
    return state, step


def training_state_bytes(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                         gen: torch.Generator, step: int) -> tuple[bytes, list[dict[str, Any]]]:
    """The tensors of a run as safetensors bytes, and the optimiser's param groups (for the JSON)."""
    tensors: dict[str, torch.Tensor] = {"rng": gen.get_state()}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value)
    return state_bytes(tensors, {"step": str(step)}), opt_state["param_groups"]


def restore_training_state(weights_path: Path, model: torch.nn.Module, ema: torch.nn.Module,
                           opt: torch.optim.Optimizer, gen: torch.Generator, param_groups: list[dict[str, Any]]) -> None:
    """Load what `training_state_bytes` wrote; a mismatch names the file."""
    tensors = read_weights(weights_path)
    try:
        gen.set_state(tensors.pop("rng"))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        opt.load_state_dict({"state": opt_state, "param_groups": param_groups})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise KlviewerInputError(weights_path, f"resume weights do not fit this run ({exc})") from exc
