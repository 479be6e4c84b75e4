"""The S²FT adapter: per-module delta blocks in the ORIGINAL (unpermuted) index space, and its base checks.

An adapter holds, per touched linear module, the trained rows (feature ``"out"``: a ``(k, in)`` block) or
columns (feature ``"in"``: an ``(out, k)`` block) as fp32 deltas, the original indices they sit at, and hashes
of the base values there, so it applies to any stock copy of the base and refuses any other. Blocks are always
in ``nn.Linear`` orientation ``(out, in)``; GPT-2 ``Conv1D`` is transposed on access (`surgery.linear`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from s2ft_lightning.blocks import read_block
from s2ft_lightning.deltas import DeltaBlocks
from surgery.linear import ExpertLinear, is_conv1d, logical_weight, resolve_linear
from surgery.plan import model_fingerprint

Feature = Literal["in", "out"]


class AdapterError(ValueError):
    """An adapter that is malformed, corrupted, or does not belong to the base it is applied to."""


# ----------------------------------------------------------------------------------------------- tensors
def module_kind(module: torch.nn.Module | ExpertLinear) -> str:
    """``"linear"``, ``"conv1d"`` (weight stored ``[in, out]``) or ``"expert"`` (one expert of a 3-D MoE
    weight); anything else is refused."""
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, ExpertLinear):
        return "expert"
    raise AdapterError(
        f"module of type {type(module).__name__} is not nn.Linear or transformers Conv1D; adapters apply to "
        "stock models only (call s2ft_lightning.layers.uninstall first if S2 wrappers are installed)"
    )


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module | ExpertLinear:
    """The module ``name`` of ``model`` (an `ExpertLinear` for ``"<experts>.<param>[e]"``), or an AdapterError."""
    try:
        return resolve_linear(model, name)
    except AttributeError as e:
        raise AdapterError(f"the model has no module {name!r}; was this adapter made for another model?") from e


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and exact bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class BaseCheck:
    """Hashes of the base values of one block's rows/columns (at ``indices``; ``None`` = the block's own)."""

    dtype: str
    sha256: str  # values in ``dtype``
    sha256_bf16: str  # values rounded to bf16, to accept the same base stored in another dtype
    indices: list[int] | None = None

    @staticmethod
    def of(values: torch.Tensor, indices: list[int] | None = None) -> BaseCheck:
        return BaseCheck(
            dtype=str(values.dtype).removeprefix("torch."),
            sha256=tensor_sha256(values),
            sha256_bf16=tensor_sha256(values.to(torch.bfloat16)),
            indices=indices,
        )

    def matches(self, values: torch.Tensor) -> bool:
        if str(values.dtype).removeprefix("torch.") == self.dtype:
            return tensor_sha256(values) == self.sha256
        return tensor_sha256(values.to(torch.bfloat16)) == self.sha256_bf16


@dataclass
class BlockDelta:
    """One module's trained rows (``"out"``, delta ``(k, in)``) or columns (``"in"``, delta ``(out, k)``)."""

    module: str
    feature: Feature
    indices: list[int]
    delta: torch.Tensor
    base_checks: list[BaseCheck] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.module}.{'rows' if self.feature == 'out' else 'cols'}"


