"""Install / uninstall S2 layers around the planned linear modules of a (permuted) model.

An `S2Linear` keeps the frozen base module's weight untouched and adds one small trainable ``nn.Parameter``
per block, holding the *update* ``Δ`` (zeros at install): rows ``(k, in)`` for ``feature="out"``, columns
``(out, k)`` for ``feature="in"``, in logical ``[out, in]`` orientation also for Conv1D. The forward is
``base(x) + block terms`` (``ops.delta_linear``), so the delta parameter is the one place the trained state
lives: any optimizer (fused, foreach, Triton, ``p.data`` writes) reaches the next forward, weight decay pulls
the update toward the pretrained values, and uninstalling without merging is bit-exact by construction.

State dicts come in two forms (docs/ARCHITECTURE.md, "Trained state"):
- ``"merged"`` (default): a stock module's keys, ``weight`` = ``cast(base_fp32 + Δ)`` at the blocks and no
  delta keys. ``save_pretrained`` and ``torch.save(model.state_dict())`` therefore write the trained model, and
  stock ``from_pretrained`` loads it (the permuted layout computes the same function). Loading a merged-form
  dict into an installed model moves the difference to the base back into the deltas.
- ``"split"`` (inside ``state_dict_form("split")``): ``weight`` = base and ``delta_<i>`` keys; what
  checkpoints are cut from (`trainable_state_dict` keeps only the trainable keys).

`install` and `uninstall` run in the model's transaction (`surgery.transaction`) and record what they change in
the model's `S2State` (saved ``requires_grad`` flags, swapped experts classes): a failure or an interrupt at any
point puts every module, flag and class back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from s2ft_lightning.blocks import (
    block_shape,
    feature_dim,
    gather_runs,
    is_quantized,
    merge_values,
    merged_weight,
    split_merged_,
    write_runs_,
)
from s2ft_lightning.deltas import DeltaBlocks, S2InstallError
from s2ft_lightning.experts import (
    ExpertBlocks,
    S2ExpertsMixin,
    attach_expert_blocks,
    check_experts,
    detach_expert_blocks,
)
from s2ft_lightning.ops import delta_linear
from s2ft_lightning.state import FORMS, S2State, current_form, state_dict_form
from surgery.linear import (
    ExpertLinear,
    is_conv1d,
    logical,
    logical_shape,
    logical_weight,
    resolve_linear,
    split_expert_name,
)
from surgery.plan import BlockSlice, S2Plan
from surgery.planner import applied_plan_id, plan_id
from surgery.transaction import Transaction, check_intact, transaction

__all__ = [
    "FORMS",
    "DeltaBlocks",
    "S2InstallError",
    "S2Linear",
    "block_parameters",
    "check_installable",
    "current_form",
    "install",
    "installed",
    "state_dict_form",
    "trainable_state",
    "trainable_state_dict",
    "uninstall",
]


class S2Linear(DeltaBlocks):
    """A frozen Linear/Conv1D plus trainable deltas on its planned rows/columns: ``y = x (W + Δ)ᵀ + b``."""

    def __init__(self, base: nn.Module, slices: Sequence[BlockSlice], master_dtype: torch.dtype | None = None):
        super().__init__()
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = logical_shape(base)
        if self.transposed:
            self.nf = base.nf  # Conv1D callers read it
        # Same Parameter objects as the base: state_dict keys ``<module>.weight``/``.bias`` are unchanged.
        self.weight = base.weight
        self.bias = base.bias
        self.__dict__["base_module"] = base  # not a submodule: restored as-is by uninstall
        self._add_deltas(slices, master_dtype or self.weight.dtype, self.weight.device)

    def merged_weight(self) -> torch.Tensor:
        """The weight with the deltas folded in (``cast(base_fp32 + Δ)``), in the base's layout and dtype."""
        return merged_weight(self.weight, self.deltas, self.specs, self.transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return delta_linear(x, self.weight, self.bias, self.deltas, self.specs, transposed=self.transposed)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if current_form() == "split":
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        destination[prefix + "weight"] = self.merged_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        wkey = prefix + "weight"
        dkeys = [f"{prefix}delta_{i}" for i in range(len(self.specs))]
        loaded = state_dict.get(wkey)
        if loaded is not None and is_quantized(self.weight):
            error_msgs.append(f"{prefix}weight: this S2 layer's base is quantized; load weights before quantizing")
            return
        if (
            loaded is not None
            and not any(k in state_dict for k in dkeys)
            and tuple(loaded.shape) == tuple(self.weight.shape)
        ):
            # Merged form: keep our base under the blocks and move the difference into the deltas.
            split = loaded.detach().to(self.weight.device, self.weight.dtype, copy=True)
            diffs = split_merged_(logical(split, self.transposed), self.logical_weight(), self.specs)
            for key, d, diff in zip(dkeys, self.deltas, diffs):
                state_dict[key] = diff.to(d.dtype)
            state_dict[wkey] = split
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        parts = [f"{f}{list(r)}" for f, r in self.specs]
        return f"in={self.in_features}, out={self.out_features}, conv1d={self.transposed}, blocks={parts}"


def installed(model: nn.Module) -> dict[str, DeltaBlocks]:
    """The S2 layers currently installed in ``model`` by module name: `S2Linear`s and MoE expert blocks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaBlocks)}


def _validate(
    model: nn.Module,
    by_module: Mapping[str, list[BlockSlice]],
    dtypes: Mapping[str, torch.dtype | None],
    init: Mapping[str, Sequence[torch.Tensor]] | None,
) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    for name in by_module:  # experts of 3-D MoE weights (`surgery.linear.ExpertLinear`) are not modules
        parts = split_expert_name(name)
        if parts is not None and parts[0] in mods:
            with contextlib.suppress(AttributeError):  # reported below as a module that is not in the model
                mods[name] = resolve_linear(model, name)
    found: dict[str, nn.Module] = {}
    checked: set[int] = set()
    for name, slices in by_module.items():
        if name not in mods:
            close = [m for m in mods if m.endswith(name.split(".")[-1])][:3]
            raise S2InstallError(
                f"module {name!r} from the plan is not in the model (similar: {close}); "
                "install on the model the plan was built for (the HF model, not a wrapper)"
            )
        mod = mods[name]
        if not (isinstance(mod, (nn.Linear, ExpertLinear)) or is_conv1d(mod)):
            raise S2InstallError(
                f"module {name!r} is a {type(mod).__name__}; S2 blocks can only be installed on nn.Linear, "
                "transformers Conv1D or MoE expert weights"
            )
        if isinstance(mod, ExpertLinear) and id(mod.owner) not in checked:  # once per experts module
            check_experts(mod.owner, name.rsplit(".", 1)[0])
            checked.add(id(mod.owner))
        out_f, in_f = logical_shape(mod)
        if len({s.feature for s in slices}) > 1:
            raise S2InstallError(f"module {name!r} has both row and column blocks; use one feature per module")
        taken: set[int] = set()
        for s in slices:
            if s.feature not in ("in", "out"):
                raise S2InstallError(f"slice of {name!r} has feature {s.feature!r}; expected 'in' or 'out'")
            size = in_f if s.feature == "in" else out_f
            if not s.runs:
                raise S2InstallError(f"slice of {name!r} has no runs")
            for a, b in s.runs:
                if not 0 <= a < b <= size:
                    raise S2InstallError(
                        f"slice of {name!r}: run [{a}, {b}) is outside its {s.feature} features [0, {size})"
                    )
                span = set(range(a, b))
                if span & taken:
                    raise S2InstallError(f"slices of {name!r} overlap at {sorted(span & taken)[:5]}")
                taken |= span
        if mod.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise S2InstallError(f"module {name!r} has weight dtype {mod.weight.dtype}; need a float weight")
        if init is not None and name in init:
            _check_init(name, slices, list(init[name]), dtypes[name] or mod.weight.dtype, mod, out_f, in_f)
        found[name] = mod
    if init is not None:
        extra = sorted(set(init) - set(by_module))
        if extra:
            raise S2InstallError(f"init has blocks for modules without slices: {extra[:5]}")
    return found


def _check_init(name, slices, vals, dtype, mod, out_f: int, in_f: int) -> None:
    if len(vals) != len(slices):
        raise S2InstallError(f"init for {name!r} has {len(vals)} tensors for {len(slices)} slices")
    for s, v in zip(slices, vals):
        shape = block_shape(s.feature, s.runs, out_f, in_f)
        if tuple(v.shape) != shape:
            raise S2InstallError(f"init block for {name!r} has shape {tuple(v.shape)}, expected {shape}")
        if v.dtype != dtype:
            raise S2InstallError(f"init block for {name!r} is {v.dtype}; expected {dtype} (cast it first)")
        if v.device != mod.weight.device:
            raise S2InstallError(f"init block for {name!r} is on {v.device} but the weight is on {mod.weight.device}")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _resolve_slices(model: nn.Module, plan_or_slices: S2Plan | Iterable[BlockSlice], check_fingerprint: bool):
    if not isinstance(plan_or_slices, S2Plan):
        return list(plan_or_slices)
    plan = plan_or_slices
    if check_fingerprint:
        plan.check_model(model)
    moves = any(perm != list(range(len(perm))) for perm in plan.permutations.values())
    if moves and applied_plan_id(model) != plan_id(plan):
        raise S2InstallError(
            f"this plan permutes {sum(1 for p in plan.permutations.values() if p != sorted(p))} couplings but the "
            "model was not permuted by it (its blocks would sit on the wrong heads/channels); use "
            "s2ft_lightning.prepare_model(model, plan=plan), or surgery.planner.apply_plan before install"
        )
    return list(plan.slices)


def _master_dtypes(model: nn.Module, names: Iterable[str], master_dtype) -> dict[str, torch.dtype | None]:
    dtypes = {}
    for name in names:
        try:
            wd = logical_weight(resolve_linear(model, name)).dtype
        except AttributeError:
            wd = torch.float32  # reported by validation
        if master_dtype == "auto":
            dtypes[name] = torch.float32 if wd in (torch.bfloat16, torch.float16) else None
        elif master_dtype is None or isinstance(master_dtype, torch.dtype):
            dtypes[name] = master_dtype
        else:
            raise S2InstallError(f"master_dtype={master_dtype!r}: use 'auto', None or a torch dtype")
    return dtypes


def _checked_blocks(model, plan_or_slices, master_dtype, init, check_fingerprint: bool, permuted: bool):
    """Every refusal of `install`, before anything changes: (slices by module, delta dtypes, target modules)."""
    check_intact(model)
    if installed(model):
        raise S2InstallError("S2 blocks are already installed on this model; call uninstall(model) first")
    if isinstance(plan_or_slices, S2Plan) and not permuted:
        if check_fingerprint:
            plan_or_slices.check_model(model)
        slices = list(plan_or_slices.slices)
    else:
        slices = _resolve_slices(model, plan_or_slices, check_fingerprint)
    if not slices:
        raise S2InstallError("the plan has no slices: nothing to train")
    by_module: dict[str, list[BlockSlice]] = {}
    for s in slices:
        by_module.setdefault(s.module, []).append(s)
    dtypes = _master_dtypes(model, by_module, master_dtype)
    return by_module, dtypes, _validate(model, by_module, dtypes, init)


def check_installable(
    model: nn.Module,
    plan_or_slices: S2Plan | Iterable[BlockSlice],
    *,
    master_dtype: torch.dtype | str | None = "auto",
    init: Mapping[str, Sequence[torch.Tensor]] | None = None,
    check_fingerprint: bool = True,
    permuted: bool = True,
) -> None:
    """Raise `S2InstallError` if ``install`` would refuse these blocks; touches nothing.

    ``permuted=False`` checks a plan against the model it is about to permute (shapes and module types do
    not change under permutation), so a refusal comes before any surgery.
    """
    _checked_blocks(model, plan_or_slices, master_dtype, init, check_fingerprint, permuted)


def install(
    model: nn.Module,
    plan_or_slices: S2Plan | Iterable[BlockSlice],
    *,
    master_dtype: torch.dtype | str | None = "auto",
    init: Mapping[str, Sequence[torch.Tensor]] | None = None,
    check_fingerprint: bool = True,
) -> dict[str, DeltaBlocks]:
    """Wrap each planned module in an ``S2Linear`` and freeze every other parameter of ``model``.

    A plan must have been applied to ``model`` (it is permuted by it); bare ``BlockSlice`` lists are taken
    as given. ``master_dtype``: ``"auto"`` = fp32 deltas for bf16/fp16 weights, else the weight dtype;
    ``None`` = the weight dtype; or a dtype. ``init`` optionally gives starting deltas per module (permuted
    space; zeros otherwise). Everything is validated before the model is touched, and a failure or interrupt
    midway puts every module, flag and class back.
    """
    by_module, dtypes, mods = _checked_blocks(model, plan_or_slices, master_dtype, init, check_fingerprint, True)
    out: dict[str, DeltaBlocks] = {}
    for name, mod in mods.items():  # built off the model: nothing changes yet
        if isinstance(mod, ExpertLinear):
            wrapper = ExpertBlocks(mod.owner, mod.param, mod.expert, by_module[name], dtypes[name])
        else:
            wrapper = S2Linear(mod, by_module[name], dtypes[name])
        if init is not None and name in init:
            with torch.no_grad():
                for d, v in zip(wrapper.deltas, init[name]):
                    d.copy_(v)
        for d in wrapper.deltas:
            d.requires_grad_(True)
        out[name] = wrapper
    with transaction(model, "installing S2 layers", S2State) as txn:
        state = S2State.of(model)
        saved = {n: p.requires_grad for n, p in model.named_parameters()}
        txn.on_rollback(functools.partial(_set_flags, model, saved), "freezing the base")
        state.requires_grad = saved
        for p in model.parameters():
            p.requires_grad_(False)
        experts: dict[str, dict[str, ExpertBlocks]] = {}
        for name, wrapper in out.items():
            if isinstance(wrapper, ExpertBlocks):
                owner, _, child = name.rpartition(".")
                experts.setdefault(owner, {})[child] = wrapper
            else:
                txn.on_rollback(functools.partial(_set_child, model, name, mods[name]), f"the S2 layer of {name}")
                _set_child(model, name, wrapper)
        for owner_name, blocks in experts.items():
            _attach_experts(txn, state, model.get_submodule(owner_name), owner_name, blocks)
    return out


def _attach_experts(txn: Transaction, state: S2State, owner: nn.Module, name: str, blocks) -> None:
    stock = type(owner)
    txn.on_rollback(functools.partial(detach_expert_blocks, owner, stock), f"the S2 forward of {name}")
    state.experts = {**state.experts, name: stock}
    attach_expert_blocks(owner, blocks)


def _set_flags(model: nn.Module, flags: Mapping[str, bool], default: bool = True) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, default))


def uninstall(model: nn.Module, merge: bool = True) -> dict[str, nn.Module]:
    """Put the original modules back: with the deltas merged in (``merge=True``) or the untouched base.

    All-or-nothing: a failure or interrupt midway leaves the S2 layers installed as they were.
    """
    check_intact(model)
    wrappers = installed(model)
    if not wrappers:
        raise S2InstallError("no S2 blocks are installed on this model")
    restored: dict[str, nn.Module] = {}
    with transaction(model, "uninstalling S2 layers", S2State) as txn:
        state = S2State.of(model)
        for name, owner in list(model.named_modules()):
            if isinstance(owner, S2ExpertsMixin):
                blocks = {n: c for n, c in owner.named_children() if isinstance(c, ExpertBlocks)}
                if merge:
                    for child in blocks.values():
                        _merge_runs(txn, child, child.weight, f"{name}.{child.param}[{child.expert}]")
                txn.on_rollback(functools.partial(attach_expert_blocks, owner, blocks), f"the S2 forward of {name}")
                detach_expert_blocks(owner, state.experts.get(name))
                restored[name] = owner
        for name, w in wrappers.items():
            if not isinstance(w, S2Linear):
                continue
            base = w.base_module
            if merge and is_quantized(w.weight):  # the base becomes its dequantized values with the blocks merged
                old = w.weight
                with txn.step(functools.partial(_set_weight, w, base, old), f"the merge into {name}"):
                    _set_weight(w, base, nn.Parameter(w.merged_weight(), requires_grad=False))
            elif merge:
                _merge_runs(txn, w, logical(w.weight, w.transposed), name)
            # in case the wrapper's parameters were replaced (e.g. by .to())
            old_params = (base.weight, base.bias)
            txn.on_rollback(functools.partial(_set_params, base, *old_params), f"the parameters of {name}")
            _set_params(base, w.weight, w.bias)
            txn.on_rollback(functools.partial(_set_child, model, name, w), f"the S2 layer of {name}")
            _set_child(model, name, base)
            restored[name] = base
        current = {n: p.requires_grad for n, p in model.named_parameters()}
        txn.on_rollback(functools.partial(_set_flags, model, current), "the base's requires_grad flags")
        _set_flags(model, state.requires_grad or {})
        state.forget_install()
    return restored


def _set_weight(w: S2Linear, base: nn.Module, weight: nn.Parameter) -> None:
    w.weight = weight
    base.weight = weight


def _set_params(module: nn.Module, weight, bias) -> None:
    module.weight, module.bias = weight, bias


def _merge_runs(txn: Transaction, blocks: DeltaBlocks, lw: torch.Tensor, name: str) -> None:
    """Write ``cast(base_fp32 + Δ)`` into the logical weight ``lw`` at each block, journaled (old values kept)."""
    with torch.no_grad():
        for d, (feature, runs) in zip(blocks.deltas, blocks.specs):
            dim = feature_dim(feature)
            old = gather_runs(lw, runs, dim).clone()
            new = merge_values(old, d.detach())
            with txn.step(functools.partial(_write, lw, runs, old, dim), f"the merge into {name}"):
                _write(lw, runs, new, dim)


@torch.no_grad()
def _write(t: torch.Tensor, runs, vals: torch.Tensor, dim: int) -> None:
    write_runs_(t, runs, vals, dim)  # no_grad: an undo may run after the base's flags are restored


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All trainable delta parameters, in module order."""
    check_intact(model)
    return [p for w in installed(model).values() for p in w.deltas]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.delta_<i>": tensor}`` of the deltas (detached, permuted index space)."""
    check_intact(model)
    return {f"{n}.delta_{i}": p.detach() for n, w in installed(model).items() for i, p in enumerate(w.deltas)}


def trainable_state_dict(module: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state dict cut to its trainable parameters (deltas, plus e.g. a new task head)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    with state_dict_form("split"):
        full = module.state_dict(keep_vars=keep_vars)
    return {k: v for k, v in full.items() if k in names}
