"""Partial backpropagation through a frozen linear layer plus trainable deltas on some rows or columns.

``y = x Wᵀ + b + Σ_blocks term``: a column block (``feature="in"``, columns ``c``, delta ``Δ (out, k)``) adds
``x[:, c] Δᵀ``; a row block (``feature="out"``, rows ``r``, delta ``Δ (k, in)``) adds ``x Δᵀ`` to outputs ``r``.
This equals ``F.linear`` with ``W + Δ`` scattered into the block positions, but the base weight is only ever
read (never written), so any optimizer, a sharded or quantized base and saving at any moment see one truth:
the delta parameter. The extra work is ``2·N·k·fan`` FLOPs per block, the size of the block itself.

Backward computes ``grad_input`` only when needed and, per block, only that block's weight gradient:
rows ``g[:, r]ᵀ x``, columns ``gᵀ x[:, c]``. Column blocks save only the gathered ``N×k`` input columns
(no full input). Block gradients are returned in the delta's dtype (fp32 for an fp32 master), accumulated in
fp32 by the selected backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from s2ft_lightning.blocks import Spec, add_runs_, dense, gather_runs, merged_weight
from surgery.linear import logical

__all__ = [
    "DeltaLinearFn",
    "Spec",
    "add_runs_",
    "delta_linear_autograd",
    "gather_runs",
    "merged_weight",
    "reference_block_grads",
    "tn_matmul_torch",
]

# tn_matmul(a, b, a_runs, b_runs) -> fp32 a[:, a_cols]ᵀ @ b[:, b_cols]; runs=None means all columns.
TnMatmul = Callable[[torch.Tensor, torch.Tensor, "tuple | None", "tuple | None"], torch.Tensor]


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
    if b.shape[1] < a.shape[1]:  # (bᵀ a)ᵀ: the narrow operand leads (measured 1.6x faster on CPU for N×k columns)
        return (b.t() @ a).t().contiguous().float()
    return (a.t() @ b).float()


# Copying the weight costs about as much as this many multiply-adds per element (2-core CPU, one thread: block
# terms win below, the copy above; measured crossover at N·k/in ≈ 20-30 on O and Down shapes).
MERGE_MACS_PER_ELEMENT = 32


def _fp32_merged(w: torch.Tensor, x: torch.Tensor, deltas, specs) -> torch.Tensor | None:
    """A per-call copy of the logical weight ``w`` holding ``W + Δ`` at the blocks, or None for the block terms.

    For a plain fp32 (or fp64) base, input and deltas with enough rows that the block terms' narrow matmuls
    (``x[:, c] Δᵀ``, ``g Δ``) cost more than copying the weight, ``x (W + Δ)ᵀ`` and ``g (W + Δ)`` are then each
    one matmul of the frozen layer's shape. In bf16/fp16 ``W + Δ`` would round a small update away, so those
    (and quantized, sharded and compiled bases) keep the terms.
    """
    if torch.compiler.is_compiling() or not deltas or w.dtype not in (torch.float32, torch.float64):
        return None
    if (
        type(w) not in (torch.Tensor, torch.nn.Parameter)
        or x.dtype != w.dtype
        or any(d.dtype != w.dtype for d in deltas)
    ):
        return None
    out_f, in_f = w.shape
    term_macs = sum(d.numel() for d in deltas) * (x.numel() // x.shape[-1])  # N·k·fan per block
    if term_macs < MERGE_MACS_PER_ELEMENT * out_f * in_f:
        return None
    m = w.clone()
    for d, (feature, runs) in zip(deltas, specs):
        add_runs_(m, runs, d.detach(), dim=1 if feature == "in" else 0)
    return m


class DeltaLinearFn(torch.autograd.Function):
    """``y = x (W + Δ)ᵀ + b`` with W, b frozen and gradients for the deltas (and x) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, specs, transposed, backend, *deltas):
        w = logical(weight, transposed)
        merged = _fp32_merged(w, x, deltas, specs)
        y = F.linear(x, w if merged is None else merged, bias)
        need_block = [ctx.needs_input_grad[6 + i] for i in range(len(deltas))]
        need_full_x = any(nb and f == "out" for nb, (f, _) in zip(need_block, specs))
        saved_cols = []
        for nb, d, (feature, runs) in zip(need_block, deltas, specs):
            dc = d.to(y.dtype)
            if feature == "in":
                xs = gather_runs(x, runs)
                if nb and not need_full_x:
                    # A contiguous copy: saving a view would pin all of x.
                    xs = xs.contiguous()
                    saved_cols.append(xs)
                if merged is None:
                    y.view(-1, y.shape[-1]).addmm_(xs.reshape(-1, xs.shape[-1]), dc.t())
            elif merged is None:
                add_runs_(y, runs, x @ dc.t())
        ctx.specs = specs
        ctx.transposed = transposed
        ctx.backend = backend
        ctx.need_block = need_block
        ctx.delta_dtypes = [d.dtype for d in deltas]
        keep_w = ctx.needs_input_grad[0]
        ctx.save_for_backward(
            weight if keep_w else None, x if need_full_x else None, *(deltas if keep_w else ()), *saved_cols
        )
        ctx.n_deltas = len(deltas) if keep_w else 0
        return y

    @staticmethod
    def backward(ctx, g):
        weight, x, *rest = ctx.saved_tensors
        deltas, saved_cols = rest[: ctx.n_deltas], rest[ctx.n_deltas :]
        grad_x = None
        merged = (
            _fp32_merged(logical(weight, ctx.transposed), g, deltas, ctx.specs) if ctx.needs_input_grad[0] else None
        )
        if merged is not None:
            grad_x = g @ merged
        elif ctx.needs_input_grad[0]:
            grad_x = g @ logical(dense(weight, g.dtype), ctx.transposed)
            for d, (feature, runs) in zip(deltas, ctx.specs):
                dc = d.to(g.dtype)
                if feature == "in":  # columns c of W+Δ: grad_x[:, c] += g Δ
                    add_runs_(grad_x, runs, g @ dc)
                else:  # rows r of W+Δ: grad_x += g[:, r] Δ
                    gr = gather_runs(g, runs)
                    grad_x.view(-1, grad_x.shape[-1]).addmm_(gr.reshape(-1, gr.shape[-1]), dc)
        out_features = g.shape[-1]
        g2 = g.reshape(-1, out_features)
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        tn_matmul = _resolve(ctx.backend)
        grads = []
        cols_iter = iter(saved_cols)
        for nb, (feature, runs), dt in zip(ctx.need_block, ctx.specs, ctx.delta_dtypes):
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