@dataclass
class Adapter:
    """A set of `BlockDelta`s plus what identifies the base they were trained on."""

    blocks: list[BlockDelta]
    base_fingerprint: str
    module_shapes: dict[str, tuple[int, int]]  # logical (out, in)
    module_kinds: dict[str, str]  # "linear" | "conv1d" | "expert"
    base_model: str | None = None
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({b.module for b in self.blocks})

    @property
    def num_params(self) -> int:
        return sum(b.delta.numel() for b in self.blocks)

    def block(self, module: str, feature: str) -> BlockDelta | None:
        for b in self.blocks:
            if b.module == module and b.feature == feature:
                return b
        return None

    @property
    def base_values_sha256(self) -> str:
        """One digest over every block's base checks (a quick identity of the touched base values)."""
        h = hashlib.sha256()
        for b in sorted(self.blocks, key=lambda b: b.key):
            for c in b.base_checks:
                h.update(f"{b.key}:{c.sha256_bf16};".encode())
        return h.hexdigest()[:16]

    def validate(self) -> None:
        """Internal consistency: features, shapes, unique in-range indices, finite fp32 deltas."""
        seen = set()
        for b in self.blocks:
            where = f"adapter block {b.key!r}"
            if b.feature not in ("in", "out"):
                raise AdapterError(f"{where}: feature {b.feature!r} must be 'in' or 'out'")
            if (b.module, b.feature) in seen:
                raise AdapterError(f"{where} appears twice; fuse the blocks instead")
            seen.add((b.module, b.feature))
            if b.module not in self.module_shapes:
                raise AdapterError(f"{where}: no shape recorded for module {b.module!r}")
            out_f, in_f = self.module_shapes[b.module]
            dim = out_f if b.feature == "out" else in_f
            if len(set(b.indices)) != len(b.indices):
                raise AdapterError(f"{where}: indices contain duplicates")
            bad = [i for i in b.indices if not 0 <= i < dim]
            if bad:
                raise AdapterError(
                    f"{where}: index {bad[0]} out of range for {b.feature!r} features of size {dim} "
                    f"(module shape {out_f}x{in_f}); the adapter does not fit this base"
                )
            k = len(b.indices)
            want = (k, in_f) if b.feature == "out" else (out_f, k)
            if tuple(b.delta.shape) != want:
                raise AdapterError(f"{where}: delta shape {tuple(b.delta.shape)} != expected {want}")
            if b.delta.dtype != torch.float32:
                raise AdapterError(f"{where}: delta must be float32, got {b.delta.dtype}")
            if not torch.isfinite(b.delta).all():
                raise AdapterError(f"{where}: delta contains NaN or inf")


def base_block(model: torch.nn.Module, module: str, feature: str, idx: torch.Tensor) -> torch.Tensor:
    return read_block(logical_weight(get_module(model, module)), feature, idx)


def _has_s2_wrappers(model: torch.nn.Module) -> bool:
    return any(isinstance(m, DeltaBlocks) for m in model.modules())


def check_base(model: torch.nn.Module, adapter: Adapter, read=None) -> None:
    """Refuse a model that is not the adapter's base: config fingerprint, module shapes, touched values.

    ``read(module, feature, idx)`` overrides how base values are read (e.g. when other adapters are merged).
    """
    fp = model_fingerprint(model)
    if fp != adapter.base_fingerprint:
        raise AdapterError(
            f"adapter {adapter.name or ''!s} was made for a base with fingerprint {adapter.base_fingerprint} "
            f"but this model has {fp} (different config or parameter shapes"
            + (", or S2 wrappers still installed" if _has_s2_wrappers(model) else "")
            + "); load the matching base model"
        )
    read = read or (lambda m, f, i: base_block(model, m, f, i))
    for mod_name in adapter.modules:
        mod = get_module(model, mod_name)
        kind = module_kind(mod)
        shape = tuple(logical_weight(mod).shape)
        if shape != tuple(adapter.module_shapes[mod_name]) or kind != adapter.module_kinds[mod_name]:
            raise AdapterError(
                f"module {mod_name!r} is a {kind} of shape {shape} but the adapter expects a "
                f"{adapter.module_kinds[mod_name]} of shape {tuple(adapter.module_shapes[mod_name])}"
            )
    for b in adapter.blocks:
        for c in b.base_checks:
            idx = torch.tensor(b.indices if c.indices is None else c.indices, dtype=torch.long)
            if not c.matches(read(b.module, b.feature, idx)):
                raise AdapterError(
                    f"the base weights of {b.module!r} at the adapter's {b.feature!r} indices differ from "
                    "the ones it was trained on (same architecture, other checkpoint?); load the exact base"
                )
