"""nn.Linear and transformers' Conv1D seen alike: logical ``[out, in]`` weights and shapes.

GPT-2's ``Conv1D`` stores its weight ``[in, out]`` (transposed); everything in this project that slices rows
or columns works on the logical ``[out, in]`` view these helpers give, so the two are handled in one place.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers is optional for surgery's pure-torch parts; Conv1D only exists there
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored ``[in, out]``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(in_features, out_features, axis of the out features in ``weight``) for Linear / Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 0
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], 1
    return None


def logical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view of a weight tensor (``transposed`` for Conv1D storage); writes land in place."""
    return weight.t() if transposed else weight


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` view (a transposed view for Conv1D)."""
    return logical(module.weight, is_conv1d(module))


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    fan_in, fan_out, _ = linear_shape(module)
    return fan_out, fan_in
