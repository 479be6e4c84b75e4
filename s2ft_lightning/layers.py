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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar

import torch
from torch import nn

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

from .ops import delta_linear, gather_runs, merged_weight
from .quantize import is_quantized

__all__ = [
    "S2InstallError",
    "S2Linear",
    "block_parameters",
    "check_installable",
    "install",
    "installed",
    "state_dict_form",
    "trainable_state",
    "trainable_state_dict",
    "uninstall",
]

_STATE_ATTR = "_s2ft_saved_requires_grad"
_FORM: ContextVar[str] = ContextVar("s2ft_state_dict_form", default="merged")
FORMS = ("merged", "split")


@contextlib.contextmanager
def state_dict_form(form: str) -> Iterator[None]:
    """Within this block, S2 layers write state dicts in ``form`` ("merged" or "split")."""
    if form not in FORMS:
        raise ValueError(f"state dict form {form!r} is not one of {FORMS}")
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


def current_form() -> str:
    """The state-dict form S2 layers write now ("merged" unless inside ``state_dict_form("split")``)."""
    return _FORM.get()


class S2InstallError(ValueError):
    """A plan or block set that cannot be installed on this model (the model is left untouched)."""


def _block_shape(feature: str, runs: Sequence[tuple[int, int]], out_f: int, in_f: int) -> tuple[int, int]:
    k = sum(e - s for s, e in runs)
    return (k, in_f) if feature == "out" else (out_f, k)


