"""S2 blocks on MoE experts (transformers' experts modules in every layout of `surgery.expert_storage`).

Expert ``e`` of an experts tensor is one linear map (`surgery.linear.ExpertLinear`, named
``"<experts>.<param>[e]"``, seen as ``[out, in]`` whether stored plain, transposed or stacked 2-D); its trained
Up rows and Down columns are `ExpertBlocks` deltas, registered as children of the module holding the tensors.
While blocks are installed, that module's class is swapped for a subclass with `S2ExpertsMixin` (as
``torch.nn.utils.parametrize`` does), whose forward is

    out = <the module's own forward on the frozen weights> + Σ_e w_te · c_e(x_t)

The first term runs whatever transformers dispatches to (eager loop, batched or grouped matmuls) and is never
touched. The correction is exact because down is linear in its input and the Up rows enter only through the
trained channels S = D ∪ U of each expert: with ``g, u`` the gate/up outputs on S (biases included, they are
frozen), ``du = x Δ_upᵀ`` and the family's declared activation ``h = f(g, u)`` (`surgery.expert_storage`),
``h' = f(g, u + du)`` and ``c_e = (h' − h) W_down[:, S]ᵀ + h'[:, D] Δ_downᵀ``. For ``f = act(g)·u``,
``h' − h = act(g)·du``; gpt-oss's clamped SwiGLU is not linear in u, so ``h'`` is computed from scratch on S
(the clamp sees base + delta). It costs about ``|S|/I`` of an expert's FLOPs and saves only ``|S|``-wide
activations (docs/ARCHITECTURE.md, "MoE experts"). Routing weights multiply the correction (Llama-4 scales the
experts' inputs instead, DBRX calls one expert at a time: `routing`), so the router's gradient is that of the
trained model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from s2ft_lightning.blocks import feature_dim, gather_runs, merged_weight, split_merged_
from s2ft_lightning.deltas import DeltaBlocks, S2InstallError
from s2ft_lightning.sharding import full
from s2ft_lightning.state import current_form
from surgery.expert_storage import ExpertStorage, activation, gate_up_bias, storage_of, untrainable
from surgery.plan import BlockSlice

__all__ = [
    "ExpertBlocks",
    "ExpertDeltas",
    "S2ExpertsMixin",
    "attach_expert_blocks",
    "check_experts",
    "detach_expert_blocks",
    "expert_correction",
    "routing",
]

_CLASSES: dict[type, type] = {}


class ExpertBlocks(DeltaBlocks):
    """The deltas of one expert of one experts tensor; ``weight`` is that expert's ``[out, in]`` view."""

    def __init__(self, owner: nn.Module, param: str, expert: int, slices: Sequence[BlockSlice], dtype) -> None:
        super().__init__()
        self.param, self.expert = param, expert
        self.__dict__["owner"] = owner  # not a submodule: the owner holds this module
        self.__dict__["storage"] = storage = storage_of(owner)
        name = f"{type(owner).__name__}.{param}[{expert}]"
        if storage is None or param not in storage.params:
            raise S2InstallError(f"{name}: not an experts tensor in a known layout")
        for s in slices:
            positions = [i for a, b in s.runs for i in range(a, b)]
            if param == storage.down and s.feature == "in":
                continue
            if s.feature == "out" and storage.up_channels(param, positions) is not None:
                continue
            raise S2InstallError(
                f"{name}: only Up rows and Down columns of experts train (the correction forward adds nothing "
                f"else), got {s.feature} features {positions[:4]}{'...' if len(positions) > 4 else ''}"
            )
        self.out_features, self.in_features = self.weight.shape
        self._add_deltas(slices, dtype or getattr(owner, param).dtype, getattr(owner, param).device)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """This expert's ``[out, in]`` view of ``t`` (the experts tensor, or one shaped like it)."""
        return self.storage.view(self.param, t, self.expert)

    @property
    def role(self) -> str:
        return "down" if self.param == self.storage.down else "up"

    @property
    def weight(self) -> torch.Tensor:
        return self.view(getattr(self.owner, self.param))

    def base_block(self, i: int) -> torch.Tensor:
        """The frozen base values under block ``i``; sharded (FSDP), this layer's expert tensor is gathered."""
        feature, runs = self.specs[i]
        w = self.view(full(getattr(self.owner, self.param).detach()))
        return gather_runs(w, runs, feature_dim(feature)).clone()

    def forward(self, *args, **kwargs):  # pragma: no cover - the owner computes the experts' output
        raise RuntimeError("expert blocks are applied by their experts module's forward, not called directly")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if current_form() == "split":  # merged form: the owner writes the merged experts tensor instead
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def channels(self, device: torch.device) -> torch.Tensor:
        """The intermediate channels (permuted space) of this block's positions, in spec order."""
        key = ("_channels", device)
        if key not in self.__dict__:
            pos = [i for _, runs in self.specs for a, b in runs for i in range(a, b)]
            ch = pos if self.role == "down" else self.storage.up_channels(self.param, pos)
            self.__dict__[key] = torch.tensor(ch, dtype=torch.long, device=device)
        return self.__dict__[key]

    def stacked(self) -> torch.Tensor:
        """All deltas side by side in spec order (rows stacked for Up, columns for Down)."""
        dim = 0 if self.specs[0][0] == "out" else 1
        return self.deltas[0] if len(self.deltas) == 1 else torch.cat(self.deltas, dim=dim)


