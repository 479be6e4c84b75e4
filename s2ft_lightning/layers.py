"""Install / uninstall S2 wrappers around the planned linear modules of a (permuted) model.

Each trainable block is one small contiguous ``nn.Parameter`` (rows ``(k, in)`` for ``feature="out"``,
columns ``(out, k)`` for ``feature="in"``, logical ``[out, in]`` orientation also for Conv1D). The block is
kept merged in the frozen weight: before each forward, a block changed since the last sync (tracked by
``param._version``) is cast and copied into the weight's block positions, so the forward is a plain linear
on the frozen weight (same FLOPs as the frozen model) and any optimizer, accumulation or checkpointing works.
The base values at the block positions are kept in a buffer so ``uninstall(merge=False)`` is bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery.plan import BlockSlice, S2Plan

from .ops import gather_runs, partial_linear

__all__ = ["S2InstallError", "S2Linear", "block_parameters", "install", "installed", "trainable_state", "uninstall"]

_STATE_ATTR = "_s2ft_saved_requires_grad"


class S2InstallError(ValueError):
    """A plan or block set that cannot be installed on this model (the model is left untouched)."""


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


def _block_shape(feature: str, runs: Sequence[tuple[int, int]], out_f: int, in_f: int) -> tuple[int, int]:
    k = sum(e - s for s, e in runs)
    return (k, in_f) if feature == "out" else (out_f, k)


class S2Linear(nn.Module):
    """A frozen Linear/Conv1D whose planned blocks train as small parameters merged into its weight."""

    def __init__(self, base: nn.Module, slices: Sequence[BlockSlice], master_dtype: torch.dtype | None = None):
        super().__init__()
        self.transposed = _is_conv1d(base)
        self.out_features, self.in_features = _logical_shape(base)
        if self.transposed:
            self.nf = base.nf  # Conv1D callers read it
        # Same Parameter objects as the base: state_dict keys ``<module>.weight``/``.bias`` are unchanged.
        self.weight = base.weight
        self.bias = base.bias
        self.__dict__["base_module"] = base  # not a submodule: restored as-is by uninstall
        self.slices = [BlockSlice(s.module, s.role, s.feature, list(s.runs), list(s.original)) for s in slices]
        self.specs = tuple((s.feature, tuple((int(a), int(b)) for a, b in s.runs)) for s in self.slices)
        dtype = master_dtype or self.weight.dtype
        self.blocks = nn.ParameterList()
        with torch.no_grad():
            for i, (feature, runs) in enumerate(self.specs):
                vals = self._read_block(feature, runs)
                self.register_buffer(f"base_values_{i}", vals.clone().contiguous())
                self.blocks.append(nn.Parameter(vals.to(dtype).clone().contiguous(), requires_grad=True))
        self._synced = [self._sync_key(b) for b in self.blocks]

    @property
    def wlog(self) -> torch.Tensor:
        """The weight as a logical ``[out, in]`` view."""
        return self.weight.t() if self.transposed else self.weight

    def _read_block(self, feature: str, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        return gather_runs(self.wlog, runs, dim=0 if feature == "out" else 1)

    def _write_block(self, feature: str, runs: Sequence[tuple[int, int]], vals: torch.Tensor) -> None:
        w, dim, off = self.wlog, (0 if feature == "out" else 1), 0
        for s, e in runs:
            w.narrow(dim, s, e - s).copy_(vals.narrow(dim, off, e - s))
            off += e - s

    @staticmethod
    def _sync_key(p: torch.Tensor) -> tuple[int, int]:
        return (p._version, p.data_ptr())

    @torch.no_grad()
    def sync_(self, force: bool = False) -> None:
        """Copy blocks changed since the last sync (or all, if ``force``) into the frozen weight."""
        compiling = torch.compiler.is_compiling()
        for i, (blk, (feature, runs)) in enumerate(zip(self.blocks, self.specs)):
            if compiling or force:
                self._write_block(feature, runs, blk.to(self.weight.dtype))
                continue
            key = self._sync_key(blk)
            if key != self._synced[i]:
                self._write_block(feature, runs, blk.to(self.weight.dtype))
                self._synced[i] = key

    def restore_base_(self) -> None:
        """Write the saved base values back into the weight (bit-exact)."""
        with torch.no_grad():
            for i, (feature, runs) in enumerate(self.specs):
                self._write_block(feature, runs, getattr(self, f"base_values_{i}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync_()
        if not torch.is_grad_enabled() or not any(b.requires_grad for b in self.blocks):
            w = self.wlog
            return F.linear(x, w, self.bias)
        return partial_linear(x, self.weight, self.bias, list(self.blocks), self.specs, transposed=self.transposed)

    def extra_repr(self) -> str:
        parts = [f"{f}{list(r)}" for f, r in self.specs]
        return f"in={self.in_features}, out={self.out_features}, conv1d={self.transposed}, blocks={parts}"


def installed(model: nn.Module) -> dict[str, S2Linear]:
    """The S2 wrappers currently installed in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, S2Linear)}


