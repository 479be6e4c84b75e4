"""Optimizer helpers for S2 blocks: param groups (weight decay on blocks only) and a multi-tensor AdamW.

Blocks are ordinary contiguous leaf parameters (fp32 masters for half-precision bases), so any torch
optimizer works on them. ``S2AdamW`` is ``torch.optim.AdamW`` whose step runs one Triton launch per param
group (the per-parameter loop dominates small-token steps on GPU); it falls back to AdamW's own step when
the Triton path does not apply. Its state_dict layout is AdamW's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layers import block_parameters
from .ops import backend_for

__all__ = ["S2AdamW", "block_param_groups"]


def block_param_groups(
    model_or_params: nn.Module | Iterable[nn.Parameter], weight_decay: float = 0.0, **group_options: Any
) -> list[dict[str, Any]]:
    """One param group holding every S2 block (weight decay applies to these only; frozen weights excluded)."""
    params = block_parameters(model_or_params) if isinstance(model_or_params, nn.Module) else list(model_or_params)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable S2 block parameters found; call s2ft_lightning.layers.install first")
    for p in params:
        if not p.is_contiguous():
            # torch.optim.AdamW(fused=True) writes the wrong memory for non-contiguous views on CPU.
            raise ValueError(f"block parameter of shape {tuple(p.shape)} is not contiguous; blocks must be standalone")
    return [{"params": params, "weight_decay": weight_decay, **group_options}]


class S2AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with a single-launch multi-tensor Triton step for fp32 block params."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, backend: str | None = None):  # fmt: skip
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.backend = backend

    def _group_uses_triton(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        if group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable"):
            return False
        if torch.is_tensor(group["lr"]):
            return False
        dev = params[0].device
        be = self.backend or backend_for(dev)
        if be != "triton":
            return False
        return all(
            p.dtype == torch.float32 and p.device == dev and p.is_contiguous() and not p.grad.is_sparse for p in params
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("S2AdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
            steps = {float(self.state[p]["step"]) for p in params}
            if len(steps) == 1 and self._group_uses_triton(group, params):
                self._triton_step(group, params, int(steps.pop()))
            else:
                self._torch_step(group, params)
        return loss

    def _triton_step(self, group: dict[str, Any], params: list[torch.Tensor], step: int) -> None:
        from .ops.kernels.adamw import multi_tensor_adamw_

        beta1, beta2 = group["betas"]
        multi_tensor_adamw_(
            params,
            [p.grad.contiguous() for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            step=step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Per-parameter reference, the same math as ``torch.optim.AdamW(foreach=False)``."""
        if group["amsgrad"] or group["maximize"]:
            raise NotImplementedError("S2AdamW supports neither amsgrad nor maximize; use torch.optim.AdamW")
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            st = self.state[p]
            step = float(st["step"])
            p.mul_(1 - lr * wd)
            st["exp_avg"].lerp_(p.grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bc1 = 1 - beta1**step
            bc2_sqrt = (1 - beta2**step) ** 0.5
            denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
