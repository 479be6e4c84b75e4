"""Measurements that validate the memory model (benchmarks/memory_model.py) on this CPU, part by part.

- saved activations per token and layer: saved-tensor hooks on 2- and 4-layer models, the difference is one layer;
- base weight bytes for fp32 / bf16 / int8 / NF4 storage (torchao), the quantized tensors' own buffers counted;
- training state: the trainable weights' bytes times the optimizer's tensors, from a real AdamW step.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import train_suite as ts
from benchmarks.memory_model import Shape, activation_bytes_per_token_layer, base_weight_bytes
from benchmarks.step_profile import saved_activation_bytes

MODES = {"frozen": "frozen", "s2ft": "s2ft", "full": "full", "lora": "lora"}


def _cfg(shape: Shape, layers: int, dtype: str, tokens: int) -> dict[str, Any]:
    cfg = ts.get_config("tiny")
    cfg["model"] = dict(
        hidden_size=shape.hidden, num_hidden_layers=layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
    )  # fmt: skip
    cfg.update(dtype=dtype, batch=1, seqs=[tokens], o_ratio=shape.o_ratio, d_ratio=shape.d_ratio, slices="hand")
    return cfg


def activations_per_token_layer(shape: Shape, method: str, dtype: str, tokens: int = 128) -> float:
    """Measured saved bytes per token of one decoder layer (4-layer minus 2-layer model, halved)."""
    torch.manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    got = []
    for layers in (2, 4):
        built = ts.setup_mode(MODES[method], _cfg(shape, layers, dtype, tokens), "cpu")
        got.append(saved_activation_bytes(built, ids))
    return (got[1] - got[0]) / 2 / tokens


def check_activations(shape: Shape, dtypes=("float32", "bfloat16")) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        size = 4 if dtype == "float32" else 2
        for method in MODES:
            measured = activations_per_token_layer(shape, method, dtype)
            predicted = activation_bytes_per_token_layer(shape, method, size)
            rows.append({"part": f"activations/token/layer {method} {dtype}", "measured": measured,
                         "predicted": predicted, "rel_err": predicted / measured - 1})  # fmt: skip
    return rows


def check_weights(shape: Shape) -> list[dict[str, Any]]:
    from s2ft_lightning.quantize import quantize_base, weight_bytes

    rows = []
    for base in ("fp32", "bf16", "int8", "nf4"):
        dtype = "float32" if base == "fp32" else "bfloat16"
        model = ts.build_model(_cfg(shape, shape.layers, dtype, 16), "cpu").requires_grad_(False)
        if base in ("int8", "nf4"):
            quantize_base(model, base)
        measured = weight_bytes(model)
        predicted = base_weight_bytes(shape, base)
        rows.append({"part": f"base weights {base}", "measured": measured, "predicted": predicted,
                     "rel_err": predicted / measured - 1})  # fmt: skip
    return rows


def check_training_state(shape: Shape) -> list[dict[str, Any]]:
    """fp32 master + grad + AdamW's two moments of S²FT's trainable weights, after one real step."""
    built = ts.setup_mode("s2ft", _cfg(shape, shape.layers, "bfloat16", 16), "cpu")
    opt = torch.optim.AdamW(built.params, lr=1e-4)
    ids = torch.randint(0, shape.vocab, (1, 16))
    built.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in built.params)
    measured += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim())
    predicted = shape.s2ft_trainable() * 16
    return [{"part": "training state s2ft (bf16 base)", "measured": measured, "predicted": predicted,
             "rel_err": predicted / measured - 1}]  # fmt: skip
