"""S²FT adapters: per-module delta blocks in the ORIGINAL (unpermuted) index space, saved and validated.

An adapter holds, per touched linear module, the trained rows (feature ``"out"``: a ``(k, in)`` block) or
columns (feature ``"in"``: an ``(out, k)`` block) as fp32 deltas ``trained - base``, the original indices
they sit at, and hashes of the base values there, so it applies to any stock copy of the base and refuses
any other. Blocks are always in ``nn.Linear`` orientation ``(out, in)``; GPT-2 ``Conv1D`` is transposed on
access. The directory format (``adapter_config.json`` + ``adapter_model.safetensors``) never uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.plan import S2Plan, model_fingerprint

ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METHOD = "S2FT"

Feature = Literal["in", "out"]


class AdapterError(ValueError):
    """An adapter that is malformed, corrupted, or does not belong to the base it is applied to."""


# ----------------------------------------------------------------------------------------------- tensors
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def module_kind(module: torch.nn.Module) -> str:
    """``"linear"`` or ``"conv1d"`` (weight stored ``[in, out]``); anything else is refused."""
    conv = _conv1d_class()
    if conv is not None and isinstance(module, conv):
        return "conv1d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    raise AdapterError(
        f"module of type {type(module).__name__} is not nn.Linear or transformers Conv1D; adapters apply to "
        "stock models only (call s2ft_lightning.layers.uninstall first if S2 wrappers are installed)"
    )


def logical_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as an ``(out, in)`` tensor (a transposed view for Conv1D, so writes land in place)."""
    return module.weight.t() if module_kind(module) == "conv1d" else module.weight


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise AdapterError(f"the model has no module {name!r}; was this adapter made for another model?") from e


