"""MoE experts: the couplings of each experts module in its family's layout (`surgery.expert_storage`).

A layout says, for one experts module, which tensors hold the gate / up / down weights of every expert, on
which axis each expert's intermediate channels lie, whether gate and up alternate channel by channel, and
where the biases are. transformers declares most layouts itself (`use_experts_implementation` sets
``is_transposed`` / ``is_concatenated`` / ``has_bias`` / ``has_gate`` on the module); families without those
flags are declared in `surgery.expert_storage` by class name after reading their source; any other module is
accepted only in the plain ``[E, 2I, H]`` / ``[E, H, I]`` layout. Every layout is proved by the probe: a
mis-declared one moves channels that are not coupled and fails it.

Legal moves (docs/ARCHITECTURE.md, "MoE experts"): any permutation of one expert's channels applied to its
gate and up rows (and biases) and its down columns. Experts themselves never move: a plan trains channels
inside experts, never reorders experts, so routers, routing-correction biases (``e_score_correction_bias``,
buffers or parameters) and expert groups (``n_group``) stay valid by construction. The experts coupling
(router rows + whole experts) is kept as a record for audits and is never permuted by plans or the probe.

Every declared layout trains (plain, transposed, interleaved with biases and gpt-oss's clamped activation,
stacked 2-D): `s2ft_lightning.experts` adds its correction to the module's own forward. Experts whose
activation or structure is not declared (`surgery.expert_storage.untrainable`: a custom gate, no gate, no
act_fn, post-expert norms) are analysed and proved, and stay frozen with the reason named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .expert_storage import holder_path, storage_of, untrainable
from .linear import expert_name, linear_shape
from .structures import Coupling, Frozen, Member

if TYPE_CHECKING:
    from .analyze import _Finder


@dataclass(frozen=True)
class ExpertLayout:
    """Where one experts module keeps its weights (see the module docstring)."""

    owner: str  # path of the module holding the expert tensors
    gate_up: str | None  # fused gate/up tensor, or None
    gate: str | None
    up: str | None
    down: str
    channels_last: bool  # gate/up are [E, H, 2I] and down [E, I, H] (transposed), not [E, 2I, H] / [E, H, I]
    interleaved: bool  # fused gate/up alternate per channel [g0, u0, g1, u1, ...] instead of [gates | ups]
    stacked: bool  # 2-D tensors [E*I, H] for gate, up and down (DBRX), experts one after another
    frozen: str | None  # why its experts cannot train (None: `s2ft_lightning.experts` trains it)


def _layout(finder: _Finder, experts_path: str) -> ExpertLayout | None:
    experts = finder.modules[experts_path]
    rel = holder_path(experts)
    owner = f"{experts_path}.{rel}" if rel else experts_path
    holder = finder.modules.get(owner)
    storage = storage_of(holder) if holder is not None else None
    if storage is None:
        params = dict(experts.named_parameters(recurse=False))
        if not any(p.dim() == 3 for p in params.values()):
            return None
        layer = finder.layer_of(experts_path)
        raise finder.fail(layer, experts_path, f"unknown expert weight layout: {sorted(params)}")
    return ExpertLayout(
        owner=owner,
        gate_up=storage.gate_up,
        gate=storage.gate,
        up=storage.up,
        down=storage.down,
        channels_last=storage.channels_last,
        interleaved=storage.interleaved,
        stacked=storage.stacked,
        frozen=untrainable(holder, storage),
    )


_ROUTER_HINT = "a router weight [experts, hidden] in the MoE block (e.g. gate, router, gate.wg, router.layer)"


def _router(finder: _Finder, path: str, experts_path: str, hidden: int, rows: int | None) -> list[tuple[str, int]]:
    """Candidate router weights ``[E, H]`` in the MoE block ``path`` outside its experts: (parameter name, E).

    With ``rows`` (stacked layouts, where E is not a tensor dimension) E is any count dividing ``rows``.
    """
    found = []
    for p in finder.modules[path].parameters():
        full = finder.param_name[id(p)]
        if full.startswith(experts_path + ".") or p.dim() != 2 or p.shape[1] != hidden:
            continue
        if rows is None or (p.shape[0] > 1 and rows % p.shape[0] == 0):
            found.append((full, int(p.shape[0])))
    return found


def _check_shapes(finder: _Finder, layer: int, where: str, layout: ExpertLayout, num_experts: int, width: int) -> None:
    owner = finder.modules[layout.owner]
    hidden = getattr(finder.config_for(where), "hidden_size", None)
    fused = 2 * width
    for name, rows in ((layout.gate_up, fused), (layout.gate, width), (layout.up, width), (layout.down, width)):
        if name is None:
            continue
        got = tuple(getattr(owner, name).shape)
        if layout.stacked:
            want = (num_experts * width, hidden)
        elif name == layout.down:
            want = (num_experts, width, hidden) if layout.channels_last else (num_experts, hidden, width)
        else:
            want = (num_experts, hidden, rows) if layout.channels_last else (num_experts, rows, hidden)
        if got != want:
            kind = "transposed " if layout.channels_last else ""
            raise finder.fail(
                layer,
                where,
                f"expert weight {name} {got} does not fit the {kind}layout declared for "
                f"{type(finder.modules[where]).__name__} (expected {want}); not supported",
            )


def _channel_members(finder: _Finder, layout: ExpertLayout, e: int, width: int) -> list[Member]:
    """Expert ``e``'s channel members: gate and up rows (and biases), down columns, on each tensor's own axis."""
    owner = finder.modules[layout.owner]
    trains = layout.frozen is None

    def member(name: str, role: str, offset: int = 0, stride: int | None = None, down: bool = False) -> Member:
        full = finder.param_name[id(getattr(owner, name))]
        if layout.stacked:  # [E*I, H]: expert e's channels are rows e*I ... (e+1)*I - 1 of every tensor
            module = expert_name(layout.owner, name, e) if trains else None
            feature = ("in" if down else "out") if module is not None else None
            start = e * width
            return Member(full, 0, width, offset=start + offset, role=role, module=module, feature=feature,
                          module_offset=start if module is not None else 0)  # fmt: skip
        if down:
            axis = 1 if layout.channels_last else 2
        else:
            axis = 2 if layout.channels_last else 1
        module = expert_name(layout.owner, name, e) if trains and not name.endswith("_bias") else None
        feature = ("in" if down else "out") if module is not None else None
        return Member(
            full, axis, width, offset=offset, stride=stride, role=role, module=module, feature=feature, fixed=((0, e),)
        )

    if layout.gate_up is not None:
        g, u, step = (0, 1, 2) if layout.interleaved else (0, width, None)
        out = [member(layout.gate_up, "gate", g, step), member(layout.gate_up, "up", u, step)]
        bias = getattr(owner, layout.gate_up + "_bias", None)
        if isinstance(bias, nn.Parameter):  # [E, 2I]: the same channel offsets as the fused weight
            full = finder.param_name[id(bias)]
            out += [
                Member(full, 1, width, offset=g, stride=step, role="gate_bias", fixed=((0, e),)),
                Member(full, 1, width, offset=u, stride=step, role="up_bias", fixed=((0, e),)),
            ]
    else:
        out = [member(n, r) for n, r in ((layout.gate, "gate"), (layout.up, "up")) if n is not None]
        for n, r in ((layout.gate, "gate_bias"), (layout.up, "up_bias")):
            bias = getattr(owner, f"{n}_bias", None) if n else None
            if isinstance(bias, nn.Parameter):
                out.append(Member(finder.param_name[id(bias)], 1, width, role=r, fixed=((0, e),)))
    out.append(member(layout.down, "down", down=True))
    return out


def find_experts(finder: _Finder, path: str) -> None:
    """A MoE block: an ``experts`` child in a known layout plus a router; couplings per expert and a record."""
    experts_path = f"{path}.experts" if path else "experts"
    experts = finder.modules.get(experts_path)
    if experts is None or isinstance(experts, nn.ModuleList):
        return
    layout = _layout(finder, experts_path)
    if layout is None:
        return
    layer = finder.layer_of(path)
    owner = finder.modules[layout.owner]
    hidden = getattr(finder.config_for(path), "hidden_size", None)
    down = getattr(owner, layout.down)
    routers = _router(finder, path, experts_path, hidden, down.shape[0] if layout.stacked else None)
    if not layout.stacked:
        routers = [(n, r) for n, r in routers if r == down.shape[0]]
    found = f"found {[n for n, _ in routers]}" if routers else "found none"
    if layout.stacked and len(routers) != 1:  # the router's rows are the only count of stacked experts
        raise finder.fail(layer, path, f"MoE experts found but no single router: looked for {_ROUTER_HINT}; {found}")
    router = routers[0][0] if len(routers) == 1 else None
    num_experts = routers[0][1] if layout.stacked else down.shape[0]
    if layout.stacked:
        width = down.shape[0] // num_experts
    else:
        width = down.shape[1] if layout.channels_last else down.shape[2]
    _check_shapes(finder, layer, experts_path, layout, num_experts, width)
    members = []
    if router is None:  # the record lacks its router rows; experts never move, so nothing depends on them
        finder.notes.append(f"{path}: no single router weight ({_ROUTER_HINT}; {found}) in the experts record")
    elif (router_lin := finder.linear(router.rsplit(".", 1)[0], "")) is not None:  # rows of an nn.Linear router
        members = finder.weight_and_bias(router_lin, "out", "router", num_experts, 1)
    else:
        members = [Member(router, 0, num_experts, role="router")]
    known = {m.param for m in members}
    for p in finder.modules[path].parameters():
        full = finder.param_name[id(p)]
        if full not in known and not full.startswith(experts_path + ".") and tuple(p.shape) == (num_experts,):
            members.append(Member(full, 0, num_experts, role="router_vector"))  # router bias, expert_bias
    for p in owner.parameters(recurse=False):
        members.append(
            Member(finder.param_name[id(p)], 0, num_experts, unit=width if layout.stacked else 1, role="expert")
        )
    finder.couplings.append(Coupling(name=path, kind="experts", layer=layer, size=num_experts, members=tuple(members)))
    cfg = finder.config_for(path)
    block = finder.modules[path]
    tensors = [*block.named_buffers(), *block.named_parameters()]
    positional = [  # routing-correction biases and statistics: buffers, or parameters outside the router row set
        f"{path}.{n}"
        for n, t in tensors
        if t.dim() >= 1
        and t.shape[-1] == num_experts
        and not f"{path}.{n}".startswith(experts_path + ".")
        and (t.dim() > 1 or not isinstance(t, nn.Parameter))
        and f"{path}.{n}" != router
    ]
    groups = getattr(cfg, "n_group", None)
    if positional or (isinstance(groups, int) and groups > 1):
        what = ", ".join(positional + ([f"group-limited routing n_group={groups}"] if groups and groups > 1 else []))
        finder.notes.append(
            f"{path}: routing depends on expert positions ({what}); experts are never moved (plans train "
            "channels inside experts, the probe moves channels only), so it stays valid"
        )
    for e in range(num_experts):
        finder.couplings.append(
            Coupling(
                name=f"{experts_path}.{e}",
                kind="ffn",
                layer=layer,
                size=width,
                members=tuple(_channel_members(finder, layout, e, width)),
                parent=path,
            )
        )
    if layout.frozen is not None:
        finder.frozen.append(
            Frozen(
                name=experts_path,
                layer=layer,
                roles=("up", "down"),
                reason=f"experts frozen: {layout.frozen}",
            )
        )
    for n, child in finder.modules[path].named_children():
        shape = linear_shape(child)
        if shape is not None and shape[1] == 1:
            finder.notes.append(f"{path}.{n}: size-1 (broadcast) output, not a coupling; left in place")
    finder.notes.append(
        f"{path}: per-expert channel couplings come from the module structure (the graph has no experts)"
    )