def check_experts(owner: nn.Module, name: str) -> None:
    """Refuse an experts module whose forward the correction does not reproduce (before anything changes)."""
    if isinstance(owner, S2ExpertsMixin):
        raise S2InstallError(f"{name!r} already carries S2 expert blocks; call uninstall(model) first")
    why = untrainable(owner)
    if why is None and getattr(owner, "_is_expert_parallel", False):
        why = "it is expert-parallel"
    if why is not None:
        raise S2InstallError(f"cannot train experts {name!r} ({type(owner).__name__}): {why}")


def _arg(args: tuple, kwargs: dict, i: int, names: tuple[str, ...]):
    if len(args) > i:
        return args[i]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    raise TypeError(f"experts forward called without its argument {names[0]!r}")


def _expert_of(owner: nn.Module, storage: ExpertStorage, w: torch.Tensor) -> int:
    """Which expert's rows of the stacked gate tensor ``w`` is (DBRX passes ``w1.view(E, I, H)[e]``)."""
    base = getattr(owner, storage.gate)
    size = storage.width * base.shape[-1]
    same = w.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    off = w.storage_offset() - base.storage_offset() if same else -1
    if off < 0 or off % size or off // size >= storage.experts or tuple(w.shape) != (storage.width, base.shape[-1]):
        raise RuntimeError(
            f"{type(owner).__name__}: S2 expert blocks read the expert index from the {storage.gate} view its "
            "caller passes, but got a tensor that is not one expert of it; this transformers version calls "
            "the experts differently: uninstall the S2 blocks"
        )
    return off // size


