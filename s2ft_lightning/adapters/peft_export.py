"""Write an S²FT adapter as an exact PEFT LoRA adapter, so LoRA serving stacks can serve it unchanged.

An S²FT update is a low-rank update with a one-hot factor. Trained columns ``c`` with values Δ ``(out, k)`` are
``ΔW = Δ · E_cᵀ``: LoRA ``B = Δ`` and ``A = E_cᵀ`` (``k × in``, a single 1 per row). Trained rows ``r`` with Δ
``(k, in)`` are ``ΔW = E_r · Δ``: ``B = E_r`` (``out × k``) and ``A = Δ``. A module with both (a fused adapter)
stacks the two factorizations (rank k₁ + k₂): ΔW = B₁A₁ + B₂A₂, which is how merging adds overlapping rows and
columns. With ``lora_alpha = r`` (scaling 1) the LoRA forward computes exactly the S²FT function, in the
original index space. GPT-2 Conv1D bases get ``fan_in_fan_out``; fused modules (``qkv_proj``, ``gate_up_proj``,
``c_attn``) need nothing special: the indices already address the fused weight. The directory is PEFT's:
``adapter_config.json`` (per-module ranks in ``rank_pattern``/``alpha_pattern``) + ``adapter_model.safetensors``.

MoE experts stored as 3-D tensors ``[E, out, in]`` become PEFT ``target_parameters``: one LoRA per tensor with
a rank r shared by its experts (the largest expert's block, the others zero-padded, experts that trained nothing
all zeros). PEFT reads ``lora_A`` ``(E·r, in)`` as ``[E, r, in]`` (expert-major) but ``lora_B`` ``(out, r·E)`` as
``[out, r, E]`` (expert-minor), so E must be the tensor's expert count, which the adapter records at extraction.
PEFT reads a 3-D tensor as ``[E, in, out]`` when its module declares ``is_transposed`` (gpt-oss, Aria) and as
``[E, out, in]`` otherwise, so a transposed tensor without the flag (Llama-4) gets each expert's factors
transposed (``(BA)ᵀ = AᵀBᵀ``); the adapter records these storage facts at extraction (``expert_storage``).
DBRX's stacked 2-D tensors are refused by name: PEFT applies a ``target_parameters`` LoRA while the module holding
the tensor runs, but ``DbrxExperts`` reads ``mlp.w1 / v1 / w2`` itself and passes views into ``mlp(...)``, so
under PEFT's wrapper it cannot even find them.

PEFT's ``task_type`` follows the base's architecture, also recorded at extraction (a causal LM, a classifier, an
encoder-decoder; none for a masked LM or a bare encoder, which PEFT serves with its plain ``PeftModel``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from s2ft_lightning.adapters.format import Adapter, AdapterError, BlockDelta
from s2ft_lightning.atomic import atomic_directory
from surgery.linear import split_expert_name

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


def _module_factors(adapter: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = adapter.module_shapes[module]
    parts = [_factors(b, out_f, in_f) for b in adapter.blocks if b.module == module]
    return torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1)


# Architecture class suffix -> PEFT task type (checked in this order).
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def task_type_of(adapter: Adapter) -> str | None:
    """PEFT's task type for the base the adapter was extracted from (None: plain PeftModel, e.g. a masked LM).

    An adapter that does not record its base's architecture (written by an older version) is taken as a causal LM.
    """
    arch = adapter.metadata.get("architecture")
    if arch is None:
        return "CAUSAL_LM"
    if arch.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if adapter.metadata.get("encoder_decoder") else "CAUSAL_LM"
    return next((task for suffix, task in _TASK_TYPES if arch.endswith(suffix)), None)


def expert_count(adapter: Adapter, key: str, trained: dict[int, str]) -> int:
    """How many experts the 3-D tensor ``key`` has (recorded at extraction); an older adapter without the record
    is refused unless every expert trained, since counting to the highest trained one would be wrong."""
    counts = adapter.metadata.get("expert_counts") or {}
    if key in counts:
        n = int(counts[key])
        if max(trained) >= n:
            raise AdapterError(f"{key!r}: the adapter trains expert {max(trained)} but records {n} experts")
        return n
    raise AdapterError(
        f"{key!r}: this adapter does not record how many experts the tensor has (written by an older version), so "
        "its PEFT LoRA factors cannot be laid out; extract the adapter again from the trained model"
    )


def _expert_params(adapter: Adapter) -> dict[str, dict[int, str]]:
    """``{"<experts>.<param>": {expert index: adapter module}}`` of the adapter's MoE expert blocks."""
    out: dict[str, dict[int, str]] = {}
    for module in adapter.modules:
        if adapter.module_kinds[module] == "expert":
            owner, param, e = split_expert_name(module)
            out.setdefault(f"{owner}.{param}", {})[e] = module
    return out


