"""Shared helpers of the surgery tests: the tiny GQA Llama they use and parameter snapshots."""

from __future__ import annotations

import torch

from benchmarks.tiny_models import tiny_model


def tiny_llama(**kw) -> torch.nn.Module:
    """Tiny GQA Llama: 4 q heads, 2 kv heads, head_dim 8, hidden 32, intermediate 48, 2 layers, with biases."""
    base = dict(num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True)
    return tiny_model("llama", **{**base, **kw})


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (tied ones under each name)."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter equals its snapshot bit for bit."""
    now = state(model)
    assert now.keys() == before.keys()
    changed = [n for n in now if not torch.equal(now[n], before[n])]
    assert not changed, f"parameters changed: {changed}"
