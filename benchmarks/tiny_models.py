"""Tiny random-init Hugging Face models for tests, audits and benchmarks, built generically from any model type.

`tiny_config` starts from ``AutoConfig.for_model(model_type)`` and shrinks every size-like field it
knows (hidden size, layers, heads, head_dim, intermediate, experts, vocab, positions, MLA ranks, image and
patch sizes) at the top level and in every nested sub-config (a vision-language model's text and vision
configs, DBRX's attention and FFN configs), so one code path covers Llama, GPT-2, OPT, BERT, Phi-3, MoE,
MLA and vision-language models. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    PretrainedConfig,
)

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

# More size fields, for the families beyond the tested core (encoder-decoders, MLA, grouped routing,
# hybrid layer patterns, vision towers). Kept apart so the core families' tiny configs never change.
_SHRINK_MORE: dict[str, int] = {
    "embed_dim": HIDDEN,
    "out_hidden_size": HIDDEN,
    "projection_dim": HIDDEN,
    "text_embed_dim": HIDDEN,
    "vision_embed_dim": HIDDEN,
    "hidden_channels": HIDDEN,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_encoder_layers": LAYERS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "encoder_ffn_dim": INTERMEDIATE,
    "decoder_ffn_dim": INTERMEDIATE,
    "depth": LAYERS,
    "ffn_hidden_size": INTERMEDIATE,
    "expert_intermediate_size": MOE_INTERMEDIATE,
    "moe_num_experts": EXPERTS,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_top_k": 2,
    "moe_k": 2,
    "num_experts_per_token": 2,
    "top_k": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "shared_experts_intermediate_size": INTERMEDIATE,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "max_seq_len": POSITIONS,
    "max_source_positions": POSITIONS,
    "max_target_positions": POSITIONS,
    "full_attention_interval": 2,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "image_size": 32,
    "patch_size": 8,
    "mm_tokens_per_image": 4,
    "num_mel_bins": 16,
    "linear_num_value_heads": 4,
    "linear_num_heads": HEADS,
    "linear_head_dim": HIDDEN // HEADS,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "num_kv_shared_layers": 0,
    "mamba_expand": 2,
    "state_size": 8,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrunk(d: dict[str, Any], overrides: dict[str, Any], core: bool, mrope: bool = False) -> dict[str, Any]:
    """Overrides that shrink the config dict ``d`` (only fields it has, only downwards); ``mrope``: the config
    class reads multimodal RoPE sections (which must follow the shrunk head_dim) even when it has none."""
    table = dict(_SHRINK) if core else {**_SHRINK, **_SHRINK_MORE}
    kw: dict[str, Any] = {k: v for k, v in table.items() if k in d and (core or not _is_int(d[k]) or d[k] > v)}
    if not core and "n_group" in d and _is_int(d["n_group"]) and d["n_group"] > 1:
        kw["n_group"], kw["topk_group"] = 2, 1  # 8 routed experts in 2 groups: group-limited routing stays real
    heads_key = next((k for k in ("num_attention_heads", "n_head", "num_heads") if k in d), "num_attention_heads")
    heads = int(overrides.get(heads_key, kw.get(heads_key, HEADS)))
    if "num_key_value_heads" in d:
        orig_q, orig_kv = d.get(heads_key), d.get("num_key_value_heads")
        gqa = _is_int(orig_kv) and _is_int(orig_q) and orig_kv < orig_q
        kw["num_key_value_heads"] = max(1, heads // 2) if gqa else heads
    hidden = int(overrides.get("hidden_size", kw.get("hidden_size", HIDDEN)))
    for key in ("head_dim", "d_kv"):
        if key in d and (core or d[key] is not None):
            kw[key] = hidden // heads
    if "head_dim" in d and _is_int(d.get("qk_rope_head_dim")) and d["qk_rope_head_dim"] > 0:
        kw["head_dim"] = _SHRINK_MORE["qk_rope_head_dim"]  # MLA: head_dim is the rotary part's width
    if isinstance(d.get("rotary_dim"), int):
        kw["rotary_dim"] = min(d["rotary_dim"], hidden // heads // 2)
    if d.get("query_pre_attn_scalar") is not None:
        kw["query_pre_attn_scalar"] = hidden // heads
    if isinstance(d.get("sliding_window"), int) and d["sliding_window"] > 0:
        kw["sliding_window"] = POSITIONS // 2
    if "max_window_layers" in d:
        kw["max_window_layers"] = LAYERS
    layers_before = next((d[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if _is_int(d.get(k))), 0)
    if not core and layers_before > LAYERS:  # per-layer lists (sparsity patterns, ...) keep their first layers
        for key, v in d.items():
            if isinstance(v, list) and len(v) == layers_before and key not in kw and key != "layer_types":
                kw[key] = v[:LAYERS]
    kinds = d.get("layer_types")
    if isinstance(kinds, list) and len(set(kinds)) > 1 and len(set(kinds[:LAYERS])) < min(LAYERS, len(set(kinds))):
        kw["layer_types"] = list(dict.fromkeys(kinds))[:LAYERS]  # keep both kinds (linear + full attention)
    rope = d.get("rope_parameters")
    if not core and isinstance(rope, dict) and (isinstance(rope.get("mrope_section"), list) or mrope):
        rotary = int((hidden // heads) * (rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1))
        half = rotary // 2  # multimodal RoPE sections must add up to half the rotary part of a head
        sec = rope.get("mrope_section") or [16, 24, 24]  # Qwen2-VL's default when the config has none
        new = [max(1, x * half // sum(sec)) for x in sec]
        new[-1] += half - sum(new)
        kw["rope_parameters"] = {**rope, "mrope_section": new}
    layers = d.get("per_layer_config")
    if not core and isinstance(layers, dict) and layers:  # heterogeneous layers: layer 1 keeps the first override
        first = next(iter(layers.values()))
        kw["per_layer_config"] = {"1": {k: v for k, v in _shrunk(first, {}, core=False).items() if k in first}}
    if not core:
        for key, v in d.items():  # per-layer lists (layer_types, ...) follow the new layer count
            if isinstance(v, list) and len(v) > LAYERS and key.endswith(("layer_types", "_layers_block_type")):
                kw.setdefault(key, None)
        for key in ("vision_feature_layer",):
            if _is_int(d.get(key)) and d[key] < -1:
                kw[key] = -1
    kw.update(overrides)
    if "head_dim" in overrides and "query_pre_attn_scalar" in kw and "query_pre_attn_scalar" not in overrides:
        kw["query_pre_attn_scalar"] = overrides["head_dim"]
    vocab = int(kw.get("vocab_size", d.get("vocab_size", VOCAB)) or VOCAB)
    # Special and multimodal token ids must stay inside the shrunk vocabulary, each on its own id (an image
    # token equal to the eos token would change what the model does): eos/bos/pad share the last id, the
    # others take distinct ids below it, in a fixed (sorted) order.
    special = sorted(k for k in d if k.endswith(("_token_id", "_token_index", "_token_ids")) and k not in _SHARED_LAST)
    slot = {k: vocab - 2 - i for i, k in enumerate(special)}
    for key, v in d.items():
        if key not in slot and key not in _SHARED_LAST:
            continue
        new = vocab - 1 if key in _SHARED_LAST else max(0, slot[key])
        v = kw.get(key, v)
        if _is_int(v) and v >= vocab:
            kw[key] = new
        elif isinstance(v, list) and any(_is_int(x) and x >= vocab for x in v):
            kw[key] = [new if _is_int(x) and x >= vocab else x for x in v]
    return kw


_SHARED_LAST = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


# Fields real checkpoints carry that a default config lacks and the model needs: transformers 5.24 builds DBRX
# attention from ``attn_config.rope_theta`` (DbrxAttentionConfig does not define it) and clamps q/k/v with
# ``clip_qkv`` (None fails in torch 2.13; checkpoints set 8); ESM's attention mask reads pad_token_id (1 in every
# checkpoint); GPT-Neo's attention_types must cover the (now 2) layers.
_CHECKPOINT_FIELDS: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},
    "esm": {"pad_token_id": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A config of ``model_type`` with every size shrunk to test scale; ``overrides`` win over defaults.

    Fields of the core table (`_SHRINK`) always take its values, so the tested families keep the configs their
    tests expect; the fuller table (`_SHRINK_MORE`: MLA ranks, expert groups, layer patterns, image sizes, ...)
    only shrinks what is larger. Every sub-config is shrunk the same way and passed back as a dict.
    """
    base = AutoConfig.for_model(model_type)
    d = base.to_dict()
    subs = {k: getattr(base, k) for k in (getattr(base, "sub_configs", None) or {}) if hasattr(base, k)}
    kw = _shrunk(d, {}, core=True)
    mrope = "mrope_section" in getattr(type(base), "ignore_keys_at_rope_validation", ())
    kw.update({k: v for k, v in _shrunk(d, {}, core=False, mrope=mrope).items() if k not in kw})
    for key, sub in subs.items():
        if isinstance(sub, PretrainedConfig):
            sd = sub.to_dict()
            mrope = "mrope_section" in getattr(type(sub), "ignore_keys_at_rope_validation", ())
            kw[key] = {**sd, **_shrunk(sd, {}, core=False, mrope=mrope)}
            kw[key] = {k: v for k, v in kw[key].items() if v is not None or k not in sd or sd[k] is None}
    if "text_config" in kw and isinstance(kw["text_config"], dict):
        text_hidden = kw["text_config"].get("hidden_size", HIDDEN)
        vision = kw.get("vision_config")
        if isinstance(vision, dict):
            for key in ("out_hidden_size", "projection_dim"):  # the vision tower's output feeds the text tower
                if key in vision:
                    vision[key] = text_hidden
    attn = next((sub for sub in kw.values() if isinstance(sub, dict) and "kv_n_heads" in sub), None)
    if attn is not None:  # DBRX: the kv head count lives in attn_config
        kw.pop("num_key_value_heads", None)
        attn["kv_n_heads"] = HEADS // 2
    for key, extra in _CHECKPOINT_FIELDS.get(model_type, {}).items():
        kw[key] = {**kw.get(key, {}), **extra} if isinstance(extra, dict) else extra
    kw.update(overrides)
    vocab = int(kw.get("vocab_size", d.get("vocab_size", VOCAB)) or VOCAB)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = kw.get(key, d.get(key))
        if isinstance(v, int) and v >= vocab:
            kw[key] = vocab - 1
        elif isinstance(v, list):
            kw[key] = [min(int(x), vocab - 1) for x in v]
    # Re-run the constructor so derived fields (layer_types, head_dim, ...) follow the new sizes.
    kw = {k: v for k, v in kw.items() if not (v is None and k.endswith(("layer_types", "_layers_block_type")))}
    for sub in kw.values():
        if isinstance(sub, dict):
            for k in [k for k, v in sub.items() if v is None and k.endswith(("layer_types", "_layers_block_type"))]:
                del sub[k]
    try:
        return AutoConfig.for_model(model_type, **kw)
    except Exception:
        if "qk_rope_head_dim" not in d or "head_dim" in overrides:
            raise
        # MLA families disagree on head_dim: DeepSeek-V3 uses it for the rotary part, others (dots3) for the
        # whole query head (nope + rope); their configs validate it.
        kw["head_dim"] = _SHRINK_MORE["qk_nope_head_dim"] + _SHRINK_MORE["qk_rope_head_dim"]
        return AutoConfig.for_model(model_type, **kw)


