"""Write an S²FT adapter as an exact PEFT LoRA adapter, so LoRA serving stacks can serve it unchanged.

An S²FT update is a low-rank update with a one-hot factor. Trained columns ``c`` with values Δ ``(out, k)`` are
``ΔW = Δ · E_cᵀ``: LoRA ``B = Δ`` and ``A = E_cᵀ`` (``k × in``, a single 1 per row). Trained rows ``r`` with Δ
``(k, in)`` are ``ΔW = E_r · Δ``: ``B = E_r`` (``out × k``) and ``A = Δ``. A module with both (a fused adapter)
stacks the two factorizations (rank k₁ + k₂): ΔW = B₁A₁ + B₂A₂, which is how merging adds overlapping rows and
columns. With ``lora_alpha = r`` (scaling 1) the LoRA forward computes exactly the S²FT function, in the
original index space. GPT-2 Conv1D bases get ``fan_in_fan_out``; fused modules (``qkv_proj``, ``gate_up_proj``,
``c_attn``) need nothing special: the indices already address the fused weight. The directory is PEFT's:
``adapter_config.json`` (per-module ranks in ``rank_pattern``/``alpha_pattern``) + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from s2ft_lightning.adapters.format import Adapter, AdapterError, BlockDelta
from s2ft_lightning.atomic import atomic_directory

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its files


def _factors(b: BlockDelta, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A ``(k, in)``, B ``(out, k)``) of one block, fp32, with ``B @ A`` the block's update."""
    k = len(b.indices)
    idx = torch.tensor(b.indices, dtype=torch.long)
    if b.feature == "in":  # columns
        a = torch.zeros(k, in_f)
        a[torch.arange(k), idx] = 1.0
        return a, b.delta.float()
    e = torch.zeros(out_f, k)
    e[idx, torch.arange(k)] = 1.0
    return b.delta.float(), e


def lora_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (lora_A ``(r, in)``, lora_B ``(out, r)``) with ``lora_B @ lora_A`` the adapter's update."""
    adapter.validate()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in adapter.modules:
        out_f, in_f = adapter.module_shapes[module]
        parts = [_factors(b, out_f, in_f) for b in adapter.blocks if b.module == module]
        out[module] = (
            torch.cat([a for a, _ in parts], 0).contiguous(),
            torch.cat([b for _, b in parts], 1).contiguous(),
        )
    return out


def peft_lora_config(adapter: Adapter, ranks: dict[str, int], task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """PEFT's LoraConfig fields for these per-module ranks (alpha = rank: LoRA scaling 1)."""
    kinds = set(adapter.module_kinds.values())
    if kinds == {"linear", "conv1d"}:
        raise AdapterError("the adapter mixes Linear and Conv1D modules; PEFT's fan_in_fan_out is one setting for all")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": kinds == {"conv1d"},
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft_lora(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    max_rank: int | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, int]:
    """Write ``adapter`` as a PEFT LoRA directory; returns the rank of every module.

    ``max_rank`` refuses an adapter whose largest per-module rank is above it (many LoRA servers cap ranks).
    """
    experts = [m for m, k in adapter.module_kinds.items() if k == "expert"]
    if experts:
        raise AdapterError(
            f"the adapter trains MoE expert weights ({experts[0]}, ...); exporting those as PEFT LoRA is not "
            "supported yet: serve it with MultiAdapterModel or merge it into the base (s2ft adapter merge)"
        )
    factors = lora_factors(adapter)
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    if max_rank is not None and max(ranks.values()) > max_rank:
        worst = max(ranks, key=ranks.get)
        raise AdapterError(
            f"{worst!r} needs LoRA rank {ranks[worst]} (its trained rows/columns), above --max-rank {max_rank}; "
            "raise the limit or train with smaller ratios"
        )
    config = peft_lora_config(adapter, ranks, task_type)
    from safetensors.torch import save_file

    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    with atomic_directory(out_dir) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return ranks


def exported_size(path: str | os.PathLike) -> int:
    """Bytes of a directory's files."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
