"""Which weights of a prior an alignment trains: all of them, only norms and biases, or LoRA adapters.

- ``full``: every parameter.
- ``norm-bias``: the affine parameters of every normalisation layer and every bias (BitFit-like);
  about 1% of the weights, so a handful of measurements cannot move the prior far.
- ``lora``: each Conv2d and Linear gets a low-rank update ``W + up @ down`` (Hu et al. 2021);
  only ``up`` and ``down`` train. ``up`` starts at zero, so training starts from the base prior
  exactly. For a convolution, ``down`` is a convolution with the base kernel's shape and
  ``rank`` outputs and ``up`` a 1x1 convolution, so their product is again a kernel of the
  base shape and merges into it.

``merged_state_dict`` folds the adapters back into plain weights: an aligned prior is saved as an
ordinary checkpoint of the base architecture, loadable with ``load_prior`` and as fast as the base.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from klviewer.errors import KlviewerInputError

ADAPTER_MODES = ("full", "norm-bias", "lora")
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d)


def _init_pair(down: nn.Module, up: nn.Module, like: torch.Tensor) -> None:
    """PEFT's initialisation (down uniform, up zero), drawn on the CPU so a seed fixes it on any
    device, then moved to the base layer's device and dtype."""
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    down.to(like.device, like.dtype)
    up.to(like.device, like.dtype)


class LoRAConv2d(nn.Module):
    """A frozen Conv2d plus a trainable rank-``rank`` update of its kernel."""

    def __init__(self, base: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if base.groups != 1:
            raise KlviewerInputError(None, "LoRA on grouped convolutions is not supported")
        self.base = base
        rank = min(rank, base.in_channels * math.prod(base.kernel_size), base.out_channels)
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                              base.dilation, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        _init_pair(self.down, self.up, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))

    def merged(self) -> nn.Conv2d:
        conv = copy.deepcopy(self.base)
        rank = self.down.out_channels
        delta = self.up.weight.reshape(-1, rank) @ self.down.weight.reshape(rank, -1)
        with torch.no_grad():
            conv.weight.add_(delta.reshape_as(conv.weight))
        return conv


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-``rank`` update of its matrix."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        rank = min(rank, base.in_features, base.out_features)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        _init_pair(self.down, self.up, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))

    def merged(self) -> nn.Linear:
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight.add_(self.up.weight @ self.down.weight)
        return linear


_LORA_TYPES = (LoRAConv2d, LoRALinear)


def _wrap_lora(module: nn.Module, rank: int) -> int:
    """Replace every Conv2d / Linear below `module` by its LoRA wrapper; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and child.groups == 1:
            setattr(module, name, LoRAConv2d(child, rank))
            count += 1
        elif isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank))
            count += 1
        elif not isinstance(child, _LORA_TYPES):
            count += _wrap_lora(child, rank)
    return count


def _norm_and_bias(model: nn.Module) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or name == "bias":
                params[id(param)] = param
    return list(params.values())


def apply_adapter(model: nn.Module, mode: str, rank: int = 4) -> list[nn.Parameter]:
    """Prepare `model` (in place) for fine-tuning in `mode`; returns the parameters to train.

    Every other parameter has ``requires_grad`` off. ``lora`` replaces layers by wrappers, so
    save such a model through ``merged_state_dict``.
    """
    if mode not in ADAPTER_MODES:
        raise KlviewerInputError(None, f"alignment mode must be one of {ADAPTER_MODES}, got {mode!r}")
    model.requires_grad_(False)
    if mode == "full":
        params = list(model.parameters())
    elif mode == "norm-bias":
        params = _norm_and_bias(model)
    else:
        if rank < 1:
            raise KlviewerInputError(None, f"LoRA rank must be at least 1, got {rank}")
        if _wrap_lora(model, rank) == 0:
            raise KlviewerInputError(None, "the prior has no convolution or linear layer to adapt with LoRA")
        params = [p for m in model.modules() if isinstance(m, _LORA_TYPES)
                  for p in (*m.down.parameters(), *m.up.parameters())]
    if not params:
        raise KlviewerInputError(None, f"the prior has no parameters to train in mode {mode!r}")
    for param in params:
        param.requires_grad_(True)
    return params


def _merge_in_place(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, _LORA_TYPES):
            setattr(module, name, child.merged())
        else:
            _merge_in_place(child)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the base architecture, with any LoRA update folded into its weights."""
    plain = copy.deepcopy(model)
    _merge_in_place(plain)
    return {k: v.detach() for k, v in plain.state_dict().items()}


def count_parameters(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
