"""S2 blocks on MoE experts stored as 3-D tensors (transformers' Mixtral, Qwen2/3-MoE, OLMoE experts modules).

Expert ``e`` of ``gate_up_proj`` / ``down_proj`` is one linear map (`surgery.linear.ExpertLinear`, named
``"<experts>.<param>[e]"``); its trained Up rows and Down columns are `ExpertBlocks` deltas, registered as
children of the experts module under those names. While blocks are installed, the experts module's class is
swapped for a subclass with `S2ExpertsMixin` (as ``torch.nn.utils.parametrize`` does), whose forward is

    out = <the module's own forward on the frozen weights> + Σ_e w_te · c_e(x_t)

The first term runs whatever transformers dispatches to (eager loop, batched or grouped matmuls) and is never
touched. The correction is exact because down is linear in its input and the Up rows enter only through the
trained channels S = D ∪ U of each expert: with ``g, u`` the gate/up outputs on S and ``du = x Δ_upᵀ``,
``h = act(g)·(u + du)`` and ``c_e = (act(g)·du) W_down[:, S]ᵀ + h[:, D] Δ_downᵀ``. It costs about
``|S|/I`` of an expert's FLOPs and saves only ``|S|``-wide activations (docs/ARCHITECTURE.md, "MoE experts").
Routing weights multiply the correction, so the router's gradient is that of the trained model.
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
from surgery.plan import BlockSlice

__all__ = [
    "ExpertBlocks",
    "ExpertDeltas",
    "S2ExpertsMixin",
    "attach_expert_blocks",
    "check_experts",
    "detach_expert_blocks",
    "expert_correction",
]

_CLASSES: dict[type, type] = {}


class ExpertBlocks(DeltaBlocks):
    """The deltas of one expert of one 3-D expert weight; ``weight`` is that expert's ``[out, in]`` view."""

    def __init__(self, owner: nn.Module, param: str, expert: int, slices: Sequence[BlockSlice], dtype) -> None:
        super().__init__()
        self.param, self.expert = param, expert
        self.__dict__["owner"] = owner  # not a submodule: the owner holds this module
        self.out_features, self.in_features = getattr(owner, param).shape[1:]
        self._add_deltas(slices, dtype or getattr(owner, param).dtype, getattr(owner, param).device)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.param)[self.expert]

    def base_block(self, i: int) -> torch.Tensor:
        """The frozen base values under block ``i``; sharded (FSDP), this layer's expert tensor is gathered."""
        feature, runs = self.specs[i]
        w = full(getattr(self.owner, self.param).detach())[self.expert]
        return gather_runs(w, runs, feature_dim(feature)).clone()

    def forward(self, *args, **kwargs):  # pragma: no cover - the owner computes the experts' output
        raise RuntimeError("expert blocks are applied by their experts module's forward, not called directly")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if current_form() == "split":  # merged form: the owner writes the merged 3-D weight instead
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def channels(self, device: torch.device) -> torch.Tensor:
        """The intermediate channels (permuted space) of this block's positions, in spec order.

        Up rows of a fused ``gate_up_proj`` sit after the ``I`` gate rows: their channel is row − I.
        """
        offset = self.out_features // 2 if self.param == "gate_up_proj" else 0
        key = ("_channels", device)
        if key not in self.__dict__:
            pos = [i - offset for _, runs in self.specs for a, b in runs for i in range(a, b)]
            self.__dict__[key] = torch.tensor(pos, dtype=torch.long, device=device)
        return self.__dict__[key]

    def stacked(self) -> torch.Tensor:
        """All deltas side by side in spec order (rows stacked for Up, columns for Down)."""
        dim = 0 if self.specs[0][0] == "out" else 1
        return self.deltas[0] if len(self.deltas) == 1 else torch.cat(self.deltas, dim=dim)


def _fused(owner: nn.Module) -> bool:
    return isinstance(getattr(owner, "gate_up_proj", None), torch.Tensor)


def check_experts(owner: nn.Module, name: str) -> None:
    """Refuse an experts module whose forward the correction does not reproduce (before anything changes)."""
    from transformers.integrations import moe

    if isinstance(owner, S2ExpertsMixin):
        raise S2InstallError(f"{name!r} already carries S2 expert blocks; call uninstall(model) first")
    why = None
    if not isinstance(getattr(owner, "down_proj", None), torch.Tensor) or owner.down_proj.dim() != 3:
        why = "it has no 3-D down_proj [experts, hidden, intermediate]"
    elif getattr(owner, "is_transposed", False) or getattr(owner, "is_concatenated", True) is False:
        why = "its expert weights are transposed or gate/up interleaved"
    elif getattr(owner, "has_post_expert_norm", False):
        why = "a norm follows each expert (the output is not linear in the down input)"
    elif getattr(owner, "_is_expert_parallel", False):
        why = "it is expert-parallel"
    elif not getattr(owner, "has_gate", True) or not callable(getattr(owner, "act_fn", None)):
        why = "its experts are not gated act(gate)·up"
    elif getattr(type(owner), "_apply_gate", moe._default_apply_gate) is not moe._default_apply_gate:
        why = f"it gates with a custom {type(owner).__name__}._apply_gate"
    elif getattr(owner, "has_bias", False) and not _fused(owner):
        why = "it has biases on separate gate/up weights"
    if why is not None:
        raise S2InstallError(f"cannot train experts {name!r} ({type(owner).__name__}): {why}")


