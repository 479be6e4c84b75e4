"""Partial-backprop ops (frozen base + trainable deltas) and the one dispatch point choosing Triton or torch.

``S2FT_KERNELS`` = ``auto`` (default), ``triton`` (force; error if triton is missing) or ``torch``.
``auto`` picks Triton on CPU when ``TRITON_INTERPRET=1`` (tests), and on CUDA only once
``CUDA_AUTO_BACKEND`` says so: the kernels are verified under the interpreter but have not yet been measured
against torch on a GPU (tools/gpu_check.sh does), so CUDA defaults to the torch reference until they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .delta_linear import (
    DeltaLinearFn,
    Spec,
    add_runs_,
    delta_linear_autograd,
    gather_runs,
    merged_weight,
    reference_block_grads,
    tn_matmul_torch,
)
from .kernels import installed_interpreter_problem, interpreter_problem, triton_available

__all__ = [
    "DeltaLinearFn",
    "Spec",
    "add_runs_",
    "backend_for",
    "delta_linear",
    "gather_runs",
    "installed_interpreter_problem",
    "interpreter_problem",
    "kernel_mode",
    "merged_weight",
    "reference_block_grads",
    "tn_matmul_torch",
    "triton_available",
]

_MODES = ("auto", "triton", "torch")
# What ``auto`` picks for CUDA tensors; switch to "triton" once the GPU benchmark shows the kernels win.
CUDA_AUTO_BACKEND = "torch"


def kernel_mode() -> str:
    """The ``S2FT_KERNELS`` setting, validated."""
    mode = os.environ.get("S2FT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"S2FT_KERNELS={mode!r} is not one of {_MODES}; unset it or pick one of those")
    return mode


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``, following ``S2FT_KERNELS``."""
    mode = kernel_mode()
    dev = torch.device(device).type
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("S2FT_KERNELS=triton but triton cannot be imported; install triton or unset it")
        if dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"S2FT_KERNELS=triton on {dev} tensors needs TRITON_INTERPRET=1 (set before importing triton)"
            )
        if dev != "cuda" and (why := installed_interpreter_problem()):
            raise RuntimeError(f"S2FT_KERNELS=triton on {dev}: {why}")
        return "triton"
    if dev == "cuda":
        return CUDA_AUTO_BACKEND if triton_available() else "torch"
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1" and not installed_interpreter_problem():
        return "triton"
    return "torch"


def delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: Sequence[torch.Tensor],
    specs: Sequence[Spec],
    *,
    transposed: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, W + Δ, b)`` for a frozen ``W``, whose backward gives grads to ``deltas`` (and ``x``) only.

    ``specs[i]`` is ``(feature, runs)`` of ``deltas[i]`` in the logical ``[out, in]`` orientation (rows
    ``(k, in)`` for ``"out"``, columns ``(out, k)`` for ``"in"``); ``transposed`` marks a Conv1D weight
    stored ``[in, out]``. ``backend`` overrides the dispatch ("torch"/"triton").
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("delta_linear needs a frozen weight and bias (requires_grad=False); only deltas train")
    if len(deltas) != len(specs):
        raise ValueError(f"got {len(deltas)} deltas but {len(specs)} specs; pass one spec per delta")
    # Under torch.compile the torch path is traced (inductor fuses it); Triton wrappers stay eager-only.
    be = "torch" if torch.compiler.is_compiling() else (backend or backend_for(x.device))
    return delta_linear_autograd(x, weight, bias, deltas, specs, transposed, be)
