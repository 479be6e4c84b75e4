"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4-MoE-Lite, ...): its heads as one coupling.

Layout, read from transformers 5 (``DeepseekV3Attention``; DeepSeek-V2 and GLM-4-MoE-Lite are the same):

- ``q = q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)`` when ``q_lora_rank`` is None), viewed
  ``[..., heads, qk_nope + qk_rope]`` and split into a no-position part and a rotary part per head;
- ``kv_a_proj_with_mqa(x) = [latent (kv_lora_rank) | k_rope (qk_rope)]``: one rotary key shared by all heads;
- ``kv_b_proj(kv_a_layernorm(latent))`` viewed ``[..., heads, qk_nope + v]``: per head ``[k_nope | v]``;
- ``o_proj`` reads ``[heads x v]``.

Head h couples q rows ``[h*qk, (h+1)*qk)`` (its no-position and rotary parts), kv_b rows
``[h*(nope+v), h*(nope+v)+nope)`` (its key) and ``[h*(nope+v)+nope, (h+1)*(nope+v))`` (its value), and o
columns ``[h*v, (h+1)*v)``. The shared rotary key and the low-rank a-projections with their norms feed every
head and stay. Legal moves: whole heads only (the rotary part rotates inside a head, and the key, value and
query widths differ, so no inner moves); no kv grouping (kv_b makes one key and value per head).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .heads import HeadInfo
from .structures import Coupling

if TYPE_CHECKING:
    from .analyze import _Finder

_SHARED = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")


def find_mla(finder: _Finder, path: str) -> None:
    """Recognise an MLA block at ``path`` (kv_b_proj + o_proj + q_b_proj or q_proj) and add its heads coupling."""
    kv_b, o = finder.linear(path, "kv_b_proj"), finder.linear(path, "o_proj")
    q = finder.linear(path, "q_b_proj") or finder.linear(path, "q_proj")
    if kv_b is None or o is None or q is None or kv_b.path in finder.claimed:
        return
    layer = finder.layer_of(path)
    cfg = finder.config_for(path)
    dims = {k: getattr(cfg, k, None) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    heads = getattr(cfg, "num_attention_heads", None)
    sizes = (dims["qk_nope_head_dim"], dims["v_head_dim"], heads)  # qk_rope may be 0: MLA without rotation
    if not all(isinstance(v, int) and v > 0 for v in sizes) or not isinstance(dims["qk_rope_head_dim"], int):
        raise finder.fail(
            layer, path, f"kv_b_proj looks like multi-head latent attention but the config lacks {dims} / heads"
        )
    nope, rope, v = dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["v_head_dim"]
    for lin, want, what in (
        (q, heads * (nope + rope), f"heads {heads} x (qk_nope {nope} + qk_rope {rope})"),
        (kv_b, heads * (nope + v), f"heads {heads} x (qk_nope {nope} + v {v})"),
    ):
        if lin.out_features != want:
            raise finder.fail(layer, path, f"{lin.path} has {lin.out_features} outputs, the MLA config implies {what}")
    if o.in_features != heads * v:
        raise finder.fail(layer, path, f"{o.path} has {o.in_features} inputs, the MLA config implies {heads} x v {v}")
    members = finder.weight_and_bias(q, "out", "q", heads, nope + rope)
    for role, offset, unit in (("k", 0, nope), ("v", nope, v)):
        members += [replace(m, stride=nope + v) for m in finder.weight_and_bias(kv_b, "out", role, heads, unit, offset)]
    members += finder.weight_and_bias(o, "in", "o", heads, v)
    hidden = getattr(cfg, "hidden_size", 0)
    members += finder.head_vectors(path, HeadInfo(heads, heads, v, hidden, rope > 0))  # per-head scales
    gates = finder.output_gates(path, heads, v, hidden)
    for _, gate_members in gates:
        members += gate_members
    shared = [name for name in _SHARED if f"{path}.{name}" in finder.modules]
    finder.claimed.update({q.path, kv_b.path, o.path, *(g.path for g, _ in gates)})
    finder.claimed.update(f"{path}.{name}" for name in shared)
    finder.couplings.append(
        Coupling(name=path, kind="heads", layer=layer, size=heads, members=tuple(members), rope=rope > 0, head_dim=v)
    )
    finder.notes.append(
        f"positions: rotary (multi-head latent attention: a qk_rope_head_dim={rope} rotary part per head and one "
        "shared rotary key)"
        if rope
        else "positions: multi-head latent attention without a rotary part (qk_rope_head_dim=0)"
    )
    finder.notes.append(
        f"{path}: multi-head latent attention; per head: q rows, kv_b rows of its key and value, o columns; "
        f"{', '.join(shared)} feed every head and stay"
    )
