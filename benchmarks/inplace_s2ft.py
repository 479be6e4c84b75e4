"""Baseline for the step benchmarks: the S²FT reference code's design, rebuilt on our plans (not its code).

The paper's released code trains each block *inside* the frozen weight: the forward is one plain matmul with W
(whose block the optimizer updated in place), the backward computes ``g W`` and only the block's gradient,
saving only the block's input columns for column blocks. It hands that gradient to its own AdamW through a
``weight.grad2`` attribute. Here the block is an ``nn.Parameter`` aliasing W's storage instead, so torch's
for-loop/foreach AdamW writes the update into W (never ``fused=True``: on CPU it writes a non-contiguous view
wrongly, docs/ARCHITECTURE.md). Mode ``inplace`` of `benchmarks.train_suite`: what our delta forward is compared
with (README "Performance"). Benchmark-only: nothing in the package uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s2ft_lightning.blocks import gather_runs


class _InplaceBlocksFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with W frozen except its blocks, which are views of W given as extra inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, feature, runs, *blocks):
        y = F.linear(x, weight, bias)
        ctx.feature, ctx.runs = feature, runs
        ctx.need_x = ctx.needs_input_grad[0]
        # Column blocks need only their input columns; row blocks need the whole input.
        saved = gather_runs(x, runs).contiguous() if feature == "in" else x
        ctx.save_for_backward(weight if ctx.need_x else None, saved)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, saved = ctx.saved_tensors
        grad_x = g @ weight if ctx.need_x else None
        g2, s2 = g.reshape(-1, g.shape[-1]), saved.reshape(-1, saved.shape[-1])
        grads, off = [], 0
        for s, e in ctx.runs:
            if ctx.feature == "in":  # columns s:e of W: gᵀ x[:, s:e]
                grads.append((s2.narrow(1, off, e - s).t() @ g2).t())
            else:  # rows s:e of W: g[:, s:e]ᵀ x
                grads.append(g2.narrow(1, s, e - s).t() @ s2)
            off += e - s
        return (grad_x, None, None, None, None, *grads)


class InplaceS2Linear(nn.Module):
    """A frozen Linear whose planned rows/columns train in place (one parameter view per run)."""

    def __init__(self, base: nn.Linear, feature: str, runs: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.weight, self.bias = base.weight, base.bias
        self.feature, self.runs = feature, tuple((int(s), int(e)) for s, e in runs)
        dim = 1 if feature == "in" else 0
        for i, (s, e) in enumerate(self.runs):
            view = self.weight.detach().narrow(dim, s, e - s)
            self.register_parameter(f"block_{i}", nn.Parameter(view))  # aliases W's storage: no copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, f"block_{i}") for i in range(len(self.runs))]
        return _InplaceBlocksFn.apply(x, self.weight, self.bias, self.feature, self.runs, *blocks)


def install_inplace(model: nn.Module, slices: Sequence) -> list[nn.Parameter]:
    """Freeze ``model`` and swap every planned Linear for an `InplaceS2Linear`; returns the block parameters."""
    model.requires_grad_(False)
    by_module: dict[str, list] = {}
    for s in slices:
        by_module.setdefault(s.module, []).append(s)
    params = []
    for name, ss in by_module.items():
        if len({s.feature for s in ss}) != 1:
            raise ValueError(f"{name}: the in-place baseline takes one feature per module")
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__}; the in-place baseline takes nn.Linear only")
        runs = sorted(r for s in ss for r in s.runs)
        layer = InplaceS2Linear(base, ss[0].feature, runs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        params += [getattr(layer, f"block_{i}") for i in range(len(layer.runs))]
    return params
