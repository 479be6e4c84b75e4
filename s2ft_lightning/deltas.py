"""`DeltaBlocks`: the trainable deltas on planned rows/columns of one logical ``[out, in]`` weight.

What an S2 layer on a Linear/Conv1D (`s2ft_lightning.layers.S2Linear`) and the blocks of one MoE expert
(`s2ft_lightning.experts.ExpertBlocks`) share: one ``nn.Parameter`` ``delta_<i>`` per block in spec order, holding
the update Δ (zeros at install), the base values under a block, and the merged weight. The arithmetic is
`s2ft_lightning.blocks`'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from s2ft_lightning.blocks import Spec, block_shape, feature_dim, gather_runs
from s2ft_lightning.sharding import full
from surgery.linear import logical
from surgery.plan import BlockSlice

__all__ = ["DeltaBlocks", "S2InstallError"]


class S2InstallError(ValueError):
    """A plan or block set that cannot be installed on this model (the model is left untouched)."""


class DeltaBlocks(nn.Module):
    """Trainable deltas on planned rows/columns of one logical ``[out, in]`` weight (``self.weight``)."""

    transposed = False  # Conv1D storage ([in, out]) when True
    out_features: int
    in_features: int
    specs: tuple[Spec, ...]

    def _add_deltas(self, slices: Sequence[BlockSlice], dtype: torch.dtype, device: torch.device) -> None:
        self.slices = [BlockSlice(s.module, s.role, s.feature, list(s.runs), list(s.original)) for s in slices]
        self.specs = tuple((s.feature, tuple((int(a), int(b)) for a, b in s.runs)) for s in self.slices)
        for i, (feature, runs) in enumerate(self.specs):
            shape = block_shape(feature, runs, self.out_features, self.in_features)
            self.register_parameter(f"delta_{i}", nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def deltas(self) -> list[nn.Parameter]:
        """The trainable updates, one per block, in spec order."""
        return [getattr(self, f"delta_{i}") for i in range(len(self.specs))]

    def logical_weight(self) -> torch.Tensor:
        """The frozen base weight in logical ``[out, in]`` orientation (a view)."""
        return logical(self.weight, self.transposed)

    def base_block(self, i: int) -> torch.Tensor:
        """The frozen base values under block ``i`` (logical orientation, a copy).

        On a sharded (DTensor) weight this is a collective that gathers only these rows/columns.
        """
        feature, runs = self.specs[i]
        return full(gather_runs(self.logical_weight(), runs, feature_dim(feature))).clone()
