"""Multi-tensor AdamW: one Triton launch updates every fp32 block of a param group.

The tensors are reached through int64 pointer tables (param, grad, exp_avg, exp_avg_sq), so no flat copies
are made and the optimizer state stays the per-parameter layout of ``torch.optim.AdamW`` (state_dicts are
interchangeable). Each program updates one CHUNK of one tensor; the math mirrors AdamW(foreach=False).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

CHUNK = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


@triton.jit
def _adamw_kernel(
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    numels,
    chunk_tensor,
    chunk_start,
    lr,
    beta1,
    beta2,
    eps,
    decay,
    step_size,
    bc2_sqrt,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p_base = tl.load(p_ptrs + t).to(tl.pointer_type(tl.float32))
    g_base = tl.load(g_ptrs + t).to(tl.pointer_type(tl.float32))
    m_base = tl.load(m_ptrs + t).to(tl.pointer_type(tl.float32))
    v_base = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_base + offs, mask=mask, other=0.0)
        g = tl.load(g_base + offs, mask=mask, other=0.0)
        m = tl.load(m_base + offs, mask=mask, other=0.0)
        v = tl.load(v_base + offs, mask=mask, other=0.0)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        tl.store(p_base + offs, p, mask=mask)
        tl.store(m_base + offs, m, mask=mask)
        tl.store(v_base + offs, v, mask=mask)


def multi_tensor_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block: int = 1024,
) -> None:
    """In-place AdamW update of contiguous fp32 tensors on one device, in a single kernel launch."""
    if not params:
        return
    dev = params[0].device
    for group in (params, grads, exp_avgs, exp_avg_sqs):
        for t in group:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device != dev:
                raise ValueError(
                    f"multi_tensor_adamw_ needs contiguous fp32 tensors on {dev}; got {t.dtype} on {t.device} "
                    f"(contiguous={t.is_contiguous()})"
                )
    numels = [p.numel() for p in params]
    chunk_tensor, chunk_start = [], []
    for i, n in enumerate(numels):
        for s in range(0, n, CHUNK):
            chunk_tensor.append(i)
            chunk_start.append(s)
    if not chunk_tensor:
        return
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    nt, nc = len(numels), len(chunk_tensor)
    # One host->device copy: [p ptrs | g ptrs | m ptrs | v ptrs | numels | chunk tensor | chunk start].
    table = torch.tensor(
        [t.data_ptr() for group in (params, grads, exp_avgs, exp_avg_sqs) for t in group]
        + numels
        + chunk_tensor
        + chunk_start,
        dtype=torch.int64,
    ).to(dev, non_blocking=True)
    _adamw_kernel[(nc,)](
        table[0:nt],
        table[nt : 2 * nt],
        table[2 * nt : 3 * nt],
        table[3 * nt : 4 * nt],
        table[4 * nt : 5 * nt],
        table[5 * nt : 5 * nt + nc],
        table[5 * nt + nc :],
        lr,
        beta1,
        beta2,
        eps,
        1.0 - lr * weight_decay,
        lr / bc1,
        bc2**0.5,
        CHUNK=CHUNK,
        BLOCK=min(block, CHUNK),
    )