def _validate(
    model: nn.Module,
    by_module: Mapping[str, list[BlockSlice]],
    dtypes: Mapping[str, torch.dtype | None],
    init: Mapping[str, Sequence[torch.Tensor]] | None,
) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name, slices in by_module.items():
        if name not in mods:
            close = [m for m in mods if m.endswith(name.split(".")[-1])][:3]
            raise S2InstallError(
                f"module {name!r} from the plan is not in the model (similar: {close}); "
                "install on the model the plan was built for (the HF model, not a wrapper)"
            )
        mod = mods[name]
        if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
            raise S2InstallError(
                f"module {name!r} is a {type(mod).__name__}; S2 blocks can only be installed on nn.Linear "
                "or transformers Conv1D modules"
            )
        out_f, in_f = _logical_shape(mod)
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


def install(
    model: nn.Module,
    plan_or_slices: S2Plan | Iterable[BlockSlice],
    *,
    master_dtype: torch.dtype | str | None = "auto",
    init: Mapping[str, Sequence[torch.Tensor]] | None = None,
    check_fingerprint: bool = True,
) -> dict[str, S2Linear]:
    """Wrap each planned module in an ``S2Linear`` and freeze every other parameter of ``model``.

    ``master_dtype``: ``"auto"`` = fp32 blocks for bf16/fp16 weights, else the weight dtype; ``None`` =
    the weight dtype; or a dtype. ``init`` optionally gives block values per module (permuted space).
    Everything is validated before the model is touched.
    """
    if installed(model):
        raise S2InstallError("S2 blocks are already installed on this model; call uninstall(model) first")
    if isinstance(plan_or_slices, S2Plan):
        if check_fingerprint:
            plan_or_slices.check_model(model)
        slices = list(plan_or_slices.slices)
    else:
        slices = list(plan_or_slices)
    if not slices:
        raise S2InstallError("the plan has no slices: nothing to train")
    by_module: dict[str, list[BlockSlice]] = {}
    for s in slices:
        by_module.setdefault(s.module, []).append(s)
    dtypes = {}
    all_mods = dict(model.named_modules())
    for name in by_module:
        mod = all_mods.get(name)
        wd = getattr(getattr(mod, "weight", None), "dtype", torch.float32)
        if master_dtype == "auto":
            dtypes[name] = torch.float32 if wd in (torch.bfloat16, torch.float16) else None
        elif master_dtype is None or isinstance(master_dtype, torch.dtype):
            dtypes[name] = master_dtype
        else:
            raise S2InstallError(f"master_dtype={master_dtype!r}: use 'auto', None or a torch dtype")
    mods = _validate(model, by_module, dtypes, init)

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    out: dict[str, S2Linear] = {}
    for name, mod in mods.items():
        wrapper = S2Linear(mod, by_module[name], dtypes[name])
        if init is not None and name in init:
            with torch.no_grad():
                for blk, v in zip(wrapper.blocks, init[name]):
                    blk.copy_(v)
            wrapper.sync_()
        out[name] = wrapper
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in out.items():
        _set_child(model, name, wrapper)
        for blk in wrapper.blocks:
            blk.requires_grad_(True)
    model.__dict__[_STATE_ATTR] = saved
    return out


def uninstall(model: nn.Module, merge: bool = True) -> dict[str, nn.Module]:
    """Put the original modules back: with trained block values (``merge=True``) or the base (bit-exact)."""
    wrappers = installed(model)
    if not wrappers:
        raise S2InstallError("no S2 blocks are installed on this model")
    restored = {}
    for name, w in wrappers.items():
        if merge:
            w.sync_(force=True)
        else:
            w.restore_base_()
        base = w.base_module
        base.weight, base.bias = w.weight, w.bias  # in case the wrapper's params were replaced (e.g. .to())
        _set_child(model, name, base)
        restored[name] = base
    saved = model.__dict__.pop(_STATE_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    return restored


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All trainable block parameters, in module order."""
    return [p for w in installed(model).values() for p in w.blocks]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.blocks.<i>": tensor}`` of the block values (detached, permuted index space)."""
    return {f"{n}.blocks.{i}": p.detach() for n, w in installed(model).items() for i, p in enumerate(w.blocks)}
