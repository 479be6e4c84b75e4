"""Quantized frozen bases: int8 weight-only or NF4 (4-bit NormalFloat, as QLoRA uses) under the S2 deltas.

torchao's tensor subclasses hold the frozen weights of every linear layer of the decoder (not the embeddings or
the output head); ``F.linear`` dispatches to them, and the delta layer's backward multiplies by the dequantized
weight (`dense`). The deltas stay fp32 (or the base dtype). S²FT quantizes after surgery and after reading the
base values under the blocks (kept in the model's `S2State`), so adapters carry the original base's hashes and
apply to the unquantized base, and checkpoints still check the base they were trained on. Chosen by measurement
(docs/ARCHITECTURE.md): torchao 0.18's Python paths run with torch 2.13 on CPU; its NF4 tensor is what
torchtune's QLoRA uses.

All-or-nothing: every weight is quantized into a new tensor before any is swapped in, and the swaps are
journaled, so a failure leaves the base as it was (never a mixed base); a second mode is refused. A quantized
base saves like any model: the model's state dict (``state_dict()``, ``save_pretrained``) holds the dequantized
values, which stock ``from_pretrained`` loads. ``copy.deepcopy`` copies NF4 weights exactly (torchao 0.18's
clone re-quantizes them with its default scaler block size, which fails or drifts; see `_exact_nf4_clone`).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from s2ft_lightning.blocks import dense, is_quantized
from s2ft_lightning.layers import S2Linear
from s2ft_lightning.state import S2State
from surgery.linear import is_conv1d
from surgery.transaction import check_intact, transaction

__all__ = [
    "MODES",
    "NF4_BLOCK",
    "Quantize",
    "check_quantizable",
    "dense",
    "dequantize_base",
    "forget_quantization",
    "is_quantized",
    "quantize_base",
    "quantize_weight",
    "quantized_mode",
    "require_torchao",
    "weight_bytes",
]

Quantize = Literal["none", "int8", "nf4"]
MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # values per NF4 scale (QLoRA's block size)


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ImportError("a quantized base needs torchao: pip install 's2ft-lightning[quant]' (torchao>=0.18)") from e


def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` up to 256: NF4 double-quantizes its scales in groups of this many."""
    return max(d for d in range(1, min(256, n_blocks) + 1) if n_blocks % d == 0)


def _exact_nf4_clone(func, args, kwargs):
    """aten.clone of an NF4 tensor as a copy of its packed data and scales (torchao 0.18 re-quantizes the
    dequantized values with the default scaler block of 256, which asserts for a block count that is not a
    multiple of 256, e.g. SmolLM2's 192×576 k/v, and drifts otherwise)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, construct_nf4_args

    t = args[0]
    inner = {name: getattr(t, name).clone() for name in t.__tensor_flatten__()[0]}
    return NF4Tensor(*construct_nf4_args(t, inner))


@functools.cache
def _patch_nf4_clone() -> None:
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.clone.default] = _exact_nf4_clone


def quantize_weight(weight: torch.Tensor, mode: Quantize) -> torch.Tensor:
    """A torchao quantized copy of a 2-D weight (its storage layout), for ``mode`` "int8" or "nf4"."""
    require_torchao()
    w = weight.detach()
    if mode == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        if w.numel() % NF4_BLOCK:
            raise ValueError(f"NF4 needs weights whose size is a multiple of {NF4_BLOCK}; got shape {tuple(w.shape)}")
        _patch_nf4_clone()
        return to_nf4(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        tmp = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            tmp.weight.copy_(w)
        quantize_(tmp, Int8WeightOnlyConfig())
        return tmp.weight.detach()
    raise ValueError(f"quantize={mode!r}: use one of {MODES}")


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers whose frozen weights a quantized base stores quantized: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, (nn.Linear, S2Linear)) or is_conv1d(m)) and m is not head
    ]


def check_quantizable(model: nn.Module, mode: str, *, sharded: bool = False) -> None:
    """Every refusal of `quantize_base` that can be decided before anything changes (also before surgery:
    permuting and installing change no shape or module kind that matters here)."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {list(MODES)}")
    if mode == "none":
        return
    done = quantized_mode(model)
    if done not in ("none", mode):
        raise ValueError(f"the model is already quantized as {done!r}; load a fresh base to quantize it as {mode!r}")
    if sharded:
        raise ValueError("a quantized base under FSDP is not supported yet; use quantize none or DDP")
    require_torchao()
    targets = _targets(model)
    bad = [n for n, m in targets if is_conv1d(m) or getattr(m, "transposed", False)]
    if bad:
        raise ValueError(
            f"quantized bases need nn.Linear layers; {bad[0]!r} is a Conv1D (GPT-2 style): use quantize none"
        )
    if mode == "nf4":
        odd = [(n, tuple(m.weight.shape)) for n, m in targets if m.weight.numel() % NF4_BLOCK]
        if odd:
            raise ValueError(
                f"NF4 stores weights in blocks of {NF4_BLOCK} values; {odd[0][0]!r} {odd[0][1]} has a size that is "
                "not a multiple of it. Use quantize int8 (or none) for this model"
            )


