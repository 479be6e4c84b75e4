"""Attention-head facts read from a Hugging Face config: head counts, GQA group size, head_dim, RoPE.

torch-pruning has no notion of heads, so the head layout must come from the config and is later
cross-checked against the traced graph (`surgery.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Config keys, in priority order, under which different model families store the same fact.
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
# Families whose attention applies no rotary embedding (absolute / learned positions instead).
_NO_ROPE_TYPES = {
    "gpt2",
    "opt",
    "bert",
    "roberta",
    "distilbert",
    "xlm-roberta",
    "electra",
    "bloom",
    "mpt",
}


class HeadConfigError(ValueError):
    """The config's head facts are missing or inconsistent."""


@dataclass(frozen=True)
class HeadInfo:
    """Head layout: ``num_heads`` q heads and ``num_kv_heads`` kv heads of ``head_dim``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: bool
    position_bias: bool = False  # ALiBi / relative bias indexed by head position: heads cannot move
    position_evidence: str = ""  # why ``rope`` is what it is (a config field, the family, or an assumption)

    @property
    def group_size(self) -> int:
        """q heads served by one kv head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def _first(config: Any, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def position_encoding(config: Any) -> tuple[bool, str]:
    """Whether attention rotates q/k by position, and the config evidence for that answer.

    With RoPE only whole heads may move; the evidence is reported by the analysis so a reader can check it.
    """
    model_type = getattr(config, "model_type", "")
    if uses_head_position_bias(config):
        return False, "ALiBi / relative position bias indexed by head (no rotation)"
    if model_type in _NO_ROPE_TYPES:
        return False, f"model_type {model_type!r} uses absolute/learned positions"
    kind = getattr(config, "position_embedding_type", None)
    if kind in ("absolute", "relative_key", "relative_key_query"):
        return False, f"position_embedding_type={kind!r}"
    if getattr(config, "alibi", False):
        return False, "alibi=True"
    for key in (
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "rotary_dim",
        "rotary_pct",
        "rotary_emb_base",
    ):
        if getattr(config, key, None) is not None:
            return True, f"config sets {key}"
    # Unknown family without any rotary field: assume RoPE, the stricter case (whole-head moves stay legal).
    return True, "assumed rotary (no position field in the config)"


def uses_head_position_bias(config: Any) -> bool:
    """ALiBi slopes / relative-position buckets are tied to the head index: permuting heads breaks them."""
    if getattr(config, "model_type", "") in ("bloom", "mpt") or getattr(config, "alibi", False):
        return True
    attn_cfg = getattr(config, "attn_config", None)
    if getattr(attn_cfg, "alibi", False) or (isinstance(attn_cfg, dict) and attn_cfg.get("alibi")):
        return True
    return getattr(config, "relative_attention_num_buckets", None) is not None


def head_info(config: Any) -> HeadInfo:
    """Read and validate the head layout from ``config``; raise HeadConfigError when it does not add up."""
    model_type = getattr(config, "model_type", type(config).__name__)
    heads = _first(config, _HEAD_KEYS)
    hidden = _first(config, _HIDDEN_KEYS)
    if heads is None or heads <= 0:
        raise HeadConfigError(
            f"{model_type}: config has no positive attention head count (looked for {', '.join(_HEAD_KEYS)})"
        )
    kv = _first(config, _KV_KEYS)
    attn_config = getattr(config, "attn_config", None)  # DBRX keeps its kv head count there
    if kv is None and attn_config is not None and not isinstance(attn_config, dict):
        kv = _first(attn_config, ("kv_n_heads",))
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1  # Falcon-style multi-query attention
    if kv is None:
        kv = heads
    if kv <= 0 or heads % kv:
        raise HeadConfigError(
            f"{model_type}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
            "grouped-query attention needs whole kv groups"
        )
    head_dim = _first(config, ("head_dim", "d_kv"))
    if not isinstance(head_dim, int) or head_dim <= 0:
        if hidden is None or hidden % heads:
            raise HeadConfigError(
                f"{model_type}: head_dim is not set and hidden_size={hidden} is not divisible by "
                f"num_attention_heads={heads}; set config.head_dim"
            )
        head_dim = hidden // heads
    rope, evidence = position_encoding(config)
    return HeadInfo(
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        hidden_size=hidden or 0,
        rope=rope,
        position_bias=uses_head_position_bias(config),
        position_evidence=evidence,
    )
