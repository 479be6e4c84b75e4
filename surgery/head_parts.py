"""Per-head parts of an attention block beyond q/k/v/o: norms, sinks, output gates, gated queries, and the
per-head tensors that keep a block frozen. A mixin of the analysis' module walker (`surgery.analyze`).

Each kind is declared from the transformers source of the families that have it; every one is proved by the
probe (a member that does not really move with its head fails it).
"""

from __future__ import annotations

from torch import nn

from .heads import HeadInfo
from .linear import linear_shape
from .structures import Frozen, Member

# Attention classes whose q_proj emits per head [query (head_dim) | output gate (head_dim)], the gate applied as
# sigmoid(gate) * attention output before o_proj (read from their transformers 5 source).
GATED_QUERY = ("Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention", "Qwen4ExpTextAttention")
# Norms over the attention output (heads x head_dim), applied before o_proj (BitNet's attn_sub_norm).
OUTPUT_NORMS = ("sub_norm", "o_norm", "out_norm")
HEADS_NORM_NOTE = (
    "{name}: {norms} weights are per head_dim and shared by all heads; they are not permuted "
    "(whole-head moves leave them valid)"
)


class HeadParts:
    """Methods of the module walker (`surgery.analyze._Finder`) for the per-head parts of attention blocks."""

    def freeze_heads(self, name: str, layer: int, reason: str, linears=()) -> None:
        """Record an attention block's heads (O columns, V rows) as frozen with the reason, claiming its linears
        so no other structure picks them up."""
        self.claimed.update(lin.path for lin in linears if lin is not None)
        self.frozen.append(Frozen(name=name, layer=layer, roles=("o", "v"), reason=reason))

    def gated_query(self, path: str, layer: int, linears: list) -> bool:
        """A q_proj emitting 2 x heads x head_dim: True for a declared per-head [query | gate] layout, else the
        layer's heads are recorded as frozen (with the reason) rather than guessed."""
        attention = type(self.modules[path]).__name__
        if attention in GATED_QUERY:
            return True
        self.freeze_heads(
            path,
            layer,
            f"{attention}'s q_proj emits 2 x heads x head_dim (a gated query) in a layout not declared for it "
            f"(declared: per-head [query | gate] in {', '.join(GATED_QUERY)}); its heads stay frozen rather than be "
            "guessed",
            linears,
        )
        return False

    def output_gates(self, path: str, heads: int, head_dim: int, hidden: int) -> list[tuple]:
        """Output gates of an attention block: linears named like a gate mapping hidden -> heads x head_dim
        (AFMoE's gate_proj, ``sigmoid(gate) * attention`` before o_proj) or hidden -> heads (dots3's g_proj,
        one scalar per head); their rows move with their heads. Returns (linear, members) pairs."""
        out = []
        for name in dict(self.modules[path].named_children()):
            lin = self.linear(path, name)
            if lin is None or not ("gate" in name or name == "g_proj") or lin.path in self.claimed:
                continue
            if lin.in_features == hidden and lin.out_features in (heads * head_dim, heads):
                unit = head_dim if lin.out_features == heads * head_dim else 1
                out.append((lin, self.weight_and_bias(lin, "out", "o_gate", heads, unit)))
        return out

    def head_vectors(self, path: str, info: HeadInfo) -> list[Member]:
        """1-D tensors of the attention block that are unambiguously per head move with their heads: one value
        per head (gpt-oss attention sinks, Beam's gate bias, Mistral-Large-4's softmax scale and bias) or per
        head and dimension (a query or gate scale of width heads x head_dim when that differs from the hidden
        size). Tensors of the block's linears and norms are not looked at. The probe proves each one."""
        out = []
        nh, d = info.num_heads, info.head_dim
        block = self.modules[path]
        skip = {  # the block's linears and norms (a norm weight is per feature, whatever its width)
            id(p)
            for m in block.modules()
            if linear_shape(m) is not None or "Norm" in type(m).__name__
            for p in m.parameters()
        }
        for name, p in block.named_parameters():
            full = self.param_name[id(p)]
            if p.dim() != 1 or id(p) in skip:
                continue
            if p.numel() == nh and nh != d:
                out.append(Member(full, 0, nh, role="sinks" if "sink" in name else "head_scalar"))
            elif p.numel() == info.q_width and info.q_width not in (info.hidden_size, d) and "." not in name:
                out.append(Member(full, 0, nh, d, role="head_scale"))
        return out

    def unknown_per_head_param(self, name: str, path: str, info: HeadInfo, members: list[Member]) -> str | None:
        """Why an attention block must stay frozen: another per-head tensor (a bias table, a new kind of sink)
        that this analysis does not know how to move with the heads; None when there is none."""
        known = {m.param for m in members}
        per_head = {info.num_heads, info.num_kv_heads, info.q_width, info.kv_width} - {1, info.hidden_size}
        for base in {name, path}:
            for p in self.modules[base].parameters():
                full = self.param_name[id(p)]
                if full in known or (p.dim() == 1 and p.numel() == info.head_dim):
                    continue
                if any(s in per_head for s in p.shape):
                    return (
                        f"attention heads stay frozen: parameter {full} {tuple(p.shape)} has a per-head dimension "
                        "this analysis does not know how to move with the heads"
                    )
        return None

    def vector_members(self, path: str, count: int, unit: int, role: str) -> list[Member]:
        """The 1-D weight (and bias) of a norm over a coupled axis, as members moving with it."""
        out = []
        for attr in ("weight", "bias"):
            name = self.pname(path, attr)
            if name is not None:
                out.append(Member(name, 0, count, unit, role=role if attr == "weight" else f"{role}_bias"))
        return out

    def head_norms(self, path: str, info: HeadInfo) -> list[Member]:
        """Per-head q/k norms: full-width ones move with their heads; head_dim-wide ones are shared."""
        members, shared = [], []
        for child_name, child in self.modules[path].named_children():
            w = getattr(child, "weight", None)
            if linear_shape(child) is not None or not isinstance(w, nn.Parameter):
                continue
            cpath = f"{path}.{child_name}" if path else child_name
            if w.dim() == 2 and w.shape[1] == info.head_dim:  # per-head affine rows [heads, head_dim]
                level = "group" if info.gqa and w.shape[0] == info.num_kv_heads else "unit"
                role = "q_norm" if w.shape[0] == info.num_heads and "q" in child_name else "k_norm"
                members.append(Member(self.pname(cpath, "weight"), 0, w.shape[0], level=level, role=role))
                continue
            if w.dim() != 1:
                continue
            if w.numel() == info.head_dim:
                shared.append(child_name)
            elif w.numel() == info.q_width and "q" in child_name:
                members.append(Member(self.pname(cpath, "weight"), 0, info.num_heads, info.head_dim, role="q_norm"))
            elif w.numel() == info.q_width and any(s in child_name for s in OUTPUT_NORMS):
                members += self.vector_members(cpath, info.num_heads, info.head_dim, "o_norm")  # BitNet attn_sub_norm
            elif w.numel() == info.kv_width and "k" in child_name:
                level = "group" if info.gqa else "unit"
                members.append(
                    Member(
                        self.pname(cpath, "weight"),
                        0,
                        info.num_kv_heads,
                        info.head_dim,
                        level=level,
                        role="k_norm",
                    )
                )
        if shared:
            self.notes.append(HEADS_NORM_NOTE.format(name=path, norms="/".join(shared)))
        return members
