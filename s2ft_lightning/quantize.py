"""Quantized frozen bases: int8 weight-only or NF4 (4-bit NormalFloat, as QLoRA uses) under the S2 deltas.

torchao's tensor subclasses hold the frozen weights of every linear layer of the decoder (not the embeddings or
the output head); ``F.linear`` dispatches to them, and the delta layer's backward multiplies by the dequantized
weight (`dense`). The deltas stay fp32 (or the base dtype). S²FT quantizes after surgery and after reading the
base values under the blocks, so adapters carry the original base's hashes and apply to the unquantized base,
and checkpoints still check the base they were trained on. Chosen by measurement (docs/ARCHITECTURE.md): torchao
0.18's Python paths run with torch 2.13 on CPU; its NF4 tensor is what torchtune's QLoRA uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from surgery.linear import is_conv1d

Quantize = Literal["none", "int8", "nf4"]
MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # values per NF4 scale (QLoRA's block size)
QUANTIZED_ATTR = "_s2ft_quantized"  # on the model: how its frozen base is stored


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ImportError("a quantized base needs torchao: pip install 's2ft-lightning[quant]' (torchao>=0.18)") from e


def is_quantized(t: torch.Tensor) -> bool:
    """True for a torchao quantized weight (NF4 or int8 weight-only)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):  # the common case, and one torch.compile can trace
        return False
    return type(t).__module__.startswith("torchao")


def dense(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a plain tensor: dequantized when quantized (in its original dtype unless ``dtype``)."""
    if is_quantized(weight):
        if hasattr(weight, "get_original_weight"):  # NF4Tensor
            weight = weight.get_original_weight()
        else:
            weight = weight.dequantize()
    return weight if dtype is None else weight.to(dtype)


def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` up to 256: NF4 double-quantizes its scales in groups of this many."""
    return max(d for d in range(1, min(256, n_blocks) + 1) if n_blocks % d == 0)


def quantize_weight(weight: torch.Tensor, mode: Quantize) -> torch.Tensor:
    """A torchao quantized copy of a 2-D weight (its storage layout), for ``mode`` "int8" or "nf4"."""
    require_torchao()
    w = weight.detach()
    if mode == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        if w.numel() % NF4_BLOCK:
            raise ValueError(f"NF4 needs weights whose size is a multiple of {NF4_BLOCK}; got shape {tuple(w.shape)}")
        return to_nf4(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        tmp = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            tmp.weight.copy_(w)
        quantize_(tmp, Int8WeightOnlyConfig())
        return tmp.weight.detach()
    raise ValueError(f"quantize={mode!r}: use one of {MODES}")


def quantize_base(model: nn.Module, mode: Quantize) -> int:
    """Quantize the frozen weights of the decoder's linear layers in place; returns how many were quantized.

    S2 layers keep the original base values under their blocks first (`S2Linear.keep_base_blocks`), so their
    adapters still identify the unquantized base. Idempotent; the embeddings and the output head stay as they are.
    """
    if mode == "none" or getattr(model, QUANTIZED_ATTR, None) == mode:
        return 0
    if getattr(model, QUANTIZED_ATTR, None) is not None:
        raise ValueError(f"the model is already quantized as {getattr(model, QUANTIZED_ATTR)!r}; load a fresh base")
    from s2ft_lightning.layers import S2Linear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, (nn.Linear, S2Linear)) or is_conv1d(m)) and m is not head
    ]
    bad = [n for n, m in targets if is_conv1d(m) or getattr(m, "transposed", False)]
    if bad:
        raise ValueError(
            f"quantized bases need nn.Linear layers; {bad[0]!r} is a Conv1D (GPT-2 style): use quantize none"
        )
    count = 0
    for _, m in targets:
        if m.weight.requires_grad or is_quantized(m.weight):
            continue  # trained weights (a new task head) stay as they are
        if isinstance(m, S2Linear):
            m.keep_base_blocks()
        m.weight = nn.Parameter(quantize_weight(m.weight, mode), requires_grad=False)
        count += 1
    if count == 0:
        raise ValueError("no frozen linear weights to quantize: prepare the model (or freeze its base) first")
    model.__dict__[QUANTIZED_ATTR] = mode
    return count


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every quantized weight by its dequantized values (in place), e.g. before a merged export."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and is_quantized(w):
            m.weight = nn.Parameter(dense(w, dtype), requires_grad=False)
    model.__dict__.pop(QUANTIZED_ATTR, None)


def quantized_mode(model: nn.Module) -> str:
    """ "none", "int8" or "nf4": how this model's frozen base is stored."""
    return getattr(model, QUANTIZED_ATTR, None) or "none"


def weight_bytes(model: nn.Module) -> int:
    """Bytes the parameters hold in memory, counting a quantized weight's packed data, scales and codebook."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_quantized(p):
            inner = [t for t in vars(p).values() if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in inner)
        else:
            total += p.numel() * p.element_size()
    return total