def _auto_classes(model_type: str, config: PretrainedConfig) -> tuple:
    if getattr(config, "is_decoder", False) is False and model_type in ("bert", "roberta", "distilbert"):
        return (AutoModelForMaskedLM, AutoModel)
    classes = (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForImageTextToText, AutoModel)
    if getattr(config, "is_encoder_decoder", False):
        return (AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq, *classes)
    return classes


def _auto_class(model_type: str, config: PretrainedConfig) -> Any:
    errors = []
    for auto in _auto_classes(model_type, config):
        if type(config) in auto._model_mapping:
            return auto
        errors.append(auto.__name__)
    raise ValueError(f"cannot build a tiny {model_type!r} model: no {' / '.join(errors)} class for its config")


def tiny_model_class(model_type: str, config: PretrainedConfig | None = None) -> type:
    """The class `tiny_model` builds for ``model_type`` (its LM head class, or its base model), not instantiated."""
    config = tiny_config(model_type) if config is None else config
    return _auto_class(model_type, config)._model_mapping[type(config)]


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
    """A random-init fp32 model in eval mode: the model type's LM head class (causal, seq2seq, image-text-to-text,
    masked), or its base model when it has no LM head; every parameter and floating buffer perturbed (`perturb`)."""
    config = tiny_config(model_type, **overrides)
    auto = _auto_class(model_type, config)
    torch.manual_seed(seed)
    return perturb(auto.from_config(config, dtype=torch.float32).float(), seed).eval()  # composite configs too
