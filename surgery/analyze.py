"""Structure discovery: find every attention-head, FFN-channel and MoE-expert coupling of a model.

Blocks are recognised from the module tree (aliases of projection names across families, validated
against the shapes the config implies), head layout comes from the config (`surgery.heads`), and the
result is cross-checked against torch-pruning's traced dependency graph (`surgery.graph`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn

from .coverage import check_token_model, layer_coverage, split_towers, sub_configs, tower_of
from .expert_layouts import find_experts
from .graph import GraphError, build_graph
from .graph import cross_check as graph_cross_check
from .head_parts import HeadParts
from .heads import HeadConfigError, HeadInfo, head_info
from .linear import linear_shape
from .mla import find_mla
from .probe import ProbeError, probe_structures
from .structures import Coupling, Frozen, Member, ModelStructures
from .transaction import check_intact


class StructureError(ValueError):
    """The model's structure is not recognised, or config and weights/graph disagree about it."""


# Projection-name aliases across families (Llama/Mistral/Qwen/Gemma, OPT, BERT, GPT-2, Phi-3, NeoX, T5, ...).
_Q = ("q_proj", "query", "q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "wv", "v_lin")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo", "Wo", "out_lin", "o", "output.dense", "output", "proj")
_FUSED_QKV = ("qkv_proj", "c_attn", "Wqkv", "W_pack", "qkv", "query_key_value")
# Attention classes whose fused query_key_value is per head [q | k | v] (viewed [.., heads, 3, head_dim]).
_PER_HEAD_FUSED_QKV = ("NeoX", "Persimmon")
# Attention classes whose fused projection is plain [q | k | v] (checked against their transformers source).
_PLAIN_FUSED_QKV = ("Phi3", "GPT2", "Mpt", "Dbrx", "ModernBert")
# Names of learned absolute position tables (GPT-2, OPT, BERT-style encoders).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
_GATED_FFN = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo"))
_FUSED_GATED_FFN = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))  # [gates | ups] (ModernBERT: act(input) * gate)
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


