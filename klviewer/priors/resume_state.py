"""Resume checkpoints of a training loop (model, EMA, Adam state, data RNG) as safetensors + JSON.

`klviewer train` and `klviewer align` both resume through these two functions, so a resume
folder never holds a pickle and is read back the same way by either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from klviewer.errors import KlviewerInputError
from klviewer.priors.checkpoint import read_weights, state_bytes


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