class DeltaBlocks(nn.Module):
    """Trainable deltas on planned rows/columns of one logical ``[out, in]`` weight (``self.weight``).

    The part S2Linear and the expert blocks (`s2ft_lightning.experts`) share: delta parameters ``delta_<i>`` in
    spec order, the base values under them, the merged weight.
    """

    transposed = False  # Conv1D storage ([in, out]) when True

    def _add_deltas(self, slices: Sequence[BlockSlice], dtype: torch.dtype, device: torch.device) -> None:
        self.slices = [BlockSlice(s.module, s.role, s.feature, list(s.runs), list(s.original)) for s in slices]
        self.specs = tuple((s.feature, tuple((int(a), int(b)) for a, b in s.runs)) for s in self.slices)
        for i, (feature, runs) in enumerate(self.specs):
            shape = _block_shape(feature, runs, self.out_features, self.in_features)
            self.register_parameter(f"delta_{i}", nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def deltas(self) -> list[nn.Parameter]:
        """The trainable updates, one per block, in spec order."""
        return [getattr(self, f"delta_{i}") for i in range(len(self.specs))]

    def base_block(self, i: int) -> torch.Tensor:
        """The frozen base values under block ``i`` (logical orientation, a copy).

        On a sharded (DTensor) weight this is a collective that gathers only these rows/columns.
        """
        from s2ft_lightning.sharding import full

        kept = self.__dict__.get("_base_blocks")
        if kept is not None:  # the base was quantized after these were read: the original values
            return kept[i].clone()
        feature, runs = self.specs[i]
        return full(gather_runs(logical(self.weight, self.transposed), runs, 0 if feature == "out" else 1)).clone()

    def keep_base_blocks(self) -> None:
        """Remember the base values under the blocks (before the base is quantized), for adapters and checks."""
        self.__dict__["_base_blocks"] = [self.base_block(i) for i in range(len(self.specs))]


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

    @torch.no_grad()
    def merge_into_base_(self) -> None:
        """Write ``cast(base_fp32 + Δ)`` into the base weight at the blocks (in place, for uninstall).

        A quantized base is replaced by its dequantized values with the blocks merged in.
        """
        if is_quantized(self.weight):
            self.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
            return
        merged = logical(self.merged_weight(), self.transposed)
        w = logical(self.weight, self.transposed)
        for feature, runs in self.specs:
            dim = 0 if feature == "out" else 1
            for s, e in runs:
                w.narrow(dim, s, e - s).copy_(merged.narrow(dim, s, e - s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return delta_linear(x, self.weight, self.bias, self.deltas, self.specs, transposed=self.transposed)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if _FORM.get() == "split":
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
            lw, bw = logical(split, self.transposed), logical(self.weight, self.transposed)
            acc = torch.promote_types(self.weight.dtype, torch.float32)
            with torch.no_grad():
                for key, d, (feature, runs) in zip(dkeys, self.deltas, self.specs):
                    dim = 0 if feature == "out" else 1
                    state_dict[key] = (gather_runs(lw, runs, dim).to(acc) - gather_runs(bw, runs, dim).to(acc)).to(
                        d.dtype
                    )
                    for s, e in runs:
                        lw.narrow(dim, s, e - s).copy_(bw.narrow(dim, s, e - s))
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
            with contextlib.suppress(AttributeError):
                mods[name] = resolve_linear(model, name)
    found: dict[str, nn.Module] = {}
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
                "transformers Conv1D or 3-D MoE expert weights"
            )
        if isinstance(mod, ExpertLinear):
            from .experts import check_experts

            check_experts(mod.owner, name.rsplit(".", 1)[0])
        out_f, in_f = logical_shape(mod)
        features = {s.feature for s in slices}
        if len(features) > 1:
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
            vals = list(init[name])
            if len(vals) != len(slices):
                raise S2InstallError(f"init for {name!r} has {len(vals)} tensors for {len(slices)} slices")
            dt = dtypes[name] or mod.weight.dtype
            for s, v in zip(slices, vals):
                shape = _block_shape(s.feature, s.runs, out_f, in_f)
                if tuple(v.shape) != shape:
                    raise S2InstallError(f"init block for {name!r} has shape {tuple(v.shape)}, expected {shape}")
                if v.dtype != dt:
                    raise S2InstallError(f"init block for {name!r} is {v.dtype}; expected {dt} (cast it first)")
                if v.device != mod.weight.device:
                    raise S2InstallError(
                        f"init block for {name!r} is on {v.device} but the weight is on {mod.weight.device}"
                    )
        found[name] = mod
    if init is not None:
        extra = sorted(set(init) - set(by_module))
        if extra:
            raise S2InstallError(f"init has blocks for modules without slices: {extra[:5]}")
    return found


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
    _validate(model, by_module, _master_dtypes(model, by_module, master_dtype), init)


def install(
    model: nn.Module,
    plan_or_slices: S2Plan | Iterable[BlockSlice],
    *,
    master_dtype: torch.dtype | str | None = "auto",
    init: Mapping[str, Sequence[torch.Tensor]] | None = None,
    check_fingerprint: bool = True,
) -> dict[str, S2Linear]:
    """Wrap each planned module in an ``S2Linear`` and freeze every other parameter of ``model``.

    A plan must have been applied to ``model`` (it is permuted by it); bare ``BlockSlice`` lists are taken
    as given. ``master_dtype``: ``"auto"`` = fp32 deltas for bf16/fp16 weights, else the weight dtype;
    ``None`` = the weight dtype; or a dtype. ``init`` optionally gives starting deltas per module (permuted
    space; zeros otherwise). Everything is validated before the model is touched.
    """
    if installed(model):
        raise S2InstallError("S2 blocks are already installed on this model; call uninstall(model) first")
    slices = _resolve_slices(model, plan_or_slices, check_fingerprint)
    if not slices:
        raise S2InstallError("the plan has no slices: nothing to train")
    by_module: dict[str, list[BlockSlice]] = {}
    for s in slices:
        by_module.setdefault(s.module, []).append(s)
    dtypes = _master_dtypes(model, by_module, master_dtype)
    mods = _validate(model, by_module, dtypes, init)

    from .experts import ExpertBlocks, attach_expert_blocks

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    out: dict[str, DeltaBlocks] = {}
    for name, mod in mods.items():
        if isinstance(mod, ExpertLinear):
            wrapper = ExpertBlocks(mod.owner, mod.param, mod.expert, by_module[name], dtypes[name])
        else:
            wrapper = S2Linear(mod, by_module[name], dtypes[name])
        if init is not None and name in init:
            with torch.no_grad():
                for d, v in zip(wrapper.deltas, init[name]):
                    d.copy_(v)
        out[name] = wrapper
    for p in model.parameters():
        p.requires_grad_(False)
    experts: dict[str, dict[str, ExpertBlocks]] = {}
    for name, wrapper in out.items():
        if isinstance(wrapper, ExpertBlocks):
            owner, _, child = name.rpartition(".")
            experts.setdefault(owner, {})[child] = wrapper
        else:
            _set_child(model, name, wrapper)
        for d in wrapper.deltas:
            d.requires_grad_(True)
    for owner, blocks in experts.items():
        attach_expert_blocks(model.get_submodule(owner), blocks)
    model.__dict__[_STATE_ATTR] = saved
    return out


def uninstall(model: nn.Module, merge: bool = True) -> dict[str, nn.Module]:
    """Put the original modules back: with the deltas merged in (``merge=True``) or the untouched base."""
    from .experts import S2ExpertsMixin, detach_expert_blocks

    wrappers = installed(model)
    if not wrappers:
        raise S2InstallError("no S2 blocks are installed on this model")
    restored = {}
    for name, owner in list(model.named_modules()):
        if isinstance(owner, S2ExpertsMixin):
            detach_expert_blocks(owner, merge)
            restored[name] = owner
    for name, w in wrappers.items():
        if not isinstance(w, S2Linear):
            continue
        if merge:
            w.merge_into_base_()
        base = w.base_module
        base.weight, base.bias = w.weight, w.bias  # in case the wrapper's params were replaced (e.g. .to())
        _set_child(model, name, base)
        restored[name] = base
    saved = model.__dict__.pop(_STATE_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    return restored


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All trainable delta parameters, in module order."""
    return [p for w in installed(model).values() for p in w.deltas]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.delta_<i>": tensor}`` of the deltas (detached, permuted index space)."""
    return {f"{n}.delta_{i}": p.detach() for n, w in installed(model).items() for i, p in enumerate(w.deltas)}


def trainable_state_dict(module: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state dict cut to its trainable parameters (deltas, plus e.g. a new task head)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    with state_dict_form("split"):
        full = module.state_dict(keep_vars=keep_vars)
    return {k: v for k, v in full.items() if k in names}
