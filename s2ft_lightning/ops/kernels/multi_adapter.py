"""Triton kernels for multi-adapter serving: each batch row adds its own adapter's S²FT block term.

Columns (feature "in"): ``y[b] += x[b][:, cols_a] @ Δ_aᵀ`` — a gather of the adapter's input columns.
Rows (feature "out"): ``y[b][:, rows_a] += x[b] @ Δ_aᵀ`` — a scatter into the adapter's output columns.
Adapters are packed and zero-padded to a common ``K``: ``idx (A, K)`` int32, ``kcnt (A,)`` int32, and the
fp32 deltas ``(A, OUT, K)`` for columns / ``(A, K, IN)`` for rows; ``aid (B,)`` picks a slot per row (-1:
none). ``y`` is updated in place, accumulating in fp32 (inputs are upcast before ``tl.dot``: bf16 ``tl.dot``
is wrong in the Triton interpreter) and cast once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from s2ft_lightning.ops.kernels import check_interpreter, interpreting


@triton.jit
def _cols_kernel(
    x_ptr, y_ptr, aid_ptr, idx_ptr, d_ptr, k_ptr,
    T, OUT, K,
    sxb, sxt, syb, syt,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    a = tl.load(aid_ptr + b)
    slot = tl.maximum(a, 0)
    k_a = tl.where(a >= 0, tl.load(k_ptr + slot), 0)
    mask_t = offs_t < T
    mask_o = offs_o < OUT
    x_row = x_ptr + b.to(tl.int64) * sxb + offs_t.to(tl.int64)[:, None] * sxt
    d_base = d_ptr + slot.to(tl.int64) * OUT * K
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, k_a, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_a
        cols = tl.load(idx_ptr + slot * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        xg = tl.load(x_row + cols[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        d = tl.load(
            d_base + offs_o.to(tl.int64)[None, :] * K + offs_k[:, None],
            mask=mask_k[:, None] & mask_o[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(xg, d, input_precision="ieee")
        else:
            acc += tl.dot(xg, d)
    m = mask_t[:, None] & mask_o[None, :] & (k_a > 0)
    y_p = y_ptr + b.to(tl.int64) * syb + offs_t.to(tl.int64)[:, None] * syt + offs_o[None, :]
    yv = tl.load(y_p, mask=m, other=0.0).to(tl.float32)
    tl.store(y_p, (yv + acc).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rows_kernel(
    x_ptr, y_ptr, aid_ptr, idx_ptr, d_ptr, k_ptr,
    T, IN, K,
    sxb, sxt, syb, syt,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    j0 = tl.program_id(2) * BLOCK_J
    offs_j = j0 + tl.arange(0, BLOCK_J)
    a = tl.load(aid_ptr + b)
    slot = tl.maximum(a, 0)
    k_a = tl.where(a >= 0, tl.load(k_ptr + slot), 0)
    mask_t = offs_t < T
    mask_j = offs_j < k_a
    n_in = tl.where(j0 < k_a, IN, 0)  # programs past this adapter's rows do no work
    x_row = x_ptr + b.to(tl.int64) * sxb + offs_t.to(tl.int64)[:, None] * sxt
    d_base = d_ptr + slot.to(tl.int64) * K * IN
    acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    for i0 in range(0, n_in, BLOCK_K):
        offs_i = i0 + tl.arange(0, BLOCK_K)
        mask_i = offs_i < IN
        xv = tl.load(x_row + offs_i[None, :], mask=mask_t[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        d = tl.load(
            d_base + offs_j.to(tl.int64)[None, :] * IN + offs_i[:, None],
            mask=mask_i[:, None] & mask_j[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(xv, d, input_precision="ieee")
        else:
            acc += tl.dot(xv, d)
    rows = tl.load(idx_ptr + slot * K + offs_j, mask=mask_j, other=0).to(tl.int64)
    m = mask_t[:, None] & mask_j[None, :]
    y_p = y_ptr + b.to(tl.int64) * syb + offs_t.to(tl.int64)[:, None] * syt + rows[None, :]
    yv = tl.load(y_p, mask=m, other=0.0).to(tl.float32)
    tl.store(y_p, (yv + acc).to(y_ptr.dtype.element_ty), mask=m)


def _check(y: torch.Tensor, x: torch.Tensor, aid: torch.Tensor, idx: torch.Tensor, d: torch.Tensor) -> None:
    check_interpreter()
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be (B, T, features) with equal B, T")
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("x and y need a contiguous last dimension")
    if aid.shape != (x.shape[0],) or aid.dtype != torch.int32:
        raise ValueError(f"aid must be int32 of shape ({x.shape[0]},), got {aid.dtype} {tuple(aid.shape)}")
    if idx.dtype != torch.int32 or d.dtype != torch.float32 or not (idx.is_contiguous() and d.is_contiguous()):
        raise ValueError("packed idx must be contiguous int32 and deltas contiguous float32")


def launch_blocks(T: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K): small, >= 16 (tl.dot minimum), 64-128 when interpreting."""
    bt = 16 if T <= 16 else (32 if T <= 32 else 64)
    bn = 64 if (interpreting() or n <= 64) else 128
    return bt, bn, 64


def cols_term_(
    y: torch.Tensor,
    x: torch.Tensor,
    aid: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor,
    kcnt: torch.Tensor,
) -> torch.Tensor:
    """In place: ``y[b] += x[b][:, idx[a]] @ delta[a]ᵀ`` for ``a = aid[b] >= 0`` (delta ``(A, OUT, K)``)."""
    _check(y, x, aid, idx, delta)
    B, T, _ = x.shape
    OUT, K = delta.shape[1], delta.shape[2]
    if B == 0 or T == 0 or K == 0:
        return y
    bt, bo, bk = launch_blocks(T, OUT)
    grid = (B, triton.cdiv(T, bt), triton.cdiv(OUT, bo))
    _cols_kernel[grid](
        x, y, aid, idx, delta, kcnt, T, OUT, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_T=bt, BLOCK_O=bo, BLOCK_K=bk, IEEE=not interpreting(),
    )  # fmt: skip
    return y


def rows_term_(
    y: torch.Tensor,
    x: torch.Tensor,
    aid: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor,
    kcnt: torch.Tensor,
) -> torch.Tensor:
    """In place: ``y[b][:, idx[a]] += x[b] @ delta[a]ᵀ`` for ``a = aid[b] >= 0`` (delta ``(A, K, IN)``)."""
    _check(y, x, aid, idx, delta)
    B, T, IN = x.shape
    K = delta.shape[1]
    if B == 0 or T == 0 or K == 0:
        return y
    bt, bj, bk = launch_blocks(T, K)
    grid = (B, triton.cdiv(T, bt), triton.cdiv(K, bj))
    _rows_kernel[grid](
        x, y, aid, idx, delta, kcnt, T, IN, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk, IEEE=not interpreting(),
    )  # fmt: skip
    return y