def delta_linear_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: Sequence[torch.Tensor],
    specs: Sequence[Spec],
    transposed: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Apply ``DeltaLinearFn`` with autocast handled outside the Function (cast x/W/b like F.linear)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return DeltaLinearFn.apply(x, weight, bias, tuple(specs), transposed, backend, *deltas)
    if x.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {x.dtype} does not match the frozen weight's {weight.dtype}; "
            "cast the input or run under torch.autocast"
        )
    return DeltaLinearFn.apply(x, weight, bias, tuple(specs), transposed, backend, *deltas)


def reference_block_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    specs: Sequence[Spec],
    grad_out: torch.Tensor,
    transposed: bool = False,
    deltas: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Full-weight autograd reference on ``W + Δ``: (grad_input, [block grads sliced out of the full grad])."""
    w = logical(weight, transposed).detach()
    if deltas is not None:
        w = logical(merged_weight(weight, deltas, specs, transposed), transposed)
    x = x.detach().requires_grad_(True)
    w = w.requires_grad_(True)
    y = F.linear(x, w, bias)
    gx, gw = torch.autograd.grad(y, (x, w), grad_out)
    out = []
    for feature, runs in specs:
        out.append(gather_runs(gw, runs, dim=0 if feature == "out" else 1))
    return gx, out
