"""Export a trained S²FT model as a plain, unpermuted Hugging Face folder that stock transformers loads."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2ft_lightning import layers
from surgery.analyze import analyze
from surgery.permute import apply_permutations, inverse, touched_tensors
from surgery.plan import S2Plan
from surgery.verify import verify_function


def unpermute(model: nn.Module, plan: S2Plan, *, verify: bool = True) -> None:
    """Undo ``plan``'s permutations on a plain (uninstalled) model, in place, proving the function is kept."""
    structures = analyze(model)
    items = [(structures[name], inverse(perm)) for name, perm in plan.permutations.items()]

    def mutate() -> None:
        apply_permutations(model, items, tied=structures.tied)

    if verify:
        verify_function(model, mutate, restore=touched_tensors(model, [c for c, _ in items]))
    else:
        mutate()


def merged_copy(model: nn.Module, plan: S2Plan, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` with the trained blocks folded in, S2 layers removed and order restored."""
    out = copy.deepcopy(model)
    if hasattr(out, "_s2ft_plan"):
        object.__delattr__(out, "_s2ft_plan")
    layers.uninstall(out, merge=True)
    for p in out.parameters():
        p.requires_grad_(True)
    unpermute(out, plan)
    if dtype is not None:
        out.to(dtype)
    return out


def export_merged(
    model: nn.Module,
    plan: S2Plan,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the merged, unpermuted model (and tokenizer) with ``save_pretrained``; atomic directory swap."""
    out_dir = Path(out_dir)
    merged = merged_copy(model, plan, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
