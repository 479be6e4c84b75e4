"""Structure discovery: find every attention-head, FFN-channel and MoE-expert coupling of a model.

Blocks are recognised from the module tree (aliases of projection names across families, validated
against the shapes the config implies), head layout comes from the config (`surgery.heads`), and the
result is cross-checked against torch-pruning's traced dependency graph (`surgery.graph`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn

from .graph import GraphError, build_graph
from .graph import cross_check as graph_cross_check
from .heads import HeadConfigError, HeadInfo, head_info
from .linear import expert_name, linear_shape
from .probe import ProbeError, probe_structures
from .structures import Coupling, Member, ModelStructures
from .transaction import check_intact


class StructureError(ValueError):
    """The model's structure is not recognised, or config and weights/graph disagree about it."""


# Projection-name aliases across families (Llama/Mistral/Qwen/Gemma, OPT, BERT, GPT-2, Phi-3, NeoX, T5, ...).
_Q = ("q_proj", "query", "q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "wv", "v_lin")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo", "out_lin", "o", "output.dense")
_FUSED_QKV = ("qkv_proj", "c_attn", "Wqkv", "W_pack", "qkv", "query_key_value")
# Attention classes whose fused projection is plain [q | k | v] (checked against their transformers source).
_PLAIN_FUSED_QKV = ("Phi3", "GPT2", "Mpt")
# Names of learned absolute position tables (GPT-2, OPT, BERT-style encoders).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
_GATED_FFN = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo"))
_FUSED_GATED_FFN = (("gate_up_proj", "down_proj"),)
_PLAIN_FFN = (
    ("up_proj", "down_proj"),
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("intermediate.dense", "output.dense"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("fc_in", "fc_out"),
    ("lin1", "lin2"),
    ("wi", "wo"),
)
_ROUTERS = ("gate", "router")
_HEADS_NORM_NOTE = (
    "{name}: {norms} weights are per head_dim and shared by all heads; they are not permuted "
    "(whole-head moves leave them valid)"
)


@dataclass
class _Linear:
    path: str
    module: nn.Module
    in_features: int
    out_features: int
    out_axis: int

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis


def _layer_index(path: str) -> int:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else 0


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _common_prefix(paths: list[str]) -> str:
    split = [p.split(".") for p in paths]
    out = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


class _Finder:
    """Walks the module tree once and turns recognised blocks into couplings."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        self.modules = dict(model.named_modules())
        canonical: dict[int, str] = {}
        self.tied: list[tuple[str, str]] = []
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in canonical:
                self.tied.append((canonical[id(p)], name))
            else:
                canonical[id(p)] = name
        self.param_name = canonical
        self.couplings: list[Coupling] = []
        self.notes: list[str] = []
        self.claimed: set[str] = set()  # linear paths already placed in a coupling
        self._heads: dict[int, HeadInfo] = {}
        self.fixed_attention: set[int] = set()  # layers whose heads were found but cannot move

    # ---- helpers -------------------------------------------------------------------------------
    def config_for(self, path: str) -> object | None:
        """The config of the nearest module on ``path`` that has one (sub-models carry their own)."""
        parts = path.split(".") if path else []
        for i in range(len(parts), -1, -1):
            cfg = getattr(self.modules.get(".".join(parts[:i])), "config", None)
            if cfg is not None and not callable(cfg):
                return cfg
        return self.config

    def heads(self, where: str) -> HeadInfo:
        cfg = self.config_for(where)
        if cfg is None:
            raise StructureError(f"{where} looks like attention but the model has no config to read heads from")
        if id(cfg) not in self._heads:
            try:
                info = head_info(cfg)
            except HeadConfigError as e:
                raise StructureError(f"{where}: {e}") from e
            learned = self.learned_positions()
            if info.rope and learned and info.position_evidence.startswith("assumed"):
                # The module tree outranks an assumption: a learned position table means no rotation.
                info = replace(info, rope=False, position_evidence=f"learned position embedding {learned}")
            self._heads[id(cfg)] = info
            self.notes.append(f"positions: {'rotary' if info.rope else 'not rotary'} ({info.position_evidence})")
        return self._heads[id(cfg)]

    def learned_positions(self) -> str | None:
        """Path of a learned absolute position table (GPT-2's wpe, OPT's embed_positions), if any."""
        for name, mod in self.modules.items():
            if isinstance(mod, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
                return name
        return None

    def linear(self, base: str, rel: str) -> _Linear | None:
        path = _join(base, rel)
        mod = self.modules.get(path)
        shape = linear_shape(mod) if mod is not None else None
        if shape is None:
            return None
        return _Linear(path, mod, shape[0], shape[1], shape[2])

    def pname(self, module_path: str, attr: str) -> str | None:
        p = getattr(self.modules[module_path], attr, None)
        if not isinstance(p, nn.Parameter):
            return None
        return self.param_name[id(p)]

    def weight_and_bias(
        self,
        lin: _Linear,
        feature: str,
        role: str,
        count: int,
        unit: int,
        offset: int = 0,
        level: str = "unit",
    ) -> list[Member]:
        """Member for ``lin``'s weight along ``feature``, plus its bias when the feature is ``out``."""
        axis = lin.out_axis if feature == "out" else lin.in_axis
        common = {"count": count, "unit": unit, "offset": offset, "level": level}
        out = [
            Member(
                param=self.pname(lin.path, "weight"),
                axis=axis,
                role=role,
                module=lin.path,
                feature=feature,
                **common,
            )
        ]
        bias = self.pname(lin.path, "bias") if feature == "out" else None
        if bias is not None:
            out.append(Member(param=bias, axis=0, role=f"{role}_bias", **common))
        return out

    def fail(self, layer: int, name: str, what: str) -> StructureError:
        return StructureError(f"layer {layer} ({name}): {what}")

    # ---- attention ---------------------------------------------------------------------------------
    def find_attention(self, path: str) -> None:
        """Separate q/k/v (+ o in the module or its parent) or a fused qkv projection under ``path``."""
        q = next((x for n in _Q if (x := self.linear(path, n)) is not None), None)
        k = next((x for n in _K if (x := self.linear(path, n)) is not None), None)
        v = next((x for n in _V if (x := self.linear(path, n)) is not None), None)
        fused = None
        if not (q and k and v):
            q = k = v = None
            fused = next((x for n in _FUSED_QKV if (x := self.linear(path, n)) is not None), None)
            if fused is None:
                return
        if any(x.path in self.claimed for x in (q, k, v, fused) if x is not None):
            return
        info = self.heads(path)
        layer = _layer_index(path)
        o = self.output_projection(path, info)
        if o is None:
            raise self.fail(layer, path, f"found q/k/v projections but no output projection (looked for {_O})")
        d, nh, nkv = info.head_dim, info.num_heads, info.num_kv_heads
        level = "group" if info.gqa else "unit"
        members: list[Member] = []
        if fused is None:
            for lin, role, width in (
                (q, "q", info.q_width),
                (k, "k", info.kv_width),
                (v, "v", info.kv_width),
            ):
                if lin.out_features != width:
                    raise self.fail(
                        layer,
                        path,
                        f"{lin.path} has {lin.out_features} output features but the config implies {width} "
                        f"(heads={nh}, kv_heads={nkv}, head_dim={d}); fix config.head_dim / head counts",
                    )
                members += self.weight_and_bias(lin, "out", role, nh if role == "q" else nkv, d, 0, "unit")
            members = [m if m.role not in ("k", "v", "k_bias", "v_bias") else _replace(m, level=level) for m in members]
            linears = [q, k, v, o]
        else:
            members += self.fused_qkv(fused, info, path, layer)
            linears = [fused, o]
        if o.in_features != info.q_width:
            raise self.fail(
                layer,
                path,
                f"{o.path} has {o.in_features} input features but the config implies {info.q_width} "
                f"(heads={nh} x head_dim={d}); fix config.head_dim / head counts",
            )
        members += self.weight_and_bias(o, "in", "o", nh, d)
        members += self.head_norms(path, info)
        name = _common_prefix([lin.path for lin in linears])
        self.claimed.update(lin.path for lin in linears)
        if info.position_bias:
            self.fixed_attention.add(layer)
            self.notes.append(
                f"{name}: no heads coupling: ALiBi / relative position bias is indexed by head position, "
                "so permuting heads would change the function"
            )
            return
        self.check_per_head_params(name, path, layer, info, members)
        self.couplings.append(
            Coupling(
                name=name,
                kind="heads",
                layer=layer,
                size=nh,
                members=tuple(members),
                group_size=info.group_size,
                rope=info.rope,
                head_dim=d,
            )
        )

    def check_per_head_params(self, name: str, path: str, layer: int, info: HeadInfo, members: list[Member]) -> None:
        """Refuse attention blocks holding other per-head tensors (sinks, bias tables) we cannot move."""
        known = {m.param for m in members}
        per_head = {info.num_heads, info.num_kv_heads, info.q_width, info.kv_width} - {1, info.hidden_size}
        for base in {name, path}:
            for p in self.modules[base].parameters():
                full = self.param_name[id(p)]
                if full in known or (p.dim() == 1 and p.numel() == info.head_dim):
                    continue
                if any(s in per_head for s in p.shape):
                    raise self.fail(
                        layer,
                        name,
                        f"parameter {full} {tuple(p.shape)} has a per-head dimension this analysis does not "
                        "know how to move with the heads; this attention variant is not supported",
                    )

    def fused_qkv(self, lin: _Linear, info: HeadInfo, path: str, layer: int) -> list[Member]:
        d, nh, nkv = info.head_dim, info.num_heads, info.num_kv_heads
        width = info.q_width + 2 * info.kv_width
        if lin.out_features != width:
            raise self.fail(
                layer,
                path,
                f"fused {lin.path} has {lin.out_features} output features, config implies {width} "
                f"((heads {nh} + 2 x kv_heads {nkv}) x head_dim {d})",
            )
        level = "group" if info.gqa else "unit"
        if "NeoX" in type(self.modules[path]).__name__ and lin.path.endswith("query_key_value"):
            if info.gqa:
                raise self.fail(layer, path, "interleaved fused qkv with grouped-query attention is not supported")
            out = []
            for i, role in enumerate(("q", "k", "v")):  # per-head interleaved [heads, 3, head_dim]
                out += [
                    _replace(m, stride=3 * d)
                    for m in self.weight_and_bias(lin, "out", role, nh, d, offset=i * d, level="unit")
                ]
            return out
        attention = type(self.modules[path]).__name__
        if lin.path.endswith("query_key_value") or not attention.startswith(_PLAIN_FUSED_QKV):
            raise self.fail(
                layer,
                path,
                f"fused {lin.path} of {attention} has a qkv layout this analysis cannot prove is [q | k | v] "
                f"(known: {', '.join(_PLAIN_FUSED_QKV)} and GPT-NeoX's per-head interleaving); e.g. CodeGen "
                "interleaves groups. Not supported",
            )
        return (
            self.weight_and_bias(lin, "out", "q", nh, d, 0, "unit")
            + self.weight_and_bias(lin, "out", "k", nkv, d, info.q_width, level)
            + self.weight_and_bias(lin, "out", "v", nkv, d, info.q_width + info.kv_width, level)
        )

    def output_projection(self, path: str, info: HeadInfo) -> _Linear | None:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        found = []
        for base in (path, parent):
            for n in _O:
                lin = self.linear(base, n)
                if lin is None or lin.path in self.claimed or (base == parent and lin.path.startswith(path + ".")):
                    continue
                found.append(lin)
        # Prefer the projection fed by the heads; else a named one, so the width check can report it.
        return next((x for x in found if x.in_features == info.q_width), found[0] if found else None)

    def head_norms(self, path: str, info: HeadInfo) -> list[Member]:
        """Per-head q/k norms: full-width ones move with their heads; head_dim-wide ones are shared."""
        members, shared = [], []
        for child_name, child in self.modules[path].named_children():
            w = getattr(child, "weight", None)
            if linear_shape(child) is not None or not isinstance(w, nn.Parameter):
                continue
            cpath = _join(path, child_name)
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
            self.notes.append(_HEADS_NORM_NOTE.format(name=path, norms="/".join(shared)))
        return members

    # ---- FFN ---------------------------------------------------------------------------------------
    def find_ffn(self, path: str) -> None:
        layer = _layer_index(path)
        for g, u, dn in _GATED_FFN:
            gate, up, down = self.linear(path, g), self.linear(path, u), self.linear(path, dn)
            if gate and up and down:
                self.add_ffn(path, layer, up=up, gate=gate, down=down)
                return
        for gu, dn in _FUSED_GATED_FFN:
            gate_up, down = self.linear(path, gu), self.linear(path, dn)
            if gate_up and down:
                width = down.in_features
                if gate_up.out_features != 2 * width:
                    raise self.fail(
                        layer,
                        path,
                        f"{gate_up.path} has {gate_up.out_features} outputs, expected 2 x {width}",
                    )
                self.add_ffn(path, layer, up=gate_up, gate=gate_up, down=down, up_offset=width)
                return
        for u, dn in _PLAIN_FFN:
            up, down = self.linear(path, u), self.linear(path, dn)
            if up and down and up.out_features == down.in_features and up.in_features == down.out_features:
                self.add_ffn(path, layer, up=up, gate=None, down=down)
                return

    def add_ffn(
        self, path: str, layer: int, *, up: _Linear, gate: _Linear | None, down: _Linear, up_offset: int = 0
    ) -> None:
        width = down.in_features
        lins = [x for x in (up, gate, down) if x is not None]
        if any(x.path in self.claimed for x in lins):
            return
        if up.out_features - up_offset != width or (gate is not None and gate is not up and gate.out_features != width):
            raise self.fail(layer, path, f"FFN widths disagree: up/gate outputs vs {down.path} inputs ({width})")
        members = self.weight_and_bias(up, "out", "up", width, 1, offset=up_offset)
        if gate is not None:
            members = self.weight_and_bias(gate, "out", "gate", width, 1) + members
        members += self.weight_and_bias(down, "in", "down", width, 1)
        self.claimed.update(x.path for x in lins)
        name = _common_prefix([x.path for x in lins])
        self.couplings.append(Coupling(name=name, kind="ffn", layer=layer, size=width, members=tuple(members)))

    # ---- MoE ---------------------------------------------------------------------------------------
    def find_experts(self, path: str) -> None:
        """A MoE block: a router child plus an ``experts`` child holding fused 3-D expert weights."""
        experts_path = _join(path, "experts")
        experts = self.modules.get(experts_path)
        if experts is None or isinstance(experts, nn.ModuleList):
            return
        params = {n: p for n, p in experts.named_parameters(recurse=False)}
        if not any(p.dim() == 3 for p in params.values()):
            return
        layer = _layer_index(path)
        hidden = getattr(self.config_for(path), "hidden_size", None)
        gate_up, gate, up, down = (params.get(n) for n in ("gate_up_proj", "gate_proj", "up_proj", "down_proj"))
        if down is None or down.dim() != 3 or (gate_up is None and (gate is None or up is None)):
            raise self.fail(layer, experts_path, f"unknown expert weight layout: {sorted(params)}")
        if getattr(experts, "is_transposed", False) or getattr(experts, "is_concatenated", True) is False:
            raise self.fail(layer, experts_path, "transposed or interleaved gate/up expert weights are not supported")
        num_experts, _, width = down.shape
        if down.shape[1] != hidden:
            raise self.fail(
                layer, experts_path, f"down_proj {tuple(down.shape)} is not [experts, hidden={hidden}, inter]"
            )
        for w, rows in ((gate_up, 2 * width), (gate, width), (up, width)):
            if w is not None and tuple(w.shape) != (num_experts, rows, hidden):
                raise self.fail(
                    layer,
                    experts_path,
                    f"expert gate/up weight {tuple(w.shape)} is not [experts, {rows}, hidden={hidden}] "
                    "(a transposed or interleaved expert layout is not supported)",
                )
        router = None
        for r in _ROUTERS:
            rw = getattr(self.modules.get(_join(path, r)), "weight", None)
            if isinstance(rw, nn.Parameter) and tuple(rw.shape) == (num_experts, hidden):
                router = _join(path, r)
                break
        if router is None:
            raise self.fail(layer, path, f"MoE experts found but no router ({_ROUTERS}) with weight [experts, hidden]")
        router_lin = self.linear(router, "")
        if router_lin is not None:  # an nn.Linear router: its rows are a linear feature axis
            members = self.weight_and_bias(router_lin, "out", "router", num_experts, 1)
        else:
            members = [
                Member(self.param_name[id(p)], 0, num_experts, role="router" if n == "weight" else f"router_{n}")
                for n, p in self.modules[router].named_parameters(recurse=False)
                if p.dim() >= 1 and p.shape[0] == num_experts
            ]
        members += [
            Member(self.param_name[id(p)], 0, num_experts, role="expert")
            for p in params.values()
            if p.dim() >= 1 and p.shape[0] == num_experts
        ]
        self.couplings.append(
            Coupling(name=path, kind="experts", layer=layer, size=num_experts, members=tuple(members))
        )
        fe = experts_path
        for e in range(num_experts):

            def em(name: str, axis: int, role: str, offset: int = 0, feature: str | None = None, e: int = e):
                # A weight member names expert e of the 3-D tensor as one linear (`surgery.linear.ExpertLinear`).
                module = expert_name(fe, name, e) if feature is not None else None
                return Member(
                    _join(fe, name), axis, width, offset=offset, role=role, module=module, feature=feature,
                    fixed=((0, e),),
                )  # fmt: skip

            if gate_up is not None:
                ch = [em("gate_up_proj", 1, "gate", 0, "out"), em("gate_up_proj", 1, "up", width, "out")]
            else:
                ch = [em("gate_proj", 1, "gate", 0, "out"), em("up_proj", 1, "up", 0, "out")]
            ch.append(em("down_proj", 2, "down", 0, "in"))
            for n, p in params.items():  # 2-D expert biases [experts, 2*inter] / [experts, inter]
                if p.dim() == 2 and n.startswith(("gate_up", "gate", "up")) and p.shape[1] == 2 * width:
                    ch += [em(n, 1, "gate_bias"), em(n, 1, "up_bias", width)]
                elif p.dim() == 2 and n.startswith(("gate", "up")) and p.shape[1] == width:
                    ch.append(em(n, 1, "gate_bias" if n.startswith("gate_") and "up" not in n else "up_bias"))
            self.couplings.append(
                Coupling(name=f"{fe}.{e}", kind="ffn", layer=layer, size=width, members=tuple(ch), parent=path)
            )
        for n, child in self.modules[path].named_children():
            shape = linear_shape(child)
            if shape is not None and shape[1] == 1:
                self.notes.append(f"{_join(path, n)}: size-1 (broadcast) output, not a coupling; left in place")
        self.notes.append(
            f"{path}: per-expert channel couplings come from the module structure (the graph has no experts)"
        )

    # ---- driver ------------------------------------------------------------------------------------
    def run(self) -> None:
        for path in self.modules:
            if path:
                self.find_experts(path)
        for path in self.modules:
            self.find_attention(path)
        for path in self.modules:
            self.find_ffn(path)
        if any(isinstance(m, nn.ModuleList) and n.endswith("experts") for n, m in self.modules.items()):
            self.notes.append("experts stored as a ModuleList: each expert is an FFN coupling; experts are not moved")


def _replace(m: Member, **kw: object) -> Member:
    from dataclasses import replace

    return replace(m, **kw)


def _num_layers(config: object, couplings: list[Coupling]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 + max((c.layer for c in couplings), default=-1)


def _validate(couplings: list[Coupling], num_layers: int, model: nn.Module, fixed_attention: set[int]) -> None:
    """Every layer has attention heads and an FFN (or MoE); every member slice fits its tensor."""
    what = type(model).__name__
    if not couplings:
        raise StructureError(
            f"{what}: no attention blocks (q/k/v or fused qkv + output projection) and no FFN blocks "
            "(up/gate/down or fc1/fc2 style) were recognised; this model is not supported"
        )
    for i in range(num_layers):
        kinds = {c.kind for c in couplings if c.layer == i and c.parent is None}
        if i in fixed_attention:
            kinds.add("heads")  # recognised, deliberately not coupled (see notes)
        missing = [
            k for k, ok in (("attention heads", "heads" in kinds), ("FFN", kinds & {"ffn", "experts"})) if not ok
        ]
        if missing:
            raise StructureError(
                f"{what} layer {i}: no {' and no '.join(missing)} recognised; "
                f"found {sorted(kinds) or 'nothing'}. Known structures: q/k/v(+o) or fused qkv attention; "
                "gate/up/down, fused gate_up, fc1/fc2-style FFNs; MoE with 3-D expert weights and a router"
            )
    params = dict(model.named_parameters())
    for c in couplings:
        for m in c.members:
            p = params.get(m.param)
            if p is None:
                raise StructureError(f"{c.name}: member parameter {m.param!r} does not exist in the model")
            if m.axis >= p.dim() or m.offset + m.extent > p.shape[m.axis]:
                raise StructureError(
                    f"{c.name}: member {m.param} slice [{m.offset}, {m.offset + m.extent}) on axis {m.axis} "
                    f"does not fit shape {tuple(p.shape)}"
                )


def analyze(
    model: nn.Module, *, cross_check: bool = True, time_budget_s: float = 60.0, probe: bool = True
) -> ModelStructures:
    """Find all head / FFN-channel / expert couplings of ``model``; raise StructureError when unsure.

    With ``probe`` (default) the result is proven on the model: every coupling is moved by a legal permutation
    and the function checked (`surgery.probe`), so a wrong analysis fails here, whatever a plan later selects.
    """
    check_intact(model)
    finder = _Finder(model)
    finder.run()
    couplings = sorted(finder.couplings, key=lambda c: (c.layer, {"heads": 0, "experts": 1, "ffn": 2}[c.kind]))
    config = finder.config
    num_layers = _num_layers(config, couplings)
    _validate(couplings, num_layers, model, finder.fixed_attention)
    notes = list(dict.fromkeys(finder.notes))
    if cross_check:
        try:
            dg = build_graph(model, time_budget_s=time_budget_s)
            report = graph_cross_check(model, couplings, dg, time_budget_s=time_budget_s)
        except GraphError as e:
            notes.append(f"graph cross-check skipped, module-structure path used: {e}")
        else:
            if report.conflicts:
                raise StructureError(
                    "config-derived structure disagrees with the traced dependency graph:\n  "
                    + "\n  ".join(report.conflicts)
                )
            notes.append(
                f"graph cross-check: {len(report.confirmed)} member links confirmed, "
                f"{len(report.unconfirmed)} not visible to the graph"
            )
            notes += [f"graph: {u}" for u in report.unconfirmed if "MoE experts" not in u]
    model_type = getattr(config, "model_type", None) or type(model).__name__
    structures = ModelStructures(
        model_type=model_type, num_layers=num_layers, couplings=couplings, tied=finder.tied, notes=notes
    )
    if probe:
        try:
            moved = probe_structures(model, structures)
        except ProbeError as e:
            raise StructureError(str(e)) from e
        structures.notes.append(f"probe: all {moved} couplings moved by a legal permutation, function unchanged")
    return structures
