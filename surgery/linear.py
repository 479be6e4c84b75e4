"""nn.Linear, transformers' Conv1D and one expert of a 3-D MoE weight seen alike: logical ``[out, in]`` weights.

GPT-2's ``Conv1D`` stores its weight ``[in, out]`` (transposed); MoE experts store tensors whose expert ``e`` acts
as one linear map (``[experts, out, in]``, transposed or stacked 2-D: `surgery.expert_storage`). Everything in
this project that slices rows or columns works on the logical ``[out, in]`` view these helpers give, so all three
are handled in one place. Expert ``e`` of parameter ``p`` of experts module ``m`` is named ``"m.p[e]"`` in plans
and adapters.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .expert_storage import storage_of

try:  # transformers is optional for surgery's pure-torch parts; Conv1D only exists there
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


_EXPERT_NAME = re.compile(r"^(?P<owner>.+)\.(?P<param>[A-Za-z_]\w*)\[(?P<expert>\d+)\]$")


class ExpertLinear:
    """Expert ``expert`` of an experts tensor (`surgery.expert_storage`), seen as one linear module.

    ``weight`` is its ``[out, in]`` view: writes land in the experts tensor. Not an ``nn.Module``: it exists
    only as a name.
    """

    def __init__(self, owner: nn.Module, param: str, expert: int) -> None:
        self.owner, self.param, self.expert = owner, param, expert
        self.storage = storage_of(owner)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """This expert's ``[out, in]`` view of ``t``: the parameter, or a tensor shaped like it (its grad)."""
        if self.storage is None:
            return t[self.expert]
        return self.storage.view(self.param, t, self.expert)

    @property
    def weight(self) -> torch.Tensor:
        return self.view(getattr(self.owner, self.param))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def expert_name(owner: str, param: str, expert: int) -> str:
    """The name of expert ``expert`` of ``owner.param`` in plans and adapters."""
    return f"{owner}.{param}[{expert}]"


def split_expert_name(name: str) -> tuple[str, str, int] | None:
    """``(owner, param, expert)`` of an expert name, or None for any other name."""
    m = _EXPERT_NAME.match(name)
    return None if m is None else (m["owner"], m["param"], int(m["expert"]))


def resolve_linear(model: nn.Module, name: str) -> nn.Module | ExpertLinear:
    """The module called ``name``, or the `ExpertLinear` an expert name stands for; AttributeError if neither."""
    parts = split_expert_name(name)
    if parts is None:
        return model.get_submodule(name)
    owner_name, param, expert = parts
    owner = model.get_submodule(owner_name)
    w = getattr(owner, param, None)
    storage = storage_of(owner)
    experts = storage.experts if storage is not None and param in storage.params else None
    if experts is None and isinstance(w, torch.Tensor) and w.dim() == 3:
        experts = w.shape[0]
    if not isinstance(w, torch.Tensor) or experts is None or not 0 <= expert < experts:
        raise AttributeError(f"{owner_name!r} has no expert parameter {param!r} with an expert {expert}")
    return ExpertLinear(owner, param, expert)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored ``[in, out]``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(in_features, out_features, axis of the out features in ``weight``) for Linear / Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 0
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], 1
    if isinstance(module, ExpertLinear):
        return module.in_features, module.out_features, 0
    return None


def logical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view of a weight tensor (``transposed`` for Conv1D storage); writes land in place."""
    return weight.t() if transposed else weight


def logical_weight(module: nn.Module | ExpertLinear) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` view (transposed for Conv1D and S2 layers around one)."""
    return logical(module.weight, is_conv1d(module) or getattr(module, "transposed", False) is True)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    fan_in, fan_out, _ = linear_shape(module)
    return fan_out, fan_in