class S2ExpertsMixin:
    """Mixed into an experts module's class while S2 blocks are installed (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = super().forward(hidden_states, top_k_index, top_k_weights)
        dev = hidden_states.device
        deltas = {
            e: ExpertDeltas(
                *((p["down"].channels(dev), p["down"].stacked()) if "down" in p else (None, None)),
                *((p["up"].channels(dev), p["up"].stacked()) if "up" in p else (None, None)),
            )
            for e, p in self.expert_blocks().items()
        }
        return out + expert_correction(self, hidden_states, top_k_index, top_k_weights, deltas).to(out.dtype)

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickle it as "the mixed class of <the stock class>".
        fn, args, *rest = super().__reduce_ex__(protocol)
        return (_new_mixed, (_stock_class(type(self)),), *rest)

    def expert_blocks(self) -> dict[int, dict[str, ExpertBlocks]]:
        """``{expert: {"up" | "down": blocks}}`` of the installed blocks."""
        out: dict[int, dict[str, ExpertBlocks]] = {}
        for child in self.children():
            if isinstance(child, ExpertBlocks):
                role = "down" if child.param == "down_proj" else "up"
                out.setdefault(child.expert, {})[role] = child
        return out

    @torch.no_grad()
    def merged_param(self, param: str) -> torch.Tensor:
        """A copy of 3-D parameter ``param`` with every installed delta on it folded in (fp32 add, one cast)."""
        merged = getattr(self, param).detach().clone()
        for child in self.children():
            if isinstance(child, ExpertBlocks) and child.param == param:
                merged[child.expert] = merged_weight(merged[child.expert], child.deltas, child.specs)
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
            diffs = split_merged_(loaded[child.expert], base[child.expert], child.specs)
            for key, d, diff in zip(keys, child.deltas, diffs):
                state_dict[key] = diff.to(d.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _stock_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not S2ExpertsMixin)


def _new_mixed(stock: type) -> nn.Module:
    return object.__new__(_mixed_class(stock))


def _mixed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"S2{cls.__name__}", (S2ExpertsMixin, cls), {"__module__": __name__})
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


def _rows(owner: nn.Module, e: int, channels: torch.Tensor, dtype: torch.dtype):
    """Gate and up weights (and biases) of expert ``e`` on ``channels``, in ``dtype``."""
    width = owner.down_proj.shape[2]
    gate_b = up_b = None
    if isinstance(getattr(owner, "gate_up_proj", None), torch.Tensor):
        w = owner.gate_up_proj[e]
        gate, up = w.index_select(0, channels), w.index_select(0, channels + width)
        bias = getattr(owner, "gate_up_proj_bias", None) if getattr(owner, "has_bias", False) else None
        if bias is not None:
            gate_b, up_b = (
                bias[e].index_select(0, channels).to(dtype),
                bias[e].index_select(0, channels + width).to(dtype),
            )
    else:
        gate, up = owner.gate_proj[e].index_select(0, channels), owner.up_proj[e].index_select(0, channels)
    return gate.to(dtype), up.to(dtype), gate_b, up_b


def expert_correction(
    owner: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    deltas: Mapping[int, ExpertDeltas],
) -> torch.Tensor:
    """``Σ_e w_te · c_e(x_t)`` for every token (rows of ``hidden``): what ``deltas`` add to the experts' output.

    Channels index the experts' intermediate features as the weights are stored now (permuted while training,
    original when serving an adapter over a stock base).
    """
    dtype, k = hidden.dtype, top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token-expert pairs grouped by expert
    counts = torch.bincount(flat, minlength=owner.down_proj.shape[0]).tolist()
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
        w_gate, w_up, b_gate, b_up = _rows(owner, e, union, dtype)
        a, u = owner.act_fn(F.linear(x, w_gate, b_gate)), F.linear(x, w_up, b_up)
        corr = None
        if d.up is not None:
            du = F.linear(x, d.up.to(dtype))
            du = x.new_zeros(n, union.numel()).index_copy(1, torch.searchsorted(union, d.up_ch), du)
            h = a * (u + du)
            corr = F.linear(a * du, owner.down_proj[e].index_select(1, union).to(dtype))
        else:
            h = a * u
        if d.down is not None:
            term = F.linear(h.index_select(1, torch.searchsorted(union, d.down_ch)), d.down.to(dtype))
            corr = term if corr is None else corr + term
        toks.append(tok)
        terms.append(corr * top_k_weights.reshape(-1).index_select(0, pairs).to(dtype)[:, None])
    out = torch.zeros_like(hidden)
    if not terms:
        return out
    return out.index_add(0, torch.cat(toks), torch.cat(terms))
