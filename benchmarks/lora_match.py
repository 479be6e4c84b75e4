"""Rank matching for the PEFT LoRA baselines: the uniform rank whose trainable count is closest to S²FT's.

Benchmark and study support (not part of the library): the quality sweep, the train suite and the audit tool
size their LoRA arms with it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from surgery.linear import linear_shape

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def matched_lora_rank(
    model: torch.nn.Module, count: int, targets: Iterable[str] | str = LORA_TARGETS
) -> tuple[int, int]:
    """(rank, weights per unit of rank): the uniform LoRA rank on ``targets`` that trains closest to ``count``.

    ``targets`` are module-name suffixes (PEFT's ``target_modules``) or ``"all-linear"`` (every Linear /
    Conv1D but the output head, as PEFT reads it). Rank is at least 1. Used to size LoRA baselines.
    """
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        mods = [m for m in model.modules() if m is not head and linear_shape(m) is not None]
    else:
        names = set(targets)
        mods = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and linear_shape(m) is not None]
    per_rank = sum(sum(linear_shape(m)[:2]) for m in mods)
    if per_rank == 0:
        raise ValueError(f"no Linear/Conv1D modules named {targets!r} in the model; pass the names LoRA should adapt")
    return max(1, round(count / per_rank)), per_rank


def matched_expert_lora_rank(model: torch.nn.Module, count: int, param: str = "down_proj") -> tuple[int, int]:
    """(rank, weights per unit of rank) of PEFT LoRA on every 3-D expert parameter ``param`` closest to ``count``.

    PEFT gives each of the E experts its own rank-r factors: ``lora_A (r·E, in)``, ``lora_B (out, r·E)``.
    """
    per_rank = sum(
        p.shape[0] * (p.shape[1] + p.shape[2])
        for n, p in model.named_parameters()
        if n.endswith(f"experts.{param}") and p.dim() == 3
    )
    if per_rank == 0:
        raise ValueError(f"no 3-D expert parameters named {param!r} in the model")
    return max(1, round(count / per_rank)), per_rank