def _dense_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """Write every quantized weight under ``module`` as its dequantized values: a stock checkpoint."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and is_quantized(value):
            state_dict[key] = dense(value).detach()


def _remove_dense_hook(model: nn.Module) -> None:
    for key in [k for k, h in model._state_dict_hooks.items() if h is _dense_state_dict_hook]:
        del model._state_dict_hooks[key]


def _add_dense_hook(model: nn.Module) -> None:
    _remove_dense_hook(model)  # idempotent: a rollback may run it where the hook is still registered
    model._register_state_dict_hook(_dense_state_dict_hook)


def _swap_weight(module: nn.Module, weight: nn.Parameter) -> None:
    module.weight = weight
    if isinstance(module, S2Linear):  # its base module holds the same weight: do not keep the dense one alive
        module.base_module.weight = weight


def quantize_base(model: nn.Module, mode: Quantize) -> int:
    """Quantize the frozen weights of the decoder's linear layers in place; returns how many were quantized.

    The base values under the S2 blocks are kept first (in the model's `S2State`), so adapters still identify
    the unquantized base. All-or-nothing (see the module docstring); idempotent for the same mode; the
    embeddings, the output head and trainable weights (e.g. a new task head) stay as they are.
    """
    check_intact(model)
    if mode == "none" or quantized_mode(model) == mode:
        check_quantizable(model, mode)
        return 0
    check_quantizable(model, mode)
    targets = [(n, m) for n, m in _targets(model) if not m.weight.requires_grad and not is_quantized(m.weight)]
    if not targets:
        raise ValueError("no frozen linear weights to quantize: prepare the model (or freeze its base) first")
    quantized = [quantize_weight(m.weight, mode) for _, m in targets]  # before any swap: a failure changes nothing
    with transaction(model, "quantizing the base", S2State) as txn:
        state = S2State.of(model)
        kept = {n: [m.base_block(i) for i in range(len(m.specs))] for n, m in targets if isinstance(m, S2Linear)}
        state.base_blocks = {**state.base_blocks, **kept}
        for (name, m), q in zip(targets, quantized):
            with txn.step(functools.partial(_swap_weight, m, m.weight), f"the quantized weight of {name}"):
                _swap_weight(m, nn.Parameter(q, requires_grad=False))
        txn.on_rollback(functools.partial(_remove_dense_hook, model), "the dense state-dict hook")
        _add_dense_hook(model)
        state.quantized = mode
    return len(targets)


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every quantized weight by its dequantized values (in place), e.g. before a merged export."""
    check_intact(model)
    with transaction(model, "dequantizing the base", S2State) as txn:
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and is_quantized(w):
                with txn.step(functools.partial(_swap_weight, m, w), f"the weight of {name}"):
                    _swap_weight(m, nn.Parameter(dense(w, dtype), requires_grad=False))
        txn.on_rollback(functools.partial(_add_dense_hook, model), "the dense state-dict hook")
        _remove_dense_hook(model)
        S2State.of(model).quantized = "none"


def forget_quantization(model: nn.Module) -> None:
    """Record that ``model``'s weights are dense now (a copy made with dense weights in place of quantized ones)."""
    _remove_dense_hook(model)
    state = S2State.of(model)
    if state is not None:
        state.quantized = "none"


def quantized_mode(model: nn.Module) -> str:
    """ "none", "int8" or "nf4": how this model's frozen base is stored."""
    state = S2State.of(model)
    return "none" if state is None else state.quantized


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