def routing(
    owner: nn.Module, storage: ExpertStorage, args: tuple, kwargs: dict, call: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [n, H], top_k_index [n, k], top_k_weights [n, k], token [n])`` of one experts call.

    ``token`` is the flat token position each row of ``hidden`` belongs to. ``call`` defaults to how
    ``storage`` says the module is called (`surgery.expert_storage`).
    """
    call = call or storage.call
    hidden = _arg(args, kwargs, 0, ("hidden_states", "x"))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    n, dev = hidden.shape[0], hidden.device
    ones = hidden.new_ones(n, 1)
    if call == "scaled_inputs":  # rows e*T ... (e+1)*T - 1 go to expert e, already scaled by their routing score
        if n % storage.experts:
            raise RuntimeError(f"{type(owner).__name__}: {n} rows do not split into {storage.experts} experts")
        t = n // storage.experts
        index = torch.arange(storage.experts, device=dev).repeat_interleave(t)[:, None]
        return hidden, index, ones, torch.arange(n, device=dev) % t
    if call == "one_expert":
        e = _expert_of(owner, storage, _arg(args, kwargs, 1, ("expert_w1",)))
        return hidden, torch.full((n, 1), e, dtype=torch.long, device=dev), ones, torch.arange(n, device=dev)
    index = _arg(args, kwargs, 1, ("top_k_index", "router_indices"))
    weights = _arg(args, kwargs, 2, ("top_k_weights", "routing_weights"))
    return hidden, index.reshape(n, -1), weights.reshape(n, -1), torch.arange(n, device=dev)


class S2ExpertsMixin:
    """Mixed into an experts module's class while S2 blocks are installed (see the module docstring)."""

    _wraps_experts = True  # `surgery.expert_storage.stock_class` looks past it

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        storage = storage_of(self)
        hidden, index, weights, _ = routing(self, storage, args, kwargs)
        dev = hidden.device
        deltas = {
            e: ExpertDeltas(
                *((p["down"].channels(dev), p["down"].stacked()) if "down" in p else (None, None)),
                *((p["up"].channels(dev), p["up"].stacked()) if "up" in p else (None, None)),
            )
            for e, p in self.expert_blocks().items()
        }
        corr = expert_correction(self, hidden, index, weights, deltas)
        return out + corr.view(out.shape).to(out.dtype)

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickle it as "the mixed class of <the stock class>".
        fn, args, *rest = super().__reduce_ex__(protocol)
        return (_new_mixed, (_stock_class(type(self)),), *rest)

    def expert_blocks(self) -> dict[int, dict[str, ExpertBlocks]]:
        """``{expert: {"up" | "down": blocks}}`` of the installed blocks."""
        out: dict[int, dict[str, ExpertBlocks]] = {}
        for child in self.children():
            if isinstance(child, ExpertBlocks):
                out.setdefault(child.expert, {})[child.role] = child
        return out

    @torch.no_grad()
    def merged_param(self, param: str) -> torch.Tensor:
        """A copy of experts tensor ``param`` with every installed delta on it folded in (fp32 add, one cast)."""
        merged = getattr(self, param).detach().clone()
        for child in self.children():
            if isinstance(child, ExpertBlocks) and child.param == param:
                view = child.view(merged)
                view.copy_(merged_weight(view, child.deltas, child.specs))
        return merged

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if current_form() == "merged":
            for param in {c.param for c in self.children() if isinstance(c, ExpertBlocks)}:
                destination[prefix + param] = self.merged_param(param)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Merged form (no delta keys): keep our base and move the difference at the blocks into the deltas.
        for name, child in self.named_children():
            if not isinstance(child, ExpertBlocks) or prefix + child.param not in state_dict:
                continue
            keys = [f"{prefix}{name}.delta_{i}" for i in range(len(child.specs))]
            if any(k in state_dict for k in keys):
                continue
            loaded = state_dict[prefix + child.param]
            base = getattr(self, child.param)
            if tuple(loaded.shape) != tuple(base.shape):
                continue  # the size mismatch is reported by the parameter load below
            loaded = loaded.detach().to(base.device, base.dtype, copy=True)
            state_dict[prefix + child.param] = loaded
            diffs = split_merged_(child.view(loaded), child.view(base), child.specs)
            for key, d, diff in zip(keys, child.deltas, diffs):
                state_dict[key] = diff.to(d.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _stock_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not S2ExpertsMixin)


def _new_mixed(stock: type) -> nn.Module:
    return object.__new__(_mixed_class(stock))


def _mixed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"S2{cls.__name__}", (S2ExpertsMixin, cls), {"__module__": __name__, "_wraps_experts": True}
        )
    return _CLASSES[cls]


def attach_expert_blocks(owner: nn.Module, blocks: Mapping[str, ExpertBlocks]) -> None:
    """Register ``blocks`` (by their ``"<param>[e]"`` child names) and switch ``owner`` to the S2 forward.

    Idempotent (a rollback may run it on an owner that still has them).
    """
    for child_name, b in blocks.items():
        owner.add_module(child_name, b)
    owner.__class__ = _mixed_class(_stock_class(type(owner)) if isinstance(owner, S2ExpertsMixin) else type(owner))