class _Finder(HeadParts):
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
        self.frozen: list[Frozen] = []  # recognised (or unrecognised) parts that stay frozen, with reasons
        self.claimed: set[str] = set()  # linear paths already placed in a coupling

        self._heads: dict[int, HeadInfo] = {}
        self._layer_configs: dict[tuple[int, int], object] = {}
        self.sub_configs = sub_configs(self.config)  # id(sub-config) -> key, to tell text from vision towers
        self.tower_errors: dict[str, list[str]] = {}

    layer_of = staticmethod(_layer_index)

    # ---- helpers -------------------------------------------------------------------------------
    def config_for(self, path: str) -> object | None:
        """The config of the nearest module on ``path`` that has one (sub-models carry their own); for a
        heterogeneous config (per-layer head counts, e.g. EmbeddingGemma-2) the entry of ``path``'s layer."""
        parts = path.split(".") if path else []
        cfg = self.config
        for i in range(len(parts), -1, -1):
            found = getattr(self.modules.get(".".join(parts[:i])), "config", None)
            if found is not None and not callable(found):
                cfg = found
                break
        if getattr(cfg, "is_heterogeneous", False) is True:
            # per_layer_config builds a new view on every access: keep one per layer, so callers that key on
            # id(config) (the head cache) never see a dead view's id reused by another layer's view.
            key = (id(cfg), _layer_index(path))
            if key not in self._layer_configs:
                self._layer_configs[key] = cfg.per_layer_config[key[1]]
            return self._layer_configs[key]
        return cfg

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
            if tower_of(self, where, self.sub_configs) is None:  # towers stay frozen: their positions do not matter
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
        layer = _layer_index(path)
        try:
            info = self.heads(path)
        except StructureError as e:  # q/k/v found, head layout unknown: frozen, never guessed
            self.freeze_heads(path, layer, f"heads unknown ({e})", (q, k, v, fused))
            return
        o = self.output_projection(path, info)
        if o is None:  # an attention block of a kind not known here: frozen, never guessed
            why = f"found q/k/v projections but no output projection (looked for {', '.join(_O)}); heads stay frozen"
            self.freeze_heads(path, layer, why, (q, k, v, fused))
            return
        d, nh, nkv = info.head_dim, info.num_heads, info.num_kv_heads
        level = "group" if info.gqa else "unit"
        members: list[Member] = []
        if fused is None:
            gated = q.out_features == 2 * info.q_width and k.out_features == v.out_features == info.kv_width
            if gated and not self.gated_query(path, layer, [q, k, v, o]):
                return
            for lin, role, width in (
                (q, "q", 2 * info.q_width if gated else info.q_width),
                (k, "k", info.kv_width),
                (v, "v", info.kv_width),
            ):
                if gated and role == "q":  # per head [query | gate] (docs/ARCHITECTURE.md, "The method")
                    for sub, offset in (("q", 0), ("q_gate", d)):
                        ms = self.weight_and_bias(lin, "out", sub, nh, d, offset, "unit")
                        members += [_replace(m, stride=2 * d) for m in ms]
                    continue
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
            fused_members = self.fused_qkv(fused, info, path, layer)
            if fused_members is None:  # a layout that cannot be proved: its heads stay frozen, never guessed
                self.claimed.update((fused.path, o.path))
                return
            members += fused_members
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
        members += self.head_vectors(path, info)
        for gate, gate_members in self.output_gates(path, nh, d, info.hidden_size):
            members += gate_members
            linears.append(gate)
        name = _common_prefix([lin.path for lin in linears])
        self.claimed.update(lin.path for lin in linears)
        if info.position_bias:
            why = (
                "attention heads stay frozen: ALiBi / relative position bias is indexed by head position "
                "(T5, MPT, BLOOM), so permuting heads would change the function"
            )
            self.freeze_heads(name, layer, why)
            return
        unknown = self.unknown_per_head_param(name, path, info, members)
        if unknown is not None:
            self.freeze_heads(name, layer, unknown)
            return
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

    def fused_qkv(self, lin: _Linear, info: HeadInfo, path: str, layer: int) -> list[Member] | None:
        """Members of a fused qkv projection whose layout is known; None (heads frozen, reason recorded) else."""
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
        neox_style = any(n in type(self.modules[path]).__name__ for n in _PER_HEAD_FUSED_QKV)
        if neox_style and lin.path.endswith("query_key_value"):
            if info.gqa:
                why = "interleaved fused qkv with grouped-query attention is not supported; its heads stay frozen"
                self.freeze_heads(path, layer, why)
                return None
            out = []
            for i, role in enumerate(("q", "k", "v")):  # per-head interleaved [heads, 3, head_dim]
                out += [
                    _replace(m, stride=3 * d)
                    for m in self.weight_and_bias(lin, "out", role, nh, d, offset=i * d, level="unit")
                ]
            return out
        attention = type(self.modules[path]).__name__
        if lin.path.endswith("query_key_value") or not attention.startswith(_PLAIN_FUSED_QKV):
            why = (
                f"fused {lin.path.rsplit('.', 1)[-1]} of {attention} has a qkv layout this analysis cannot prove is "
                f"[q | k | v] (known: {', '.join(_PLAIN_FUSED_QKV)}, and per head in {', '.join(_PER_HEAD_FUSED_QKV)}; "
                "e.g. CodeGen interleaves groups); its heads stay frozen"
            )
            self.freeze_heads(path, layer, why)
            return None
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
        for child_name, child in self.modules[path].named_children():  # a norm over the intermediate channels
            w = getattr(child, "weight", None)
            if "norm" in child_name and isinstance(w, nn.Parameter) and w.dim() == 1 and w.numel() == width:
                members += self.vector_members(_join(path, child_name), width, 1, "ffn_norm")  # BitNet ffn_sub_norm
        self.claimed.update(x.path for x in lins)
        name = _common_prefix([x.path for x in lins])
        self.couplings.append(Coupling(name=name, kind="ffn", layer=layer, size=width, members=tuple(members)))

    # ---- driver ------------------------------------------------------------------------------------
    def guarded(self, step, path: str) -> None:
        """Run one recognition step. A block it cannot read (widths that disagree with the config, an unknown
        expert layout, ...) stays frozen with the reason, its linears claimed so no later step reinterprets
        them; inside an image/audio tower (frozen as a whole) the reason goes to the tower's entry."""
        try:
            step(self, path)
        except StructureError as e:
            tower = tower_of(self, path, self.sub_configs)
            if tower is not None:
                self.tower_errors.setdefault(tower, []).append(str(e))
                return
            self.claimed.update(p for p, m in self.modules.items() if p.startswith(path + ".") and linear_shape(m))
            roles = ("up", "down") if step in (find_experts, _Finder.find_ffn) else ("o", "v")
            self.frozen.append(Frozen(path, _layer_index(path), roles, f"not recognised ({e}); it stays frozen"))

    def run(self) -> None:
        for step in (find_experts, find_mla, _Finder.find_attention, _Finder.find_ffn):
            for path in self.modules:
                if path:
                    self.guarded(step, path)
        if any(isinstance(m, nn.ModuleList) and n.endswith("experts") for n, m in self.modules.items()):
            self.notes.append("experts stored as a ModuleList: each expert is an FFN coupling; experts are not moved")


