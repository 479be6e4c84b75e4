"""Tiny random-init Hugging Face models for tests, audits and benchmarks, built generically from any model type.

`tiny_config` starts from ``AutoConfig.for_model(model_type)`` and shrinks every size-like field it
knows (hidden size, layers, heads, head_dim, intermediate, experts, vocab, positions), so one code path
covers Llama, GPT-2, OPT, BERT, Phi-3, MoE models and more. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

HIDDEN = 32
HEADS = 4
LAYERS = 2
INTERMEDIATE = 48
VOCAB = 128
POSITIONS = 64
EXPERTS = 4
MOE_INTERMEDIATE = 24

# Cases exercised by the surgery tests: (model_type, overrides). Covers MHA/GQA, qkv bias, explicit
# head_dim, q/k norm, fused qkv / gate_up, Conv1D, no-RoPE encoders and decoders, and MoE.
SUPPORTED_TINY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("llama", {}),
    ("llama", {"num_key_value_heads": 2}),
    ("mistral", {}),
    ("qwen2", {"num_key_value_heads": 2}),
    ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    ("gemma", {}),
    ("gemma2", {}),
    ("phi3", {}),
    ("phi3", {"num_key_value_heads": 2}),
    ("gpt2", {}),
    ("opt", {}),
    ("bert", {}),
    ("gpt_neox", {}),
    ("mixtral", {}),
    ("qwen2_moe", {}),
)

# Field name -> tiny value. Only fields present in the default config are touched.
_SHRINK: dict[str, int] = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "num_hidden_layers": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    "dim": HIDDEN,
    "hidden_dim": INTERMEDIATE,
    "d_ff": INTERMEDIATE,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "n_layer": LAYERS,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "intermediate_size": INTERMEDIATE,
    "ffn_dim": INTERMEDIATE,
    "n_inner": INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": INTERMEDIATE,
    "num_local_experts": EXPERTS,
    "num_experts": EXPERTS,
    "num_experts_per_tok": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    "n_positions": POSITIONS,
    "original_max_position_embeddings": POSITIONS,
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A config of ``model_type`` with every size shrunk to test scale; ``overrides`` win over defaults."""
    base = AutoConfig.for_model(model_type)
    d = base.to_dict()
    kw: dict[str, Any] = {k: v for k, v in _SHRINK.items() if k in d}
    heads_key = "num_attention_heads" if "num_attention_heads" in d else "n_head"
    heads = int(overrides.get(heads_key, HEADS))
    if "num_key_value_heads" in d:
        orig_q, orig_kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
        gqa = orig_kv is not None and orig_q is not None and orig_kv < orig_q
        kw["num_key_value_heads"] = max(1, heads // 2) if gqa else heads
    for key in ("head_dim", "d_kv"):
        if key in d:
            kw[key] = HIDDEN // heads
    if isinstance(d.get("rotary_dim"), int):
        kw["rotary_dim"] = min(d["rotary_dim"], HIDDEN // heads // 2)
    if d.get("query_pre_attn_scalar") is not None:
        kw["query_pre_attn_scalar"] = HIDDEN // heads
    if isinstance(d.get("sliding_window"), int) and d["sliding_window"] > 0:
        kw["sliding_window"] = POSITIONS // 2
    if "max_window_layers" in d:
        kw["max_window_layers"] = LAYERS
    kw.update(overrides)
    if "head_dim" in overrides and "query_pre_attn_scalar" in kw and "query_pre_attn_scalar" not in overrides:
        kw["query_pre_attn_scalar"] = overrides["head_dim"]
    vocab = int(kw.get("vocab_size", VOCAB))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = kw.get(key, d.get(key))
        if isinstance(v, int) and v >= vocab:
            kw[key] = vocab - 1
        elif isinstance(v, list):
            kw[key] = [min(int(x), vocab - 1) for x in v]
    # Re-run the constructor so derived fields (layer_types, head_dim, ...) follow the new sizes.
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded noise to every parameter and floating buffer a checkpoint holds, in place; returns ``model``.

    Hugging Face init leaves biases at 0, norms at 1 and routing-correction biases at 0, so a test on a fresh
    model cannot tell whether they are moved (or merged, or exported) correctly. Parameters get ``scale``·N(0, 1);
    buffers get noise relative to their magnitude (``scale`` for an all-zero buffer). Non-persistent buffers
    (RoPE frequencies) are left alone: they are rebuilt from the config, so no checkpoint could carry a change.
    Shared tensors are perturbed once.
    """
    g = torch.Generator().manual_seed(seed)
    params = {id(p) for p in model.parameters()}
    persistent = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)]
    seen: set[int] = set()
    for t in [*model.parameters(), *persistent]:
        if id(t) in seen or not t.is_floating_point() or t.is_meta:
            continue
        seen.add(id(t))
        noise = torch.randn(t.shape, generator=g).to(t.device, t.dtype)
        size = 1.0 if id(t) in params else float(t.abs().max().nan_to_num(posinf=1.0)) if t.numel() else 1.0
        t.add_(noise * (scale * (size or 1.0)))
    return model


def _non_persistent(model: torch.nn.Module, name: str) -> set[str]:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return owner._non_persistent_buffers_set


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-init fp32 model in eval mode (causal LM; masked LM for encoders like BERT), with every parameter
    and floating buffer perturbed (`perturb`)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = None
    auto_classes = (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel)
    if getattr(config, "is_decoder", False) is False and model_type in ("bert", "roberta", "distilbert"):
        auto_classes = (AutoModelForMaskedLM, AutoModel)
    errors = []
    for auto in auto_classes:
        try:
            model = auto.from_config(config, dtype=torch.float32)
            break
        except ValueError as e:  # this auto class does not know the model type
            errors.append(f"{auto.__name__}: {e}")
    if model is None:
        raise ValueError(f"cannot build a tiny {model_type!r} model: " + "; ".join(errors))
    return perturb(model.float(), seed).eval()