def detach_expert_blocks(owner: nn.Module, stock: type | None = None) -> None:
    """Undo `attach_expert_blocks`: remove the expert blocks and give ``owner`` back its ``stock`` class.

    Idempotent (a rollback may run it on an owner that never got them). Merging is `layers.uninstall`'s.
    """
    for name in [n for n, c in owner.named_children() if isinstance(c, ExpertBlocks)]:
        delattr(owner, name)
    if isinstance(owner, S2ExpertsMixin):
        owner.__class__ = stock or _stock_class(type(owner))


class ExpertDeltas(NamedTuple):
    """What one expert adds: Down columns at channels ``down_ch`` (Δ ``(H, kD)``) and Up rows at channels
    ``up_ch`` (Δ ``(kU, H)``); either pair may be None."""

    down_ch: torch.Tensor | None
    down: torch.Tensor | None
    up_ch: torch.Tensor | None
    up: torch.Tensor | None


def _weights(owner: nn.Module, st: ExpertStorage, e: int, channels: torch.Tensor, dtype: torch.dtype):
    """Gate and up rows ``[k, H]`` (and their biases) of expert ``e`` on ``channels``, in ``dtype``."""
    gate_b = up_b = None
    if st.gate_up is not None:
        w = st.view(st.gate_up, getattr(owner, st.gate_up), e)
        g_rows, u_rows = st.gate_rows(channels), st.up_rows(channels)
        gate, up = w.index_select(0, g_rows), w.index_select(0, u_rows)
        bias = gate_up_bias(owner, st) if getattr(owner, "has_bias", True) else None
        if bias is not None:
            gate_b, up_b = bias[e].index_select(0, g_rows).to(dtype), bias[e].index_select(0, u_rows).to(dtype)
    else:
        gate = st.view(st.gate, getattr(owner, st.gate), e).index_select(0, channels)
        up = st.view(st.up, getattr(owner, st.up), e).index_select(0, channels)
    return gate.to(dtype), up.to(dtype), gate_b, up_b


def expert_correction(
    owner: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    deltas: Mapping[int, ExpertDeltas],
) -> torch.Tensor:
    """``Σ_e w_te · c_e(x_t)`` for every token (rows of ``hidden``): what ``deltas`` add to the experts' output.

    ``owner`` holds the experts tensors. Channels index the experts' intermediate features as the weights are
    stored now (permuted while training, original when serving an adapter over a stock base).
    """
    st = storage_of(owner)
    f = activation(owner, st, check=False)
    if isinstance(f, str):
        raise RuntimeError(f"cannot apply expert blocks to {type(owner).__name__}: {f}")
    dtype, k = hidden.dtype, top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token-expert pairs grouped by expert
    counts = torch.bincount(flat, minlength=st.experts).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    toks, terms = [], []
    for e, d in sorted(deltas.items()):
        n = counts[e]
        if n == 0:  # no token routed to this expert: nothing to add, no gradient
            continue
        pairs = order[starts[e] : starts[e] + n]
        tok = pairs // k
        x = hidden.index_select(0, tok)
        union = torch.unique(torch.cat([c for c in (d.down_ch, d.up_ch) if c is not None]))  # sorted channels S
        w_gate, w_up, b_gate, b_up = _weights(owner, st, e, union, dtype)
        g, u = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
        h = f(g, u)
        corr = None
        if d.up is not None:
            du = F.linear(x, d.up.to(dtype))
            du = x.new_zeros(n, union.numel()).index_copy(1, torch.searchsorted(union, d.up_ch), du)
            if f.linear_in_up:  # act(g)·(u + du) = h + act(g)·du
                dh = f(g, du)
                h = h + dh
            else:  # computed from scratch on S: the clamp sees base + delta
                h_new = f(g, u + du)
                dh, h = h_new - h, h_new
            w_down = st.view(st.down, getattr(owner, st.down), e).index_select(1, union)
            corr = F.linear(dh, w_down.to(dtype))
        if d.down is not None:
            term = F.linear(h.index_select(1, torch.searchsorted(union, d.down_ch)), d.down.to(dtype))
            corr = term if corr is None else corr + term
        toks.append(tok)
        terms.append(corr * top_k_weights.reshape(-1).index_select(0, pairs).to(dtype)[:, None])
    out = torch.zeros_like(hidden)
    if not terms:
        return out
    return out.index_add(0, torch.cat(toks), torch.cat(terms))