def lora_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (lora_A ``(r, in)``, lora_B ``(out, r)``) with ``lora_B @ lora_A`` the adapter's update.

    Experts are keyed by their 3-D parameter (``<experts>.<param>``), in PEFT's layout for it (module docstring).
    """
    adapter.validate()
    out = {
        m: tuple(t.contiguous() for t in _module_factors(adapter, m))
        for m in adapter.modules
        if adapter.module_kinds[m] != "expert"
    }
    for key, members in _expert_params(adapter).items():
        per = {e: _module_factors(adapter, m) for e, m in members.items()}
        n = expert_count(adapter, key, members)
        storage = (adapter.metadata.get("expert_storage") or {}).get(key, {})
        if storage.get("stored") == "in_out" and not storage.get("flags_transposed"):
            # PEFT reads this expert's slice as [out, in] but it holds the logical weight transposed:
            # (B A)ᵀ = Aᵀ Bᵀ, so PEFT's factors are A' = Bᵀ and B' = Aᵀ
            per = {e: (b.t(), a.t()) for e, (a, b) in per.items()}
        r = max(a.shape[0] for a, _ in per.values())
        out_f, in_f = per[min(per)][1].shape[0], per[min(per)][0].shape[1]
        a3, b3 = torch.zeros(n, r, in_f), torch.zeros(out_f, r, n)
        for e, (a, b) in per.items():
            a3[e, : a.shape[0]] = a
            b3[:, : b.shape[1], e] = b
        out[key] = (a3.reshape(n * r, in_f), b3.reshape(out_f, r * n))
    return out


# Declaration order of the 3-D parameters in transformers' experts modules. PEFT wraps a module once per
# targeted parameter in this order, each wrapper around the last, so the first is the innermost and its keys
# carry one ``base_layer.`` per parameter wrapped after it.
_EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


def _peft_keys(keys: list[str], expert_params: list[str]) -> dict[str, str]:
    """The module path PEFT stores each key's factors under (a linear's name, or a nested ParamWrapper's)."""
    out = {k: k for k in keys}
    for key in expert_params:
        owner, _, param = key.rpartition(".")
        wrapped_after = [p for p in _EXPERT_PARAM_ORDER[_EXPERT_PARAM_ORDER.index(param) + 1 :]
                         if f"{owner}.{p}" in expert_params]  # fmt: skip
        out[key] = owner + ".base_layer" * len(wrapped_after)
    return out


def peft_lora_config(adapter: Adapter, ranks: dict[str, int], task_type: str | None = "auto") -> dict[str, Any]:
    """PEFT's LoraConfig fields for these per-module ranks (alpha = rank: LoRA scaling 1); ``task_type`` "auto"
    follows the base's architecture (`task_type_of`)."""
    if task_type == "auto":
        task_type = task_type_of(adapter)
    kinds = set(adapter.module_kinds.values())
    if {"linear", "conv1d"} <= kinds:
        raise AdapterError("the adapter mixes Linear and Conv1D modules; PEFT's fan_in_fan_out is one setting for all")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    params = sorted(k for k in ranks if k not in adapter.module_kinds)  # 3-D expert parameters
    modules = sorted(k for k in ranks if k in adapter.module_kinds)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": modules or None,
        "target_parameters": params or None,
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
    task_type: str | None = "auto",
) -> dict[str, int]:
    """Write ``adapter`` as a PEFT LoRA directory; returns the rank of every module.

    ``max_rank`` refuses an adapter whose largest per-module rank is above it (many LoRA servers cap ranks);
    ``task_type`` "auto" follows the base's architecture (`task_type_of`), None writes no task type.
    """
    experts = _expert_params(adapter)
    storage = adapter.metadata.get("expert_storage") or {}
    for key in experts:
        if storage.get(key, {}).get("stacked"):
            raise AdapterError(
                f"{key!r}: PEFT cannot serve a LoRA on stacked 2-D experts tensors (DBRX): its target_parameters "
                "LoRA is applied while the module holding the tensor runs, but DbrxExperts reads mlp.w1/v1/w2 "
                "itself and passes views into mlp(...); serve this adapter with MultiAdapterModel or merge it "
                "into the base (s2ft adapter merge)"
            )
        if key.rpartition(".")[2] not in _EXPERT_PARAM_ORDER:
            raise AdapterError(
                f"{key!r}: PEFT LoRA export knows the expert parameters {_EXPERT_PARAM_ORDER}, not this one; "
                "serve this adapter with MultiAdapterModel or merge it into the base (s2ft adapter merge)"
            )
    factors = lora_factors(adapter)
    # lora_A of an expert parameter stacks (experts x rank) rows
    ranks = {
        k: a.shape[0] // (expert_count(adapter, k, experts[k]) if k in experts else 1) for k, (a, _) in factors.items()
    }
    if max_rank is not None and max(ranks.values()) > max_rank:
        worst = max(ranks, key=ranks.get)
        raise AdapterError(
            f"{worst!r} needs LoRA rank {ranks[worst]} (its trained rows/columns), above --max-rank {max_rank}; "
            "raise the limit or train with smaller ratios"
        )
    config = peft_lora_config(adapter, ranks, task_type)
    from safetensors.torch import save_file

    tensors = {}
    paths = _peft_keys(list(factors), list(experts))
    for key, (a, b) in factors.items():
        tensors[f"{PREFIX}{paths[key]}.lora_A.weight"] = a
        tensors[f"{PREFIX}{paths[key]}.lora_B.weight"] = b
    with atomic_directory(out_dir) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return ranks
