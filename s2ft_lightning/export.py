"""Export a trained S²FT model as a plain, unpermuted Hugging Face folder that stock transformers loads."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2ft_lightning import layers
from s2ft_lightning.adapters import merge_adapter
from s2ft_lightning.atomic import atomic_directory
from s2ft_lightning.blocks import dense, is_quantized
from s2ft_lightning.models import load_model
from s2ft_lightning.pipeline import applied_plan
from s2ft_lightning.quantize import forget_quantization
from s2ft_lightning.state import S2State
from surgery.plan import PlanError, S2Plan
from surgery.planner import plan_id, unapply_plan


def merged_copy(model: nn.Module, plan: S2Plan | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` with the deltas folded in, S2 layers removed and the original order restored.

    The copy is a stock model (no applied plan, every parameter trainable as loaded); the unpermutation is
    verified to keep the function. ``plan`` defaults to the one applied to ``model``.
    """
    S2State.checked(model)
    applied = applied_plan(model)
    if applied is None:
        raise PlanError("this model carries no applied S2 plan: it is not an S²FT-prepared model")
    if plan is not None and plan_id(plan) != plan_id(applied):
        raise PlanError("the plan given is not the one applied to this model; pass the model's own plan or None")
    # A quantized base is copied dense (its dequantized values), so merging adds in fp32 exactly as on any base.
    memo = {id(p): nn.Parameter(dense(p).clone(), requires_grad=False) for p in model.parameters() if is_quantized(p)}
    out = copy.deepcopy(model, memo)
    forget_quantization(out)  # the copy's weights are dense
    if layers.installed(out):
        layers.uninstall(out, merge=True)
    for p in out.parameters():
        p.requires_grad_(True)
    unapply_plan(out)
    if dtype is not None:
        out.to(dtype)
    return out


def export_merged(
    model: nn.Module,
    plan: S2Plan | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the merged, unpermuted model (and tokenizer) with ``save_pretrained``, all-or-nothing."""
    merged = merged_copy(model, plan, dtype)
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def export_merged_from_adapter(
    adapter: Any, base: str | os.PathLike | None, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Load the stock base from ``base`` (a folder, .gguf or demo:smollm2), merge ``adapter`` and save it.

    The path for models that are sharded or quantized in memory: only the base on disk and the adapter are read.
    """
    if not base:
        raise PlanError("the module records no base model path to merge into; set model_name or export the adapter")
    model, tokenizer = load_model(base, dtype=dtype or "auto")
    merge_adapter(model, adapter)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
