"""Partial backpropagation through a frozen linear layer whose trainable blocks are merged in its weight.

Forward is a plain ``F.linear`` on the (merged) frozen weight, so forward FLOPs equal the frozen model's.
Backward computes ``grad_input`` only when needed and, per block, only that block's weight gradient:
rows (``feature="out"``): ``g[:, rows]ᵀ x``; columns (``feature="in"``): ``gᵀ x[:, cols]``. Input-sliced
blocks save only the gathered ``N×k`` input columns. Block gradients are returned in the block's dtype
(fp32 for an fp32 master), accumulated in fp32 by the selected backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# One block: (feature, runs) with feature "in" | "out" and runs ((start, end), ...), in the module's
# logical [out, in] orientation (Conv1D's transposed storage is handled by ``transposed``).
Spec = tuple[str, tuple[tuple[int, int], ...]]

# tn_matmul(a, b, a_runs, b_runs) -> fp32 a[:, a_cols]ᵀ @ b[:, b_cols]; runs=None means all columns.
TnMatmul = Callable[[torch.Tensor, torch.Tensor, "tuple | None", "tuple | None"], torch.Tensor]


def gather_runs(t: torch.Tensor, runs: Sequence[tuple[int, int]], dim: int = -1) -> torch.Tensor:
    """Concatenate ``t``'s slices along ``dim`` for each half-open run (a view when there is one run)."""
    if len(runs) == 1:
        s, e = runs[0]
        return t.narrow(dim, s, e - s)
    return torch.cat([t.narrow(dim, s, e - s) for s, e in runs], dim=dim)


def tn_matmul_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_runs: Sequence[tuple[int, int]] | None = None,
    b_runs: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Torch reference of the block-gradient product ``a[:, a_runs]ᵀ @ b[:, b_runs]`` returned in fp32."""
    if a_runs is not None:
        a = gather_runs(a, a_runs)
    if b_runs is not None:
        b = gather_runs(b, b_runs)
    return (a.t() @ b).float()


def weight_logical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view of a weight (Conv1D stores ``[in, out]``)."""
    return weight.t() if transposed else weight


class PartialLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with gradients only for ``blocks`` (and x); W and b are frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, specs, transposed, backend, *blocks):
        w = weight_logical(weight, transposed)
        y = F.linear(x, w, bias)
        ctx.specs = specs
        ctx.transposed = transposed
        ctx.backend = backend
        ctx.block_dtypes = [blk.dtype for blk in blocks]
        need_block = [ctx.needs_input_grad[6 + i] for i in range(len(blocks))]
        need_full_x = any(nb and f == "out" for nb, (f, _) in zip(need_block, specs))
        # Input-sliced blocks keep only their gathered columns (contiguous copy: a view would pin all of x).
        saved_cols = []
        for nb, (f, runs) in zip(need_block, specs):
            if nb and f == "in" and not need_full_x:
                saved_cols.append(gather_runs(x, runs).contiguous())
        ctx.need_block = need_block
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, x if need_full_x else None, *saved_cols)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, x, *saved_cols = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight_logical(weight, ctx.transposed).to(g.dtype)
        out_features = g.shape[-1]
        g2 = g.reshape(-1, out_features)
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        tn_matmul = _resolve(ctx.backend)
        grads = []
        cols_iter = iter(saved_cols)
        for nb, (feature, runs), dt in zip(ctx.need_block, ctx.specs, ctx.block_dtypes):
            if not nb:
                grads.append(None)
            elif feature == "out":
                grads.append(tn_matmul(g2, x2.to(g2.dtype), runs, None).to(dt))
            elif x2 is not None:
                grads.append(tn_matmul(g2, x2.to(g2.dtype), None, runs).to(dt))
            else:
                xs = next(cols_iter)
                grads.append(tn_matmul(g2, xs.reshape(-1, xs.shape[-1]).to(g2.dtype), None, None).to(dt))
        return (grad_x, None, None, None, None, None, *grads)


def _resolve(backend: str) -> TnMatmul:
    if backend == "triton":
        from .kernels.block_grad import tn_matmul_triton

        return tn_matmul_triton
    return tn_matmul_torch


def partial_linear_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: Sequence[torch.Tensor],
    specs: Sequence[Spec],
    transposed: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Apply ``PartialLinearFn`` with autocast handled outside the Function (cast x/W/b like F.linear)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return PartialLinearFn.apply(x, weight, bias, tuple(specs), transposed, backend, *blocks)
    if x.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {x.dtype} does not match the frozen weight's {weight.dtype}; "
            "cast the input or run under torch.autocast"
        )
    return PartialLinearFn.apply(x, weight, bias, tuple(specs), transposed, backend, *blocks)


def reference_block_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    specs: Sequence[Spec],
    grad_out: torch.Tensor,
    transposed: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Full-weight autograd reference: (grad_input, [block grads sliced out of the full weight grad])."""
    x = x.detach().requires_grad_(True)
    w = weight_logical(weight, transposed).detach().requires_grad_(True)
    y = F.linear(x, w, bias)
    gx, gw = torch.autograd.grad(y, (x, w), grad_out)
    out = []
    for feature, runs in specs:
        out.append(gather_runs(gw, runs, dim=0 if feature == "out" else 1))
    return gx, out
