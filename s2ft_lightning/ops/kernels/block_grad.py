"""Split-K skinny "transposed-A" matmul for block gradients: ``C = A[:, ia]ᵀ @ B[:, ib]`` in fp32.

Covers both block kinds: columns ``gᵀ x[:, cols]`` (ia = all, ib = cols or pre-gathered) and rows
``g[:, rows]ᵀ x`` (ia = rows, ib = all). The reduction runs over the token dim N (large), the outputs are
skinny, so N is split across programs that ``atomic_add`` fp32 partials into one zeroed fp32 buffer —
no batched matmul + ``.sum(0)``, no half-precision rounding of the gradient. Column selection by runs is
done through an int32 index vector, so gathering costs nothing extra.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from s2ft_lightning.ops.kernels import check_interpreter, interpreting


@triton.jit
def _tn_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    ia_ptr,
    ib_ptr,
    N,
    M,
    P,
    stride_an,
    stride_am,
    stride_bn,
    stride_bp,
    stride_cm,
    stride_cp,
    n_per_split,
    HAS_IA: tl.constexpr,
    HAS_IB: tl.constexpr,
    UPCAST: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    if HAS_IA:
        cols_a = tl.load(ia_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        cols_a = offs_m.to(tl.int64)
    if HAS_IB:
        cols_b = tl.load(ib_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    else:
        cols_b = offs_p.to(tl.int64)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        rows = offs_n.to(tl.int64)
        a = tl.load(
            a_ptr + rows[:, None] * stride_an + cols_a[None, :] * stride_am,
            mask=mask_n[:, None] & mask_m[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows[:, None] * stride_bn + cols_b[None, :] * stride_bp,
            mask=mask_n[:, None] & mask_p[None, :],
            other=0.0,
        )
        if UPCAST:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_p[None, :].to(tl.int64) * stride_cp
    mask_c = mask_m[:, None] & mask_p[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mask_c)
    else:
        tl.store(c_ptrs, acc, mask=mask_c)


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def runs_index(runs: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """int32 positions covered by the runs, in run order (cached per device: no H2D copy per backward)."""
    key = (tuple(tuple(r) for r in runs), str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        idx = torch.tensor([i for s, e in runs for i in range(s, e)], dtype=torch.int32, device=device)
        _INDEX_CACHE[key] = idx
    return idx


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick_split(n: int, tiles: int, device: torch.device, block_n: int) -> int:
    if interpreting() or device.type != "cuda":
        return 1 if n <= 4 * block_n else 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = max(1, (2 * sms) // max(tiles, 1))
    return max(1, min(want, triton.cdiv(n, 4 * block_n)))


def launch_config(a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[bool, tuple[int, int, int]]:
    """(UPCAST, (BLOCK_M, BLOCK_P, BLOCK_N)) the wrapper launches for these operand dtypes.

    fp32 or mixed operands are upcast and multiplied with IEEE fp32 precision (no TF32); equal 16-bit operands
    go to the tensor cores directly. Under the interpreter everything is upcast.
    """
    upcast = interpreting() or a_dtype == torch.float32 or b_dtype == torch.float32 or a_dtype != b_dtype
    return upcast, (64, 64, 64) if interpreting() else (64, 64, 32 if upcast else 64)


def tn_matmul_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_runs: Sequence[tuple[int, int]] | None = None,
    b_runs: Sequence[tuple[int, int]] | None = None,
    *,
    out: torch.Tensor | None = None,
    split: int | None = None,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """fp32 ``a[:, a_runs]ᵀ @ b[:, b_runs]`` for 2-D ``a`` (N×Ma) and ``b`` (N×Mb) via the split-K kernel.

    ``out`` (fp32, contiguous, zeroed when split > 1) receives the result if given (e.g. a flat grad buffer).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"tn_matmul needs 2-D a, b with equal rows; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a on {a.device} and b on {b.device}: move both to one device")
    check_interpreter()
    n = a.shape[0]
    # A single run is a strided view: no index vector needed.
    if a_runs is not None and len(a_runs) == 1:
        a, a_runs = a.narrow(1, a_runs[0][0], a_runs[0][1] - a_runs[0][0]), None
    if b_runs is not None and len(b_runs) == 1:
        b, b_runs = b.narrow(1, b_runs[0][0], b_runs[0][1] - b_runs[0][0]), None
    ia = runs_index(a_runs, a.device) if a_runs is not None else None
    ib = runs_index(b_runs, b.device) if b_runs is not None else None
    m = ia.numel() if ia is not None else a.shape[1]
    p = ib.numel() if ib is not None else b.shape[1]
    upcast, auto_block = launch_config(a.dtype, b.dtype)
    bm, bp, bn = block or auto_block
    tiles = triton.cdiv(m, bm) * triton.cdiv(p, bp)
    split = split or _pick_split(n, tiles, a.device, bn)
    if torch.are_deterministic_algorithms_enabled():
        split = 1  # split-K adds partial sums with fp32 atomics in arbitrary order; one program per tile does not
    n_per_split = triton.cdiv(triton.cdiv(n, split), bn) * bn
    split = max(1, triton.cdiv(n, n_per_split)) if n else 1
    if out is None:
        out = (torch.zeros if split > 1 else torch.empty)((m, p), dtype=torch.float32, device=a.device)
    elif out.shape != (m, p) or out.dtype != torch.float32:
        raise ValueError(f"out must be fp32 of shape {(m, p)}; got {out.dtype} {tuple(out.shape)}")
    if n == 0:
        return out.zero_()
    dummy = out  # never read when HAS_IA/HAS_IB is False
    grid = (triton.cdiv(m, bm), triton.cdiv(p, bp), split)
    _tn_kernel[grid](
        a,
        b,
        out,
        ia if ia is not None else dummy,
        ib if ib is not None else dummy,
        n,
        m,
        p,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        n_per_split,
        HAS_IA=ia is not None,
        HAS_IB=ib is not None,
        UPCAST=upcast,
        ATOMIC=split > 1,
        BLOCK_M=bm,
        BLOCK_P=bp,
        BLOCK_N=bn,
    )
    return out