def read_block(w: torch.Tensor, feature: str, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a logical ``(out, in)`` weight for ``"out"``, columns for ``"in"`` (a copy)."""
    return w.index_select(0 if feature == "out" else 1, idx.to(w.device))


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
    module_kinds: dict[str, str]  # "linear" | "conv1d"
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


# ------------------------------------------------------------------------------------------- extraction
def block_delta(
    module: str,
    feature: Feature,
    original: Iterable[int],
    delta: torch.Tensor,
    base: torch.Tensor,
    other_perm: list[int] | None = None,
) -> BlockDelta:
    """One trained block moved to original index space.

    ``delta``/``base`` are the block's update and the base values under it, in trained-position order (rows
    ``(k, in)`` or columns ``(out, k)``, logical orientation); ``base`` in the base dtype. ``other_perm``
    (new -> old) un-permutes the other axis when the module's non-trained axis was permuted too.
    """
    original = [int(i) for i in original]
    axis = 0 if feature == "out" else 1
    if delta.shape != base.shape or delta.shape[axis] != len(original):
        raise AdapterError(
            f"{module}: delta {tuple(delta.shape)} / base block {tuple(base.shape)} do not match "
            f"{len(original)} trained {feature!r} features"
        )
    if other_perm is not None:
        inv = torch.argsort(torch.tensor(other_perm))
        delta, base = delta.index_select(1 - axis, inv), base.index_select(1 - axis, inv)
    base = base.detach().cpu()
    return BlockDelta(module, feature, original, delta.detach().cpu().float().contiguous(), [BaseCheck.of(base)])


def diff_adapter(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    targets: Mapping[str, Mapping[str, Iterable[int]]],
    base_model: str | None = None,
    name: str | None = None,
) -> Adapter:
    """Adapter from two stock models (same architecture), at ``targets[module][feature] = indices``."""
    blocks, shapes, kinds = [], {}, {}
    for mod_name, feats in targets.items():
        mb, mt = get_module(base, mod_name), get_module(tuned, mod_name)
        wb, wt = logical_weight(mb), logical_weight(mt)
        shapes[mod_name], kinds[mod_name] = tuple(wb.shape), module_kind(mb)
        for feature, idx in feats.items():
            idx_t = torch.tensor([int(i) for i in idx], dtype=torch.long)
            base_vals = read_block(wb, feature, idx_t)
            delta = read_block(wt, feature, idx_t).float() - base_vals.float()
            blocks.append(block_delta(mod_name, feature, idx_t.tolist(), delta, base_vals))
    adapter = Adapter(blocks, model_fingerprint(base), shapes, kinds, base_model=base_model, name=name)
    adapter.validate()
    return adapter


def extract_adapter(
    model: torch.nn.Module,
    plan: S2Plan,
    base_model: str | None = None,
    name: str | None = None,
) -> Adapter:
    """Read the trained S2 deltas of an installed (permuted) model into an adapter in original index space.

    The delta is the layer's trained update as is (the fp32 master when there is one); the base checks hash
    the frozen base values under it. Several slices of one module and feature (e.g. GQA runs split over
    slices) become one block.
    """
    from s2ft_lightning.layers import S2Linear

    parts: dict[tuple[str, str], list[BlockDelta]] = {}
    shapes, kinds = {}, {}
    for s in plan.slices:
        try:
            wrapper = model.get_submodule(s.module)
        except AttributeError as e:
            raise AdapterError(f"plan module {s.module!r} is not in the model") from e
        if not isinstance(wrapper, S2Linear):
            raise AdapterError(
                f"module {s.module!r} is a {type(wrapper).__name__}, not an installed S2Linear; extract from "
                "the model prepared with this plan (before uninstall), or use diff_adapter on plain models"
            )
        match = [i for i, t in enumerate(wrapper.slices) if t.feature == s.feature and list(t.runs) == list(s.runs)]
        if not match:
            raise AdapterError(f"the S2 wrapper of {s.module!r} has no block for slice runs {s.runs}; wrong plan?")
        i = match[0]
        shapes[s.module] = (wrapper.out_features, wrapper.in_features)
        kinds[s.module] = "conv1d" if wrapper.transposed else "linear"
        delta, base = wrapper.deltas[i], wrapper.base_block(i)
        parts.setdefault((s.module, s.feature), []).append(block_delta(s.module, s.feature, s.original, delta, base))
    blocks = []
    for (module, feature), bs in parts.items():
        if len(bs) == 1:
            blocks.append(bs[0])
            continue
        axis = 0 if feature == "out" else 1
        blocks.append(
            BlockDelta(
                module,
                feature,
                [i for b in bs for i in b.indices],
                torch.cat([b.delta for b in bs], dim=axis),
                [BaseCheck(c.dtype, c.sha256, c.sha256_bf16, b.indices) for b in bs for c in b.base_checks],
            )
        )
    adapter = Adapter(blocks, plan.fingerprint, shapes, kinds, base_model=base_model, name=name)
    adapter.metadata["plan_settings"] = {k: v for k, v in plan.settings.items() if k not in ("couplings", "tied")}
    adapter.validate()
    return adapter


# ---------------------------------------------------------------------------------------- base checking
def base_block(model: torch.nn.Module, module: str, feature: str, idx: torch.Tensor) -> torch.Tensor:
    return read_block(logical_weight(get_module(model, module)), feature, idx)


def _has_s2_wrappers(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "S2Linear" for m in model.modules())


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


# ------------------------------------------------------------------------------------------ directories
def _config_dict(adapter: Adapter) -> dict:
    from s2ft_lightning._version import __version__

    modules: dict[str, Any] = {}
    for b in adapter.blocks:
        entry = modules.setdefault(
            b.module,
            {
                "kind": adapter.module_kinds[b.module],
                "shape": list(adapter.module_shapes[b.module]),
                "blocks": {},
            },
        )
        entry["blocks"][b.feature] = {
            "indices": list(b.indices),
            "delta_sha256": tensor_sha256(b.delta),
            "base_checks": [vars(c).copy() for c in b.base_checks],
        }
    return {
        "method": METHOD,
        "format_version": ADAPTER_FORMAT_VERSION,
        "package_version": __version__,
        "name": adapter.name,
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "base_values_sha256": adapter.base_values_sha256,
        "dtype": "float32",
        "num_params": adapter.num_params,
        "modules": modules,
        "metadata": adapter.metadata,
    }


def _atomic_dir_write(path: Path, write) -> None:
    """Build the directory under a temp name, then rename it into place (old one replaced only on success)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _write_adapter_files(adapter: Adapter, d: Path) -> None:
    from safetensors.torch import save_file

    adapter.validate()
    (d / CONFIG_NAME).write_text(json.dumps(_config_dict(adapter), indent=1))
    save_file(
        {b.key: b.delta.contiguous() for b in adapter.blocks},
        str(d / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> None:
    """Write one adapter directory atomically."""
    _atomic_dir_write(Path(path), lambda d: _write_adapter_files(adapter, d))


def save_adapters(adapters: Mapping[str, Adapter], path: str | os.PathLike) -> None:
    """Write several named adapters as subdirectories of ``path`` (atomically, as one directory)."""
    for n in adapters:
        if not n or "/" in n or n.startswith("."):
            raise AdapterError(f"adapter name {n!r} is not a valid directory name")

    def write(d: Path) -> None:
        for n, a in adapters.items():
            (d / n).mkdir()
            _write_adapter_files(a, d / n)

    _atomic_dir_write(Path(path), write)


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Names of the adapters stored as subdirectories of ``path`` ("" when ``path`` itself is one)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return [""]
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    return sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())


def load_adapter(path: str | os.PathLike, name: str | None = None) -> Adapter:
    """Load and validate an adapter directory (or the subdirectory ``name`` of a multi-adapter one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) / name if name else Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = "" if path.is_dir() else " (the directory does not exist)"
            raise AdapterError(f"adapter file {str(p)!r} is missing{hint}; is {str(path)!r} an S2FT adapter?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{str(cfg_path)!r} is not valid JSON (truncated or corrupted?): {e}") from e
    if not isinstance(cfg, dict) or cfg.get("method") != METHOD:
        raise AdapterError(f"{str(cfg_path)!r} is not an S2FT adapter config (method must be {METHOD!r})")
    if cfg.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"adapter format_version {cfg.get('format_version')} is not supported (expected "
            f"{ADAPTER_FORMAT_VERSION}); re-export the adapter with this version of s2ft-lightning"
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{str(w_path)!r} cannot be read (truncated or corrupted safetensors?): {e}") from e
    try:
        blocks, shapes, kinds, keys = [], {}, {}, set()
        for mod_name, entry in cfg["modules"].items():
            shapes[mod_name] = tuple(int(x) for x in entry["shape"])
            kinds[mod_name] = str(entry["kind"])
            for feature, be in entry["blocks"].items():
                b = BlockDelta(mod_name, feature, [int(i) for i in be["indices"]], torch.empty(0))
                keys.add(b.key)
                if b.key not in tensors:
                    raise AdapterError(f"{str(w_path)!r} lacks tensor {b.key!r} listed in the config")
                b.delta = tensors[b.key].float()
                if tensor_sha256(tensors[b.key]) != be["delta_sha256"]:
                    raise AdapterError(f"tensor {b.key!r} in {str(w_path)!r} does not match its checksum (corrupted)")
                b.base_checks = [BaseCheck(**c) for c in be["base_checks"]]
                blocks.append(b)
        extra = set(tensors) - keys
        if extra:
            raise AdapterError(f"{str(w_path)!r} holds tensors not in the config: {sorted(extra)[:3]}")
        adapter = Adapter(
            blocks,
            str(cfg["base_fingerprint"]),
            shapes,
            kinds,
            base_model=cfg.get("base_model"),
            name=cfg.get("name") or name,
            metadata=dict(cfg.get("metadata") or {}),
        )
    except AdapterError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"malformed adapter config {str(cfg_path)!r}: {type(e).__name__}: {e}") from e
    adapter.validate()
    return adapter


def load_adapters(path: str | os.PathLike) -> dict[str, Adapter]:
    """All adapters of a directory by name (a single-adapter directory: its config name or "default")."""
    names = list_adapters(path)
    if names == [""]:
        a = load_adapter(path)
        return {a.name or "default": a}
    if not names:
        raise AdapterError(f"{str(path)!r} holds no adapter (no {CONFIG_NAME} in it or its subdirectories)")
    return {n: load_adapter(path, n) for n in names}