def _replace(m: Member, **kw: object) -> Member:
    from dataclasses import replace

    return replace(m, **kw)


def _num_layers(config: object, couplings: list[Coupling]) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
    return 1 + max((c.layer for c in couplings), default=-1)


def _refuse_empty(finder: _Finder) -> None:
    """Refuse a model in which nothing trainable was recognised, naming what stays frozen and why."""
    if finder.couplings:
        return
    what = type(finder.model).__name__
    if finder.frozen:
        reasons = "; ".join(dict.fromkeys(f"{f.name}: {f.reason}" for f in finder.frozen[:4]))
        raise StructureError(f"{what}: nothing S²FT can train was recognised; {reasons}")
    raise StructureError(
        f"{what}: no attention blocks (q/k/v or fused qkv + output projection) and no FFN blocks "
        "(up/gate/down or fc1/fc2 style) were recognised; this model is not supported"
    )


def _validate(couplings: list[Coupling], model: nn.Module) -> None:
    """Every member slice fits its tensor."""
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


_ORDER = {"heads": 0, "experts": 1, "ffn": 2}


def analyze(
    model: nn.Module, *, cross_check: bool = True, time_budget_s: float = 60.0, probe: bool = True
) -> ModelStructures:
    """Find all head / FFN-channel / expert couplings of ``model``; raise StructureError when unsure.

    What is recognised trains; what is not (a linear-attention or Mamba mixer, an expert layout S²FT cannot
    train yet, a vision tower) stays frozen and is listed in ``frozen`` with the reason (`surgery.coverage`).
    With ``probe`` (default) the result is proven on the model: every coupling is moved by a legal permutation
    and the function checked (`surgery.probe`), so a wrong analysis fails here, whatever a plan later selects.
    """
    check_intact(model)
    finder = _Finder(model)
    finder.run()
    split_towers(finder)
    layer_coverage(finder)
    _refuse_empty(finder)
    if probe:  # the probe drives the model with token ids: name the reason when it cannot
        from surgery.verify import logits_of, make_inputs

        why = check_token_model(model, make_inputs, logits_of)
        if why is not None:
            raise StructureError(why)
    couplings = sorted(finder.couplings, key=lambda c: (c.layer, _ORDER[c.kind]))
    config = finder.config
    num_layers = _num_layers(config, couplings)
    _validate(couplings, model)
    notes = list(dict.fromkeys(finder.notes))
    if cross_check:
        try:
            dg = build_graph(model, time_budget_s=time_budget_s)
            report = graph_cross_check(model, couplings, dg, time_budget_s=time_budget_s)
        except Exception as e:  # the graph is an optional cross-check: any failure falls back (hooks are gone)
            why = str(e) if isinstance(e, GraphError) else f"{type(e).__name__}: {e}"
            notes.append(f"graph cross-check skipped, module-structure path used: {why}")
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
        model_type=model_type,
        num_layers=num_layers,
        couplings=couplings,
        tied=finder.tied,
        notes=notes,
        frozen=finder.frozen,
    )
    if probe:
        try:
            moved = probe_structures(model, structures)
        except ProbeError as e:
            raise StructureError(str(e)) from e
        structures.notes.append(f"probe: all {moved} couplings moved by a legal permutation, function unchanged")
    return structures
